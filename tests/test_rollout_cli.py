"""An operator steps a rollout from a shell: `sync-server rollout ...` and `sync-server quality ...`
against a running server, with one clear line when a quality gate or a request is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync_server.cli import main
from tests.server_fixtures import ADMIN_TOKEN, MODEL, live_server, publisher, server_config  # noqa: F401


def _run(capsys: pytest.CaptureFixture[str], url: str, *words: str) -> tuple[int, str, str]:
    code = main([*words, "--server", url, "--token", ADMIN_TOKEN])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_an_operator_takes_a_version_from_shadow_to_the_channel(tmp_path: Path, publisher, capsys) -> None:  # noqa: F811
    config = server_config(tmp_path / "data", None, publisher)
    with live_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        server.publish_ok(publisher, 2)
        url = server.url

        code, out, _ = _run(capsys, url, "rollout", "start", MODEL, "2", "--percent", "50", "--mode", "shadow", "--sample-rate", "0.2")
        assert code == 0
        assert out.strip() == f"{MODEL} channel stable: version 1, shadow of version 2 to 50 % (sample rate 0.2), active"

        # No telemetry yet: the gates wait for data, and moving to canary is refused with the reason.
        code, out, _ = _run(capsys, url, "rollout", "gates", MODEL)
        assert code == 0 and out.startswith("version 2 (shadow): ") and "not_enough_data" in out
        code, out, err = _run(capsys, url, "rollout", "start", MODEL, "2", "--percent", "20")
        assert code == 2 and out == ""
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "predictions" in err

        code, out, _ = _run(capsys, url, "rollout", "start", MODEL, "2", "--percent", "20", "--force")
        assert code == 0 and "canary of version 2 to 20 %, active" in out

        code, out, _ = _run(capsys, url, "rollout", "pause", MODEL, "--reason", "checking a complaint")
        assert code == 0 and out.splitlines() == [
            f"{MODEL} channel stable: version 1, canary of version 2 to 20 %, paused", "  reason: checking a complaint"]
        assert _run(capsys, url, "rollout", "resume", MODEL)[1].endswith("active\n")
        code, out, _ = _run(capsys, url, "rollout", "promote", MODEL, "--force")
        assert code == 0 and out.strip() == f"{MODEL} channel stable: version 2, no rollout"
        code, out, _ = _run(capsys, url, "rollout", "rollback", MODEL)
        assert code == 0 and out.strip() == f"{MODEL} channel stable: version 1, no rollout"

        code, out, _ = _run(capsys, url, "quality", MODEL, "--since", "3600")
        assert code == 0 and out.splitlines()[1].split()[:3] == ["version", "mode", "devices"]
        assert "(no telemetry yet)" in out


def test_bad_rollout_commands_say_what_is_wrong(tmp_path: Path, publisher, capsys) -> None:  # noqa: F811
    config = server_config(tmp_path / "data", None, publisher)
    with live_server(config) as server:
        server.publish_ok(publisher, 1, channel="stable")
        code, _, err = _run(capsys, server.url, "rollout", "start", MODEL, "2")
        assert code == 2 and err.strip() == "error: rollout start needs MODEL VERSION and --percent P"
        code, _, err = _run(capsys, server.url, "rollout", "promote", MODEL)
        assert code == 2 and err.strip() == "error: channel 'stable' has no rollout in progress"
        code, _, err = _run(capsys, server.url, "rollout", "show", "no-such-model")
        assert code == 2 and "no-such-model" in err and len(err.strip().splitlines()) == 1
