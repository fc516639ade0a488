"""`sync-server rollout ...` and `sync-server quality ...`: the operator's rollout steps from a shell.

    sync-server rollout show MODEL [--channel stable]
    sync-server rollout start MODEL VERSION --percent 20 [--mode shadow --sample-rate 0.1] [--force]
    sync-server rollout gates|promote|pause|resume|rollback MODEL [--channel C] [--force] [--reason TEXT]
    sync-server quality MODEL [--channel C] [--since 3600] [--json]

Each talks to a running server's admin API (the same calls the dashboard makes), so a quality gate
that is not met answers here exactly as it does there: one line naming the gate and its figures.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import ServerConfig

ACTIONS = ("show", "start", "gates", "promote", "pause", "resume", "rollback")


def add_cli(sub: Any, settings: argparse.ArgumentParser) -> None:
    rollout = sub.add_parser("rollout", parents=[settings], help="show, start, promote, pause, resume or roll back a channel's rollout")
    rollout.add_argument("action", choices=ACTIONS, metavar="ACTION", help=" | ".join(ACTIONS))
    rollout.add_argument("model", metavar="MODEL")
    rollout.add_argument("version", nargs="?", type=int, metavar="VERSION", help="start: the candidate version")
    rollout.add_argument("--channel", default="stable", metavar="NAME", help="default %(default)s")
    rollout.add_argument("--percent", type=float, metavar="P", help="start: share of the channel's devices (0-100]")
    rollout.add_argument("--mode", choices=("canary", "shadow"), default="canary",
                         help="start: canary runs it; shadow runs it beside the channel's version (default %(default)s)")
    rollout.add_argument("--sample-rate", type=float, metavar="R", help="shadow: share of requests the candidate also runs on")
    rollout.add_argument("--force", action="store_true", help="start (shadow to canary) and promote: skip the quality gates")
    rollout.add_argument("--reason", metavar="TEXT", help="pause: why (recorded in the history)")
    _connection(rollout)
    rollout.set_defaults(run=_rollout)

    quality = sub.add_parser("quality", parents=[settings], help="a model's quality and drift figures per version (from the rollups)")
    quality.add_argument("model", metavar="MODEL")
    quality.add_argument("--channel", metavar="NAME", help="one channel (default: all)")
    quality.add_argument("--since", metavar="WHEN", help="ISO 8601 time or seconds back (default: all retained)")
    _connection(quality)
    quality.set_defaults(run=_quality)


def _connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help="default http://HOST:PORT from the options")
    parser.add_argument("--token", metavar="TOKEN", help="bearer token (default: the admin token)")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON")


def _client(args: argparse.Namespace, config: ServerConfig):  # type: ignore[no-untyped-def]
    from .cli import _admin_token
    from .client import SyncServerClient

    return SyncServerClient(args.server or f"http://{config.host}:{config.port}", args.token or _admin_token(config))


def _rollout(args: argparse.Namespace, config: ServerConfig) -> int:
    from .errors import BadRequestError

    base = f"/v1/models/{args.model}/channels/{args.channel}"
    with _client(args, config) as client:
        if args.action == "show":
            answer = client.get(base)
        elif args.action == "gates":
            answer = client.get(base + "/rollout/gates")
        elif args.action == "start":
            if args.version is None or args.percent is None:
                raise BadRequestError("rollout start needs MODEL VERSION and --percent P", code="bad_arguments")
            body: dict[str, Any] = {"version": args.version, "percent": args.percent, "mode": args.mode, "force": args.force}
            if args.sample_rate is not None:
                body["sample_rate"] = args.sample_rate
            answer = client.post(base + "/rollout", body)
        elif args.action == "promote":
            answer = client.post(base + "/rollout/promote", {"force": args.force})
        elif args.action == "pause":
            answer = client.post(base + "/rollout/pause", {"reason": args.reason} if args.reason else {})
        elif args.action == "resume":
            answer = client.post(base + "/rollout/resume", {})
        else:
            answer = client.post(base + "/rollback", {})
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.action == "gates":
        print(format_gates(answer))
    else:
        print(format_channel(answer))
    return 0


def _quality(args: argparse.Namespace, config: ServerConfig) -> int:
    from urllib.parse import urlencode

    query = {k: v for k, v in (("channel", args.channel), ("since", args.since)) if v}
    with _client(args, config) as client:
        answer = client.get(f"/v1/models/{args.model}/quality" + (f"?{urlencode(query)}" if query else ""))
    print(json.dumps(answer, indent=2) if args.json else format_quality(answer))
    return 0


def format_channel(view: dict[str, Any]) -> str:
    """A channel view in a few lines: its version, and the rollout's mode, share, state and reason."""
    line = f"{view['model']} channel {view['channel']}: version {view['version']}"
    rollout = view.get("rollout")
    if not rollout:
        return line + ", no rollout"
    what = f"{rollout['mode']} of version {rollout['version']} to {rollout['percent']:g} %"
    if rollout.get("mode") == "shadow" and rollout.get("sample_rate") is not None:
        what += f" (sample rate {rollout['sample_rate']:g})"
    line += f", {what}, {rollout['state']}"
    if rollout.get("reason"):
        line += f"\n  reason: {rollout['reason']}"
    return line


def format_gates(verdict: dict[str, Any]) -> str:
    """The gates' verdict: passed or not, then one line per gate with its message."""
    lines = [f"version {verdict.get('version')} ({verdict.get('mode')}): {verdict.get('summary', '')}"]
    for check in verdict.get("checks") or []:
        lines.append(f"  {check.get('gate', '?'):<20} {check.get('status', '?'):<15} {check.get('message') or ''}".rstrip())
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_quality(answer: dict[str, Any]) -> str:
    """One row per version and mode: the figures the quality gates judge."""
    head = (f"{'version':>7} {'mode':<8} {'devices':>7} {'predictions':>11} {'fallback':>8} {'low conf':>8} "
            f"{'disagree':>8} {'shadow agr':>10} {'class JSD':>9} {'input shift':>11} {'p50 ms':>7}")
    rows = [f"{answer['model']} quality since {answer.get('since') or 'the first report'}"
            + (f", channel {answer['channel']}" if answer.get("channel") else ""), head]
    for v in answer.get("versions") or []:
        rows.append(
            f"{v['version']:>7} {v['mode']:<8} {v['devices']:>7} {v['predictions']:>11} {_pct(v['fallback_rate']):>8} "
            f"{_pct(v['low_confidence_rate']):>8} {_pct(v['disagreement_rate']):>8} {_pct(v['shadow_agreement']):>10} "
            f"{_num(v['class_jsd']):>9} {_num(v['input_shift'], 2):>11} {_num(v['latency_p50_ms'], 1):>7}"
        )
    if len(rows) == 2:
        rows.append("  (no telemetry yet)")
    return "\n".join(rows)
