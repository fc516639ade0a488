"""A device in a shadow rollout's cohort downloads the candidate's files; a device outside it still
cannot fetch them (the same 404 as for a file that does not exist)."""

from __future__ import annotations

from pathlib import Path

from tests.server_fixtures import MODEL, publisher, running_server, server_config  # noqa: F401


def test_only_the_shadow_cohort_may_download_the_candidates_files(tmp_path: Path, publisher) -> None:  # noqa: F811
    with running_server(server_config(tmp_path / "data", None, publisher)) as server:
        server.publish_ok(publisher, 1, channel="stable")
        server.publish_ok(publisher, 2)
        devices = [server.enroll() for _ in range(12)]
        response = server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollout",
                                json={"version": 2, "percent": 50, "mode": "shadow", "sample_rate": 0.5})
        assert response.status_code == 200, response.text
        listed = server.admin("GET", "/v1/models").json()[0]["channels"]["stable"]["rollout"]
        assert listed["gates"] == response.json()["rollout"]["gates"] and listed["gates"]["min_predictions"] == 200
        inside, outside = [], []
        for device in devices:
            view = device.assignment().json()
            assert view["version"] == 1
            (inside if view.get("shadow") else outside).append(device)
        assert inside and outside, "12 devices at 50 % should fall on both sides"

        shadow = inside[0].assignment().json()["shadow"]
        assert shadow["version"] == 2
        manifest_url = shadow["files"]["manifest.json"]["url"]
        got = server.client.get(manifest_url, headers=inside[0].headers)
        assert got.status_code == 200 and b'"version": 2' in got.content

        refused = server.client.get(manifest_url, headers=outside[0].headers)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "unknown_artifact"

        # Once the shadow rollout is rolled back, the cohort loses access as well.
        assert server.admin("POST", f"/v1/models/{MODEL}/channels/stable/rollback").status_code == 200
        server.services.devices.invalidate()
        assert server.client.get(manifest_url, headers=inside[0].headers).status_code == 404
