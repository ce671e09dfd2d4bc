"""DenseNet (Huang et al. 2017): torchvision's ImageNet layout and DenseNet-BC for 32x32 inputs.

Module names follow torchvision's `features.*` keys (conv0, norm0, denseblock{i}/denselayer{j},
transition{i}, norm5, classifier) so that `jaxcnn.convert` maps weights one to one.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import DenseBlock, Transition, conv, conv_bn, norm, norm_relu, transition_features
from jaxcnn.models.registry import register_model


class DenseNet(nn.Module):
    """DenseNet / DenseNet-BC. `stem='imagenet'`: 7x7/2 conv-BN-ReLU-maxpool (torchvision);
    `stem='cifar'`: a single 3x3 conv of `num_init_features` channels (2k for BC)."""
    num_classes: int = 1000
    growth_rate: int = 32
    block_config: Sequence[int] = (6, 12, 24, 16)
    num_init_features: Optional[int] = None   # None: 2 * growth_rate
    bn_size: Optional[int] = 4                # None: no bottleneck (plain DenseNet)
    compression: float = 0.5
    drop_rate: float = 0.0
    stem: str = "imagenet"
    remat: bool = False   # True: recompute dense layers in the backward pass (see layers.DenseBlock)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        ch = self.num_init_features or 2 * self.growth_rate
        if self.stem == "imagenet":
            x = conv_bn(x, conv(ch, 7, 2, name="conv0", **kw), norm(train, name="norm0", **kw), train)
            x = ops.max_pool(x, 3, 2, 1)
        elif self.stem == "cifar":
            x = conv(ch, 3, name="conv0", **kw)(x)
        else:
            raise ValueError(f"stem must be 'imagenet' or 'cifar', got {self.stem!r}")
        self.sow("intermediates", "stem", x)
        for i, n in enumerate(self.block_config):
            x = DenseBlock(n, self.growth_rate, self.bn_size, self.drop_rate, remat=self.remat,
                           name=f"denseblock{i + 1}", **kw)(x, train)
            ch += n * self.growth_rate
            self.sow("intermediates", f"stage{i + 1}", x)  # the block's output, before its transition
            if i != len(self.block_config) - 1:
                ch = transition_features(ch, self.compression)
                x = Transition(ch, name=f"transition{i + 1}", **kw)(x, train)
        x = norm_relu(norm(train, name="norm5", **kw), x)
        x = jnp.mean(x, axis=(1, 2))
        if features_only:
            return x
        return nn.Dense(self.num_classes, name="classifier", **kw)(x)


def _bc_cifar(depth: int, k: int):
    n = (depth - 4) // 6  # 3 blocks of bottleneck layers (2 convs each) + stem, 2 transitions, FC
    return partial(DenseNet, growth_rate=k, block_config=(n, n, n), stem="cifar", bn_size=4,
                   compression=0.5)


for _depth, _k in [(100, 12), (250, 24), (190, 40)]:
    register_model(f"densenet_bc_{_depth}_{_k}", image_size=32, recipe="seed000",
                   description=f"DenseNet-BC L={_depth} k={_k} for 32x32 (θ=0.5, 3x3 stem of 2k)")(
        _bc_cifar(_depth, _k))


@register_model("densenet_bc_small", image_size=32, recipe="seed000",
                description="seed 000's DenseNet-BC: k=12, blocks [3,3,3], θ=0.5, 3x3 stem of 2k")
def densenet_bc_small(**kw):
    # Seed 000's Keras code also gives its convolutions biases and skips the final BN-ReLU;
    # we keep the DenseNet-BC graph (bias-free convs, final BN-ReLU) with its configuration.
    return DenseNet(**{**dict(growth_rate=12, block_config=(3, 3, 3), stem="cifar"), **kw})


for _name, _blocks in [("densenet121", (6, 12, 24, 16)), ("densenet169", (6, 12, 32, 32)),
                       ("densenet201", (6, 12, 48, 32))]:
    register_model(_name, image_size=224, num_classes=1000, recipe="seed004",
                   description=f"{_name}, torchvision layout (k=32, blocks {list(_blocks)})")(
        partial(DenseNet, growth_rate=32, block_config=_blocks, num_init_features=64))
