"""Turn a decoded photo into a model input, exactly as the `PreprocessSpec` says."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ._budget import DEFAULT_BUDGET, DecodeBudget
from ._decode import DEFAULT_LIMITS, DecodeLimits, ImageSource, decode_then
from ._spec import PreprocessSpec

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def prepare(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Resize, normalise and (for integer models) quantize an RGB uint8 array.

    Returns an array of shape (spec.height, spec.width, 3) and dtype `spec.dtype`; add the batch
    axis yourself (`x[None]`) or use `numpy.stack` for a batch.
    """
    _check_rgb(image, "prepare")
    return _prepare_image(Image.fromarray(image), spec)


def fit_pixels(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The fitted uint8 pixels (`spec.pixel_shape`) of an RGB uint8 array, as `load_image` returns it.

    `fit_pixels(load_image(s), spec)` equals `preprocess_pixels(s, spec)`, and `normalise` of it equals
    `prepare`: for code that decodes once and needs both the pixels and the model input.
    """
    _check_rgb(image, "fit_pixels")
    return np.ascontiguousarray(np.asarray(_fit(Image.fromarray(image), spec)), dtype=np.uint8)


def _check_rgb(image: np.ndarray, caller: str) -> None:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{caller} needs an RGB uint8 array of shape (height, width, 3), as load_image returns; "
            f"got {getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}"
        )


def _prepare_image(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return _normalise(np.asarray(_fit(image, spec)), spec)


def preprocess(
    source: ImageSource,
    spec: PreprocessSpec,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    threads: int | None = None,
    budget: DecodeBudget | None = DEFAULT_BUDGET,
) -> np.ndarray:
    """Decode `source` and prepare it: the one path every part of the system uses for a photo.

    `threads` bounds the cores one big JPEG's decode may use (default: two where there are two);
    it changes the speed, never the tensor. Callers that already decode photos in parallel pass 1.
    The decode and the resize run inside `budget` (see `load_image`); a busy budget raises
    `DecodeBusyError`, a photo larger than the whole budget `InvalidImageError("too_large")`.
    """
    draft = spec.size if spec.jpeg_draft else None
    # Same steps as prepare(load_image(...)), without turning the decoded photo into an array and back.
    return decode_then(
        source, lambda image: _prepare_image(image, spec), limits=limits, draft_size=draft, threads=threads,
        budget=budget, use_bytes=lambda size: _fit_bytes(size, spec),
    )


def preprocess_pixels(
    source: ImageSource,
    spec: PreprocessSpec,
    *,
    limits: DecodeLimits = DEFAULT_LIMITS,
    threads: int | None = None,
    budget: DecodeBudget | None = DEFAULT_BUDGET,
) -> np.ndarray:
    """Decode and fit `source` like `preprocess`, stopping before normalisation: uint8 `spec.pixel_shape`.

    `normalise(preprocess_pixels(s, spec), spec)` equals `preprocess(s, spec)` exactly; the device
    sends these pixels to the server's full model instead of the photo.
    """
    draft = spec.size if spec.jpeg_draft else None
    return decode_then(
        source, lambda image: np.ascontiguousarray(np.asarray(_fit(image, spec)), dtype=np.uint8), limits=limits,
        draft_size=draft, threads=threads, budget=budget, use_bytes=lambda size: _fit_bytes(size, spec),
    )


def normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """The model input for fitted pixels (uint8, `spec.pixel_shape`): scale, mean, std, quantization."""
    if not isinstance(pixels, np.ndarray) or pixels.dtype != np.uint8 or pixels.shape != spec.pixel_shape:
        raise ValueError(
            f"normalise needs uint8 pixels of shape {spec.pixel_shape}, as preprocess_pixels returns; "
            f"got {getattr(pixels, 'dtype', type(pixels).__name__)} {getattr(pixels, 'shape', '')}"
        )
    return _normalise(pixels, spec)


def _fit_bytes(size: tuple[int, int], spec: PreprocessSpec) -> int:
    """What `_prepare_image` allocates for a picture of `size`: the resize's intermediate rows and outputs."""
    target = spec.width * spec.height
    return spec.width * size[1] * 4 + target * 4 * 2 + target * 3 * 4 * 3


def _fit(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    resample = _FILTERS[spec.resize]
    width, height = image.size
    target_w, target_h = spec.size
    if spec.fit == "stretch":
        return image.resize((target_w, target_h), resample)
    if spec.fit == "center_crop":
        target_aspect = target_w / target_h
        if width / height > target_aspect:
            crop_w = height * target_aspect
            left = (width - crop_w) / 2
            box = (left, 0.0, left + crop_w, float(height))
        else:
            crop_h = width / target_aspect
            top = (height - crop_h) / 2
            box = (0.0, top, float(width), top + crop_h)
        return image.resize((target_w, target_h), resample, box=box)
    # pad: fit inside, centre on a canvas of pad_color
    factor = min(target_w / width, target_h / height)
    inner = (max(1, min(target_w, round(width * factor))), max(1, min(target_h, round(height * factor))))
    canvas = Image.new("RGB", (target_w, target_h), spec.pad_color)
    canvas.paste(image.resize(inner, resample), ((target_w - inner[0]) // 2, (target_h - inner[1]) // 2))
    return canvas


def _normalise(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    if spec.dtype == "uint8" and spec.quantization is None:
        return np.ascontiguousarray(pixels, dtype=np.uint8)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (pixels.astype(np.float32) * np.float32(spec.scale) - mean) / std
    if spec.dtype == "float32":
        return x
    q_scale, zero_point = spec.quantization  # type: ignore[misc]
    low, high = (0, 255) if spec.dtype == "uint8" else (-128, 127)
    q = np.rint(x / np.float32(q_scale)) + zero_point
    return np.clip(q, low, high).astype(spec.dtype)
