"""The over-the-air demo: a sync server, an enrolled `edge-agent`, and a second version published
while an app keeps classifying through the agent.

    python -m edge_runtime.agent.demo --workdir demo-output      (after `edge-demo` made its bundle)

`run_agent_demo(work)` uses what `edge-demo` left in `work` (bundle-int8/, its TF Serving version in
serving/, keys/, samples/),
runs every step as the command a person would type (printed before it runs), and writes its own
files under `work/ota/`. Version 2 is the same weights signed as version 2: a real release would be
retrained, but the path to the kiosk is the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable

#: Predictions a quality gate needs in the demo (the server's default, 200, suits a fleet, not one kiosk).
DEMO_GATE_PREDICTIONS = 30
#: (console script, module) of the commands the demo runs.
_COMMANDS = {"sync-server": "sync_server", "edge-agent": "edge_runtime.agent"}


def run_agent_demo(work: Path, *, seconds_after: float = 2.0, out: Callable[[str], None] = print,
                   announce: Callable[[str], None] | None = None, keep_serving: bool = False) -> int:
    """Run the demo in `work`; returns 0 when the agent switched with no failed request and version 3
    went from shadow to canary. `announce(title)` heads the shadow part; `keep_serving` leaves the
    server (and its dashboard) and the agent running until Ctrl-C."""
    work = Path(work)
    bundle, keys = work / "bundle-int8", work / "keys"
    model = _served_model(work, bundle)  # the TF Serving version edge-convert wrote with the bundle: what gets published
    photos = sorted(p for p in (work / "samples").glob("*.jpg") if _is_photo(p))
    for needed in (bundle / "manifest.json", model / "saved_model.pb", keys / "publisher"):
        if not needed.is_file():
            out(f"edge-agent demo: {needed} is missing: run `edge-demo` first")
            return 2
    ota = work / "ota"
    shutil.rmtree(ota, ignore_errors=True)
    ota.mkdir(parents=True)
    second = _second_version(bundle, keys / "publisher", ota / "bundle-int8-v2")
    name = json.loads((bundle / "manifest.json").read_text())["name"]

    port, agent_port = _free_port(), _free_port()
    url = f"http://127.0.0.1:{port}"
    server_env = {  # no admin token given: the server generates one into DATA/admin-token, which the commands read
        "SYNC_SERVER_DATA_DIR": str(ota / "sync-server"),
        "SYNC_SERVER_ENROLLMENT_SECRET": secrets.token_urlsafe(24),
        "SYNC_SERVER_EMBEDDED_PRELOAD": "off",
        "SYNC_SERVER_LOG_LEVEL": "warning",
    }
    secret = server_env["SYNC_SERVER_ENROLLMENT_SECRET"]
    device_env = {"EDGE_CLASSIFY_HOME": str(ota / "kiosk")}
    server = agent = None
    try:
        server = _start(["sync-server", "serve", "--port", str(port), "--publisher-keys", keys / "publisher.pub",
                         "--gate-min-predictions", str(DEMO_GATE_PREDICTIONS)],
                        server_env, ota / "sync-server.log", out)
        _wait(lambda: _get(url + "/readyz") is not None, 60, "the sync server to start")
        publish = ["sync-server", "publish", None, "--saved-model", model, "--channel", "stable", "--server", url]
        if _run([a if a is not None else bundle for a in publish], server_env, out) != 0:
            return 2
        if _run(["edge-agent", "enroll", "--server", url, "--secret", secret, "--model", name, "--name", "demo-kiosk",
                 "--public-key", keys / "publisher.pub"], device_env, out, hide=secret) != 0:
            return 2
        agent = _start(["edge-agent", "run", "--port", str(agent_port), "--poll-interval", "5", "--telemetry-period", "2"],
                       device_env, ota / "edge-agent.log", out)
        local = f"http://127.0.0.1:{agent_port}"
        _wait(lambda: (_get(local + "/healthz") or {}).get("status") == "ok", 60, "the agent to serve version 1")

        out(f"    an app classifies through {local}/classify while version 2 is published:")
        answers: list[tuple[float, int, dict]] = []
        stop = threading.Event()
        client = threading.Thread(target=_keep_classifying, args=(local, photos, answers, stop), daemon=True)
        client.start()
        time.sleep(1.5)
        out("    (version 2 is the same weights signed as version 2 with the publisher key: a real release is retrained,"
            " but it travels the same way)")
        published = time.monotonic()
        if _run([a if a is not None else second for a in publish], server_env, out) != 0:
            return 2
        _wait(lambda: answers and (answers[-1][2].get("model") or {}).get("version") == 2, 60, "answers from version 2")
        time.sleep(seconds_after)
        stop.set()
        client.join(10)
        _show_answers(answers, out)
        failed = [a for a in answers if a[1] != 200]
        first_v2 = next(t for t, _, body in answers if (body.get("model") or {}).get("version") == 2)
        slowest = max(body.get("latency_ms", 0) for _, _, body in answers)
        out(f"    {len(answers)} photos classified during the update, {len(failed)} failed; version 2 answered "
            f"{first_v2 - published:.1f} s after the publish command started; slowest answer {slowest:.0f} ms")
        _run(["edge-agent", "status"], device_env, out)
        if failed:
            return 1
        if announce is not None:
            announce("shadow, then canary: version 3 runs beside version 2 on the kiosk before it serves anyone")
        status = _shadow_then_canary(url, local, name, bundle, model, keys, ota, photos, server_env, out)
        if status == 0 and not keep_serving:
            out("    (the demo stops its server and agent now: `bash scripts/demo.sh --serve` keeps them running for the dashboard)")
        if status == 0 and keep_serving:
            out("    the server and the agent keep running; Ctrl-C stops them")
            try:
                while server.poll() is None:
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return status
    finally:
        for process in (agent, server):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()


def _shadow_then_canary(url: str, local: str, name: str, bundle: Path, model: Path, keys: Path, ota: Path,
                        photos: list[Path], server_env: dict[str, str], out: Callable[[str], None]) -> int:
    """Publish version 3 without a channel, run it in shadow on the kiosk while the app classifies,
    move it to canary once its shadow figures pass the gates, and show the figures and the dashboard."""
    third = _second_version(bundle, keys / "publisher", ota / "bundle-int8-v3", version=3)
    server = ["--server", url]
    if _run(["sync-server", "publish", third, "--saved-model", model, *server], server_env, out) != 0:
        return 2
    if _run(["sync-server", "rollout", "start", name, "3", "--percent", "100", "--mode", "shadow", "--sample-rate", "1",
             *server], server_env, out) != 0:
        return 2
    token = (ota / "sync-server" / "admin-token").read_text().strip()
    out(f"    the app keeps classifying; the kiosk answers with version 2 and runs version 3 on each photo off the request "
        f"path, until {DEMO_GATE_PREDICTIONS} shadow answers have reached the server")
    answers: list[tuple[float, int, dict]] = []
    stop = threading.Event()
    client = threading.Thread(target=_keep_classifying, args=(local, photos, answers, stop), daemon=True)
    client.start()
    try:
        _wait(lambda: _shadow_predictions(url, name, token) >= DEMO_GATE_PREDICTIONS, 120, "shadow reports of version 3")
    finally:
        stop.set()
        client.join(10)
    served = {(body.get("model") or {}).get("version") for _, status, body in answers if status == 200}
    failed = [a for a in answers if a[1] != 200]
    out(f"    {len(answers)} photos classified meanwhile, {len(failed)} failed, answered by version "
        f"{', '.join(str(v) for v in sorted(served)) or '-'}")
    _run(["sync-server", "rollout", "gates", name, *server], server_env, out)
    if _run(["sync-server", "rollout", "start", name, "3", "--percent", "20", *server], server_env, out) != 0:
        return 1
    _run(["sync-server", "quality", name, *server], server_env, out)
    out(f"    the fleet dashboard: {url}/dashboard (log in with the admin token in {ota / 'sync-server' / 'admin-token'})")
    return 0 if not failed else 1


def _shadow_predictions(url: str, name: str, token: str) -> int:
    answer = _get(f"{url}/v1/models/{name}/quality?mode=shadow", token) or {}
    return sum(v.get("predictions") or 0 for v in answer.get("versions") or [] if v.get("version") == 3)


def _served_model(work: Path, bundle: Path) -> Path:
    """The SavedModel published with the bundle (and its re-signed versions 2 and 3): the TF Serving version
    its manifest records (work/serving/NAME/VERSION), else work/model for a bundle converted without one."""
    try:
        serving = json.loads((bundle / "manifest.json").read_text()).get("serving") or {}
    except (OSError, ValueError):
        serving = {}
    if serving.get("name") and serving.get("version"):
        return work / "serving" / str(serving["name"]) / str(serving["version"])
    return work / "model"


def _second_version(bundle: Path, private_key: Path, target: Path, *, version: int | None = None) -> Path:
    from converter import read_bundle, write_bundle

    first = read_bundle(bundle, None, require_signature=False)
    manifest = dataclasses.replace(first.manifest, version=version or first.manifest.version + 1)
    return write_bundle(target, first.read_model(), manifest, sign_key=private_key, overwrite=True)


def _keep_classifying(local: str, photos: list[Path], answers: list, stop: threading.Event) -> None:
    i = 0
    while not stop.is_set():
        photo = photos[i % len(photos)]
        request = urllib.request.Request(local + "/classify", data=photo.read_bytes(), method="POST",
                                         headers={"X-Filename": photo.name, "Content-Type": "application/octet-stream"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                answers.append((time.monotonic(), response.status, json.loads(response.read())))
        except urllib.error.HTTPError as exc:
            answers.append((time.monotonic(), exc.code, json.loads(exc.read() or b"{}")))
        except OSError as exc:
            answers.append((time.monotonic(), 0, {"error": {"message": str(exc)}}))
        i += 1
        time.sleep(0.1)


def _show_answers(answers: list, out: Callable[[str], None]) -> None:
    """One line per version change and a few around it: enough to see the switch happen."""
    shown = set()
    versions = [(body.get("model") or {}).get("version") for _, _, body in answers]
    for i, (_, status, body) in enumerate(answers):
        near_change = any(0 <= i - j <= 1 or 0 <= j - i <= 1 for j in range(1, len(versions)) if versions[j] != versions[j - 1])
        if i < 2 or i >= len(answers) - 1 or near_change:
            if i - 1 not in shown and shown:
                out("      ...")
            model = body.get("model") or {}
            what = f"{body.get('label')} {body.get('score', 0):.2f}" if status == 200 else f"HTTP {status} {body.get('error')}"
            out(f"      {body.get('path') or '?':<22} -> {what:<16} ({model.get('name')} v{model.get('version')}, "
                f"{body.get('latency_ms', 0):.0f} ms)")
            shown.add(i)


# --- processes ---------------------------------------------------------------------------------------------


def _argv(words: list) -> tuple[list[str], str]:
    words = [str(w) for w in words]
    script = Path(sys.executable).parent / words[0]
    shown = " ".join(shlex.quote(w) for w in words)
    if script.exists():
        return [str(script), *words[1:]], shown
    return [sys.executable, "-m", _COMMANDS[words[0]], *words[1:]], shown


def _run(words: list, env: dict[str, str], out: Callable[[str], None], hide: str | None = None) -> int:
    argv, shown = _argv(words)
    out(f"    $ {_env_prefix(env)}{shown.replace(hide, '***') if hide else shown}")
    completed = subprocess.run(argv, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in completed.stdout.splitlines():
        if not line.startswith(("I0000", "W0000", "E0000", "WARNING: All log")):
            out(f"      {line}")
    return completed.returncode


def _start(words: list, env: dict[str, str], log: Path, out: Callable[[str], None]) -> subprocess.Popen:
    argv, shown = _argv(words)
    out(f"    $ {_env_prefix(env)}{shown} &        (log: {log})")
    return subprocess.Popen(argv, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env}, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _env_prefix(env: dict[str, str]) -> str:
    shown = {k: v for k, v in env.items() if k in ("EDGE_CLASSIFY_HOME", "SYNC_SERVER_DATA_DIR")}
    return "".join(f"{k}={shlex.quote(v)} " for k, v in shown.items())


def _get(url: str, token: str | None = None) -> dict | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"edge-agent demo: timed out waiting for {what}")
        time.sleep(0.1)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _is_photo(path: Path) -> bool:
    """The demo's good sample photos (edge-demo also leaves two bad ones there on purpose)."""
    from preprocessing import InvalidImageError, load_image

    try:
        load_image(path)
    except InvalidImageError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_runtime.agent.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"), help="what edge-demo made (default: %(default)s)")
    parser.add_argument("--serve", action="store_true", help="keep the server, its dashboard and the agent running at the end")
    args = parser.parse_args(argv)
    return run_agent_demo(args.workdir, keep_serving=args.serve)


if __name__ == "__main__":
    raise SystemExit(main())
