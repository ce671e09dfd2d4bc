"""FastNet: Keller Jordan's airbench94 network (the `fast` recipe's model), with ReLU.

airbench94 (itself from hlb-CIFAR10 and Page's ResNet-9): a 2x2 unpadded stem conv (24 filters,
the recipe's patch-whitening layer), then three groups of conv -> max-pool -> BN -> act -> conv ->
BN -> act (64, 256, 256 channels), a global max-pool and a bias-free linear head whose logits are
scaled down (x1/9). Differences: ReLU instead of GELU (GELU's step was 22% slower on the 2-core
CPU, 940 against 1,205 img/s, before the ReLUs were fused into the BatchNorms), and a BatchNorm
after the stem (`stem_norm=False` builds airbench's biased stem without one: 90.22% against 90.56%
validation accuracy in session 29, not taken). Each group pools right after its
first conv, so the second conv and both BNs run at a quarter of the pixels. Convolutions start
as identities on their first channels ("dirac" init), an implicit residual that lets the plain
(skip-free) stack train fast; airbench measured 21 -> 18 epochs to 94% from it.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxcnn import ops
from jaxcnn.layers import conv, conv_init, norm, norm_relu
from jaxcnn.models.registry import register_model


def dirac_init(base: Callable = conv_init) -> Callable:
    """`base` init, then output channel i < min(in, out) becomes the identity on input channel i
    (torch.nn.init.dirac_ applied to the first in-channels filters, as airbench does)."""
    def init(key, shape, dtype=jnp.float32):
        w = base(key, shape, dtype)
        kh, kw, cin, cout = shape
        n = min(cin, cout)
        eye = jnp.zeros((kh, kw, cin, n), dtype).at[kh // 2, kw // 2].set(jnp.eye(cin, n, dtype=dtype))
        return w.at[..., :n].set(eye)
    return init


class ConvGroup(nn.Module):
    """conv(3x3) -> max-pool 2 -> BN -> act -> conv(3x3) -> BN -> act (airbench's ConvGroup)."""
    features: int
    act: Callable = nn.relu
    dirac: bool = True
    bn_momentum: float = 0.9
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        init = dirac_init() if self.dirac else conv_init
        x = conv(self.features, 3, kernel_init=init, name="conv1", **kw)(x)
        x = ops.max_pool(x, 2, 2)
        x = _norm_act(x, self.act, train, self.bn_momentum, "bn1", kw)
        x = conv(self.features, 3, kernel_init=init, name="conv2", **kw)(x)
        return _norm_act(x, self.act, train, self.bn_momentum, "bn2", kw)


def _norm_act(x, act, train, momentum, name, kw):
    """act(BN(x)); a ReLU is fused into the BatchNorm (`norm_relu`: its gradient recomputes the
    mask instead of storing the pre-activation, and in bf16 on the CPU it runs on oneDNN). Until
    session 29 fastnet applied the ReLU after an unfused BatchNorm: its bf16 step at batch 256
    ran at 964 against 1,101 img/s fused (one process, alternated; benchmarks/NOTES.md)."""
    bn = norm(train, momentum=momentum, name=name, **kw)
    return norm_relu(bn, x) if act is nn.relu else act(bn(x))


class FastNet(nn.Module):
    """Stem conv-BN-act at full resolution, len(widths) ConvGroups (each halves the side), global
    max-pool, linear head (no bias) scaled by `logit_scale`."""
    num_classes: int = 10
    stem_width: int = 24
    stem_stride: int = 1         # 2: a 2x2/2 patchify stem, every later layer at a quarter of the pixels
    # airbench's 2x2 stem, unpadded (32 -> 31 px, then 15, 7, 3): its whitening layer takes all 12
    # directions of a 2x2 patch (24 filters = +/- 12). 3: padded, 32 px throughout.
    stem_kernel: int = 2
    # airbench94's. Until session 28 the recipe used (32, 64, 128) with a 3x3 stem: 2.4x the images/s
    # (2,900 against 1,205), 1.9 points less validation accuracy in the same 10 minutes.
    widths: Sequence[int] = (64, 256, 256)
    # 'relu' (Page's ResNet-9; fused into the BatchNorm, see _norm_act) | 'gelu' (airbench)
    act: str = "relu"
    dirac: bool = True
    # airbench's stem is the whitening conv with a bias and no BatchNorm; False builds that.
    stem_norm: bool = True
    # Flax's convention (PyTorch's 0.1). airbench uses 0.6 (its 0.4), which it found to help only
    # with lookahead: the pair gave 90.42% against 90.56% validation accuracy here (session 29).
    bn_momentum: float = 0.9
    logit_scale: float = 1 / 9   # airbench's output Mul(1/9); Page uses 0.125
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False, features_only: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = {"gelu": nn.gelu, "relu": nn.relu}[self.act]
        s = self.stem_stride  # > 1: a patchify stem, kernel = stride; else odd kernels keep the side
        k = s if s > 1 else self.stem_kernel
        x = conv(self.stem_width, k, s, padding=0 if s > 1 else (k - 1) // 2, use_bias=not self.stem_norm,
                 name="stem_conv", **kw)(x)
        x = _norm_act(x, act, train, self.bn_momentum, "stem_bn", kw) if self.stem_norm else act(x)
        self.sow("intermediates", "stem", x)
        for i, w in enumerate(self.widths):
            x = ConvGroup(w, act, self.dirac, self.bn_momentum, name=f"block{i + 1}", **kw)(x, train)
            self.sow("intermediates", f"stage{i + 1}", x)
        x = jnp.max(x, axis=(1, 2))
        if features_only:
            return x
        x = nn.Dense(self.num_classes, use_bias=False, name="head", **kw)(x)
        return x * jnp.asarray(self.logit_scale, x.dtype)


@register_model("fastnet", image_size=32, recipe="fast",
                description="airbench94's net (2x2 stem 24, groups 64/256/256), ReLU, dirac init; "
                            "the --recipe fast model (1.97M parameters)")
def fastnet(**kw):
    return FastNet(**kw)
