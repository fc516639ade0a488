"""What the agent must remember across restarts, in `HOME/agent/state.json` (written atomically).

    running     true while a daemon runs: found true at start, the last run crashed
    loading     the candidate being loaded and smoke-tested, with how many runs crashed doing it
    probation   the version switched to last, its previous version, when, and the crashes since
    refused     versions that failed a step or were rolled back, with why: not tried again until
                the server assigns some other version
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from ..store import ModelRef
from .config import write_json_atomic


def ref_key(ref: ModelRef) -> str:
    return f"{ref.name}:{ref.version}"


class AgentState:
    """The state file, read once and written on every change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._data: dict[str, Any] = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            self._data = {}
        self._data.setdefault("refused", {})

    # --- reading --------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self._data))

    @property
    def probation(self) -> dict[str, Any] | None:
        with self._lock:
            probation = self._data.get("probation")
            return dict(probation) if probation else None

    def refused(self, ref: ModelRef) -> dict[str, Any] | None:
        with self._lock:
            return self._data["refused"].get(ref_key(ref))

    # --- changing -------------------------------------------------------------------------------

    def start_run(self) -> bool:
        """Mark a daemon as running; True when the previous run did not stop cleanly (a crash)."""
        with self._lock:
            crashed = bool(self._data.get("running"))
            self._data["running"] = True
            self._write()
            return crashed

    def stop_run(self) -> None:
        with self._lock:
            self._data["running"] = False
            self._write()

    def refuse(self, ref: ModelRef, step: str, reason: str) -> None:
        with self._lock:
            self._data["refused"][ref_key(ref)] = {"step": step, "reason": reason, "at": time.time()}
            self._write()

    def forget_refusals_except(self, ref: ModelRef | None) -> None:
        """The server now assigns `ref`: earlier refusals of other versions no longer apply."""
        with self._lock:
            keep = {k: v for k, v in self._data["refused"].items() if ref is not None and k == ref_key(ref)}
            if keep != self._data["refused"]:
                self._data["refused"] = keep
                self._write()

    def begin_loading(self, ref: ModelRef) -> int:
        """Note that `ref` is being loaded; returns how many earlier runs crashed while loading it."""
        with self._lock:
            loading = self._data.get("loading") or {}
            attempts = int(loading.get("crashes", 0)) if loading.get("key") == ref_key(ref) else 0
            self._data["loading"] = {"key": ref_key(ref), "crashes": attempts}
            self._write()
            return attempts

    def loading_crashed(self) -> None:
        """At start after a crash: the candidate being loaded (if any) crashed the agent once more."""
        with self._lock:
            if self._data.get("loading"):
                self._data["loading"]["crashes"] = int(self._data["loading"].get("crashes", 0)) + 1
                self._write()

    def end_loading(self) -> None:
        with self._lock:
            if self._data.pop("loading", None) is not None:
                self._write()

    def start_probation(self, ref: ModelRef, previous: ModelRef | None) -> None:
        with self._lock:
            self._data["probation"] = {
                "name": ref.name,
                "version": ref.version,
                "previous": previous.version if previous else None,
                "started": time.time(),
                "crashes": 0,
            }
            self._write()

    def probation_crashed(self) -> int:
        """At start after a crash: one more crash of the version on probation; returns the count."""
        with self._lock:
            probation = self._data.get("probation")
            if not probation:
                return 0
            probation["crashes"] = int(probation.get("crashes", 0)) + 1
            self._write()
            return probation["crashes"]

    def end_probation(self) -> None:
        with self._lock:
            if self._data.pop("probation", None) is not None:
                self._write()

    def _write(self) -> None:
        write_json_atomic(self.path, self._data)
