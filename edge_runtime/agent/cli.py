"""`edge-agent`: enrol this device, run the agent, show where it stands.

    edge-agent enroll --server URL --secret SECRET [--model NAME] [--channel C] [--name N] [--public-key KEY]
    edge-agent run [--port P] [--host H] [--poll-interval S] [--no-push] [--policy availability|resource] ...
    edge-agent status [--json]
    edge-agent samples [--json] [--dir DIR]        low-confidence photos kept by `run --keep-low-confidence`
    edge-agent samples export DEST [--since WHEN]  copy them into DEST/<predicted label>/ (+ manifest.jsonl)
    edge-agent path

Every command takes --home DIR (default `$EDGE_CLASSIFY_HOME`, the store `edge-classify` uses).
Exit status: 0 on success, 2 for a usage error, an unreachable or refusing server, or a device that
is not enrolled (always one line on stderr, never a traceback); 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Sequence

from .._cli import OneLineParser
from ..errors import EdgeRuntimeError

EXIT_OK, EXIT_ERROR = 0, 2
SECRET_ENV = "EDGE_AGENT_ENROLLMENT_SECRET"




def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `edge-agent`; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(args_list)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_ERROR
        return int(args.run(args) or EXIT_OK)
    except EdgeRuntimeError as exc:
        print(f"edge-agent: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except ValueError as exc:  # a bad option value caught by the options' checks
        print(f"edge-agent: error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(f"edge-agent: {_one_line(exc.strerror or str(exc))}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EXIT_ERROR
    except SystemExit as exc:  # argparse's --help and usage errors: return, don't exit, when called in-process
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _parser() -> OneLineParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, help="the device's model store (default: $EDGE_CLASSIFY_HOME)")

    parser = OneLineParser(prog="edge-agent", description="Keep this device on the model its sync server assigns, with zero downtime.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)

    enroll = sub.add_parser("enroll", parents=[common], help="enrol this device with a sync server (once)")
    enroll.add_argument("--server", required=True, metavar="URL", help="the sync server, e.g. http://sync.shop.lan:8080")
    enroll.add_argument("--secret", default=os.environ.get(SECRET_ENV), metavar="SECRET",
                        help=f"the server's enrolment secret (or ${SECRET_ENV})")
    enroll.add_argument("--model", metavar="NAME", help="the model this device runs (default: the installed one)")
    enroll.add_argument("--channel", metavar="NAME", help="channel to follow (default: stable)")
    enroll.add_argument("--name", metavar="NAME", help="a name for people, e.g. kiosk-12")
    enroll.add_argument("--public-key", type=Path, metavar="KEY", help="the publisher's public key to pin (copied to HOME/trusted.pub)")
    enroll.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per try (default 10)")
    enroll.add_argument("--force", action="store_true", help="enrol again, replacing the stored identity")
    enroll.set_defaults(run=_enroll)

    run = sub.add_parser("run", parents=[common], help="run the agent (until SIGTERM or Ctrl-C)")
    run.add_argument("--host", default=None, help="address of the local API (default 127.0.0.1: this device only)")
    run.add_argument("--port", type=int, default=None, help="port of the local API (default 8765; 0: any free port)")
    run.add_argument("--poll-interval", type=float, default=None, metavar="S", help="seconds between polls while the push stream is down (default 30)")
    run.add_argument("--no-push", action="store_true", help="poll only; for networks that cut long-lived connections")
    run.add_argument("--policy", choices=("availability", "resource"), default=None,
                     help="availability (default): load the new version before unloading the old; resource: the reverse")
    run.add_argument("--fallback", choices=("auto", "never", "always"), default=None, help="ask the server's full model (default auto: when unsure)")
    run.add_argument("--threshold", type=float, default=None, help="ask the server below this top score (default: the model's)")
    run.add_argument("--threads", type=int, default=None, help="interpreter threads")
    run.add_argument("--telemetry-period", type=float, default=None, metavar="S", help="seconds per telemetry report (default 60)")
    run.add_argument("--backoff-max", type=float, default=None, metavar="S", help="longest wait between retries (default 60)")
    run.add_argument("--max-error-rate", type=float, default=None, metavar="F",
                     help="roll a new version back above this share of failed requests (default 0.2)")
    run.add_argument("--min-requests", type=int, default=None, metavar="N", help="requests before the error rate counts (default 20)")
    run.add_argument("--max-crashes", type=int, default=None, metavar="N", help="roll back after this many crashes on a new version (default 2)")
    run.add_argument("--probation", type=float, default=None, metavar="S", help="seconds a new version is watched (default 600)")
    run.add_argument("--crash-retry", type=float, default=None, metavar="S",
                     help="try a version refused for crashes again after S seconds, doubling each time (default 1800)")
    run.add_argument("--public-key", type=Path, default=None, help="publisher key (default: $EDGE_CLASSIFY_PUBLIC_KEY or HOME/trusted.pub)")
    run.add_argument("--keep-low-confidence", default=None, metavar="DIR|on",
                     help="opt-in: keep photos answered below the threshold, for training (on: HOME/agent/samples)")
    run.add_argument("--keep-max-mb", type=float, default=None, metavar="MB",
                     help="disk for kept photos; the oldest go first (default 100)")
    run.add_argument("--shadow", action=argparse.BooleanOptionalAction, default=True,
                     help="run the version the server names as shadow beside the served one, off the request path (default on)")
    run.add_argument("--shadow-min-free-mb", type=float, default=None, metavar="MB",
                     help="install a shadow version only if the disk keeps this much free after it (default 64)")
    run.add_argument("--shadow-max-model-mb", type=float, default=None, metavar="MB",
                     help="the largest model this device loads as a second, shadow model (default 256)")
    run.add_argument("--shadow-queue", type=int, default=None, metavar="N",
                     help="sampled photos waiting for the shadow model; beyond it they are dropped, counted (default 16)")
    run.add_argument("--verbose", "-v", action="store_true", help="log every step")
    run.set_defaults(run=_run)

    status = sub.add_parser("status", parents=[common], help="the device, its server, current and previous versions")
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.set_defaults(run=_status)

    samples = sub.add_parser("samples", parents=[common], help="the low-confidence photos this device kept (list, export)")
    samples.add_argument("--dir", type=Path, default=None, help="the samples folder (default: where the agent keeps them)")
    samples.add_argument("--json", action="store_true", help="print one JSON object")
    samples.set_defaults(run=_samples)
    samples_sub = samples.add_subparsers(dest="samples_command", metavar="ACTION", parser_class=OneLineParser)
    export = samples_sub.add_parser("export", help="copy them into DEST/<predicted label>/ with a manifest.jsonl")
    export.add_argument("dest", type=Path, metavar="DEST")
    export.add_argument("--since", default=None, metavar="WHEN", help="only those kept since: 2026-12-01, 2026-12-01T09:30, 24h, 7d")
    export.add_argument("--dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # also after `export`
    export.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    export.set_defaults(run=_samples_export)

    path = sub.add_parser("path", parents=[common], help="print where the device's files are")
    path.set_defaults(run=_path)
    return parser


# --- commands ----------------------------------------------------------------------------------


def _enroll(args: argparse.Namespace) -> int:
    from .config import AgentPaths
    from .enroll import enroll

    if not args.secret:
        raise SystemExit(_usage_error("edge-agent enroll", f"give the enrolment secret with --secret or ${SECRET_ENV}"))
    paths = AgentPaths.at(args.home)
    identity = enroll(paths, args.server, args.secret, model=args.model, channel=args.channel, name=args.name,
                      public_key=args.public_key, force=args.force, timeout_s=args.timeout)
    who = identity.device_id + (f" ({identity.name})" if identity.name else "")
    print(f"enrolled {who} with {identity.server}: model {identity.model}, channel {identity.channel}")
    print(f"identity in {paths.identity}")
    key = paths.public_key()
    if not key.is_file():
        print(f"edge-agent: note: no trusted publisher key at {key}: copy it there (or pass --public-key) before `edge-agent run`",
              file=sys.stderr)
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    from .daemon import Agent
    from .options import AgentOptions, HealthPolicy, RetryOptions, ServeOptions, ShadowOptions

    _configure_logging(args.verbose)

    def given(*pairs: tuple[str, Any]) -> dict[str, Any]:
        return {name: value for name, value in pairs if value is not None}

    serve = ServeOptions(**given(("host", args.host), ("port", args.port)))
    health = HealthPolicy(**given(("max_error_rate", args.max_error_rate), ("min_requests", args.min_requests),
                                  ("max_crashes", args.max_crashes), ("probation_s", args.probation),
                                  ("crash_retry_s", args.crash_retry)))
    retry = RetryOptions(**given(("max_s", args.backoff_max)))
    values: dict[str, Any] = {"home": args.home, "serve": serve, "health": health, "retry": retry, "push": not args.no_push,
                              "public_key": args.public_key}
    for option, value in (("poll_interval_s", args.poll_interval), ("policy", args.policy), ("fallback", args.fallback),
                          ("fallback_threshold", args.threshold), ("threads", args.threads),
                          ("telemetry_period_s", args.telemetry_period)):
        if value is not None:
            values[option] = value
    values["shadow"] = ShadowOptions(enabled=args.shadow, **given(
        ("min_free_bytes", None if args.shadow_min_free_mb is None else int(args.shadow_min_free_mb * 1024 * 1024)),
        ("max_model_bytes", None if args.shadow_max_model_mb is None else int(args.shadow_max_model_mb * 1024 * 1024)),
        ("queue_size", args.shadow_queue)))
    if args.keep_low_confidence is not None or args.keep_max_mb is not None:
        from .config import AgentPaths
        from .options import SampleOptions
        from .samples import DEFAULT_FOLDER_NAME, DEFAULT_MAX_MB

        if args.keep_low_confidence is None:
            raise SystemExit(_usage_error("edge-agent run", "--keep-max-mb needs --keep-low-confidence DIR|on"))
        keep = args.keep_low_confidence
        folder = AgentPaths.at(args.home).agent_dir / DEFAULT_FOLDER_NAME if keep == "on" else Path(keep)
        megabytes = args.keep_max_mb if args.keep_max_mb is not None else DEFAULT_MAX_MB
        if not megabytes > 0:
            raise ValueError(f"--keep-max-mb must be a positive number, got {megabytes:g}")
        values["samples"] = SampleOptions(folder=folder, max_bytes=int(megabytes * 1024 * 1024))
    options = AgentOptions(**values)
    try:
        agent = Agent.create_from_options(options)
    except OSError as exc:
        if exc.errno == 98:  # EADDRINUSE
            raise EdgeRuntimeError(f"port {serve.port} on {serve.host} is in use (is an agent already running? try --port)") from exc
        raise
    agent.run_forever()
    return EXIT_OK


def _status(args: argparse.Namespace) -> int:
    from ..store import ModelStore
    from .config import AgentPaths, load_identity
    from .outbox import Outbox

    paths = AgentPaths.at(args.home)
    identity = load_identity(paths)
    with warnings.catch_warnings():  # a damaged pointer is rebuilt: said by the agent, not here
        warnings.simplefilter("ignore")
        state = ModelStore(paths.home).state()
    queued, dead, dead_count = 0, [], 0
    if paths.outbox.is_file():
        try:
            outbox = Outbox(paths.outbox, recover=False)
        except EdgeRuntimeError:
            pass
        else:
            queued, dead, dead_count = outbox.count(), outbox.dead_letters(5), outbox.dead_count()
            outbox.close()
    live = _live_status(paths)
    report = {
        "device": identity.public_dict(),
        "current": state.current.to_dict() if state.current else None,
        "previous": state.previous.to_dict() if state.previous else None,
        "outbox_queued": queued,
        "dead_letters": {"count": dead_count, "newest": dead},
        "agent": live,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return EXIT_OK
    who = identity.device_id + (f" ({identity.name})" if identity.name else "")
    rows = [
        ("device", who),
        ("server", identity.server),
        ("model", f"{identity.model}, channel {identity.channel}"),
        ("current", str(state.current) if state.current else "none"),
        ("previous", str(state.previous) if state.previous else "none"),
    ]
    if live is None:
        rows.append(("agent", "not running"))
    else:
        serving = live.get("serving")
        what = f"{serving['name']} v{serving['version']}" if serving else "nothing yet"
        following = f"; following: {live['following']}" if live.get("following") else ""
        rows.append(("agent", f"running (pid {live.get('pid')}) on {live.get('url')}, serving {what}{following}"))
        for name, refusal in (live.get("refused") or {}).items():
            again = refusal.get("retry_at")
            when = f" (tried again after {_clock(again)})" if isinstance(again, (int, float)) else ""
            rows.append(("refused", f"{name.replace(':', ' v')}: {refusal.get('reason')}{when}"))
        if str(live.get("last_error") or "").startswith("disk_full"):
            rows.append(("disk", str(live["last_error"])))
    rows.append(("outbox", f"{queued} report{'s' if queued != 1 else ''} waiting"))
    if dead_count:
        newest = dead[0]
        rows.append(("dead letters", f"{dead_count} report{'s' if dead_count != 1 else ''} the server refused "
                                     f"(newest: {newest['kind']} at {_clock(newest['refused'])}, {newest['status']}: {newest['error']})"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return EXIT_OK


def _samples_folder(args: argparse.Namespace) -> Path:
    from .config import AgentPaths
    from .samples import folder_for

    return args.dir if args.dir is not None else folder_for(AgentPaths.at(args.home).agent_dir)


def _samples(args: argparse.Namespace) -> int:
    from .samples import list_samples

    folder = _samples_folder(args)
    found = list_samples(folder)
    labels: dict[str, int] = {}
    for sample in found:
        labels[sample.label] = labels.get(sample.label, 0) + 1
    size = sum(sample.size for sample in found)
    if args.json:
        print(json.dumps({"folder": str(folder), "count": len(found), "bytes": size, "labels": labels,
                          "oldest": found[0].meta.get("time_utc") if found else None,
                          "newest": found[-1].meta.get("time_utc") if found else None}, indent=2))
        return EXIT_OK
    if not found:
        hint = "" if folder.is_dir() else " (the agent keeps them with `edge-agent run --keep-low-confidence on`)"
        print(f"no samples in {folder}{hint}")
        return EXIT_OK
    print(f"{len(found)} sample{'s' if len(found) != 1 else ''}, {size / 1e6:.1f} MB in {folder}, "
          f"{found[0].meta.get('time_utc')} .. {found[-1].meta.get('time_utc')}")
    width = max(len(label) for label in labels)
    for label, count in sorted(labels.items(), key=lambda item: (-item[1], item[0])):
        print(f"  {label:<{width}}  {count}")
    return EXIT_OK


def _samples_export(args: argparse.Namespace) -> int:
    from .samples import export_samples, parse_since

    since = parse_since(args.since) if args.since is not None else None
    folder = _samples_folder(args)
    if not folder.is_dir():
        raise EdgeRuntimeError(f"no samples folder at {folder} (give it with --dir, or run the agent with --keep-low-confidence)")
    result = export_samples(folder, args.dest, since=since)
    labels = ", ".join(f"{label} {count}" for label, count in sorted(result.labels.items()))
    again = f"; {result.already_there} already there" if result.already_there else ""
    print(f"exported {result.copied} photo{'s' if result.copied != 1 else ''} to {args.dest}{f' ({labels})' if labels else ''}{again}")
    print(f"manifest {result.manifest}")
    return EXIT_OK


def _path(args: argparse.Namespace) -> int:
    from .config import AgentPaths

    paths = AgentPaths.at(args.home)
    for label, value in (("store", paths.home), ("identity", paths.identity), ("state", paths.state),
                         ("outbox", paths.outbox), ("downloads", paths.downloads), ("trusted key", paths.public_key())):
        print(f"{label:<11}  {value}")
    return EXIT_OK


# --- helpers -----------------------------------------------------------------------------------


def _live_status(paths) -> dict[str, Any] | None:  # noqa: ANN001
    """The running agent's own `/status` (one second at most), or None."""
    try:
        run = json.loads(paths.run_file.read_text(encoding="utf-8"))
        with urllib.request.urlopen(run["url"] + "/status", timeout=1.0) as response:
            return json.loads(response.read(1 << 20))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _clock(at: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def _configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edge-agent: %(message)s"))
    logger = logging.getLogger("edge_agent")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    warnings.simplefilter("default")
    warnings.showwarning = lambda message, *_args, **_kw: print(f"edge-agent: warning: {message}", file=sys.stderr)


def _usage_error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
