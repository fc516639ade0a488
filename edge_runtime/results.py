"""Plain result objects; converted to JSON only at the edge of the system (the CLI, the agent's HTTP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Category:
    """One label with its score."""

    label: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 6)}


@dataclass(frozen=True)
class Classification:
    """What one photo was classified as, by which model, where and how fast."""

    path: str | None
    categories: tuple[Category, ...] = ()
    model_name: str | None = None
    model_version: int | None = None
    source: str = "edge"  # "edge" or "server"
    latency_ms: float = 0.0
    error: dict[str, str] | None = None
    fallback: str | None = None  # None, "answered", or why it was unavailable

    @property
    def label(self) -> str | None:
        return self.categories[0].label if self.categories else None

    @property
    def score(self) -> float | None:
        return self.categories[0].score if self.categories else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `edge-classify --json` prints, one per line."""
        return {
            "path": self.path,
            "label": self.label,
            "score": None if self.score is None else round(self.score, 6),
            "top_k": [c.to_dict() for c in self.categories],
            "model": None if self.model_name is None else {"name": self.model_name, "version": self.model_version},
            "source": self.source,
            "latency_ms": round(self.latency_ms, 3),
            "fallback": self.fallback,
            "error": self.error,
        }
