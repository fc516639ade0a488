"""What a conversion measured: the validation report and the GPU check, as plain dataclasses.

They travel inside `manifest.json` (devices and the server read them without TensorFlow) and are
printed by `edge-convert` as text or, with `--json`, as JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .baseline import Baseline


@dataclass(frozen=True)
class ModelScore:
    """One model's results on the validation images."""

    accuracy: float
    size_bytes: int
    #: Median and 90th percentile of single-image inference time (batch of one, photo already prepared).
    latency_ms: float
    latency_p90_ms: float


@dataclass(frozen=True)
class ClassAgreement:
    """Results on the validation images of one true label: where full-int8 collapses show up."""

    label: str
    images: int
    saved_model_accuracy: float
    tflite_accuracy: float
    agreement: float


@dataclass(frozen=True)
class ValidationReport:
    """The converted model against its SavedModel on labelled validation photos."""

    images: int
    saved_model: ModelScore
    tflite: ModelScore
    #: Fraction of photos where both models pick the same top-1 label.
    agreement: float
    #: Mean and max of |p_tflite - p_savedmodel| over every photo and class.
    mean_abs_diff: float
    max_abs_diff: float
    per_class: tuple[ClassAgreement, ...]
    min_agreement: float
    min_class_agreement: float
    #: The bundle's default confidence threshold, and how the TFLite model fares above it.
    confidence_threshold: float
    coverage_at_threshold: float
    accuracy_at_threshold: float
    threads: int = 1
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        """True when overall and every class's agreement reach their thresholds."""
        return not self.failures

    @property
    def size_ratio(self) -> float:
        """TFLite model size over SavedModel size."""
        return self.tflite.size_bytes / max(1, self.saved_model.size_bytes)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["per_class"] = [asdict(c) for c in self.per_class]
        data["failures"] = list(self.failures)
        data["passed"] = self.passed
        data["size_ratio"] = self.size_ratio
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ValidationReport":
        fields = dict(data)
        fields.pop("passed", None)
        fields.pop("size_ratio", None)
        fields["saved_model"] = ModelScore(**fields["saved_model"])
        fields["tflite"] = ModelScore(**fields["tflite"])
        fields["per_class"] = tuple(ClassAgreement(**c) for c in fields["per_class"])
        fields["failures"] = tuple(fields.get("failures", ()))
        return cls(**fields)


@dataclass(frozen=True)
class FallbackOp:
    """An op the GPU delegate would leave to the CPU."""

    index: int
    op: str
    reason: str


@dataclass(frozen=True)
class GpuReport:
    """GPU-delegate compatibility of the converted model, from TFLite's model analyzer."""

    compatible: bool
    ops: tuple[str, ...]
    fallback_ops: tuple[FallbackOp, ...] = ()
    #: True when the analyzer itself printed GPU warnings (some builds ship the check compiled out).
    analyzer_checked: bool = False
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ops"] = list(self.ops)
        data["fallback_ops"] = [asdict(f) for f in self.fallback_ops]
        data["notes"] = list(self.notes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GpuReport":
        return cls(
            compatible=bool(data["compatible"]),
            ops=tuple(data.get("ops", ())),
            fallback_ops=tuple(FallbackOp(**f) for f in data.get("fallback_ops", ())),
            analyzer_checked=bool(data.get("analyzer_checked", False)),
            notes=tuple(data.get("notes", ())),
        )


def format_validation(report: ValidationReport, quantization: str = "") -> str:
    """The report as an aligned text table for a terminal."""
    title = f"validation on {report.images} photos" + (f" ({quantization})" if quantization else "")
    sm, tl = report.saved_model, report.tflite
    lines = [
        title,
        f"  {'':14}{'SavedModel':>12}{'TFLite':>12}",
        f"  {'top-1 accuracy':14}{sm.accuracy:>12.1%}{tl.accuracy:>12.1%}",
        f"  {'size':14}{_size(sm.size_bytes):>12}{_size(tl.size_bytes):>12}   ratio {report.size_ratio:.2f}",
        f"  {'latency':14}{sm.latency_ms:>10.2f}ms{tl.latency_ms:>10.2f}ms   median per photo "
        f"(p90 {sm.latency_p90_ms:.2f} / {tl.latency_p90_ms:.2f} ms, TFLite {report.threads} thread"
        f"{'s' if report.threads != 1 else ''})",
        f"  top-1 agreement {report.agreement:.1%} (gate {report.min_agreement:.0%}, per class "
        f"{report.min_class_agreement:.0%}); mean |dp| {report.mean_abs_diff:.4f}, max {report.max_abs_diff:.4f}",
        f"  confidence >= {report.confidence_threshold:.2f} on {report.coverage_at_threshold:.0%} of photos, "
        f"{report.accuracy_at_threshold:.1%} of those right",
        "  per class       photos  SavedModel  TFLite  agreement",
    ]
    for c in report.per_class:
        flag = "  <-- below gate" if c.agreement < report.min_class_agreement else ""
        lines.append(
            f"    {c.label[:14]:14}{c.images:>6}{c.saved_model_accuracy:>11.0%}{c.tflite_accuracy:>8.0%}"
            f"{c.agreement:>10.0%}{flag}"
        )
    return "\n".join(lines)


def format_baseline(baseline: "Baseline", labels: tuple[str, ...]) -> str:
    """The bundle's baseline in one line: what devices and the server measure drift against."""
    top = max(range(len(baseline.class_counts)), key=baseline.class_counts.__getitem__) if baseline.class_counts else None
    share = baseline.class_counts[top] / max(1, baseline.images) if top is not None else 0.0
    largest = f"'{labels[top]}' {share:.0%}" if top is not None and top < len(labels) else "none"
    spread = ", ".join(f"{m:.1f}±{s:.1f}" for m, s in zip(baseline.input.mean, baseline.input.std))
    predicted = sum(1 for c in baseline.class_counts if c)
    return (
        f"baseline for drift (in the manifest): {baseline.images} photos, {baseline.low_confidence_rate:.0%} below "
        f"confidence {baseline.confidence_threshold:.2f}; {predicted} of {len(baseline.class_counts)} labels "
        f"predicted, largest {largest}; input mean±std per channel {spread}"
    )


def format_gpu(report: GpuReport) -> str:
    """The GPU check as text: one line when compatible, one line per fallback op otherwise."""
    if report.compatible:
        head = f"GPU delegate: all {len(report.ops)} ops supported ({', '.join(sorted(set(report.ops)))})"
        return "\n".join([head, *(f"  note: {n}" for n in report.notes)])
    lines = [f"GPU delegate: {len(report.fallback_ops)} op(s) would fall back to the CPU:"]
    lines += [f"  Op#{f.index} {f.op}: {f.reason}" for f in report.fallback_ops]
    lines += [f"  note: {n}" for n in report.notes]
    return "\n".join(lines)


def _size(n: int) -> str:
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB"
