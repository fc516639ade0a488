"""`sync-server check`: find what killed publishes left behind, and where the database, the artifact
store and the TF Serving repository disagree; `--repair` removes what is provably left over.

Leftovers (removed by `--repair`, and at every server start):

    temp_artifact      artifacts/tmp/.incoming-*              a copy into the artifact store
    incoming_folder    tf-serving/models/M/.V-incoming-*      a SavedModel copy not yet renamed into place
    trash_folder       tf-serving/models/M/.V-stale-*|-deleted-*   a version folder half deleted
    temp_config        tf-serving/.models.config.* / .state.json.*  a config file not yet renamed
    upload_staging     tmp/upload-*                           an unpacked upload (see below)

Each is held (`claims`) by the process writing it, so one nobody holds is provably left over, and one
held is never touched. Upload folders are also judged by age: an unheld one counts as left over once
nothing in it changed for `upload_grace_s` (default an hour), because a folder made by an older server,
or by an instance on another machine sharing the data directory (flock is local), holds no claim this
machine can see; `--upload-grace 0` when no such server runs.

Disagreements (what `--repair` does):

    orphan_folder           a version folder without a registry row           removed
    orphan_artifact         a stored file no version names                    removed
    unknown_config_version  models.config names a version without a row       config rewritten without it
    missing_saved_model     a version whose TF Serving folder is missing      reported: publish it again
    saved_model_mismatch    a folder whose content digest is not the recorded  reported: publish it again
    missing_artifact        a version file missing from the artifact store    reported: publish it again
    artifact_mismatch       a stored file whose content is not its hash       reported: publish it again

Publishing the same bundle and SavedModel again puts back what is missing or damaged; `--repair`
never deletes anything the registry records. The check holds the registry lock (`PublishLocks.everything`)
while it compares, so it never sees a publish or delete half-way. The exit status is 1 when anything
is found that is still there afterwards.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import select

from .artifacts import ArtifactStore
from .claims import if_abandoned
from .db import Database
from .locks import PublishLocks
from .models import Model, ModelVersion, VersionFile
from .serving_repo import ServedModel, ServingRepository

log = logging.getLogger("sync_server.check")

LEFTOVER_CODES = ("temp_artifact", "incoming_folder", "trash_folder", "temp_config", "upload_staging")
#: What `--repair` removes or rewrites; the rest needs the version published again.
REPAIRABLE_CODES = LEFTOVER_CODES + ("orphan_folder", "orphan_artifact", "unknown_config_version")
_TRASH = re.compile(r"^\.\d+-(stale|deleted)-")
_INCOMING = re.compile(r"^\.\d+-incoming-")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class CheckOptions:
    """What `check` does: `repair` removes leftovers and orphans; `verify_hashes` reads every stored
    file (off at server start: sizes and presence only); `upload_grace_s` protects uploads in progress."""

    repair: bool = False
    repair_leftovers_only: bool = False  # server start: remove temporaries, only report disagreements
    verify_hashes: bool = True
    upload_grace_s: float = 3600.0
    lock_timeout_s: float = 30.0


@dataclass
class Finding:
    """One thing found: `code` (see the module docstring), where, what, and whether it was repaired."""

    code: str
    path: str
    message: str
    repaired: bool = False

    @property
    def leftover(self) -> bool:
        return self.code in LEFTOVER_CODES


@dataclass
class CheckReport:
    """Everything `check` found; `clean` when nothing remains to act on."""

    findings: list[Finding] = field(default_factory=list)
    skipped: str | None = None  # why the comparison with the database did not run (a publish held the lock)

    @property
    def remaining(self) -> list[Finding]:
        return [f for f in self.findings if not f.repaired]

    @property
    def clean(self) -> bool:
        return not self.remaining and self.skipped is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean": self.clean,
            "skipped": self.skipped,
            "repaired": sum(1 for f in self.findings if f.repaired),
            "remaining": len(self.remaining),
            "findings": [asdict(f) for f in self.findings],
        }

    def lines(self) -> list[str]:
        out = []
        for f in self.findings:
            state = "removed" if f.repaired else ("left over" if f.leftover else "DISAGREES")
            out.append(f"{state:<10} {f.code:<22} {f.path}: {f.message}")
        if self.skipped:
            out.append(f"skipped    the comparison with the database: {self.skipped}")
        repaired = sum(1 for f in self.findings if f.repaired)
        if self.clean:
            out.append("clean: the database, the artifact store and the TF Serving repository agree"
                       + (f" ({repaired} removed)" if repaired else ""))
        else:
            repairable = [f for f in self.remaining if f.code in REPAIRABLE_CODES]
            out.append(f"{len(self.remaining)} problem(s) remain" + (f", {repaired} removed" if repaired else "")
                       + (f"; `sync-server check --repair` removes {len(repairable)} of them" if repairable else ""))
        return out


def run_check(db: Database, artifacts: ArtifactStore, repository: ServingRepository, locks: PublishLocks,
              data_dir: Path, options: CheckOptions = CheckOptions()) -> CheckReport:
    """Check (and with `options.repair` repair) one server's state; see the module docstring."""
    report = CheckReport()
    remove_leftovers = options.repair or options.repair_leftovers_only
    _leftovers(report, artifacts, repository, Path(data_dir), options, remove_leftovers)
    try:
        with locks.everything(options.lock_timeout_s):
            _compare(report, db, artifacts, repository, options, options.repair and not options.repair_leftovers_only)
    except Exception as exc:  # a publish held the lock, or the database is away: report, do not guess
        from .errors import SyncServerError

        if not isinstance(exc, SyncServerError) and not type(exc).__module__.startswith("sqlalchemy"):
            raise
        report.skipped = getattr(exc, "message", None) or str(exc).splitlines()[0]
    return report


# --- leftovers ----------------------------------------------------------------------------------


def _leftovers(report: CheckReport, artifacts: ArtifactStore, repository: ServingRepository, data_dir: Path,
               options: CheckOptions, repair: bool) -> None:
    candidates: list[tuple[str, Path, str]] = []
    for path in _children(artifacts.staging_dir):
        if path.name.startswith(".incoming-"):
            candidates.append(("temp_artifact", path, "a copy into the artifact store that was never finished"))
    for model_dir in _children(repository.models_dir):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for path in _children(model_dir):
            if _INCOMING.match(path.name):
                candidates.append(("incoming_folder", path, "a SavedModel copy that was never renamed into place"))
            elif _TRASH.match(path.name):
                candidates.append(("trash_folder", path, "a version folder whose deletion was never finished"))
    for path in _children(repository.root):
        if path.name.startswith((".models.config.", ".state.json.")):
            candidates.append(("temp_config", path, "a TF Serving config that was never renamed into place"))
    for code, path, what in candidates:
        with if_abandoned(path) as abandoned:
            if not abandoned:
                continue  # a live process holds it: work in progress
            finding = Finding(code, str(path), what)
            if repair:
                _remove(path)
                finding.repaired = True
            report.findings.append(finding)
    now = time.time()
    for path in _children(data_dir / "tmp"):
        if not (path.is_dir() and path.name.startswith("upload-")):
            continue
        age = now - _newest_mtime(path)
        if age < options.upload_grace_s:
            continue  # maybe an upload in progress on an instance whose claims this machine cannot see
        with if_abandoned(path) as abandoned:
            if not abandoned:
                continue  # a live upload on this machine
            finding = Finding("upload_staging", str(path), f"an unpacked upload nothing changed for {age:.0f} s")
            if repair:
                _remove(path)
                finding.repaired = True
            report.findings.append(finding)


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []


def _newest_mtime(folder: Path) -> float:
    newest = folder.lstat().st_mtime
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            try:
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
            except FileNotFoundError:
                pass
    return newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for item in [path, *path.rglob("*")]:  # artifacts and trash may be read-only
            if item.is_dir() and not item.is_symlink():
                os.chmod(item, 0o755)
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --- database against files -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    model: str
    version: int
    digest: str
    files: tuple[tuple[str, str, int], ...]  # (name, sha256, size)


def _rows(db: Database) -> list[_Row]:
    with db.read() as session:
        versions = session.execute(
            select(ModelVersion.id, Model.name, ModelVersion.version, ModelVersion.saved_model_digest)
            .join(Model, Model.id == ModelVersion.model_id)
            .order_by(Model.name, ModelVersion.version)
        ).all()
        files: dict[int, list[tuple[str, str, int]]] = {}
        for version_id, name, sha256, size in session.execute(
            select(VersionFile.version_id, VersionFile.name, VersionFile.sha256, VersionFile.size)
        ):
            files.setdefault(version_id, []).append((name, sha256, int(size)))
    return [_Row(name, int(version), digest, tuple(sorted(files.get(vid, [])))) for vid, name, version, digest in versions]


def _compare(report: CheckReport, db: Database, artifacts: ArtifactStore, repository: ServingRepository,
             options: CheckOptions, repair: bool) -> None:
    rows = _rows(db)
    known = {(r.model, r.version) for r in rows}
    add = report.findings.append

    # Each recorded version: its SavedModel folder and its files.
    for row in rows:
        folder = repository.path_of(row.model, row.version)
        label = f"version {row.version} of {row.model}"
        if not folder.is_dir():
            add(Finding("missing_saved_model", str(folder), f"{label} has no SavedModel folder; publish it again to restore it"))
        elif options.verify_hashes:
            digest = repository.content_digest(row.model, row.version)
            if digest != row.digest:
                add(Finding("saved_model_mismatch", str(folder),
                            f"{label}: the folder's content digest {str(digest)[:12]} is not the recorded "
                            f"{row.digest[:12]}; publish it again to restore it"))
        for name, sha256, size in row.files:
            path = artifacts.path_of(sha256)
            if not path.is_file():
                add(Finding("missing_artifact", str(path), f"{label}: {name} is missing; publish it again to restore it"))
            elif path.stat().st_size != size or (options.verify_hashes and not artifacts.is_whole(sha256)):
                add(Finding("artifact_mismatch", str(path),
                            f"{label}: {name} does not hash to its name; publish it again to restore it"))

    # models.config: only recorded versions (TF Serving would load whatever it names).
    configured = _read_config(repository)
    if configured is None:
        add(Finding("unknown_config_version", str(repository.config_path), "models.config cannot be read"))
    else:
        unknown = {name: sorted(v for v in served.versions if (name, v) not in known) for name, served in configured.items()}
        unknown = {name: versions for name, versions in unknown.items() if versions}
        if unknown:
            listing = "; ".join(f"{name}: {', '.join(map(str, v))}" for name, v in sorted(unknown.items()))
            finding = Finding("unknown_config_version", str(repository.config_path),
                              f"names versions the registry does not have ({listing})")
            if repair:
                kept = {}
                for name, served in configured.items():
                    versions = frozenset(v for v in served.versions if (name, v) in known)
                    if versions:
                        kept[name] = ServedModel(versions, {k: v for k, v in served.labels.items() if v in versions})
                repository.write(kept)
                finding.repaired = True
            add(finding)

    # Version folders and stored files that nothing records.
    for model_dir in _children(repository.models_dir):
        if not model_dir.is_dir() or model_dir.name.startswith("."):
            continue
        for folder in _children(model_dir):
            if folder.name.isdigit() and (model_dir.name, int(folder.name)) not in known:
                finding = Finding("orphan_folder", str(folder), "a version folder the registry does not record")
                if repair:
                    repository.remove(model_dir.name, int(folder.name))
                    finding.repaired = True
                add(finding)
    referenced = {sha256 for row in rows for _, sha256, _ in row.files}
    for path in _stored(artifacts):
        if path.name not in referenced:
            finding = Finding("orphan_artifact", str(path), "a stored file no version names")
            if repair:
                _remove(path)
                finding.repaired = True
            add(finding)


def _stored(artifacts: ArtifactStore) -> Iterable[Path]:
    return artifacts.stored()


_BLOCK = re.compile(r"config \{(.*?)\n  \}", re.S)


def _read_config(repository: ServingRepository) -> dict[str, ServedModel] | None:
    """The models, versions and labels models.config names (the format `render_config` writes); None
    when the file is there but not in that format."""
    try:
        text = repository.config_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError):
        return None
    models: dict[str, ServedModel] = {}
    for block in _BLOCK.findall(text):
        name = re.search(r'name: "((?:[^"\\]|\\.)*)"', block)
        if name is None:
            return None
        versions = frozenset(int(v) for v in re.findall(r"versions: (\d+)", block))
        labels = {k: int(v) for k, v in re.findall(r'version_labels \{ key: "((?:[^"\\]|\\.)*)" value: (\d+) \}', block)}
        models[name.group(1).replace('\\"', '"').replace("\\\\", "\\")] = ServedModel(versions, labels)
    if "config {" in text and not models:
        return None
    return models


# --- the command line and the server start ----------------------------------------------------------


def add_cli(sub: Any, settings: Any) -> None:
    """`sync-server check [--repair] [--upload-grace S] [--quick] [--json]`."""
    parser = sub.add_parser(
        "check", parents=[settings],
        help="find leftovers of killed publishes and disagreements between database, artifacts and TF Serving repository",
    )
    parser.add_argument("--repair", action="store_true",
                        help="remove leftovers, unrecorded version folders and stored files, and config entries for unknown versions")
    parser.add_argument("--upload-grace", type=float, default=CheckOptions.upload_grace_s, metavar="S",
                        help="upload folders count as left over once unchanged for S seconds (default 3600; 0 when every server is stopped)")
    parser.add_argument("--quick", action="store_true", help="compare sizes only, do not re-read every stored file")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=_cli)


def _cli(args: Any, config: Any) -> int:
    import json

    from sqlalchemy.engine import make_url

    from .errors import ConfigError

    url = make_url(config.resolved_database_url)
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").is_file():
        raise ConfigError(f"no sync-server data in {config.data_dir}: pass the --data-dir (or --database-url) of the server to check")
    if args.upload_grace < 0:
        raise ConfigError(f"--upload-grace must be 0 or more seconds, got {args.upload_grace:g}")
    db = Database(config.resolved_database_url)
    try:
        report = run_check(
            db, ArtifactStore(config.artifacts_dir), ServingRepository(config.serving_dir, config.tf_serving.base_path),
            PublishLocks(db, config.data_dir), config.data_dir,
            CheckOptions(repair=args.repair, verify_hashes=not args.quick, upload_grace_s=args.upload_grace),
        )
    finally:
        db.dispose()
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        print("\n".join(report.lines()))
    return 0 if report.clean else 1


def check_at_start(db: Database, artifacts: ArtifactStore, repository: ServingRepository, locks: PublishLocks,
                   data_dir: Path) -> CheckReport:
    """What a server does as it starts: remove the temporaries nobody holds (provably left over) and
    upload folders unchanged for an hour; report, but do not repair, any disagreement (a wrong
    --database-url must not cost the TF Serving repository its folders)."""
    report = run_check(db, artifacts, repository, locks, data_dir,
                       CheckOptions(repair_leftovers_only=True, verify_hashes=False, lock_timeout_s=5.0))
    removed = [f for f in report.findings if f.repaired]
    if removed:
        log.info("removed leftovers of interrupted publishes", extra={"count": len(removed), "paths": [f.path for f in removed]})
    for finding in report.remaining:
        log.warning("check: %s", finding.message, extra={"code": finding.code, "path": finding.path})
    if report.remaining:
        log.warning("the database, artifact store and TF Serving repository disagree: run `sync-server check`",
                    extra={"problems": len(report.remaining)})
    return report
