"""VGG-16 with BatchNorm for 32x32 inputs (seed 000's comparison table): the common CIFAR variant,
13 conv-BN-ReLU layers with biases, 5 max-pools, one linear classifier on the 512-d vector."""
from __future__ import annotations

from typing import Any, Sequence, Union

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import ConvBNAct
from jaxcnn.models.registry import register_model

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG with BatchNorm; 'M' in `cfg` is a 2x2 max-pool."""
    num_classes: int = 10
    cfg: Sequence[Union[int, str]] = VGG16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        i = stage = 0
        for v in self.cfg:
            if v == "M":
                x = ops.max_pool(x, 2, 2)
                stage += 1
                self.sow("intermediates", f"stage{stage}", x)
            else:
                i += 1
                x = ConvBNAct(v, 3, use_bias=True, name=f"conv{i}", **kw)(x, train)
        x = jnp.mean(x, axis=(1, 2))  # 1x1 after five pools at 32x32; GAP keeps other sizes valid
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="classifier", **kw)(x)


@register_model("vgg16_bn_cifar", image_size=32, recipe="seed000",
                description="VGG-16-BN for 32x32 (13 conv-BN-ReLU, linear classifier)")
def vgg16_bn_cifar(**kw):
    return VGG(**kw)
