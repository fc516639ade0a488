"""GPU-delegate compatibility of a converted model, with TensorFlow Lite's model analyzer.

`tf.lite.experimental.Analyzer.analyze(..., gpu_compatibility=True)` lists every op and, in builds
that include the check, prints ``GPU COMPATIBILITY WARNING: <reason>`` under each op the delegate
would leave to the CPU. The TensorFlow 2.21 and LiteRT 2.3 wheels ship the analyzer with that check
compiled out (it calls every model compatible), so the analyzer's op list is also compared with the
ops the GPU delegate implements (`tensorflow/lite/tools/versioning/gpu_compatibility.cc`). Both are
static checks: a device's delegate can still refuse a shape or type at run time.
"""

from __future__ import annotations

import contextlib
import io
import re

from .report import FallbackOp, GpuReport

#: Builtin ops the TFLite GPU delegate implements (the cases of CheckGpuDelegateCompatibility).
GPU_DELEGATE_OPS: frozenset[str] = frozenset(
    """ABS ADD ADD_N ATAN2 AVERAGE_POOL_2D BATCH_MATMUL CAST CEIL CONCATENATION CONV_2D COS CUMSUM DENSIFY
    DEPTH_TO_SPACE DEPTHWISE_CONV_2D DEQUANTIZE DIV DYNAMIC_UPDATE_SLICE ELU EMBEDDING_LOOKUP EQUAL EXP
    FLOOR FLOOR_DIV FLOOR_MOD FULLY_CONNECTED GATHER GELU GREATER GREATER_EQUAL HARD_SWISH LEAKY_RELU LESS
    LESS_EQUAL LOG LOGICAL_AND LOGISTIC LSTM MAX_POOL_2D MAXIMUM MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL
    ONE_HOT PACK PAD PADV2 POW PRELU QUANTIZE REDUCE_MAX REDUCE_MIN REDUCE_PROD RELU RELU6 RELU_N1_TO_1
    RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR RSQRT SELECT SELECT_V2 SIGN SIN SLICE SOFTMAX
    SPACE_TO_DEPTH SPLIT SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE STABLEHLO_CLAMP STRIDED_SLICE SUB SUM TANH
    TILE TRANSPOSE TRANSPOSE_CONV""".split()
)
#: Custom ops the GPU delegate implements.
GPU_DELEGATE_CUSTOM_OPS: frozenset[str] = frozenset(
    {"Convolution2DTransposeBias", "MaxPoolingWithArgmax2D", "MaxUnpooling2D", "Resampler"}
)

_OP_LINE = re.compile(r"^\s*Op#(\d+) ([A-Za-z0-9_]+)\(")
_WARNING = "GPU COMPATIBILITY WARNING:"


def check_gpu_compatibility(model: bytes) -> GpuReport:
    """Run the model analyzer with the GPU check and list each op that would fall back to the CPU."""
    import tensorflow as tf

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        tf.lite.experimental.Analyzer.analyze(model_content=model, gpu_compatibility=True)
    return parse_analyzer_output(text.getvalue())


def parse_analyzer_output(text: str) -> GpuReport:
    """Turn the analyzer's text into a `GpuReport` (ops, fallbacks with reasons)."""
    ops: list[str] = []
    fallbacks: dict[int, FallbackOp] = {}
    analyzer_checked = False
    current: tuple[int, str] | None = None
    for line in text.splitlines():
        match = _OP_LINE.match(line)
        if match:
            current = (int(match.group(1)), match.group(2))
            ops.append(current[1])
            continue
        if _WARNING in line and current is not None and "has GPU delegate compatibility issues" not in line:
            analyzer_checked = True
            reason = line.split(_WARNING, 1)[1].strip()
            fallbacks[current[0]] = FallbackOp(current[0], current[1], reason)
    for index, op in enumerate(ops):
        if index not in fallbacks and op not in GPU_DELEGATE_OPS and op not in GPU_DELEGATE_CUSTOM_OPS:
            fallbacks[index] = FallbackOp(index, op, "not an op the GPU delegate implements")
    notes = []
    if not analyzer_checked:
        notes.append(
            "this TensorFlow build's analyzer reports no per-op GPU warnings; ops were checked against "
            "the GPU delegate's op list"
        )
    notes.append("static check: the device's delegate may still refuse a shape or type at run time")
    return GpuReport(
        compatible=not fallbacks,
        ops=tuple(ops),
        fallback_ops=tuple(fallbacks[i] for i in sorted(fallbacks)),
        analyzer_checked=analyzer_checked,
        notes=tuple(notes),
    )
