"""ResNet v1 (torchvision layout), seed 001's CIFAR ResNet-18, and pre-activation (v2) ResNets.

Module names follow torchvision (conv1, bn1, layer{i}_{j}/..., fc) so `jaxcnn.convert` can map
`layer1.0.conv1.weight`-style keys one to one.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import BasicBlock, Bottleneck, conv, conv_bn, norm, norm_relu
from jaxcnn.models.registry import register_model


class ResNet(nn.Module):
    """ResNet. `stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool; `stem='cifar'`: 3x3/1 conv, no pool.
    `preact=True` gives ResNet v2: BN-ReLU before each conv, no BN after the stem, a final BN-ReLU."""
    num_classes: int = 1000
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = "basic"          # 'basic' | 'bottleneck'
    width: int = 64
    stem: str = "imagenet"
    preact: bool = False
    se: bool = False
    se_reduction: int = 16
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = {"basic": BasicBlock, "bottleneck": Bottleneck}[self.block]
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        stem = conv(self.width, *((7, 2) if self.stem == "imagenet" else (3, 1)), name="conv1", **kw)
        x = stem(x) if self.preact else conv_bn(x, stem, norm(train, name="bn1", **kw), train)
        if self.stem == "imagenet":
            x = ops.max_pool(x, 3, 2, 1)
        self.sow("intermediates", "stem", x)
        for i, n in enumerate(self.stage_sizes):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                x = block_cls(self.width * 2 ** i, stride, preact=self.preact, se=self.se,
                              se_reduction=self.se_reduction, name=f"layer{i + 1}_{j}", **kw)(x, train)
            self.sow("intermediates", f"stage{i + 1}", x)
        if self.preact:
            x = norm_relu(norm(train, name="bn_final", **kw), x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="fc", **kw)(x)


_IMAGENET = [("resnet18", (2, 2, 2, 2), "basic"), ("resnet34", (3, 4, 6, 3), "basic"),
             ("resnet50", (3, 4, 6, 3), "bottleneck")]
for _name, _sizes, _block in _IMAGENET:
    register_model(_name, image_size=224, num_classes=1000, recipe="seed004",
                   description=f"{_name}, torchvision layout")(
        partial(ResNet, stage_sizes=_sizes, block=_block))

register_model("resnet18_cifar", image_size=32, recipe="seed001",
               description="seed 001's ResNet-18: 3x3 stem, no max-pool, projection shortcuts")(
    partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic", stem="cifar"))
register_model("preact_resnet18_cifar", image_size=32, recipe="seed001",
               description="pre-activation ResNet-18 for 32x32 (He et al. 2016, identity mappings)")(
    partial(ResNet, stage_sizes=(2, 2, 2, 2), block="basic", stem="cifar", preact=True))
register_model("resnet50v2", image_size=224, num_classes=1000, recipe="seed004",
               description="pre-activation ResNet-50 (v2), stride on the first block of a stage")(
    partial(ResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck", preact=True))
