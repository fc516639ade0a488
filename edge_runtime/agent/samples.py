"""Opt-in: keep the photos the device was unsure about, for the next training set.

With `edge-agent run --keep-low-confidence DIR|on`, every photo whose edge answer scored below the
threshold is kept as received, beside a small JSON sidecar, in a folder bounded by `--keep-max-mb`:

    DIR/01796130698460952123-v3-1f2e3d4c.jpg     the photo's bytes, as the app sent them
    DIR/01796130698460952123-v3-1f2e3d4c.json    {"model", "version", "label", "label_index", "score",
                                                         "time", "pixels_sha256", "spec_digest", "photo", "bytes"}

Names sort by time, so the oldest go first when a new photo would pass the byte budget. Each file is
written to a temporary name and renamed; the sidecar last, so a sample without one was never finished
and is removed at the next start. The request path only hands the photo to a bounded queue: a writer
thread does the disk work, and a full queue, a full disk or a photo bigger than the whole budget
skips that photo and counts it (`status()`), never failing or slowing the request.

`edge-agent samples` lists what was kept; `edge-agent samples export DEST [--since WHEN]` copies the
photos into DEST/<predicted label>/ and appends one JSON line per photo to DEST/manifest.jsonl.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preprocessing import sniff_format

from .serving import ClassifiedPhoto

log = logging.getLogger("edge_agent.samples")

#: What `--keep-low-confidence on` means: HOME/agent/<this>.
DEFAULT_FOLDER_NAME = "samples"
#: HOME/agent/<this> names the folder the agent keeps samples in (for `edge-agent samples`).
POINTER_NAME = "samples-folder"
DEFAULT_MAX_MB = 100.0
QUEUE_SIZE = 32
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}
_TEMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class Sample:
    """One kept photo: its files and what its sidecar says."""

    name: str  # the shared stem of the photo and its sidecar
    photo: Path
    sidecar: Path
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.meta.get("label", ""))

    @property
    def at(self) -> float:
        return float(self.meta.get("time", 0.0))

    @property
    def size(self) -> int:
        return _size(self.photo) + _size(self.sidecar)


class SampleStore:
    """The bounded folder of kept low-confidence photos; `offer` is what the request path calls."""

    def __init__(self, folder: Path, max_bytes: int, *, queue_size: int = QUEUE_SIZE) -> None:
        if max_bytes <= 0:
            raise ValueError(f"the sample budget must be a positive number of bytes, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kept = 0
        self.dropped_oldest = 0
        self.skipped_busy = 0  # the writer was behind: the queue was full
        self.skipped_disk = 0  # the disk refused the write (full, read-only)
        self.skipped_large = 0  # one photo bigger than the whole budget
        self._said_disk = False
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[ClassifiedPhoto, bytes, int] | None] = queue.Queue(queue_size)
        self._samples: list[tuple[str, int]] = []  # (name, bytes), oldest first
        self._bytes = 0
        self._recover()
        self._thread = threading.Thread(target=self._run, name="edge-agent-samples", daemon=True)
        self._thread.start()

    # --- the request path -----------------------------------------------------------------------

    def offer(self, photo: ClassifiedPhoto, data: bytes) -> None:
        """Keep `data` (the photo as received) later, on the writer thread; never blocks."""
        try:
            self._queue.put_nowait((photo, data, time.time_ns()))
        except queue.Full:
            with self._lock:
                self.skipped_busy += 1

    # --- views and life cycle -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """What `GET /status` shows under `samples`."""
        with self._lock:
            return {"folder": str(self.folder), "count": len(self._samples), "bytes": self._bytes, "max_bytes": self.max_bytes,
                    "kept": self.kept, "dropped_oldest": self.dropped_oldest,
                    "skipped": {"busy": self.skipped_busy, "disk": self.skipped_disk, "too_large": self.skipped_large}}

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every offered photo is written or skipped (tests, and a clean stop)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (for up to `timeout_s`), then stop the writer."""
        self.flush(timeout_s)
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)

    # --- the writer -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception as exc:  # a bug must not stop keeping later photos  # noqa: BLE001
                log.warning("could not keep a low-confidence photo: %s", exc)
            finally:
                self._queue.task_done()

    def _write(self, photo: ClassifiedPhoto, data: bytes, at_ns: int) -> None:
        pixels_sha = hashlib.sha256(photo.pixels.tobytes()).hexdigest()
        accepted, _ = sniff_format(data[:16])
        name = f"{at_ns:020d}-v{photo.ref.version}-{pixels_sha[:8]}"
        at = at_ns / 1e9
        photo_name = name + _EXTENSIONS.get(accepted or "", ".bin")
        meta = {
            "model": photo.ref.name, "version": photo.ref.version, "label": photo.label, "label_index": photo.label_index,
            "score": photo.score, "time": round(at, 6),
            "time_utc": datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds"),
            "pixels_sha256": pixels_sha, "spec_digest": photo.spec.pixels_digest(), "photo": photo_name, "bytes": len(data),
        }
        sidecar = (json.dumps(meta, sort_keys=True) + "\n").encode()
        size = len(data) + len(sidecar)
        if size > self.max_bytes:
            with self._lock:
                self.skipped_large += 1
            return
        self._make_room(size)
        written: list[Path] = []
        try:
            for final, content in ((photo_name, data), (name + ".json", sidecar)):
                temp = self.folder / f"{_TEMP_PREFIX}{final}"
                written.append(temp)
                with open(temp, "wb") as out:
                    out.write(content)
                os.replace(temp, self.folder / final)
                written[-1] = self.folder / final
        except OSError as exc:  # a full (or read-only) disk: this photo is skipped, the request never knew
            for path in written:
                _unlink(path)
            with self._lock:
                self.skipped_disk += 1
                said, self._said_disk = self._said_disk, True
            if not said:
                log.warning("cannot keep low-confidence photos in %s: %s (skipped and counted until there is room)",
                            self.folder, exc.strerror or exc)
            return
        with self._lock:
            self._samples.append((name, size))
            self._bytes += size
            self.kept += 1
            self._said_disk = False

    def _make_room(self, size: int) -> None:
        """Drop the oldest samples until `size` more bytes fit the budget."""
        while True:
            with self._lock:
                if not self._samples or self._bytes + size <= self.max_bytes:
                    return
                name, old = self._samples.pop(0)
                self._bytes -= old
                self.dropped_oldest += 1
            for path in self.folder.glob(name + ".*"):
                _unlink(path)

    def _recover(self) -> None:
        """Count what an earlier run kept; remove temporary files and photos whose sidecar never came."""
        for path in self.folder.iterdir():
            if path.name.startswith(_TEMP_PREFIX):
                _unlink(path)
        samples = {s.name: s for s in list_samples(self.folder)}
        for path in self.folder.iterdir():
            stem = path.name.split(".", 1)[0]
            if path.is_file() and _STEM.fullmatch(stem) and stem not in samples:
                _unlink(path)
        self._samples = sorted((name, sample.size) for name, sample in samples.items())
        self._bytes = sum(size for _, size in self._samples)


_STEM = re.compile(r"\d{20}-v\d+-[0-9a-f]{8}")


# --- reading and exporting ------------------------------------------------------------------------------


def list_samples(folder: Path, *, since: float | None = None) -> list[Sample]:
    """The finished samples in `folder` (oldest first), those kept at or after `since` (epoch seconds)."""
    found = []
    folder = Path(folder)
    if not folder.is_dir():
        return []
    for sidecar in sorted(folder.glob("*.json")):
        if not _STEM.fullmatch(sidecar.stem):
            continue
        try:
            meta = json.loads(sidecar.read_text(encoding="utf-8"))
            photo = folder / str(meta["photo"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if photo.parent != folder or not photo.is_file():
            continue
        sample = Sample(sidecar.stem, photo, sidecar, meta)
        if since is None or sample.at >= since:
            found.append(sample)
    return found


@dataclass(frozen=True)
class ExportResult:
    copied: int
    already_there: int
    labels: dict[str, int]
    manifest: Path


def export_samples(folder: Path, dest: Path, *, since: float | None = None) -> ExportResult:
    """Copy the samples into `dest/<predicted label>/` and append one JSON line per copied photo to
    `dest/manifest.jsonl`. A photo already in `dest` is not copied (or listed) again."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    manifest = dest / "manifest.jsonl"
    copied, already, labels = 0, 0, {}
    with open(manifest, "a", encoding="utf-8") as lines:
        for sample in list_samples(folder, since=since):
            folder_name = label_folder(sample.label)
            target = dest / folder_name / sample.photo.name
            if target.exists():
                already += 1
                continue
            target.parent.mkdir(exist_ok=True)
            temp = target.with_name(_TEMP_PREFIX + target.name)
            try:
                shutil.copyfile(sample.photo, temp)
            except FileNotFoundError:  # the agent dropped it meanwhile (the budget): nothing to copy
                _unlink(temp)
                continue
            os.replace(temp, target)
            lines.write(json.dumps({"file": f"{folder_name}/{target.name}", **sample.meta}, sort_keys=True) + "\n")
            copied += 1
            labels[sample.label] = labels.get(sample.label, 0) + 1
    return ExportResult(copied, already, labels, manifest)


def label_folder(label: str) -> str:
    """A safe folder name for a label (no separators, no leading dot)."""
    name = re.sub(r"[^\w.\- ]", "_", label).strip().lstrip(".")
    return name or "_"


def parse_since(text: str, *, now: float | None = None) -> float:
    """Epoch seconds from `2026-12-01`, `2026-12-01T09:30` (local time unless it says), or an age: `90m`, `24h`, `7d`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match:
        seconds = float(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
        return (time.time() if now is None else now) - seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"--since takes a date (2026-12-01), a time (2026-12-01T09:30) or an age (90m, 24h, 7d); got {text!r}") from None
    return when.timestamp()


def folder_for(agent_dir: Path) -> Path:
    """Where the agent of `agent_dir` keeps samples: what its last run wrote in the pointer, else the default."""
    try:
        named = (agent_dir / POINTER_NAME).read_text(encoding="utf-8").strip()
    except OSError:
        named = ""
    return Path(named) if named else agent_dir / DEFAULT_FOLDER_NAME


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass

