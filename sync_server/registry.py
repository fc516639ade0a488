"""The model registry: publish verified bundles with their SavedModels, and look them up.

Publishing is idempotent: the same bundle and SavedModel published again answer with the existing
version (and put back any of its files that went missing or were damaged); the same name and version
with other content is refused (409 `version_conflict`).

Across instances (one database, one data directory) a publish holds the lock of its (model, version)
(`locks.PublishLocks`) from the check for an existing row until the row is committed, so exactly one
instance moves files for a version and the others find its row. Files go in place before the row is
written, so every recorded version has its artifacts and its SavedModel folder; a folder whose row
could not be written is removed again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sqlalchemy import delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from preprocessing import PreprocessSpec

from .artifacts import ArtifactStore
from .bundles import check_saved_model, verify_bundle
from .db import Database, iso
from .errors import ConflictError, NotFoundError
from .models import Channel, DeletedVersion, Device, DeviceStatus, Model, ModelVersion, VersionFile
from .locks import PublishLocks
from .serving_repo import ServingRepository

log = logging.getLogger("sync_server.registry")

ARTIFACTS_URL = "/v1/artifacts/"


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: `created` is False when the same version was already there."""

    name: str
    version: int
    created: bool


@dataclass(frozen=True)
class VersionInfo:
    """What the fallback needs to serve a version: its float spec and labels (immutable, so cached)."""

    name: str
    version: int
    float_spec: PreprocessSpec
    labels: tuple[str, ...]


class Registry:
    """Published models and versions."""

    def __init__(self, db: Database, artifacts: ArtifactStore, repository: ServingRepository, keys: Sequence[Any],
                 locks: PublishLocks | None = None) -> None:
        self.db = db
        self.artifacts = artifacts
        self.repository = repository
        self.keys = list(keys)
        self.locks = locks or PublishLocks(db, repository.root.parent)
        self._infos: dict[tuple[str, int], VersionInfo] = {}

    # --- publishing -----------------------------------------------------------------------------

    def publish(self, bundle_dir: Path, saved_model_dir: Path) -> PublishResult:
        """Verify and store a bundle and its SavedModel; see the module docstring."""
        bundle = verify_bundle(Path(bundle_dir), self.keys)
        saved_model = check_saved_model(Path(saved_model_dir), bundle)
        name, version = bundle.name, bundle.version
        # One winner per (model, version) across instances, chosen before any file moves.
        with self.locks.version(name, version):
            existing = self._existing(name, version)
            if existing is not None:
                result = self._same_or_conflict(existing, bundle.manifest_sha256, saved_model.digest, name, version)
                self._restore(bundle, saved_model)
                return result
            deleted = self._deleted(name, version)
            if deleted is not None:  # only the same content may come back under a deleted number
                self._same_or_conflict(deleted, bundle.manifest_sha256, saved_model.digest, name, version, deleted=True)
            stored = {file: self.artifacts.put_file(path) for file, path in bundle.files.items()}
            placed = self.repository.install(name, version, saved_model.path, saved_model.digest)
            try:
                self._record(bundle, saved_model.digest, stored)
            except BaseException as exc:
                if placed:  # not recorded: TF Serving must not keep a folder the registry does not name
                    self.repository.remove(name, version)
                if isinstance(exc, IntegrityError):  # an instance on another data dir recorded it meanwhile
                    existing = self._existing(name, version)
                    if existing is not None:
                        return self._same_or_conflict(existing, bundle.manifest_sha256, saved_model.digest, name, version)
                raise
            # A version deleted meanwhile (its own lock) may have taken a file this one shares.
            for file, path in bundle.files.items():
                if not self.artifacts.path_of(stored[file].sha256).is_file():
                    self.artifacts.put_file(path)
        log.info("published", extra={"model": name, "version": version, "key_id": bundle.key_id})
        return PublishResult(name, version, True)

    def _record(self, bundle: Any, digest: str, stored: dict[str, Any]) -> None:
        with self.db.write() as session:
            model = session.scalar(select(Model).where(Model.name == bundle.name))
            if model is None:  # two instances may create a new model at once (other versions): a savepoint
                try:
                    with session.begin_nested():
                        model = Model(name=bundle.name)
                        session.add(model)
                except IntegrityError:
                    model = session.scalar(select(Model).where(Model.name == bundle.name))
                    if model is None:
                        raise
            tombstone = session.get(DeletedVersion, (model.id, bundle.version))
            if tombstone is not None:  # the same content comes back (checked by the caller)
                session.delete(tombstone)
            row = ModelVersion(
                model_id=model.id,
                version=bundle.version,
                manifest_sha256=bundle.manifest_sha256,
                manifest=bundle.manifest,
                saved_model_digest=digest,
                labels=list(bundle.labels),
                float_spec=bundle.float_spec.to_dict(),
                baseline=_baseline(bundle.manifest),
            )
            session.add(row)
            session.flush()
            for name, artifact in stored.items():
                session.add(VersionFile(version_id=row.id, name=name, sha256=artifact.sha256, size=artifact.size))

    def _restore(self, bundle: Any, saved_model: Any) -> None:
        """The same version published again: put back any file `sync-server check` would find missing
        or damaged (an artifact, the SavedModel folder)."""
        for path in bundle.files.values():
            self.artifacts.put_file(path, verify_existing=True)
        if self.repository.install(bundle.name, bundle.version, saved_model.path, saved_model.digest):
            log.warning("restored the SavedModel folder", extra={"model": bundle.name, "version": bundle.version})

    def _existing(self, name: str, version: int) -> tuple[str, str] | None:
        with self.db.read() as session:
            row = session.execute(
                select(ModelVersion.manifest_sha256, ModelVersion.saved_model_digest)
                .join(Model)
                .where(Model.name == name, ModelVersion.version == version)
            ).first()
            return (row[0], row[1]) if row else None

    def _deleted(self, name: str, version: int) -> tuple[str, str] | None:
        with self.db.read() as session:
            row = session.execute(
                select(DeletedVersion.manifest_sha256, DeletedVersion.saved_model_digest)
                .join(Model, Model.id == DeletedVersion.model_id)
                .where(Model.name == name, DeletedVersion.version == version)
            ).first()
            return (row[0], row[1]) if row else None

    @staticmethod
    def _same_or_conflict(existing: tuple[str, str], manifest_sha256: str, digest: str, name: str, version: int,
                          *, deleted: bool = False) -> PublishResult:
        if existing == (manifest_sha256, digest):
            return PublishResult(name, version, False)
        which = "bundle" if existing[0] != manifest_sha256 else "SavedModel"
        state = "was deleted, and devices may still hold it," if deleted else "already exists"
        raise ConflictError(
            f"version {version} of model {name} {state} with a different {which}; "
            "publish the new model as a new version",
            code="version_conflict",
        )

    # --- deleting -------------------------------------------------------------------------------

    def delete_version(self, name: str, version: int, *, dry_run: bool = False) -> dict[str, Any]:
        """Delete a version nothing uses any more: its row, its files no other version shares, and its
        SavedModel in the TF Serving repository. Refused (409) while a channel names it (as current,
        previous or rollout version), while a device reports running it, or while TF Serving's config
        still lists it. The number stays taken (see `DeletedVersion`). `dry_run` checks all that and
        deletes nothing."""
        served = self.repository.written().get(name)
        with self.locks.version(name, version):
            with self.db.write() as session:
                row = find_version(session, name, version)
                model_id = row.model_id
                channels = session.scalars(
                    select(Channel.name).where(
                        Channel.model_id == model_id,
                        or_(Channel.version == version, Channel.previous_version == version,
                            Channel.rollout_version == version),
                    )
                ).all()
                if channels:
                    raise ConflictError(
                        f"version {version} of model {name} is in use by channel {', '.join(sorted(channels))} "
                        "(as its current, previous or rollout version); move the channel on first",
                        code="version_in_use",
                    )
                running = session.scalar(
                    select(func.count())
                    .select_from(DeviceStatus)
                    .join(Device, Device.id == DeviceStatus.device_id)
                    .where(Device.model_id == model_id, Device.revoked.is_(False), DeviceStatus.version == version,
                           DeviceStatus.running.is_(True))
                )
                if running:
                    raise ConflictError(
                        f"{running} device(s) still run version {version} of model {name}; delete it once they "
                        "report another version",
                        code="version_running",
                    )
                if served is not None and version in served.versions:
                    raise ConflictError(
                        f"TF Serving's config still lists version {version} of model {name}; try again once the "
                        "server has written its next config (seconds after the channel moved)",
                        code="version_served",
                    )
                if dry_run:
                    return {"name": name, "version": version, "deleted": False, "dry_run": True, "freed_bytes": 0}
                hashes = {f.sha256 for f in row.files}
                session.add(DeletedVersion(model_id=model_id, version=version, manifest_sha256=row.manifest_sha256,
                                           saved_model_digest=row.saved_model_digest))
                session.execute(delete(VersionFile).where(VersionFile.version_id == row.id))
                session.expire(row, ["files"])  # the files are gone: nothing for the ORM to unlink
                session.delete(row)
            freed = sum(self.artifacts.remove(h) for h in sorted(hashes) if not self.versions_with_artifact(h))
            freed += self.repository.remove(name, version)
            self._infos.pop((name, version), None)
        log.info("version deleted", extra={"model": name, "version": version, "freed_bytes": freed})
        return {"name": name, "version": version, "deleted": True, "dry_run": False, "freed_bytes": freed}

    # --- reading --------------------------------------------------------------------------------

    def list_models(self, gates: Any = None, rollout_options: Any = None) -> list[dict[str, Any]]:
        """Every model with its versions and channels; `gates`, `rollout_options`: the server's, for
        each rollout's effective quality gates (as the channel view shows them)."""
        with self.db.read() as session:
            models = session.scalars(
                select(Model).options(selectinload(Model.versions), selectinload(Model.channels)).order_by(Model.name)
            ).all()
            from .rollout import channel_view

            return [
                {
                    "name": m.name,
                    "created_at": iso(m.created_at),
                    "versions": [v.version for v in m.versions],
                    "channels": {c.name: channel_view(m.name, c, gates, rollout_options) for c in m.channels},
                }
                for m in models
            ]

    def get_model(self, name: str) -> dict[str, Any]:
        for model in self.list_models():  # small: a handful of models per server
            if model["name"] == name:
                return model
        raise NotFoundError(f"unknown model {name!r}", code="unknown_model")

    def get_version(self, name: str, version: int, *, with_manifest: bool = True) -> dict[str, Any]:
        with self.db.read() as session:
            row = find_version(session, name, version)
            return version_view(name, row, with_manifest=with_manifest)

    def cached_version_info(self, name: str, version: int) -> VersionInfo | None:
        """`version_info` if it was read before (no I/O)."""
        return self._infos.get((name, version))

    def version_info(self, name: str, version: int) -> VersionInfo:
        """The float spec and labels of a version (cached: versions never change)."""
        found = self._infos.get((name, version))
        if found is not None:
            return found
        with self.db.read() as session:
            row = find_version(session, name, version)
            info = VersionInfo(name, version, PreprocessSpec.from_dict(row.float_spec), tuple(row.labels))
        self._infos[(name, version)] = info
        return info

    def versions_with_artifact(self, sha256: str) -> list[tuple[str, int]]:
        """Every (model, version) whose bundle holds the artifact with this content hash."""
        with self.db.read() as session:
            rows = session.execute(
                select(Model.name, ModelVersion.version)
                .join(ModelVersion, ModelVersion.model_id == Model.id)
                .join(VersionFile, VersionFile.version_id == ModelVersion.id)
                .where(VersionFile.sha256 == sha256)
            ).all()
            return [(r[0], r[1]) for r in rows]


def find_model(session: Session, name: str) -> Model:
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        raise NotFoundError(f"unknown model {name!r}", code="unknown_model")
    return model


def find_version(session: Session, name: str, version: int) -> ModelVersion:
    model = find_model(session, name)
    row = session.scalar(
        select(ModelVersion)
        .options(selectinload(ModelVersion.files))
        .where(ModelVersion.model_id == model.id, ModelVersion.version == version)
    )
    if row is None:
        known = session.scalars(select(ModelVersion.version).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version)).all()
        listing = ", ".join(str(v) for v in known) or "none"
        raise NotFoundError(f"model {name!r} has no version {version} (published: {listing})", code="unknown_version")
    return row


def require_version(session: Session, model: Model, version: int) -> None:
    """Raise NotFoundError unless `model` has `version`; reads only its id (a device's report names a
    version, and a thousand reports should not each parse its manifest)."""
    found = session.scalar(
        select(ModelVersion.id).where(ModelVersion.model_id == model.id, ModelVersion.version == version)
    )
    if found is None:
        find_version(session, model.name, version)  # raises, listing the published versions


def _baseline(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest's "baseline" (signed with it; the quality figures compare against it); None for older bundles."""
    baseline = manifest.get("baseline")
    return baseline if isinstance(baseline, dict) else None


def files_view(row: ModelVersion) -> dict[str, dict[str, Any]]:
    return {f.name: {"sha256": f.sha256, "size": f.size, "url": ARTIFACTS_URL + f.sha256} for f in row.files}


def version_view(name: str, row: ModelVersion, *, with_manifest: bool = True) -> dict[str, Any]:
    view: dict[str, Any] = {
        "name": name,
        "version": row.version,
        "created_at": iso(row.created_at),
        "manifest_sha256": row.manifest_sha256,
        "saved_model_digest": row.saved_model_digest,
        "labels": list(row.labels),
        "quantization": row.manifest.get("quantization"),
        "confidence_threshold": row.manifest.get("confidence_threshold"),
        "files": files_view(row),
    }
    if with_manifest:
        view["manifest"] = row.manifest
    return view
