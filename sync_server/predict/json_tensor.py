"""Compact, exact JSON for float tensors, for TF Serving's REST predict API.

TF Serving's REST API takes float inputs only as JSON numbers (`{"b64": ...}` is for string tensors),
and `json.dumps(x.tolist())` writes each float32 as the 17-digit repr of a double. Instead each value
is written with the fewest digits that still parse back to the *same float32*
(`numpy.format_float_positional(unique=True)`): the model in TF Serving sees bit-for-bit the tensor the
embedded predictor sees. Prepared photos hold at most 256 distinct values per channel, so only the
distinct values are formatted, and the nesting is joined with vectorised string operations.

Measured on a 96x96x3 photo (bench/bench_server.py prints the current numbers): about 324 kB and
9 ms here, against 590 kB and 26 ms for `json.dumps(x.tolist())`; rounding to 4 decimals would give
250 kB but no longer the same tensor.
"""

from __future__ import annotations

import numpy as np

_STR = np.dtypes.StringDType()


def encode_float_tensor(batch: np.ndarray) -> str:
    """`batch` (float32, any rank >= 1) as nested JSON lists with shortest float32 digits."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim == 0:
        raise ValueError("encode_float_tensor needs at least one dimension")
    if not np.all(np.isfinite(batch)):
        raise ValueError("encode_float_tensor got NaN or infinity")
    if batch.size == 0:
        return "[]"
    distinct, inverse = np.unique(batch, return_inverse=True)
    words = np.array([np.format_float_positional(v, unique=True, trim="-") for v in distinct], dtype=_STR)
    tokens = words[inverse.reshape(batch.shape)]
    level = tokens[..., 0]
    for k in range(1, batch.shape[-1]):
        level = np.strings.add(np.strings.add(level, ","), tokens[..., k])
    level = np.strings.add(np.strings.add("[", level), "]")
    while level.ndim > 0:
        rows = level.reshape(-1, level.shape[-1]).tolist()
        joined = ["[" + ",".join(row) + "]" for row in rows]
        level = np.array(joined, dtype=_STR).reshape(level.shape[:-1])
    return str(level)
