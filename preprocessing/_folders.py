"""Find labelled photos in a folder laid out as `ROOT/<label>/<photo>`.

Training, calibration and the converter's validation all read data sets through this, so they
agree on which files count and in which order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ._errors import PreprocessingError

#: File endings taken as photos when a folder is listed (the format itself is still sniffed).
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


class DatasetError(PreprocessingError, ValueError):
    """Raised when a folder of labelled photos is missing, empty or does not match its labels."""


@dataclass(frozen=True)
class LabeledImages:
    """Photo paths with the index of their label in `labels`."""

    paths: tuple[Path, ...]
    targets: tuple[int, ...]
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)


def list_images(root: str | Path) -> list[Path]:
    """Every photo file below `root`, sorted, skipping hidden files and folders."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"{root} does not exist")
    found = [
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(found)


def list_labeled_images(root: str | Path, labels: list[str] | tuple[str, ...] | None = None) -> LabeledImages:
    """Photos in `root/<label>/`, labels from `labels`, else `root/labels.txt`, else sorted folders."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of labelled photos (expected ROOT/<label>/<photo>)")
    if labels is None:
        labels_file = root / "labels.txt"
        if labels_file.is_file():
            labels = read_labels(labels_file)
        else:
            labels = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    labels = tuple(labels)
    index = {label: i for i, label in enumerate(labels)}
    paths: list[Path] = []
    targets: list[int] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if folder.name not in index:
            raise DatasetError(f"{folder} is not one of the labels ({', '.join(labels)})")
        for path in list_images(folder):
            paths.append(path)
            targets.append(index[folder.name])
    if not paths:
        raise DatasetError(f"{root} holds no photos (expected ROOT/<label>/<photo>.jpg)")
    return LabeledImages(tuple(paths), tuple(targets), labels)


def read_labels(path: str | Path) -> tuple[str, ...]:
    """Read a labels file: one label per line, blank lines ignored, duplicates refused."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read labels file {path}: {exc}") from exc
    labels = tuple(line.strip() for line in lines if line.strip())
    if not labels:
        raise DatasetError(f"labels file {path} is empty")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise DatasetError(f"labels file {path} repeats {', '.join(duplicates)}")
    return labels
