"""Seed 004's ResDenseNet: dense residual blocks (concat inside, add outside) with doubling
transitions. Names mirror the seed's PyTorch module (stem, stages.{i} as block{i+1}, transition{i},
final_bn, classifier); `stage{i}` is the name of each block's output in `intermediates`."""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import DenseResidualBlock, Transition, conv, conv_bn, norm, norm_relu
from jaxcnn.models.registry import register_model


class ResDenseNet(nn.Module):
    """Stem -> [DRB -> Transition(x2 width, /2)] x 3 -> DRB -> BN-ReLU-GAP-FC (seed 004)."""
    num_classes: int = 1000
    growth_rate: int = 32
    block_config: Sequence[int] = (3, 4, 6, 4)
    num_init_features: int = 64
    bn_size: int = 4
    stem: str = "imagenet"
    se: bool = False
    se_reduction: int = 16
    remat: bool = False   # True: recompute dense layers in the backward pass (see layers.DenseBlock)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.num_init_features
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        k, s = (7, 2) if self.stem == "imagenet" else (3, 1)
        x = conv_bn(x, conv(ch, k, s, name="stem_conv", **kw), norm(train, name="stem_bn", **kw), train)
        if self.stem == "imagenet":
            x = ops.max_pool(x, 3, 2, 1)
        self.sow("intermediates", "stem", x)
        for i, n in enumerate(self.block_config):
            x = DenseResidualBlock(n, self.growth_rate, self.bn_size, se=self.se,
                                   se_reduction=self.se_reduction, remat=self.remat,
                                   name=f"block{i + 1}", **kw)(x, train)
            self.sow("intermediates", f"stage{i + 1}", x)
            if i != len(self.block_config) - 1:
                ch *= 2
                x = Transition(ch, name=f"transition{i + 1}", **kw)(x, train)
        x = norm_relu(norm(train, name="final_bn", **kw), x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="classifier", **kw)(x)


register_model("resdensenet", image_size=224, num_classes=3, recipe="seed004",
               description="seed 004 ResDenseNet: 7x7/2 stem + max-pool, DRBs (3,4,6,4), k=32")(
    partial(ResDenseNet, stem="imagenet"))
register_model("resdensenet_cifar", image_size=32, num_classes=10, recipe="seed004",
               description="ResDenseNet with a 3x3 stem and no max-pool, for 32x32")(
    partial(ResDenseNet, stem="cifar"))
