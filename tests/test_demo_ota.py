"""The demo's over-the-air part (README's first command, steps 6 and 7) as a user runs it: a real
sync-server and edge-agent, a second version switched to while an app classifies, then a third run
in shadow, moved to canary by its gates, and the drift figures and the dashboard's address at the end."""

from __future__ import annotations

import shutil
from pathlib import Path

from edge_runtime.agent.demo import run_agent_demo
from tests.baseline_fixtures import validated_bundle  # noqa: F401  (fixture)


def test_the_demo_switches_versions_then_takes_a_third_from_shadow_to_canary(validated_bundle, tiny_saved_model,  # noqa: F811
                                                                             demo_dataset, tmp_path):
    work = tmp_path / "demo-output"
    shutil.copytree(tiny_saved_model, work / "model")
    shutil.copytree(validated_bundle.bundle, work / "bundle-int8")
    (work / "keys").mkdir()
    shutil.copy(validated_bundle.private_key, work / "keys" / "publisher")
    shutil.copy(validated_bundle.public_key, work / "keys" / "publisher.pub")
    (work / "samples").mkdir()
    for photo in sorted((demo_dataset / "test").rglob("*.jpg"))[:6]:
        shutil.copy(photo, work / "samples" / f"{photo.parent.name}-{photo.name}")
    (work / "samples" / "not-a-photo.jpg").write_bytes(b"this is not a photo")  # the demo skips its bad samples

    lines: list[str] = []
    status = run_agent_demo(work, seconds_after=0.5, out=lines.append)
    text = "\n".join(lines)
    assert status == 0, text[-4000:]

    switch = next(line for line in lines if "photos classified during the update" in line)
    assert ", 0 failed;" in switch
    assert any(line.strip() == "shop channel stable: version 2, shadow of version 3 to 100 % (sample rate 1), active" for line in lines)
    meanwhile = next(line for line in lines if "photos classified meanwhile" in line)
    assert meanwhile.endswith("0 failed, answered by version 2"), "the shadow never answers a request"
    assert "quality gates met for version 3 (shadow)" in text
    assert any(line.strip() == "shop channel stable: version 2, canary of version 3 to 20 %, active" for line in lines)
    rows = {tuple(line.split()[:2]): line.split() for line in lines if line.strip().startswith(("2 serving", "3 shadow"))}
    assert int(rows[("3", "shadow")][2]) == 1 and int(rows[("3", "shadow")][3]) >= 30, "the kiosk's shadow answers reached the server"
    assert rows[("3", "shadow")][7] == "100.0%", "the same weights agree with themselves"
    assert lines[-2].startswith("    the fleet dashboard: http://127.0.0.1:") and lines[-2].endswith("/ota/sync-server/admin-token)")
