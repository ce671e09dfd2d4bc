"""CPU-friendly versions of three primitives: convolution, max-pooling and BatchNorm.

Convolution. XLA:CPU computes a convolution's weight gradient with an Eigen kernel that wants
its input as [C, H, W, N]. XLA then fuses the transpose with whatever elementwise work produced
the input (BatchNorm, ReLU, residual adds), so that work is recomputed inside a strided,
cache-hostile loop: on a ResNet-18 (CIFAR, batch 128) these transpose fusions took 910 ms of a
2.9 s step. `conv_general_dilated` here is the same convolution with a custom VJP that keeps the
conv input (forward) and the cotangent (backward) as materialised buffers, which cuts that to
~270 ms. `lax.optimization_barrier` does not stop the fusion on CPU; a while loop that XLA cannot
prove trivial (trip count and a factor of 1 read from the replicated weights at run time) does.
1x1 convolutions get a weight gradient that is one matmul over N*H*W rows and needs no
transposed copy of the input at all (DenseNet's bottlenecks read the whole concatenated block);
their forward and input gradient are oneDNN convolutions where it applies, else matmuls. Off the
CPU it is plain `lax.conv_general_dilated`. Inference never sees a fence (it lives in the
forward rule of the VJP, used only under differentiation).
The forward convolution and the input gradient run on oneDNN's direct kernels where
`jaxcnn.onednn` applies (jaxlib 0.10 on the CPU); the weight gradient on oneDNN's backward-weights
kernels through its own library where `jaxcnn.dnnl` applies (then no fence is needed: that call
reads its operands from buffers and transposes nothing), a 1x1 convolution's as oneDNN's matmul
(`onednn.matmul_tn`), else XLA's, fenced.

Max-pooling. JAX differentiates `reduce_window(max)` through a variadic reduce-window that
carries argmax indices; on XLA:CPU that gradient cost ~40% of a small CNN's training step.
`max_pool` here has the same forward (on the CPU the maximum of the window taps' strided
slices, else XLA's reduce-window) and a hand-written gradient made of
strided slices, compares and pads, which XLA fuses into one elementwise loop (for windows that
tile the image, 2x2 pools, from reshapes and the index of each window's first maximum). Same
values and same gradient (ties go to the first maximum) as `flax.linen.max_pool`. Where
`jaxcnn.pool` applies (one CPU device, f32/bf16), oneDNN's pooling kernels run both instead:
forward and backward each one library call, 5-10x faster than these fusions.
"""
from __future__ import annotations

import contextlib
import os
from functools import partial, reduce
from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn import bnorm, dnnl, onednn, pool

# Switches, read when a model is traced (so one process can compare both settings; see
# `enabled`). JAXCNN_PLAIN_OPS=1 in the environment starts with all of them off.
_PLAIN = os.environ.get("JAXCNN_PLAIN_OPS", "") not in ("", "0")
FENCES = not _PLAIN          # fusion fences around the convolution gradient (CPU only)
DOT_1X1 = not _PLAIN         # 1x1 convolutions as matmuls (CPU only)
MAX_POOL_GRAD = not _PLAIN   # max-pool gradient from slices instead of select-and-scatter
CUSTOM_BN = not _PLAIN       # closed-form BatchNorm gradient (jaxcnn.layers.norm)
ONEDNN = not _PLAIN          # oneDNN direct convolutions where jaxcnn.onednn applies (CPU only)
BIAS_GRAD = not _PLAIN       # convolution bias gradients summed in float32 (add_bias)
DENSE_BUFFER = not _PLAIN    # dense blocks in inference grow one buffer in place (layers.DenseBlock)
FOLD_BN = not _PLAIN         # inference: conv + BN (+ add) (+ ReLU) as one oneDNN call (layers.conv_bn)
DNNL_WGRAD = not _PLAIN      # convolution weight gradients by oneDNN's library (jaxcnn.dnnl; CPU only)
DNNL_BN = not _PLAIN         # training BatchNorm (+ ReLU) by oneDNN's library (jaxcnn.bnorm; CPU only)
DNNL_POOL = not _PLAIN       # max-pools by oneDNN's library (jaxcnn.pool; CPU only)
WINOGRAD = not _PLAIN        # FOLD_BN's wide f32 3x3 convolutions on small images by Winograd (jaxcnn.winograd)
_SWITCHES = ("FENCES", "DOT_1X1", "MAX_POOL_GRAD", "CUSTOM_BN", "ONEDNN", "BIAS_GRAD",
             "DENSE_BUFFER", "FOLD_BN", "DNNL_WGRAD", "DNNL_BN", "DNNL_POOL", "WINOGRAD")


def enabled(on: bool = True):
    """Turn every switch of this module on or off for models traced inside the block:
    `with ops.enabled(False): ...` gives plain Flax/XLA layers (for comparisons and debugging)."""
    return switched(**{k: on for k in _SWITCHES})


@contextlib.contextmanager
def switched(**values: bool):
    """Set some switches for models traced inside the block: `ops.switched(FOLD_BN=False)`."""
    unknown = set(values) - set(_SWITCHES)
    if unknown:
        raise ValueError(f"unknown switches {sorted(unknown)}; known: {', '.join(_SWITCHES)}")
    old = {k: globals()[k] for k in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(old)


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def fence(xs, w):
    """`xs` (a tuple of arrays) unchanged, but as new values that XLA:CPU cannot fuse into their
    consumers, merge with equal computations elsewhere (CSE) or compute before all of `xs`
    exist. `lax.optimization_barrier` is meant for this, but XLA:CPU removes it. `w`: a small
    replicated array (a weight) whose first element sets the loop's trip count at run time."""
    return _materialize(tuple(xs), w)


def _materialize(xs, w):
    """Return `xs` unchanged but computed into buffers of their own (a fusion boundary).

    The trip count (1) and the factor (1.0) come from `w` at run time (`w0 == w0` is false only for
    NaN, and then the loop runs 0 times: the values are returned unchanged either way), so no
    simplifier can remove the loop. `w` is a replicated weight: reading it needs no communication
    when the batch is sharded over devices."""
    w0 = lax.stop_gradient(w).ravel()[0]
    n = (w0 == w0).astype(jnp.int32)
    one = 1 + 0 * w0

    def body(carry):
        i, ys = carry
        return i + 1, tuple(y * one.astype(y.dtype) for y in ys)

    return lax.while_loop(lambda c: c[0] < n, body, (jnp.int32(0), tuple(xs)))[1]


def _xla_conv(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision):
    return lax.conv_general_dilated(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups,
                                    precision=precision)


def _on_onednn(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision) -> bool:
    return (ONEDNN and onednn.applies(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups)
            and not onednn.xla_faster(x, w, strides, padding, dn))


def _conv(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision):
    """The forward convolution: oneDNN's direct kernel where it applies, else XLA's."""
    if _on_onednn(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision):
        return onednn.conv(x, w, strides, padding, dn)
    return _xla_conv(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7, 8))
def _fenced_conv(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision):
    return _conv(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision)


def _wgrad_by_dnnl(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups, precision) -> bool:
    return (DNNL_WGRAD and dnnl.applies(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups)
            and not dnnl.xla_faster(x, w, strides, padding))


def _fenced_fwd(x, w, *static):
    if not _wgrad_by_dnnl(x, w, *static):  # only XLA's weight gradient needs the fences
        (x,) = _materialize((x,), w)
    return _conv(x, w, *static), (x, w)


def _fenced_bwd(*args):
    *static, (x, w), g = args
    strides, padding, _, _, dn, _, _ = static
    # Both gradients by oneDNN where it applies (dnnl, onednn), else XLA's (fenced).
    if _wgrad_by_dnnl(x, w, *static):
        dw = dnnl.weight_grad(x, g, w.shape, strides, padding, w.dtype)
    else:
        (g,) = _materialize((g,), w)
        dw = jax.vjp(lambda w: _xla_conv(x, w, *static), w)[1](g)[0]
    dx = None
    if _on_onednn(x, w, *static):
        dx = onednn.input_grad(g, w, x.shape, strides, padding, dn)
    if dx is None:
        dx = jax.vjp(lambda x: _xla_conv(x, w, *static), x)[1](g)[0]
    return dx, dw


_fenced_conv.defvjp(_fenced_fwd, _fenced_bwd)


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(e) for e in v)
    return v


_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _is_pointwise(rhs, padding, lhs_dil, rhs_dil, dn, groups):
    return (rhs.shape[:2] == (1, 1) and groups == 1 and dn == _NHWC
            and all(d == 1 for d in (lhs_dil or ())) and all(d == 1 for d in (rhs_dil or ()))
            and (padding in ("SAME", "SAME_LOWER", "VALID")  # for a 1x1 kernel: no padding
                 or not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)))


def _pointwise_conv(x, w, strides, precision):
    """A 1x1 convolution whose weight gradient is one transposed-operand matmul over N*H*W rows,
    which needs no [C, H, W, N] copy of the input (see above). The forward and the input gradient
    run on oneDNN where it applies (`_onednn_pointwise`), else they are matmuls too."""
    if strides != (1, 1):
        x = x[:, ::strides[0], ::strides[1], :]
    if _on_onednn(x, w, (1, 1), ((0, 0), (0, 0)), None, None, _NHWC, 1, precision):
        return _onednn_pointwise(x, w)
    n, h, wd, c = x.shape
    y = lax.dot_general(x.reshape(n * h * wd, c), w.reshape(c, w.shape[-1]),
                        (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(n, h, wd, w.shape[-1])


def _weight_grad_1x1(x, g):
    n, h, wd, c = x.shape
    x2, g2 = x.reshape(n * h * wd, c), g.reshape(n * h * wd, g.shape[-1])
    dw = onednn.matmul_tn(x2, g2) if ONEDNN else None
    if dw is None:
        dw = lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dw.astype(x.dtype).reshape(1, 1, c, g.shape[-1])


@jax.custom_vjp
def _onednn_pointwise(x, w):
    """A stride-1 1x1 convolution by oneDNN. XLA:CPU's matmul (YNNPACK) was as fast in f32 but
    3-10x slower in bf16 for the forward and the input gradient (densenet_bc_100_12's
    bottlenecks, batch 128: e.g. 216->108 channels at 32x32, forward 33 -> 7 ms, input gradient
    34 -> 8.5 ms); the weight gradient stays a matmul (oneDNN only runs forward convolutions)."""
    return onednn.conv(x, w, (1, 1), ((0, 0), (0, 0)), _NHWC)


def _onednn_pointwise_fwd(x, w):
    return _onednn_pointwise(x, w), (x, w)


def _onednn_pointwise_bwd(res, g):
    x, w = res
    dx = onednn.input_grad(g, w, x.shape, (1, 1), ((0, 0), (0, 0)), _NHWC)
    return dx, _weight_grad_1x1(x, g)


_onednn_pointwise.defvjp(_onednn_pointwise_fwd, _onednn_pointwise_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated`, on the CPU with fusion fences around its gradient and 1x1
    kernels as matmuls (see above). Signature-compatible, so it plugs into
    `flax.linen.Conv(conv_general_dilated=...)`."""
    plain = partial(lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation,
                    rhs_dilation, dimension_numbers, feature_group_count, batch_group_count,
                    precision=precision, preferred_element_type=preferred_element_type)
    if not on_cpu() or batch_group_count != 1 or preferred_element_type is not None:
        return plain()
    if dimension_numbers is not None and not isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        dimension_numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if DOT_1X1 and _is_pointwise(rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                                 feature_group_count):
        return _pointwise_conv(lhs, rhs, tuple(window_strides), precision)
    if not FENCES:
        return plain()
    return _fenced_conv(lhs, rhs, _hashable(window_strides), _hashable(padding),
                        _hashable(lhs_dilation), _hashable(rhs_dilation), dimension_numbers,
                        feature_group_count, _hashable(precision))


def _max_pool_window(x, window: int, stride: int, padding: int):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def max_pool(x, window: int, stride: int, padding: int = 0):
    """Max-pool over (H, W) of an NHWC array, PyTorch's `max_pool2d(x, window, stride, padding)`
    (floor mode; padding counts as -inf). The gradient goes to the first maximum of each window
    in row-major order, as in PyTorch and `flax.linen.max_pool`."""
    if not MAX_POOL_GRAD:
        return _max_pool_window(x, window, stride, padding)
    if DNNL_POOL and on_cpu() and pool.applies(x, window, stride, padding):
        return pool.max_pool(x, window, stride, padding)
    return _max_pool(x, window, stride, padding)


def _pad_inf(x, padding: int):
    """x padded by `padding` on each side of H and W with -inf, as a max-pool counts padding."""
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                   constant_values=-jnp.inf) if padding else x


def pool_taps(xp, window: int, stride: int, ho: int, wo: int) -> list:
    """Per window tap (i, j), row-major, the strided slice of the (padded) NHWC input `xp` that
    holds that tap of every window: `window`**2 arrays [N, ho, wo, C]."""
    n, c = xp.shape[0], xp.shape[3]
    return [lax.slice(xp, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                      (1, stride, stride, 1)) for i in range(window) for j in range(window)]


def _taps(x, window: int, stride: int, padding: int) -> list:
    """`pool_taps` of x padded with -inf: the windows' taps for floor-mode output sides."""
    _, h, w, _ = x.shape
    ho, wo = pool.out_side(h, window, stride, padding), pool.out_side(w, window, stride, padding)
    return pool_taps(_pad_inf(x, padding), window, stride, ho, wo)


def _max_of_taps(x, window: int, stride: int, padding: int):
    """The max-pool as the elementwise maximum of its taps' strided slices: one elementwise
    fusion on the CPU. XLA:CPU's reduce-window was slower, most of all in bf16: resdensenet's
    3x3/2 stem pool of [32, 112, 112, 64] 51.8 -> 13.9 ms in bf16, 19.9 -> 11.9 in fp32; in
    simple_cnn's bf16 inference at batch 128 its two 2x2 pools took 4.1 of 7.8 ms. Same values
    (NaN propagates the same way)."""
    if not on_cpu():
        return _max_pool_window(x, window, stride, padding)
    return reduce(jnp.maximum, _taps(x, window, stride, padding))


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, stride, padding):
    return _max_of_taps(x, window, stride, padding)


def _keeps_first(window, stride, padding) -> bool:
    """Whether the forward pass keeps each window's first-max tap instead of x and y: windows
    that tile the image (the 2x2 pools), on the CPU (elsewhere the forward is reduce-window)."""
    return window == stride and padding == 0 and on_cpu()


def _max_pool_fwd(x, window, stride, padding):
    if _keeps_first(window, stride, padding):
        # The residual is each window's first-max tap, from the taps the maximum reads, not x:
        # the backward pass no longer crops x to whole windows and slices each tap out of the
        # crop (on fastnet's odd sides, 31, 15 and 7 px, two extra copies of x per pool). XLA
        # may still keep the taps and fuse the index into the backward loop (it does in
        # fastnet's step; an optimization barrier that kept the index made it no faster).
        # fastnet bf16 step, batch 256: +9-11% (benchmarks/NOTES.md, session 29).
        taps = _taps(x, window, stride, padding)
        y = reduce(jnp.maximum, taps)
        first = _first_max(taps, y).astype(jnp.int8 if window * window < 127 else jnp.int32)
        return y, (first, jnp.zeros((0,) + x.shape[1:3] + (0,), x.dtype))  # carries x's sides only
    y = _max_of_taps(x, window, stride, padding)
    return y, (x, y)


def _max_pool_bwd(window, stride, padding, res, g):
    # Instead of select-and-scatter: the index of each window's first maximum (one compare per
    # tap, on strided slices), then per tap the cotangent where that index matches, summed into
    # the input per stride phase (`_phased_scatter`). All elementwise.
    if _keeps_first(window, stride, padding):
        first, like = res
        return (_tiled_scatter(first, g, stride, like.shape[1:3]),)
    x, y = res
    first = _first_max(_taps(x, window, stride, padding), y)
    if window == stride and padding == 0:
        return (_tiled_scatter(first, g, stride, x.shape[1:3]),)
    hp, wp = x.shape[1] + 2 * padding, x.shape[2] + 2 * padding
    taps = [(i, j) for i in range(window) for j in range(window)]
    if FENCES and on_cpu():
        # The scatter below reads `first` and g once per tap. Unfenced, XLA fused their
        # producers into it (the taps' compares, and in bf16 the whole dense-block gradient
        # that g sums), evaluated once per tap: 152 of resdensenet's 390 ms of bf16 thunks at
        # batch 8. g's first element sets the fence's trip count: there is no weight here.
        first, g = _materialize((first, g), g)
    # Overlapping windows add several cotangents per input (up to four for 3x3/2). In bf16
    # XLA:CPU rounds after each add through converts: resdensenet's stem pool ([32, 112, 112,
    # 64], 3x3/2) took 197 ms that way, 20 ms summed in f32 (and rounded once, so exact here).
    dxp = _phased_scatter(first, g.astype(jnp.promote_types(g.dtype, jnp.float32)), taps, stride, hp, wp)
    dx = dxp[:, padding:hp - padding, padding:wp - padding] if padding else dxp
    return (dx.astype(g.dtype),)


def _phased_scatter(first, g, taps, s: int, hp: int, wp: int):
    """The sum over taps t = (i, j) of g where first == t, placed at the inputs (s*o + i, s*o' + j),
    as s*s phases: the inputs (s*k + a, s*l + b) are reached only by the taps with i % s == a and
    j % s == b, each a shifted copy (a pad) of its masked g; a reshape interleaves the phases.
    Before, each tap's term was scattered with an interior-padded pad, mostly zeros: f32
    [32, 112, 112, 64] 3x3/2 28.2 -> 24.6 ms, same values."""
    n, ho, wo, c = g.shape
    hq, wq = -(-hp // s), -(-wp // s)
    zero = jnp.zeros((), g.dtype)
    rows = []
    for a in range(s):
        cols = []
        for b in range(s):
            acc = None
            for t, (i, j) in enumerate(taps):
                if i % s != a or j % s != b:
                    continue
                di, dj = i // s, j // s
                part = lax.pad(jnp.where(first == t, g, zero), zero,
                               ((0, 0, 0), (di, hq - ho - di, 0), (dj, wq - wo - dj, 0), (0, 0, 0)))
                acc = part if acc is None else acc + part
            cols.append(jnp.zeros((n, hq, wq, c), g.dtype) if acc is None else acc)
        rows.append(jnp.stack(cols, axis=3))  # (n, hq, wq, s, c)
    return jnp.stack(rows, axis=2).reshape(n, hq * s, wq * s, c)[:, :hp, :wp]


def _first_max(taps, y):
    """Per output element, the index of the first tap (row-major in the window) equal to the
    maximum `y`; len(taps) where none is (NaN windows), so that no tap gets the gradient."""
    first = jnp.full(y.shape, len(taps), jnp.int32)
    for t in reversed(range(len(taps))):
        first = jnp.where(taps[t] == y, t, first)
    return first


def _tiled_scatter(first, g, s: int, hw):
    """The gradient when the windows tile the image (window == stride, no padding; the 2x2
    pools): the cotangent broadcast over each window where the tap index matches `first`, then
    zeros for the rows and columns past the last window (floor mode). Views by reshape, no
    scatter: the general loop above evaluates x (and whatever XLA fused into it: conv bias,
    BatchNorm, ReLU) once per tap and output element, which cost simple_cnn's step 10 of its
    45 ms at batch 128."""
    n, ho, wo, c = g.shape
    h, w = hw
    taps = (lax.broadcasted_iota(first.dtype, (1, 1, s, 1, s, 1), 2) * s +
            lax.broadcasted_iota(first.dtype, (1, 1, s, 1, s, 1), 4))
    dx = jnp.where(taps == first[:, :, None, :, None], g[:, :, None, :, None], jnp.zeros((), g.dtype))
    dx = dx.reshape(n, ho * s, wo * s, c)
    if (h, w) != (ho * s, wo * s):
        dx = jnp.pad(dx, ((0, 0), (0, h - ho * s), (0, w - wo * s), (0, 0)))
    return dx


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def add_bias(y, b):
    """`y + b` over the last axis; the gradient of `b` sums the cotangent in float32 (see
    layers.BiasedConv). Plain `y + b` when `BIAS_GRAD` is off."""
    return _add_bias(y, b) if BIAS_GRAD else y + b


@jax.custom_vjp
def _add_bias(y, b):
    return y + b


def _add_bias_fwd(y, b):
    return y + b, None


def _add_bias_bwd(_, g):
    return g, g.astype(jnp.float32).sum(axis=tuple(range(g.ndim - 1))).astype(g.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


# BatchNorm (training mode) with a hand-written gradient. Autodiff of the textbook formula saves
# `x - mean` (a second activation-sized buffer per BatchNorm) and builds the backward from many
# small pieces that XLA fuses into large multi-output loops; the closed-form backward below reads
# x and the cotangent once each for the two channel sums and once more for dx. Arithmetic and
# statistics are float32 whatever the input dtype (as flax.linen.BatchNorm does).


def _bn_stats(x):
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = xf.mean(axis=axes)
    # E[x^2] - E[x]^2, clamped: flax.linen.BatchNorm's default (use_fast_variance=True).
    var = jnp.maximum(0.0, (xf * xf).mean(axis=axes) - mean * mean)
    return mean, var


def bn_affine(mean, var, scale, bias, eps):
    """BatchNorm with fixed statistics as y = x * a + b: (a, b) per channel, in float32."""
    a = scale.astype(jnp.float32) * lax.rsqrt(var + eps)
    return a, bias.astype(jnp.float32) - mean * a


def batch_norm_apply(x, mean, var, scale, bias, eps, dtype, relu: bool = False):
    """y = (x - mean) / sqrt(var + eps) * scale + bias in float32 (then ReLU when `relu`), cast
    to `dtype`."""
    a, b = bn_affine(mean, var, scale, bias, eps)
    y = x.astype(jnp.float32) * a + b
    return (jnp.maximum(y, 0.0) if relu else y).astype(dtype)


# `relu=True` fuses the ReLU that follows most BatchNorms into them, gradient included: the
# backward pass recomputes the ReLU's mask from x and the statistics instead of storing the
# BatchNorm's output for it. Separately, autodiff of `relu(bn(x))` kept the pre-activation as a
# residual: one more activation-sized write in the forward pass and a select pass over it in
# the backward, on XLA:CPU a convert-heavy loop each in bf16 (see `_bn_sums`).


def _by_dnnl(x, dtype, relu: bool) -> bool:
    """Whether a training BatchNorm of `x` runs on oneDNN's kernels (`jaxcnn.bnorm`): one pass
    over bf16 data where XLA:CPU copies it to float32 for its reductions. Only with the ReLU
    fused: a plain BatchNorm (ResNet's before the residual add) on oneDNN made resnet18_cifar's
    fp32 step no faster and its buffers 663 -> 805 MB (batch 128), with only the BN-ReLUs
    there 667 MB."""
    return relu and DNNL_BN and on_cpu() and bnorm.applies(x, dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, eps: float, dtype, relu: bool = False):
    """BatchNorm over every axis but the last, with batch statistics (then ReLU when `relu`).
    Returns (y, (mean, biased var))."""
    (y, stats), _ = _bn_fwd(x, scale, bias, eps, dtype, relu)
    return y, stats


def _bn_fwd(x, scale, bias, eps, dtype, relu):
    # residuals: ws is oneDNN's ReLU mask, None on XLA's path (which recomputes the mask)
    if _by_dnnl(x, dtype, relu):
        y, mean, var, ws = bnorm.forward(x, scale, bias, eps, relu)
        return (y, (mean, var)), (x, mean, var, scale, bias, ws)
    mean, var = _bn_stats(x)
    y = batch_norm_apply(x, mean, var, scale, bias, eps, dtype, relu)
    return (y, (mean, var)), (x, mean, var, scale, bias, None)


def _bn_sums(x, mean, var, scale, bias, eps, g, relu):
    """The backward pass's float32 cotangent (zero where the fused ReLU was off), x-hat, and
    their channel sums sum(g), sum(g*x-hat)."""
    g = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * lax.rsqrt(var + eps)
    if relu:  # the forward pass's pre-activation, computed as batch_norm_apply computes it
        a, b = bn_affine(mean, var, scale, bias, eps)
        g = jnp.where(x.astype(jnp.float32) * a + b > 0, g, 0.0)
    axes = tuple(range(x.ndim - 1))
    return g, xhat, g.sum(axis=axes), (g * xhat).sum(axis=axes)


def _bn_bwd(eps, dtype, relu, res, cts):
    # the statistics output only feeds the running averages: its cotangent is ignored
    x, mean, var, scale, bias, ws = res
    if ws is not None:
        dx, sum_gx, sum_g = bnorm.backward(x, cts[0], mean, var, scale, ws, eps, relu, False)
        return dx, sum_gx.astype(scale.dtype), sum_g.astype(bias.dtype)
    g, xhat, sum_g, sum_gx = _bn_sums(x, mean, var, scale, bias, eps, cts[0], relu)
    r = lax.rsqrt(var + eps)
    n = x.size // x.shape[-1]
    dx = (scale * r) * (g - (sum_g + xhat * sum_gx) / n)
    return dx.astype(x.dtype), sum_gx.astype(scale.dtype), sum_g.astype(bias.dtype)


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


# BatchNorm with statistics computed elsewhere: in a dense block every layer normalises the
# concatenation of all earlier feature maps, and a channel's batch mean and variance are the
# same in every layer that sees it. `batch_stats` computes them once per feature map and
# `batch_norm_given_stats` normalises with them; their gradients add up to `_bn_bwd`'s.


@jax.custom_vjp
def batch_stats(x):
    """(mean, biased var) over every axis but the last, in float32, as `batch_norm_train`'s."""
    return _bn_stats(x)


def _stats_fwd(x):
    mean, var = _bn_stats(x)
    return (mean, var), (x, mean)


def _stats_bwd(res, cts):
    x, mean = res
    d_mean, d_var = cts
    n = x.size // x.shape[-1]
    # var = E[x^2] - mean^2, so d var / d x = 2 (x - mean) / n
    dx = (d_mean + 2.0 * d_var * (x.astype(jnp.float32) - mean)) / n
    return (dx.astype(x.dtype),)


batch_stats.defvjp(_stats_fwd, _stats_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def batch_norm_given_stats(x, mean, var, scale, bias, eps: float, dtype, relu: bool = False):
    """`batch_norm_apply` differentiable in the statistics too (see `batch_stats`)."""
    return _given_fwd(x, mean, var, scale, bias, eps, dtype, relu)[0]


def _given_fwd(x, mean, var, scale, bias, eps, dtype, relu):
    if _by_dnnl(x, dtype, relu):
        y, ws = bnorm.forward(x, scale, bias, eps, relu, stats=(mean, var))
        return y, (x, mean, var, scale, bias, ws)
    return batch_norm_apply(x, mean, var, scale, bias, eps, dtype, relu), (x, mean, var, scale, bias, None)


def _given_bwd(eps, dtype, relu, res, g):
    x, mean, var, scale, bias, ws = res
    r = lax.rsqrt(var + eps)
    sr = scale * r
    if ws is not None:
        dx, sum_gx, sum_g = bnorm.backward(x, g, mean, var, scale, ws, eps, relu, True)
    else:
        g, _, sum_g, sum_gx = _bn_sums(x, mean, var, scale, bias, eps, g, relu)
        dx = (g * sr).astype(x.dtype)
    return (dx, -sr * sum_g, -0.5 * sr * r * sum_gx, sum_gx.astype(scale.dtype), sum_g.astype(bias.dtype))


batch_norm_given_stats.defvjp(_given_fwd, _given_bwd)
