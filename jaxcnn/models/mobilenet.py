"""MobileNet v1 for 32x32 (seed 002's depthwise-separable slimming), with a width multiplier."""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn.layers import ConvBNAct, DepthwiseSeparableConv
from jaxcnn.models.registry import register_model

# (channels, stride) per depthwise-separable unit; CIFAR variant: 3x3/1 stem, first unit stride 1.
MOBILENET_V1: Tuple[Tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))


class MobileNetV1(nn.Module):
    """MobileNet v1: conv 3x3 stem then depthwise-separable units; `width` scales every layer."""
    num_classes: int = 10
    width: float = 1.0
    cfg: Sequence[Tuple[int, int]] = MOBILENET_V1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        scale = lambda c: max(8, int(c * self.width))  # noqa: E731
        x = ConvBNAct(scale(32), 3, name="conv_stem", **kw)(x, train)
        self.sow("intermediates", "stem", x)
        stage = 0
        for i, (c, s) in enumerate(self.cfg):
            x = DepthwiseSeparableConv(scale(c), s, name=f"ds{i + 1}", **kw)(x, train)
            if i + 1 == len(self.cfg) or self.cfg[i + 1][1] > 1:  # the last unit at this resolution
                stage += 1
                self.sow("intermediates", f"stage{stage}", x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="classifier", **kw)(x)


@register_model("mobilenet_v1_cifar", image_size=32, recipe="seed002",
                description="MobileNet v1 (depthwise-separable) for 32x32, width multiplier `width`")
def mobilenet_v1_cifar(**kw):
    return MobileNetV1(**kw)
