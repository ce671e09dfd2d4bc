"""Building blocks shared by every model family (Flax Linen, NHWC).

Every block takes `dtype` (compute) and `param_dtype` (storage). Convolutions use explicit
symmetric padding (k // 2), as PyTorch does: XLA's 'SAME' pads asymmetrically for stride 2
on even inputs, which would change every strided layer's output versus the reference models.
BatchNorm uses PyTorch's defaults (momentum 0.1 -> Flax momentum 0.9, eps 1e-5); its
statistics are always computed and stored in float32 (Flax promotes them), whatever `dtype`.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

from jaxcnn import onednn, ops, winograd

Dtype = Any
Act = Callable[[jnp.ndarray], jnp.ndarray]

# Kaiming-normal over fan_out, the initialisation torchvision's ResNet/DenseNet use.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv(features: int, kernel: int = 3, stride: int = 1, *, groups: int = 1, use_bias: bool = False,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, name: Optional[str] = None,
         padding: Optional[int] = None, kernel_init: Callable = conv_init) -> nn.Conv:
    """A square convolution padded like PyTorch's `Conv2d(..., padding=kernel // 2)`, computed by
    `ops.conv_general_dilated` (CPU-friendly gradient)."""
    p = kernel // 2 if padding is None else padding
    return (BiasedConv if use_bias else nn.Conv)(
        features, (kernel, kernel), (stride, stride), padding=((p, p), (p, p)),
        feature_group_count=groups, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=kernel_init, name=name, conv_general_dilated=ops.conv_general_dilated)


class BiasedConv(nn.Conv):
    """`nn.Conv` with a bias (same fields, variables and values) for `conv`'s square NHWC
    convolutions with explicit padding, the bias added by `ops.add_bias`: its gradient sums the
    cotangent in float32. With bf16 activations the sum Flax's `y += bias` leaves to XLA:CPU
    became a reduce-window loop (XLA's tree reduction of the upcast bf16 sum): 12.8 of simple_cnn's
    48 ms bf16 step (batch 128)."""

    @nn.compact
    def __call__(self, inputs):
        shape = tuple(self.kernel_size) + (inputs.shape[-1] // self.feature_group_count, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        dn = jax.lax.conv_dimension_numbers(inputs.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        y = self.conv_general_dilated(inputs, kernel, tuple(self.strides), tuple(self.padding),
                                      dimension_numbers=dn, feature_group_count=self.feature_group_count,
                                      precision=self.precision)
        return ops.add_bias(y, bias)


def norm(train: bool, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         name: Optional[str] = None, scale_init=nn.initializers.ones, momentum: float = 0.9) -> nn.Module:
    """BatchNorm with PyTorch's defaults; batch statistics over the (global) batch when training.
    `momentum` is Flax's (the running averages' decay): PyTorch's momentum m is Flax's 1 - m."""
    if ops.CUSTOM_BN:
        return BatchNorm(use_running_average=not train, momentum=momentum, dtype=dtype,
                         param_dtype=param_dtype, scale_init=scale_init, name=name)
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5, dtype=dtype,
                        param_dtype=param_dtype, scale_init=scale_init, name=name)


class BatchNorm(nn.Module):
    """flax.linen.BatchNorm's variables and results (params scale/bias, batch_stats mean/var,
    biased variance, float32 statistics), with the closed-form gradient of `ops.batch_norm_train`
    (faster on XLA:CPU and one activation-sized buffer less per layer)."""
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Callable = nn.initializers.ones

    @nn.compact
    def __call__(self, x, stats=None, relu: bool = False):
        """`stats`: this batch's (mean, var) of `x` from `ops.batch_stats`, computed once and
        shared (dense blocks); None computes them here. `relu`: ReLU of the result, fused into
        the BatchNorm's gradient (see `ops.batch_norm_train`)."""
        c = x.shape[-1]
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype).astype(jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype).astype(jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        dtype = self.dtype or x.dtype
        if self.use_running_average:
            return ops.batch_norm_apply(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon,
                                        dtype, relu)
        if stats is None:
            y, (mean, var) = ops.batch_norm_train(x, scale, bias, self.epsilon, jnp.dtype(dtype), relu)
        else:
            mean, var = stats
            y = ops.batch_norm_given_stats(x, mean, var, scale, bias, self.epsilon, jnp.dtype(dtype),
                                           relu)
        if not self.is_initializing():
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
            ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
        return y


def norm_relu(bn_mod: nn.Module, x, **kw):
    """ReLU(`bn_mod`(x)): fused into jaxcnn's BatchNorm, separate after flax's."""
    if isinstance(bn_mod, BatchNorm):
        return bn_mod(x, relu=True, **kw)
    return nn.relu(bn_mod(x, **kw))


def conv_bn(x, conv_mod: nn.Conv, bn_mod: nn.Module, train: bool, *, relu: bool = True,
            residual=None):
    """`conv_mod` -> `bn_mod` (-> + `residual`) (-> ReLU): ResNet's and DenseNet's conv-BN units.

    In inference on the CPU (oneDNN, one device) this is one oneDNN convolution: the BatchNorm's
    running statistics and affine folded into the kernel and a bias, the residual add and the
    ReLU as oneDNN post-ops, so the conv output is written once instead of being re-read and
    re-written by an elementwise pass. Same variables; the values differ only by rounding (the
    folded kernel is rounded to the compute dtype). Training, other layouts and `ops.FOLD_BN`
    off take the unfused path."""
    y = _folded(x, conv_mod, bn_mod, relu, residual) if not train else None
    if y is not None:
        return y
    if residual is None:
        return norm_relu(bn_mod, conv_mod(x)) if relu else bn_mod(conv_mod(x))
    y = bn_mod(conv_mod(x)) + residual
    return nn.relu(y) if relu else y


def _folded(x, conv_mod, bn_mod, relu, residual):
    if not (ops.FOLD_BN and ops.ONEDNN and ops.on_cpu() and isinstance(bn_mod, BatchNorm)
            and isinstance(conv_mod, nn.Conv) and conv_mod.feature_group_count == 1
            and bn_mod.use_running_average and not conv_mod.is_initializing()):
        return None
    cv, bv = conv_mod.variables, bn_mod.variables
    if "params" not in cv or "params" not in bv or "batch_stats" not in bv:
        return None
    dtype = conv_mod.dtype or x.dtype
    if jnp.dtype(bn_mod.dtype or dtype) != jnp.dtype(dtype):
        return None
    strides, padding = tuple(conv_mod.strides), tuple(tuple(p) for p in conv_mod.padding)
    wino = ops.WINOGRAD and winograd.applies(x.shape, cv["params"]["kernel"].shape, strides, padding, dtype)
    name = "winograd" if wino else "kernel"  # the folded kernel, or its Winograd transform
    kept = conv_mod.has_variable(FOLDED, name)  # by fold_batchnorm, once for many batches
    if kept:
        kernel, shift = conv_mod.get_variable(FOLDED, name), conv_mod.get_variable(FOLDED, "bias")
    else:
        stats, p = bv["batch_stats"], bv["params"]
        s, shift = ops.bn_affine(stats["mean"], stats["var"], p["scale"], p["bias"], bn_mod.epsilon)
        if conv_mod.use_bias:
            shift = shift + cv["params"]["bias"].astype(jnp.float32) * s
        kernel = (cv["params"]["kernel"].astype(jnp.float32) * s).astype(dtype)
        if wino:
            kernel = winograd.kernel(kernel)
    if wino:
        y = winograd.fused_conv(x.astype(dtype), kernel, shift, residual, relu)
    else:
        dn = lax.conv_dimension_numbers(x.shape, kernel.shape, ("NHWC", "HWIO", "NHWC"))
        y = onednn.fused_conv(x.astype(dtype), kernel, shift, strides, padding, dn, residual, relu)
    if y is not None and not kept and conv_mod.is_mutable_collection(FOLDED):
        conv_mod.put_variable(FOLDED, name, kernel)
        conv_mod.put_variable(FOLDED, "bias", shift)
    return y


FOLDED = "folded"  # the variable collection fold_batchnorm fills


def fold_batchnorm(apply_fn: Callable, variables, input_shape: Sequence[int], dtype: Dtype = jnp.float32):
    """`variables` plus a "folded" collection: the kernel and bias of every conv-BN unit that
    inference runs as one fused oneDNN convolution (`conv_bn`), with the BatchNorm folded in.
    `apply_fn(those, x, train=False)` then uses them instead of folding the weights again on every
    call: resnet18_cifar's fp32 eval step spends ~16 ms of ~370 (batch 128) re-reading and
    re-writing all 11M weights for that. Fold again whenever the weights change (the training
    loop does it once per evaluation). `apply_fn`: a model's `apply` (or a TrainState's
    `apply_fn`); `input_shape`: one input's shape, e.g. (32, 32, 3), traced at batch 1;
    `dtype`: the input's dtype. Where nothing folds (training layouts, several devices, other
    platforms, `ops.FOLD_BN` off) the collection is empty and the results are the same. Jit it."""
    x = jnp.zeros((1, *input_shape), dtype)
    _, new = apply_fn(variables, x, train=False, mutable=[FOLDED])
    return {**variables, FOLDED: new.get(FOLDED, {})}


class ConvBNAct(nn.Module):
    """Conv -> BatchNorm -> activation (post-activation unit of ResNet v1, VGG, the simple CNN)."""
    features: int
    kernel: int = 3
    stride: int = 1
    groups: int = 1
    use_bias: bool = False
    act: Optional[Act] = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = conv(self.features, self.kernel, self.stride, groups=self.groups,
                 use_bias=self.use_bias, name="conv", **kw)
        if self.act in (None, nn.relu):
            return conv_bn(x, c, norm(train, name="bn", **kw), train, relu=self.act is not None)
        return self.act(norm(train, name="bn", **kw)(c(x)))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (seed 002): GAP -> FC(C/r) -> ReLU -> FC(C) -> sigmoid -> rescale."""
    reduction: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        s = nn.relu(nn.Conv(max(1, c // self.reduction), (1, 1), name="fc1", **kw)(s))
        s = nn.sigmoid(nn.Conv(c, (1, 1), name="fc2", **kw)(s))
        return x * s


class DenseLayer(nn.Module):
    """DenseNet layer: BN-ReLU-1x1(bn_size*k)-BN-ReLU-3x3(k) (bottleneck), or BN-ReLU-3x3(k) when
    `bn_size` is None; output is the input with k new channels concatenated. `new_features`
    takes the earlier feature maps as a sequence and returns only the k new channels."""
    growth_rate: int
    bn_size: Optional[int] = 4
    drop_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __call__(self, x, train: bool = False):
        return jnp.concatenate([x, self.new_features((x,), train)], axis=-1)

    @nn.compact
    def new_features(self, features: Sequence[jax.Array], train: bool = False, dropout_rng=None,
                     stats=None):
        """`stats`: one (mean, var) per feature map from `ops.batch_stats` (training with
        `ops.CUSTOM_BN`), so that norm1 does not recompute what earlier layers computed."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = jnp.concatenate(list(features), axis=-1) if len(features) > 1 else features[0]
        if stats is not None:
            stats = tuple(jnp.concatenate([s[i] for s in stats]) for i in (0, 1))
        if self.bn_size:
            y = norm_relu(norm(train, name="norm1", **kw), y, **_given(stats))
            y = conv_bn(y, conv(self.bn_size * self.growth_rate, 1, name="conv1", **kw),
                        norm(train, name="norm2", **kw), train)
            y = conv(self.growth_rate, 3, name="conv2", **kw)(y)
        else:
            y = norm_relu(norm(train, name="norm1", **kw), y, **_given(stats))
            y = conv(self.growth_rate, 3, name="conv1", **kw)(y)
        if self.drop_rate > 0:
            y = nn.Dropout(self.drop_rate, deterministic=not train)(y, rng=dropout_rng)
        return y


def _given(stats) -> dict:
    """norm1's keyword arguments: shared statistics only when there are some (nn.BatchNorm,
    used with ops.CUSTOM_BN off, takes none)."""
    return {} if stats is None else {"stats": stats}


def _recomputed_new_features(layer: DenseLayer, features: tuple, dropout_rng, stats=None):
    """`layer.new_features(features, train=True)` that stores only its inputs for the backward
    pass and recomputes the rest there: `nn.remat` on the CPU. XLA:CPU drops the
    optimization barriers with which `jax.checkpoint` keeps the recomputation apart from the
    forward pass, and common-subexpression elimination then merges the two: remat saved no byte.
    Here the backward pass recomputes from inputs passed through `ops.fence` together with the
    cotangent, which XLA can neither merge with the forward pass nor schedule before it."""
    def f(mdl, feats, stats):
        return mdl.new_features(feats, True, dropout_rng, stats)

    def fwd(mdl, feats, stats):
        return f(mdl, feats, stats), (mdl.variables, feats, stats)

    def bwd(res, g):
        variables, feats, stats = res
        g, *feats = ops.fence((g, *feats), jax.tree_util.tree_leaves(variables["params"])[0])
        unbound = layer.clone(parent=None)

        def pure(params, feats, stats):
            return unbound.apply({**variables, "params": params}, feats, True, dropout_rng, stats,
                                 method=DenseLayer.new_features, mutable=True)[0]

        _, vjp = jax.vjp(pure, variables["params"], tuple(feats), stats)
        d_params, d_feats, d_stats = vjp(g)
        return {"params": d_params}, d_feats, d_stats

    return nn.custom_vjp(f, forward_fn=fwd, backward_fn=bwd)(layer, features, stats)


class DenseBlock(nn.Module):
    """`num_layers` DenseLayers, each seeing every earlier feature map.

    `remat=True` is the memory-efficient DenseNet (Pleiss et al. 2017; torchvision's
    `memory_efficient=True`): in training, a layer's concatenation, BatchNorms, ReLUs and
    bottleneck are recomputed in the backward pass, so the block stores only each layer's k new
    channels instead of a growing concatenation per layer (quadratic in depth). It costs speed:
    densenet_bc_100_12 fp32 at batch 128 on a 2-core CPU with huge pages, host peak 2.9 GB at
    2.5-2.7 s per step against 4.7 GB at 2.1-2.2 s stored (PyTorch: 5.2 GB). The default,
    `False`, stores: with it every benchmarked model's step already needs less memory than
    PyTorch's (benchmarks/NOTES.md, session 20); turn remat on for deeper blocks or bigger
    batches than memory allows.

    In training (with `ops.CUSTOM_BN`), each feature map's batch mean and variance are computed
    once, when it is made, and every later layer's norm1 normalises with them (`ops.batch_stats`):
    a channel's statistics are the same in every layer that sees it, so recomputing them per
    layer read the growing concatenation twice more per layer, and twice again when recomputed.
    densenet_bc_100_12, batch 128 (benchmarks/throughput.py): 44.1 -> 56.0 training images/s."""
    num_layers: int
    growth_rate: int
    bn_size: Optional[int] = 4
    drop_rate: float = 0.0
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        remat = bool(self.remat) and train and not self.is_initializing()
        # jax.checkpoint works off the CPU; on it, see _recomputed_new_features.
        # static_argnums counts `self` as 0: argument 2 is `train`.
        layer_cls = (nn.remat(DenseLayer, static_argnums=(2,), methods=["new_features"])
                     if remat and not ops.on_cpu() else DenseLayer)
        if not train and ops.DENSE_BUFFER and not self.is_initializing():
            return self._grow_in_place(x, layer_cls)
        # Each feature map's batch statistics, computed once for every later layer's norm1.
        share = ops.CUSTOM_BN and train and not self.is_initializing()
        stats = [ops.batch_stats(x)] if share else None
        features = [x]
        for j in range(self.num_layers):
            layer = self._layer(layer_cls, j)
            key = self.make_rng("dropout") if train and self.drop_rate > 0 else None
            given = tuple(stats) if share else None
            if remat and ops.on_cpu():
                y = _recomputed_new_features(layer, tuple(features), key, given)
            else:
                y = layer.new_features(tuple(features), train, key, given)
            features.append(y)
            if share:
                stats.append(ops.batch_stats(y))
        return jnp.concatenate(features, axis=-1)

    def _layer(self, layer_cls, j: int):
        return layer_cls(self.growth_rate, self.bn_size, self.drop_rate, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"denselayer{j + 1}")

    def _grow_in_place(self, x, layer_cls):
        """Inference: the block's output is allocated once and each layer writes its k channels
        into it (an in-place dynamic_update_slice) and reads the channels before them as a
        slice, which XLA fuses into norm1. Concatenating the growing list per layer copied
        O(layers^2) channels: 62 of densenet_bc_100_12's ~390 ms at batch 128 on the CPU.
        Same operations and values as the concatenating path (which training keeps: its
        gradient and recomputation are built on the list of feature maps)."""
        c, k = x.shape[-1], self.growth_rate
        dtype = jnp.promote_types(x.dtype, self.dtype)
        # XLA:CPU upcasts a bf16 dynamic_update_slice to f32: a convert of the whole buffer
        # there and back per layer (47 of densenet_bc_100_12's 92 ms of bf16 thunks at batch
        # 32). The same bits as uint16 update in place.
        bits = jnp.uint16 if jnp.dtype(dtype).itemsize == 2 else None
        store = (lambda a: lax.bitcast_convert_type(a, bits)) if bits else (lambda a: a)
        load = (lambda a: lax.bitcast_convert_type(a, dtype)) if bits else (lambda a: a)
        buf = store(jnp.pad(x.astype(dtype), ((0, 0),) * (x.ndim - 1) + ((0, self.num_layers * k),)))
        for j in range(self.num_layers):
            layer = self._layer(layer_cls, j)
            seen = x if j == 0 else load(buf[..., :c + j * k])  # layer 0 sees x, as the list path
            y = layer.new_features((seen,), False)
            buf = lax.dynamic_update_slice_in_dim(buf, store(y.astype(dtype)), c + j * k, axis=-1)
        return load(buf)


def recomputes(model: nn.Module) -> bool:
    """Whether `model`'s training step recomputes dense-block activations in its backward pass
    on the CPU (a `remat` field set to True). Models without a `remat` field never do. See
    `jaxcnn._xla.train_compiler_options` for why it matters."""
    # On the CPU the recomputation is the fenced one (_recomputed_new_features); elsewhere
    # nn.remat, which XLA's scheduler handles itself.
    return ops.on_cpu() and bool(getattr(model, "remat", False))


class Transition(nn.Module):
    """DenseNet transition: BN-ReLU-1x1 conv to `features` channels, then 2x2 average pool.

    Computed as pool-then-conv: a bias-free 1x1 convolution and an average pool are both linear
    and commute, so the result is the same (up to rounding) while the convolution sees a quarter
    of the pixels, and the pool, written as a reshaped mean, fuses with the BN-ReLU before it."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = norm_relu(norm(train, name="norm", **kw), x)
        return conv(self.features, 1, name="conv", **kw)(avg_pool_2x2(x))


@jax.custom_vjp
def avg_pool_2x2(x):
    """`nn.avg_pool(x, (2, 2), (2, 2))` (an odd last row or column is dropped), as the sum of four
    strided slices: one elementwise fusion with whatever comes before it. The same pool as a
    reshaped mean was an XLA:CPU reduction, 2.5-3.5x slower on the CPU: a transition's
    BN-ReLU-pool of [128, 32, 32, 160] took 30.3 ms that way, 8.6 ms this way, the same values
    bit for bit. Accumulates in float32. Its gradient is a broadcast of g / 4."""
    t = ops.pool_taps(x.astype(jnp.float32), 2, 2, x.shape[1] // 2, x.shape[2] // 2)
    return ((t[0] + t[1] + t[2] + t[3]) * 0.25).astype(x.dtype)


def _avg_pool_fwd(x):
    # The residual is an empty array that only carries x's height, width and dtype: the pooled
    # input itself (a BN-ReLU output fused into the pool) is never stored.
    return avg_pool_2x2(x), jnp.zeros(x.shape[1:3] + (0,), x.dtype)


def _avg_pool_bwd(res, g):
    (h, w, _), dtype = res.shape, res.dtype
    n, hp, wp, c = g.shape
    g = jnp.broadcast_to((g.astype(jnp.float32) * 0.25)[:, :, None, :, None, :], (n, hp, 2, wp, 2, c))
    g = g.reshape(n, 2 * hp, 2 * wp, c).astype(dtype)
    return (jnp.pad(g, ((0, 0), (0, h - 2 * hp), (0, w - 2 * wp), (0, 0))),)  # dropped row/column: 0


avg_pool_2x2.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def transition_features(channels: int, compression: float) -> int:
    """Channels after a transition with compression θ (floor, as DenseNet-BC and torchvision do)."""
    return int(channels * compression)


class _ResidualBlock(nn.Module):
    """A ResNet block: a chain of convs (`specs`) plus a shortcut, then SE and the add.

    v1 (post-activation): conv-BN-ReLU ... conv-BN, add, ReLU; a shape change projects x through a
    1x1 conv + BN. `preact` (v2): BN-ReLU-conv ...; add; a shape change projects the first
    pre-activation through a 1x1 conv. Names (conv{i}, bn{i}, downsample_*) match torchvision's.
    """
    features: int
    stride: int = 1
    preact: bool = False
    se: bool = False
    se_reduction: int = 16
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    expansion = 1

    def specs(self, out_ch: int):
        """(kernel, stride, channels) of each conv of the residual branch."""
        raise NotImplementedError

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        out_ch = self.features * self.expansion
        project = self.stride != 1 or x.shape[-1] != out_ch
        specs = self.specs(out_ch)
        if self.preact:
            y = norm_relu(norm(train, name="bn1", **kw), x)
            shortcut = conv(out_ch, 1, self.stride, name="downsample_conv", **kw)(y) if project else x
            for i, (k, s, c) in enumerate(specs):
                if i:
                    y = norm_relu(norm(train, name=f"bn{i + 1}", **kw), y)
                y = conv(c, k, s, name=f"conv{i + 1}", **kw)(y)
        else:
            *units, last = [(conv(c, k, s, name=f"conv{i + 1}", **kw), norm(train, name=f"bn{i + 1}", **kw))
                            for i, (k, s, c) in enumerate(specs)]
            y = x
            for unit in units:
                y = conv_bn(y, *unit, train)

            def shortcut_of(x):
                if not project:
                    return x
                return conv_bn(x, conv(out_ch, 1, self.stride, name="downsample_conv", **kw),
                               norm(train, name="downsample_bn", **kw), train, relu=False)

            if not train and not self.se:  # inference: the add and the ReLU fold into the last conv
                return conv_bn(y, *last, train, residual=shortcut_of(x))
            # training keeps this order (the shortcut after the branch): XLA's memory-optimized
            # schedule follows it, and the other order changed resnet18_cifar's step buffers
            y = conv_bn(y, *last, train, relu=False)
            shortcut = shortcut_of(x)
        if self.se:
            y = SqueezeExcite(self.se_reduction, name="se", **kw)(y)
        y = y + shortcut
        return y if self.preact else nn.relu(y)


class BasicBlock(_ResidualBlock):
    """ResNet basic block, 3x3-3x3 (v1, or v2 with `preact`)."""
    expansion = 1

    def specs(self, out_ch):
        return [(3, self.stride, self.features), (3, 1, out_ch)]


class Bottleneck(_ResidualBlock):
    """ResNet bottleneck 1x1-3x3-1x1 (x4 expansion), stride on the 3x3 as torchvision (v1.5)."""
    expansion = 4

    def specs(self, out_ch):
        return [(1, 1, self.features), (3, self.stride, self.features), (1, 1, out_ch)]


class DenseResidualBlock(nn.Module):
    """Seed 004's DRB: dense layers (concat) -> BN-ReLU-1x1 compress back to the input width ->
    identity add."""
    num_layers: int
    growth_rate: int = 32
    bn_size: int = 4
    se: bool = False
    se_reduction: int = 16
    remat: bool = False   # see DenseBlock
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = DenseBlock(self.num_layers, self.growth_rate, self.bn_size, remat=self.remat,
                       name="dense", **kw)(x, train)
        y = norm_relu(norm(train, name="compress_norm", **kw), y)
        y = conv(x.shape[-1], 1, name="compress_conv", **kw)(y)
        if self.se:
            y = SqueezeExcite(self.se_reduction, name="se", **kw)(y)
        return y + x


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 -> BN -> ReLU -> pointwise 1x1 -> BN -> ReLU (MobileNet v1 unit, seed 002)."""
    features: int
    stride: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = ConvBNAct(x.shape[-1], 3, self.stride, groups=x.shape[-1], name="dw", **kw)(x, train)
        return ConvBNAct(self.features, 1, name="pw", **kw)(x, train)
