"""Quality gates: may a rollout's version move on, and must it pause? A pure function of figures.

`evaluate_gates(candidate, current, gates, mode=...)` compares the candidate's figures
(`quality.VersionQuality` over the rollout's window) with the channel's current version's serving
figures over the same window and with the candidate bundle's own baseline:

    gate                 mode             fails when
    fallback_rate        canary           candidate - current > max_fallback_rate_increase
    low_confidence_rate  canary, shadow   candidate - current > max_low_confidence_increase
    disagreement_rate    canary           candidate - current > max_disagreement_increase (edge vs server top-1)
    shadow_agreement     shadow           candidate's agreement with the serving version < min_shadow_agreement
    class_jsd            canary, shadow   predicted-class JSD from the bundle baseline > max_class_jsd
    input_shift          canary, shadow   input mean shift from the bundle baseline > max_input_shift

Each check ends `pass`, `fail`, `not_enough_data` (a side has fewer than `min_predictions`) or
`not_measured` (enough predictions, but the figure does not exist: no baseline in the bundle, agents
that do not report it, no current version; or, for the disagreement gate, fewer than `min_predictions`
fallback answers on a side: fallbacks are rare by design, so their scarcity holds no step back).
A failed check pauses a rollout; a step (shadow -> canary, promote) needs no failed check and no
check waiting for data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import QualityGates

if TYPE_CHECKING:
    from .quality import VersionQuality

PASS, FAIL, NOT_ENOUGH_DATA, NOT_MEASURED = "pass", "fail", "not_enough_data", "not_measured"
SHADOW, CANARY = "shadow", "canary"
#: A figure this close above its limit still passes (rates are sums of floats).
_EPSILON = 1e-9


@dataclass(frozen=True)
class GateCheck:
    """One gate's verdict with the figures it compared."""

    gate: str
    status: str  # pass | fail | not_enough_data | not_measured
    candidate: float | None  # the candidate's figure
    current: float | None  # the current version's figure (None for gates against the baseline)
    limit: float  # the margin, maximum or minimum it was held to
    samples: tuple[int, int | None]  # (candidate, current) predictions, or fallback answers
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "status": self.status,
            "candidate": self.candidate,
            "current": self.current,
            "limit": self.limit,
            "samples": list(self.samples),
            "message": self.message,
        }


@dataclass(frozen=True)
class GateResult:
    """Every gate's verdict for one candidate in one mode."""

    mode: str
    version: int
    current_version: int | None
    checks: tuple[GateCheck, ...]
    candidate: "VersionQuality"
    current: "VersionQuality | None"
    gates: QualityGates

    @property
    def failed(self) -> tuple[GateCheck, ...]:
        """Checks the candidate failed: these pause a rollout."""
        return tuple(c for c in self.checks if c.status == FAIL)

    @property
    def waiting(self) -> tuple[GateCheck, ...]:
        """Checks that cannot judge yet for want of predictions: these block a step, never pause."""
        return tuple(c for c in self.checks if c.status == NOT_ENOUGH_DATA)

    @property
    def passed(self) -> bool:
        """True when the rollout may move on: nothing failed and nothing waits for data."""
        return not self.failed and not self.waiting

    def summary(self) -> str:
        """One line: what failed, else what waits for data, else that the gates were met."""
        if self.failed:
            return "; ".join(c.message for c in self.failed)
        if self.waiting:
            return "; ".join(c.message for c in self.waiting)
        return f"quality gates met for version {self.version} ({self.mode})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "version": self.version,
            "current_version": self.current_version,
            "passed": self.passed,
            "failed": [c.gate for c in self.failed],
            "not_enough_data": [c.gate for c in self.waiting],
            "summary": self.summary(),
            "checks": [c.to_dict() for c in self.checks],
            "candidate": self.candidate.to_dict(),
            "current": self.current.to_dict() if self.current is not None else None,
            "gates": self.gates.to_dict(),
        }


def gates_for(mode: str) -> tuple[str, ...]:
    """The gates that judge a rollout in `mode` (shadow figures have no fallbacks to compare)."""
    if mode == SHADOW:
        return ("low_confidence_rate", "shadow_agreement", "class_jsd", "input_shift")
    return ("fallback_rate", "low_confidence_rate", "disagreement_rate", "class_jsd", "input_shift")


def evaluate_gates(
    candidate: "VersionQuality", current: "VersionQuality | None", gates: QualityGates, *, mode: str
) -> GateResult:
    """Judge `candidate` (the rollout's version; shadow figures in mode shadow, serving figures in mode
    canary) against `current` (the channel's version, serving, same channel and window; None when the
    channel has no version) and the candidate bundle's baseline."""
    if mode not in (SHADOW, CANARY):
        raise ValueError(f"mode must be {SHADOW!r} or {CANARY!r}, got {mode!r}")
    checks = []
    for gate in gates_for(mode):
        if gate == "fallback_rate":
            checks.append(_increase(gate, "fallback rate", candidate, current, gates.max_fallback_rate_increase, gates))
        elif gate == "low_confidence_rate":
            checks.append(_increase(gate, "low-confidence rate", candidate, current, gates.max_low_confidence_increase, gates))
        elif gate == "disagreement_rate":
            checks.append(_increase(gate, "edge-vs-server disagreement", candidate, current, gates.max_disagreement_increase,
                                    gates, unit="fallback answers"))
        elif gate == "shadow_agreement":
            checks.append(_agreement(candidate, current, gates))
        elif gate == "class_jsd":
            checks.append(_from_baseline(gate, "class distribution drift", "JSD", candidate, gates.max_class_jsd, gates))
        else:
            checks.append(_from_baseline(gate, "input shift", "baseline stds", candidate, gates.max_input_shift, gates))
    return GateResult(mode, candidate.version, current.version if current is not None else None, tuple(checks),
                      candidate, current, gates)


# --- the checks ------------------------------------------------------------------------------------------


def _increase(gate: str, label: str, candidate: "VersionQuality", current: "VersionQuality | None", margin: float,
              gates: QualityGates, *, unit: str = "predictions") -> GateCheck:
    """The candidate's rate may exceed the current version's by at most `margin`."""
    mine = getattr(candidate, gate)
    if current is None:
        return GateCheck(gate, NOT_MEASURED, mine, None, margin, (candidate.predictions, None),
                         f"{label}: not measured (the channel has no current version to compare with)")
    theirs = getattr(current, gate)
    if unit == "fallback answers":
        samples = (candidate.fallback_answers, current.fallback_answers)
        counts = (candidate.predictions, current.predictions)
    else:
        samples = counts = (candidate.predictions, current.predictions)
    short = _short(counts, gates)
    if short:
        return GateCheck(gate, NOT_ENOUGH_DATA, mine, theirs, margin, samples, f"{label}: not enough data ({short})")
    few = _short(samples, gates, unit) if samples != counts else None
    if few:  # fallbacks are rare by design: too few answers to judge holds no step back
        return GateCheck(gate, NOT_MEASURED, mine, theirs, margin, samples, f"{label}: not measured (only {few})")
    if mine is None or theirs is None:
        return GateCheck(gate, NOT_MEASURED, mine, theirs, margin, samples,
                         f"{label}: not measured (not reported for version {candidate.version if mine is None else current.version})")
    diff = mine - theirs
    verdict = FAIL if diff > margin + _EPSILON else PASS
    where = "above" if verdict == FAIL else "within"
    message = (f"{label} {mine:.2f} vs {theirs:.2f} on version {current.version} ({diff:+.2f}, {where} the "
               f"+{margin:.2f} margin) over {samples[0]} and {samples[1]} {unit}")
    return GateCheck(gate, verdict, mine, theirs, margin, samples, message)


def _agreement(candidate: "VersionQuality", current: "VersionQuality | None", gates: QualityGates) -> GateCheck:
    """In shadow, the candidate's top-1 must agree with the serving version's on enough samples."""
    gate, label, minimum = "shadow_agreement", "shadow agreement", gates.min_shadow_agreement
    mine = candidate.shadow_agreement
    samples = (candidate.predictions, None)
    short = _short((candidate.predictions,), gates)
    if short:
        return GateCheck(gate, NOT_ENOUGH_DATA, mine, None, minimum, samples, f"{label}: not enough data ({short})")
    if mine is None:
        return GateCheck(gate, NOT_MEASURED, None, None, minimum, samples,
                         f"{label}: not measured (no agreements reported for version {candidate.version})")
    verdict = FAIL if mine < minimum - _EPSILON else PASS
    where = "below" if verdict == FAIL else "at least"
    with_ = f" with version {current.version}" if current is not None else ""
    message = (f"shadow agreement {mine:.2f}{with_} ({where} the {minimum:.2f} minimum) over "
               f"{candidate.predictions} samples of version {candidate.version}")
    return GateCheck(gate, verdict, mine, None, minimum, samples, message)


def _from_baseline(gate: str, label: str, unit: str, candidate: "VersionQuality", maximum: float,
                   gates: QualityGates) -> GateCheck:
    """The candidate's drift from its own bundle's baseline may be at most `maximum`."""
    mine = getattr(candidate, gate)
    samples = (candidate.predictions, None)
    short = _short((candidate.predictions,), gates)
    if short:
        return GateCheck(gate, NOT_ENOUGH_DATA, mine, None, maximum, samples, f"{label}: not enough data ({short})")
    if mine is None:
        return GateCheck(gate, NOT_MEASURED, None, None, maximum, samples,
                         f"{label}: not measured (no baseline in version {candidate.version}'s bundle, or not reported)")
    verdict = FAIL if mine > maximum + _EPSILON else PASS
    where = "above" if verdict == FAIL else "within"
    message = (f"{label} {mine:.2f} {unit} from version {candidate.version}'s bundle baseline ({where} the "
               f"{maximum:.2f} maximum) over {candidate.predictions} predictions")
    return GateCheck(gate, verdict, mine, None, maximum, samples, message)


def _short(counts: tuple[int, ...], gates: QualityGates, unit: str = "predictions") -> str | None:
    """None when every side has `min_predictions`; else how many each side has."""
    if all(n >= gates.min_predictions for n in counts):
        return None
    each = " on each side" if len(counts) > 1 else ""
    return f"{' and '.join(str(n) for n in counts)} {unit}; {gates.min_predictions} needed{each}"
