"""The demo classifier: a small MobileNet-style network built from ops every edge target runs.

Conv2D, DepthwiseConv2D, BatchNormalization (folded into the convolutions on conversion), ReLU6,
global average pooling, Dropout (gone at inference) and a Dense softmax: all convert cleanly to
TFLite float, dynamic-range and full int8, run on the GPU delegate, and are supported by
tensorflow_model_optimization's quantization-aware training and pruning. That is why this uses
`tf_keras` (Keras 2) and not Keras 3: tfmot only wraps tf_keras models.

The input is the float32 tensor `PreprocessSpec` makes (already resized and normalised); the model
does no preprocessing of its own, so the device and training prepare photos with the same code.
"""

from __future__ import annotations

import tf_keras as keras

#: (pointwise filters at width 1.0, stride of the depthwise conv) of each depthwise-separable block.
#: MobileNet v1's first seven blocks and a last 512-wide one: at 96x96 the feature map goes
#: 48 -> 24 -> 12 -> 6 -> 3, which is plenty for a handful of product categories.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
)
STEM_FILTERS = 32
#: BatchNormalization momentum. Keras' 0.99 needs hundreds of steps before the moving statistics
#: (used at inference) catch up; a small data set has ~60 steps an epoch, so 0.9.
BN_MOMENTUM = 0.9


def _channels(filters: int, width: float) -> int:
    """Scale a filter count by `width`, rounding to a multiple of 8 (what delegates like best)."""
    return max(8, int(filters * width + 4) // 8 * 8)


def build_classifier(
    num_classes: int,
    input_size: tuple[int, int] = (96, 96),
    width: float = 1.0,
    dropout: float = 0.2,
    seed: int = 0,
) -> keras.Model:
    """A MobileNet-style classifier: float32 (H, W, 3) in, softmax over `num_classes` out.

    `input_size` is (height, width), as in `PreprocessSpec`. `width` scales every layer's channel
    count (MobileNet's alpha). The output layer is named ``"probabilities"``. Weights are
    initialised from `seed`, so the same arguments build the same model.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be a whole number of at least 2, got {num_classes!r}")
    height, width_px = (int(v) for v in input_size)
    if height < 8 or width_px < 8:
        raise ValueError(f"input_size must be at least 8x8, got {input_size!r}")
    if not 0 < width <= 4:
        raise ValueError(f"width must be in (0, 4], got {width!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    seeds = iter(range(seed * 1000, seed * 1000 + 1000))

    def he() -> keras.initializers.Initializer:
        return keras.initializers.HeNormal(seed=next(seeds))

    def conv_bn_relu(x, filters: int, kernel: int, stride: int, name: str):
        x = keras.layers.Conv2D(
            filters, kernel, strides=stride, padding="same", use_bias=False,
            kernel_initializer=he(), name=f"{name}_conv",
        )(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
        return keras.layers.ReLU(6.0, name=f"{name}_relu")(x)

    inputs = keras.Input(shape=(height, width_px, 3), dtype="float32", name="image")
    x = conv_bn_relu(inputs, _channels(STEM_FILTERS, width), 3, 2, "stem")
    for i, (filters, stride) in enumerate(BLOCKS, start=1):
        name = f"block{i}"
        x = keras.layers.DepthwiseConv2D(
            3, strides=stride, padding="same", use_bias=False,
            depthwise_initializer=he(), name=f"{name}_dw",
        )(x)
        x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_dw_bn")(x)
        x = keras.layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
        x = conv_bn_relu(x, _channels(filters, width), 1, 1, f"{name}_pw")
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, seed=next(seeds), name="dropout")(x)
    outputs = keras.layers.Dense(
        num_classes,
        activation="softmax",
        kernel_initializer=keras.initializers.GlorotUniform(seed=next(seeds)),
        name="probabilities",
    )(x)
    return keras.Model(inputs, outputs, name=f"edge_demo_w{width:g}_{height}x{width_px}")
