"""The numeric precisions a network can train in (`train.mixed_precision`), without importing
Keras: the driver checks a config with them and never imports TensorFlow."""

from __future__ import annotations

# train.mixed_precision -> the Keras dtype policy the network is built under. Mixed policies keep
# the variables in float32 and compute in the 16-bit type; the output layer is float32 anyway
# (models.networks), so the softmax and the loss stay in float32. Under float16 Keras' compile
# scales the loss (LossScaleOptimizer), as float16's narrow range needs; bfloat16 has float32's.
PRECISIONS: dict[str, str] = {
    "none": "float32",
    "bfloat16": "mixed_bfloat16",
    "float16": "mixed_float16",
}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(
            f"train.mixed_precision: expected one of {', '.join(PRECISIONS)}, "
            f"received {precision!r}."
        )
    return precision
