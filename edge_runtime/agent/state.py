"""What the agent must remember across restarts, in `HOME/agent/state.json` (written atomically).

    running     true while a daemon runs: found true at start, the last run crashed
    boot_id     the kernel's boot id when the daemon started: another one at the next start means the
                device rebooted (a power cut), which is never the fault of a model
    loading     the candidate being loaded and smoke-tested, with how many runs crashed doing it
    probation   the version switched to last, its previous version, when, and the crashes since
    refused     versions that failed a step or were rolled back, with why: not tried again until
                the server assigns some other version, or, for a transient reason (crashes), until
                `retry_at` (each new refusal of the same version doubles the wait)
    shadow_refused  shadow versions that failed a step or crashed the agent, with why: not run in
                shadow again until the server names another shadow version

A damaged file (empty, random, half-written, wrong types) is read as an empty state, with a warning:
what it forgets is at worst one more try of a refused version.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from ..store import ModelRef
from .config import write_json_atomic

log = logging.getLogger("edge_agent.state")

_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
#: The longest a transient refusal waits before the version is tried again.
MAX_RETRY_S = 24 * 3600.0


def boot_id() -> str | None:
    """This boot of the machine (Linux), or None where unknown."""
    try:
        return _BOOT_ID.read_text(encoding="ascii").strip()[:64] or None
    except OSError:
        return None


def ref_key(ref: ModelRef) -> str:
    return f"{ref.name}:{ref.version}"


class AgentState:
    """The state file, read once and written on every change."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        #: True when the last run ended without `stop_run` on this same boot (set by `start_run`).
        self.rebooted = False
        self._data: dict[str, Any] = _valid(self._read())

    def _read(self) -> Any:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("cannot read the agent's state %s (%s): starting from an empty one", self.path, exc.strerror or exc)
            return {}
        try:
            data = json.loads(raw[: 1 << 20].decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            data = None
        if not isinstance(data, dict):
            log.warning("the agent's state %s was damaged (%d bytes, not a JSON object): starting from an empty one",
                        self.path, len(raw))
            return {}
        return data

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
        """Why `ref` is refused, or None (never refused, or a transient refusal whose wait is over)."""
        with self._lock:
            refusal = self._data["refused"].get(ref_key(ref))
            if refusal and refusal.get("retry_at") is not None and time.time() >= float(refusal["retry_at"]):
                return None
            return refusal

    # --- changing -------------------------------------------------------------------------------

    def start_run(self) -> bool:
        """Mark a daemon as running; True when the previous run did not stop cleanly (a crash).

        Sets `rebooted` when the machine booted since that run started (a power cut, not a crash).
        """
        with self._lock:
            crashed = bool(self._data.get("running"))
            now = boot_id()
            before = self._data.get("boot_id")
            self.rebooted = crashed and now is not None and before is not None and now != before
            self._data["running"] = True
            self._data["boot_id"] = now
            self._write()
            return crashed

    def stop_run(self) -> None:
        with self._lock:
            self._data["running"] = False
            self._write()

    def refuse(self, ref: ModelRef, step: str, reason: str, *, retry_s: float | None = None) -> dict[str, Any]:
        """Refuse `ref`: for good (until the server assigns another version), or, with `retry_s`, for a
        transient reason: until then, doubling with each new refusal of the same version."""
        with self._lock:
            key = ref_key(ref)
            now = time.time()
            refusal: dict[str, Any] = {"step": step, "reason": reason, "at": now}
            if retry_s is not None:
                times = int((self._data["refused"].get(key) or {}).get("times", 0)) + 1
                wait = min(MAX_RETRY_S, retry_s * 2 ** (times - 1))
                refusal.update(times=times, retry_at=now + wait, transient=True)
            self._data["refused"][key] = refusal
            self._write()
            return dict(refusal)

    def accepted(self, ref: ModelRef) -> None:
        """`ref` was switched to: a transient refusal of it is over."""
        with self._lock:
            if self._data["refused"].pop(ref_key(ref), None) is not None:
                self._write()

    def forget_refusals_except(self, ref: ModelRef | None) -> None:
        """The server now assigns `ref`: earlier refusals of other versions no longer apply."""
        with self._lock:
            keep = {k: v for k, v in self._data["refused"].items() if ref is not None and k == ref_key(ref)}
            if keep != self._data["refused"]:
                self._data["refused"] = keep
                self._write()

    def refuse_shadow(self, ref: ModelRef, step: str, reason: str) -> None:
        """Run `ref` in shadow no more (until the server names another shadow version)."""
        with self._lock:
            self._data["shadow_refused"][ref_key(ref)] = {"step": step, "reason": reason, "at": time.time()}
            self._write()

    def shadow_refused(self, ref: ModelRef) -> dict[str, Any] | None:
        with self._lock:
            refusal = self._data["shadow_refused"].get(ref_key(ref))
            return dict(refusal) if refusal else None

    def forget_shadow_refusals_except(self, ref: ModelRef | None) -> None:
        """The server now names `ref` (or nothing) as the shadow: earlier shadow refusals no longer apply."""
        with self._lock:
            old = self._data["shadow_refused"]
            keep = {k: v for k, v in old.items() if ref is not None and k == ref_key(ref)}
            if keep != old:
                self._data["shadow_refused"] = keep
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
        try:
            write_json_atomic(self.path, self._data)
        except OSError as exc:  # a full disk: keep going in memory, the next write tries again
            log.debug("cannot write the agent's state %s: %s", self.path, exc)


def _valid(data: dict[str, Any]) -> dict[str, Any]:
    """Keep only the entries of the expected shape (a hand-edited or damaged file loses the rest)."""
    out: dict[str, Any] = {"running": data.get("running") is True}
    if isinstance(data.get("boot_id"), str):
        out["boot_id"] = data["boot_id"][:64]
    refused = data.get("refused")
    out["refused"] = {k: v for k, v in refused.items() if isinstance(k, str) and isinstance(v, dict)} if isinstance(refused, dict) else {}
    shadow = data.get("shadow_refused")
    out["shadow_refused"] = ({k: v for k, v in shadow.items() if isinstance(k, str) and isinstance(v, dict)}
                             if isinstance(shadow, dict) else {})
    loading = data.get("loading")
    if isinstance(loading, dict) and isinstance(loading.get("key"), str) and isinstance(loading.get("crashes", 0), int):
        out["loading"] = {"key": loading["key"], "crashes": loading.get("crashes", 0)}
    probation = data.get("probation")
    if (isinstance(probation, dict) and isinstance(probation.get("name"), str) and isinstance(probation.get("version"), int)
            and isinstance(probation.get("started"), (int, float)) and isinstance(probation.get("crashes", 0), int)):
        out["probation"] = probation
    return out
