"""`sync-server`: run the server, publish bundles, ask for a prediction, show where state lives.

    sync-server [serve] [OPTIONS]                      run the HTTP server (the default command)
    sync-server publish BUNDLE --saved-model DIR       verify and publish (locally, or --server URL)
    sync-server predict PHOTO --model NAME             ask a running server's full model
    sync-server demo --bundle B --saved-model M --photo P   start, publish, predict, stop
    sync-server path                                   where the data, database, tokens and TF Serving config are
    sync-server migrate                                upgrade the database schema
    sync-server check [--repair]                       find (and remove) leftovers; compare database, artifacts, TF Serving
    sync-server enrollment-token create|list|revoke    expiring, revocable credentials for enrolling devices

Every option of `ServerConfig` is a flag here and a `SYNC_SERVER_*` variable (flags win). Errors are
one line on stderr and exit status 2 (bad input or configuration) or 1 (a server or backend failure).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import SETTINGS, ServerConfig
from .errors import BackendError, ConfigError, SyncServerError

COMMANDS = ("serve", "publish", "predict", "prune", "demo", "path", "migrate", "enrollment-token", "check", "rollout", "quality")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in COMMANDS and args_list[0] not in ("-h", "--help", "--version")):
        args_list.insert(0, "serve")
    parser = _parser()
    args = parser.parse_args(args_list)
    if any(a == "--admin-token" or a.startswith("--admin-token=") for a in args_list):
        print("warning: --admin-token is visible to every user in the process list; use --admin-token-file FILE "
              "or SYNC_SERVER_ADMIN_TOKEN instead", file=sys.stderr)
    try:
        flags = {s.name: getattr(args, s.name.replace(".", "__"), None) for s in SETTINGS}
        config = ServerConfig.load(flags)
        return int(args.run(args, config) or 0)
    except SyncServerError as exc:
        print(f"error: {_one_line(exc.message)}", file=sys.stderr)
        return 1 if isinstance(exc, BackendError) else 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    settings = argparse.ArgumentParser(add_help=False)
    group = settings.add_argument_group("server options (also SYNC_SERVER_* environment variables)")
    for s in SETTINGS:
        group.add_argument(s.flag, dest=s.name.replace(".", "__"), type=s.parse, metavar=s.metavar, help=f"{s.help} [{s.env}]")

    parser = argparse.ArgumentParser(prog="sync-server", description="edge-classify's model registry, rollout and fallback server.")
    parser.add_argument("--version", action="version", version=f"sync-server {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[settings], help="run the HTTP server (default)")
    serve.set_defaults(run=_serve)

    publish = sub.add_parser("publish", parents=[settings], help="verify and publish a bundle with its SavedModel")
    publish.add_argument("bundle", metavar="BUNDLE", type=Path, help="bundle folder (model.tflite, manifest.json, manifest.sig, labels.txt)")
    publish.add_argument("--saved-model", required=True, type=Path, metavar="DIR", help="the SavedModel the bundle was converted from")
    publish.add_argument("--channel", metavar="NAME", help="also make it this channel's version (e.g. stable)")
    publish.add_argument("--server", metavar="URL", help="upload to a running server instead of writing the data dir")
    publish.add_argument("--json", action="store_true", help="print the result as JSON")
    publish.set_defaults(run=_publish)

    predict = sub.add_parser("predict", parents=[settings], help="ask a running server's full model about a photo")
    predict.add_argument("photo", metavar="PHOTO", type=Path)
    predict.add_argument("--model", required=True, metavar="NAME")
    predict.add_argument("--model-version", type=int, metavar="N", help="version (default: the channel's)")
    predict.add_argument("--channel", metavar="NAME", help="channel whose version to ask (default stable)")
    predict.add_argument("--top-k", type=int, default=3, metavar="K")
    predict.add_argument("--server", default=None, metavar="URL", help="default http://HOST:PORT from the options")
    predict.add_argument("--token", metavar="TOKEN", help="bearer token (default: the admin token)")
    predict.add_argument("--json", action="store_true", help="print the answer as JSON")
    predict.set_defaults(run=_predict)

    demo = sub.add_parser("demo", parents=[settings], help="start a server, publish a bundle, get one fallback prediction, stop")
    demo.add_argument("--bundle", required=True, type=Path, metavar="DIR")
    demo.add_argument("--saved-model", required=True, type=Path, metavar="DIR")
    demo.add_argument("--photo", required=True, type=Path, metavar="FILE")
    demo.set_defaults(run=_demo)

    path = sub.add_parser("path", parents=[settings], help="print where the server keeps its state")
    path.set_defaults(run=_path)

    prune = sub.add_parser("prune", parents=[settings],
                           help="delete a model's old versions that nothing uses (channels, devices, TF Serving)")
    prune.add_argument("model", metavar="MODEL")
    prune.add_argument("--keep", type=int, default=3, metavar="N", help="always keep the newest N versions (default 3)")
    prune.add_argument("--dry-run", action="store_true", help="check and list what would be deleted, delete nothing")
    prune.add_argument("--server", metavar="URL", help="prune a running server instead of the data dir")
    prune.add_argument("--json", action="store_true", help="print the result as JSON")
    prune.set_defaults(run=_prune)

    from .enrollment import add_cli

    add_cli(sub, settings)

    from .check import add_cli as add_check

    add_check(sub, settings)

    from .rollout_cli import add_cli as add_rollout

    add_rollout(sub, settings)

    migrate = sub.add_parser("migrate", parents=[settings], help="upgrade the database schema to the newest version")
    migrate.set_defaults(run=_migrate)
    return parser


# ----------------------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace, config: ServerConfig) -> int:
    from .app import create_app
    from .logs import configure_logging

    configure_logging(config.log_level, config.log_format)
    app = create_app(config)
    print(
        f"sync-server on http://{config.host}:{config.port} (data {config.data_dir}; admin token in "
        f"{_secret_hint(config, 'admin_token', 'admin-token')}; docs at /docs)",
        file=sys.stderr,
        flush=True,
    )
    from .connection_guard import serve

    serve(app, config)  # uvicorn with header and body deadlines and a connection limit
    return 0


def _publish(args: argparse.Namespace, config: ServerConfig) -> int:
    _check_folder(args.bundle, "bundle")
    _check_folder(args.saved_model, "SavedModel")
    if args.server:
        from .client import SyncServerClient

        with SyncServerClient(args.server, _admin_token(config)) as client:
            result = client.publish(args.bundle, args.saved_model, args.channel)
        channel = (result.get("channel") or {}).get("channel")
        created = bool(result.get("created"))
    else:
        result, created, channel = _publish_local(args, config)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        state = "published" if created else "already published (same content)"
        suffix = f"; channel {channel} -> version {result['version']}" if channel else ""
        print(f"{result['name']} version {result['version']} {state}{suffix}")
    return 0


def _publish_local(args: argparse.Namespace, config: ServerConfig) -> tuple[dict[str, Any], bool, str | None]:
    from .services import Services

    services = Services.build(config, with_predictor=False)
    try:
        services.db.migrate()
        outcome = services.registry.publish(args.bundle, args.saved_model)
        result = services.registry.get_version(outcome.name, outcome.version, with_manifest=False)
        result["created"] = outcome.created
        channel = None
        if args.channel:
            result["channel"] = services.rollouts.set_version(outcome.name, args.channel, outcome.version)
            channel = args.channel
            if not config.uses_tf_serving:  # no TF Serving to wait for: write the TF Serving config now
                asyncio.run(services.reconciler.reconcile())
        return result, outcome.created, channel
    finally:
        services.close()


def _predict(args: argparse.Namespace, config: ServerConfig) -> int:
    from .client import SyncServerClient

    try:
        photo = args.photo.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {args.photo}: {exc.strerror or exc}") from None
    server = args.server or f"http://{config.host}:{config.port}"
    with SyncServerClient(server, args.token or _admin_token(config)) as client:
        answer = client.predict(args.model, photo, version=args.model_version, channel=args.channel, top_k=args.top_k)
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        model = answer["model"]
        print(f"{model['name']} version {model['version']} ({answer['latency_ms']:.0f} ms):")
        for item in answer["top_k"]:
            print(f"  {item['label']:<16} {item['score']:.3f}")
    return 0


def _demo(args: argparse.Namespace, config: ServerConfig) -> int:
    from .demo import run_demo

    for folder, what in ((args.bundle, "bundle"), (args.saved_model, "SavedModel")):
        _check_folder(folder, what)
    result = run_demo(config, args.bundle, args.saved_model, args.photo)
    print(result.summary())
    return 0


def _path(args: argparse.Namespace, config: ServerConfig) -> int:
    from .serving_repo import ServingRepository

    repository = ServingRepository(config.serving_dir, config.tf_serving.base_path)
    rows = [
        ("data directory", str(config.data_dir)),
        ("database", config.resolved_database_url),
        ("artifacts", str(config.artifacts_dir)),
        ("TF Serving repository", str(repository.models_dir)),
        ("TF Serving config file", str(repository.config_path)),
        ("trusted publisher keys", ", ".join(str(p) for p in config.publisher_keys) + (" + " if config.publisher_keys else "") + str(config.trusted_keys_dir) + "/*"),
        ("admin token", _secret_hint(config, "admin_token", "admin-token")),
        ("enrolment secret", "given by flag or environment variable" if config.enrollment_secret
         else "none (devices enrol with tokens: sync-server enrollment-token create)"),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 0


def _prune(args: argparse.Namespace, config: ServerConfig) -> int:
    """Delete versions older than the newest --keep; a version still in use is kept, with the reason."""
    from .errors import ConflictError

    if args.keep < 1:
        raise ConfigError(f"--keep must be at least 1, got {args.keep}")
    with contextlib.ExitStack() as stack:
        if args.server:
            from .client import SyncServerClient

            client = stack.enter_context(SyncServerClient(args.server, _admin_token(config)))
            versions = client.get(f"/v1/models/{args.model}")["versions"]
            delete = client.delete_version
        else:
            from .services import Services

            from sqlalchemy.engine import make_url

            url = make_url(config.resolved_database_url)
            if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
                raise ConfigError(
                    f"no sync-server data in {config.data_dir}: pass the --data-dir (or --database-url) of the "
                    "server whose versions to prune, or --server URL"
                )
            services = Services.build(config, with_predictor=False)
            stack.callback(services.close)
            services.db.migrate()
            versions = services.registry.get_model(args.model)["versions"]
            delete = services.registry.delete_version
        old = sorted(versions)[: max(0, len(versions) - args.keep)]
        deleted, kept, freed = [], [], 0
        for version in old:
            try:
                freed += delete(args.model, version, dry_run=args.dry_run)["freed_bytes"]
                deleted.append(version)
            except ConflictError as exc:
                kept.append({"version": version, "code": exc.code, "reason": exc.message})
    result = {"model": args.model, "deleted": deleted, "kept": kept, "freed_bytes": freed, "dry_run": args.dry_run}
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{args.model}: {verb} {_versions(deleted)}" + ("" if args.dry_run else f" ({freed / 1e6:.1f} MB freed)"))
    for item in kept:
        print(f"  kept version {item['version']}: {item['reason']}")
    return 0


def _versions(versions: list[int]) -> str:
    if not versions:
        return "no version"
    return ("version " if len(versions) == 1 else "versions ") + ", ".join(str(v) for v in versions)


def _migrate(args: argparse.Namespace, config: ServerConfig) -> int:
    from .db import Database

    db = Database(config.resolved_database_url)
    try:
        db.migrate()
    finally:
        db.dispose()
    print(f"database {db.safe_url} is up to date")
    return 0


# ----------------------------------------------------------------------------------------------------------


def _admin_token(config: ServerConfig) -> str:
    if config.admin_token:
        return config.admin_token
    if config.admin_token_file:
        return config.with_secrets().admin_token or ""
    path = config.data_dir / "admin-token"
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError:
        raise ConfigError(f"no admin token: pass --admin-token, set SYNC_SERVER_ADMIN_TOKEN, or run where {path} exists") from None


def _secret_hint(config: ServerConfig, field: str, filename: str) -> str:
    if getattr(config, field):
        return "given by flag or environment variable"
    return str(config.data_dir / filename)


def _check_folder(path: Path, what: str) -> None:
    if not path.is_dir():
        raise ConfigError(f"the {what} {path} is not a folder")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
