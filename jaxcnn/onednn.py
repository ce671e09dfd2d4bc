"""oneDNN's direct convolution kernels on the CPU, through XLA:CPU's own oneDNN runtime.

XLA:CPU computes a convolution as Eigen's im2col packing plus a GEMM: a 3x3 64->64 conv at
32x32, batch 128, packs 302 MB of patches into freshly mapped memory on every call, and the
packing and page zeroing were ~20% of a ResNet-18 training step (perf and strace, README of 786d799).
PyTorch runs the same convolution with oneDNN's direct kernels, which need no patch buffer.
jaxlib 0.10 ships those kernels too, with a runtime thunk for an XLA custom call
`__onednn$convolution`; XLA's own rewriter only emits that call in builds with
ENABLE_ONEDNN_ASYNC, which jaxlib's wheels are not. jaxcnn emits the call itself.

Measured alone (benchmarks/conv_kernels.py, batch 128, f32, ms): forward 64->64 at 32x32 35 -> 29,
48->12 at 32x32 9.9 -> 5.1; in bf16 the forward is 3-4x faster than Eigen's (46 -> 10.5 ms).

What goes to oneDNN: forward convolutions, and input gradients (stride 1: a forward convolution
of the cotangent with the flipped kernel; strided, NHWC/HWIO: one such convolution per input
phase, see `_strided_input_grad`), 1x1 ones included (jaxcnn.ops). A 1x1 convolution's weight
gradient is one oneDNN matmul over the batch's rows (`matmul_tn`, bf16 operands accumulated in
f32). Other weight gradients cannot go through this thunk (it runs forward convolutions only; as
a forward convolution a 3x3 weight gradient's window is the whole image, and oneDNN's kernels for
that ran for minutes): `jaxcnn.dnnl` calls oneDNN's backward-weights kernels in its own library. In inference,
`fused_conv` adds a bias, a residual and a ReLU as oneDNN post-ops (jaxcnn.layers.conv_bn folds
BatchNorm into it).

When: 2-D, feature_group_count 1, no dilation, padding >= 0, f32 or bf16 operands of one dtype,
on the CPU backend of jaxlib 0.10.x, and only after a probe (one small strided, padded convolution
compared with XLA's) passed in this process. JAXCNN_ONEDNN=0 turns it off; `jaxcnn.ops.enabled(False)`
too. Under `jax.vmap` the convolution falls back to XLA's (with several devices, only when vmap is
applied inside the jit, the usual order). With several devices the call is wrapped
in `custom_partitioning` (XLA's partitioner does not know it and would replicate it): each device
convolves its own shard of the batch, with the kernel replicated; any other sharding of the
operands is gathered first.
"""
from __future__ import annotations

import functools
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from jaxcnn._xla import _jaxlib_version

try:  # not public API: with a jax that lacks them, the convolutions stay XLA's
    from jax._src.interpreters.batching import BatchTracer as _BatchTracer
    from jax._src.interpreters.mlir import custom_call as _custom_call
except ImportError:  # pragma: no cover
    _custom_call = _BatchTracer = None

TARGET = "__onednn$convolution"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _backend_config(dn: lax.ConvDimensionNumbers, window, pads, strides, fusions=()) -> str:
    """xla.cpu.BackendConfig (JSON) for the custom call. Field meanings as in XLA's
    OneDnnContractionRewriter for jaxlib 0.10: zero-based dims, actual window values. `fusions`:
    oneDNN post-ops (OneDnnFusionConfig kinds), each extra operand after x and w in order."""
    lhs, rhs, out = dn
    data = lambda s: {"batch_dim": s[0], "feature_dim": s[1], "spatial_dims": list(s[2:])}
    rank = len(lhs)
    config = {
        "dims": rank, "feature_groups": 1,
        "input": {"dims": rank, "data": data(lhs)},
        "kernel": {"dims": rank, "filter": {"output_feature_dim": rhs[0], "input_feature_dim": rhs[1],
                                            "spatial_dims": list(rhs[2:])}},
        "output": {"dims": rank, "data": data(out)},
        "window": {"size": list(window), "pad_left": [p[0] for p in pads],
                   "pad_right": [p[1] for p in pads], "strides": list(strides),
                   "window_dilations": [1] * len(window)}}
    if fusions:
        config["fusions"] = {"ops": list(fusions)}
    return json.dumps({"outer_dimension_partitions": [], "onednn_conv_config": config})


def _xla_conv(x, w, *, strides, pads, dn):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)


def _primitive(name: str) -> jex_core.Primitive:
    p = jex_core.Primitive(name)
    # Outside a trace, bind compiles the call like any jitted function.
    p.def_impl(lambda *args, **params: jax.jit(functools.partial(p.bind, **params))(*args))
    return p


_conv_p = _primitive("jaxcnn_onednn_conv")


@_conv_p.def_abstract_eval
def _abstract(x, w, *, strides, pads, dn):
    out = jax.eval_shape(functools.partial(_xla_conv, strides=strides, pads=pads, dn=dn), x, w)
    return jax.core.ShapedArray(out.shape, out.dtype)


def _lower(ctx, x, w, *fused, strides, pads, dn, relu=None):
    """Both primitives: `fused` operands (bias, then a residual) and `relu` only for _fused_p."""
    rhs_shape = ctx.avals_in[1].shape
    window = [rhs_shape[d] for d in dn.rhs_spec[2:]]
    fusions = _post_ops(len(fused) > 1, relu) if fused else ()
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return _custom_call(TARGET, result_types=[out_type], operands=[x, w, *fused], api_version=1,
                        backend_config=_backend_config(dn, window, pads, strides, fusions)).results


mlir.register_lowering(_conv_p, _lower, platform="cpu")


def _batch(args, dims, **params):
    # No batched oneDNN call: vmap the same convolution in XLA.
    return jax.vmap(functools.partial(_xla_conv, **params), in_axes=dims)(*args), 0


batching.primitive_batchers[_conv_p] = _batch


def _sharded_axis(arg_shapes, dim: int):
    """The mesh axis (or axes) over which dimension `dim` of the first operand is sharded."""
    sh = arg_shapes[0].sharding
    spec = tuple(sh.spec) if isinstance(sh, NamedSharding) else ()
    return spec[dim] if dim < len(spec) else None


@functools.lru_cache(maxsize=None)
def _partitioned(dn: lax.ConvDimensionNumbers):
    """The custom call as a `custom_partitioning` function for several devices: the batch axis
    of the input and output may be sharded; everything else is replicated."""
    lhs, rhs, out = dn

    @functools.partial(custom_partitioning, static_argnums=(2, 3))
    def conv(x, w, strides, pads):
        return _conv_p.bind(x, w, strides=strides, pads=pads, dn=dn)

    def spec(batch_dim, axis, rank):
        return PartitionSpec(*[axis if d == batch_dim else None for d in range(rank)])

    def infer(strides, pads, mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, spec(out[0], _sharded_axis(arg_shapes, lhs[0]), len(out)))

    def partition(strides, pads, mesh, arg_shapes, result_shape):
        axis, rank = _sharded_axis(arg_shapes, lhs[0]), len(lhs)
        local = lambda x, w: _conv_p.bind(x, w, strides=strides, pads=pads, dn=dn)
        return (mesh, local, NamedSharding(mesh, spec(out[0], axis, rank)),
                (NamedSharding(mesh, spec(lhs[0], axis, rank)), NamedSharding(mesh, PartitionSpec())))

    # Shardy's rule: one factor per dimension; only the batch ("n") may stay sharded.
    names = [None] * (3 * len(lhs))
    for base, dims, labels in ((0, lhs, "nchw"), (len(lhs), rhs, "ockl"), (2 * len(lhs), out, "noij")):
        for d, label in zip(dims, labels):
            names[base + d] = label
    r = len(lhs)
    rule = f"{' '.join(names[:r])}, {' '.join(names[r:2 * r])} -> {' '.join(names[2 * r:])}"
    order = list(dict.fromkeys(names))  # factor order of first appearance, as Shardy wants
    conv.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=rule,
                       need_replication_factors=tuple(f for f in order if f != "n"))
    return conv


# --- Inference: convolution + bias (+ residual) (+ ReLU) in one call, as oneDNN post-ops. ---

def _post_ops(residual: bool, relu: bool) -> tuple:
    return ("BIAS",) + (("BINARY_ADD",) if residual else ()) + (("RELU",) if relu else ())


def _fused_reference(x, w, bias, *residual, strides, pads, dn, relu):
    """What the fused call computes, by XLA (batching rule, gradient, probe)."""
    y = _xla_conv(x, w, strides=strides, pads=pads, dn=dn)
    return epilogue(y, bias, residual[0] if residual else None, relu, x.dtype, dn.out_spec[1])


def epilogue(y, bias, residual, relu: bool, dtype, feature_dim: int = -1):
    """`y + bias (+ residual)`, then ReLU if `relu`, in float32, rounded once to `dtype`: the
    fused call's post-ops (also jaxcnn.winograd's)."""
    shape = [1] * y.ndim
    shape[feature_dim] = -1
    y = y.astype(jnp.float32) + bias.astype(jnp.float32).reshape(shape)
    if residual is not None:
        y = y + residual.astype(jnp.float32)
    return (jnp.maximum(y, 0) if relu else y).astype(dtype)


_fused_p = _primitive("jaxcnn_onednn_fused_conv")
_fused_p.def_abstract_eval(lambda x, w, *fused, relu, **params: _abstract(x, w, **params))
mlir.register_lowering(_fused_p, _lower, platform="cpu")
batching.primitive_batchers[_fused_p] = lambda args, dims, **params: (
    jax.vmap(functools.partial(_fused_reference, **params), in_axes=dims)(*args), 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused(x, w, bias, residual, strides, pads, dn, relu):
    return _fused_p.bind(x, w, bias, *residual, strides=strides, pads=pads, dn=dn, relu=relu)


def _fused_fwd(x, w, bias, residual, *static):
    return _fused(x, w, bias, residual, *static), (x, w, bias, residual)


def _fused_bwd(strides, pads, dn, relu, res, g):  # rare (gradients through an eval-mode model)
    x, w, bias, residual = res
    ref = lambda x, w, b, r: _fused_reference(x, w, b, *r, strides=strides, pads=pads, dn=dn, relu=relu)
    return jax.vjp(ref, x, w, bias, residual)[1](g)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_conv(x, w, bias, strides, padding, dn, residual=None, relu=False):
    """`conv(x, w) + bias (+ residual)`, then ReLU if `relu`, as one oneDNN convolution with
    post-ops: the output is written once instead of being re-read by XLA's elementwise fusion
    (inference, with BatchNorm folded into `w` and `bias`). Accumulates and adds in float32 and
    rounds once, to x's dtype. Shapes where XLA's convolution is faster (`_xla_faster`) are XLA's,
    with the same epilogue. None where it does not apply (see `applies`; also: several devices,
    a batched trace, a residual of another shape or dtype): compute it unfused then."""
    if not (applies(x, w, strides, padding, None, None, dn, 1) and fused_usable()):
        return None
    strides, pads = tuple(strides), _pads(x.shape, w.shape, strides, padding, dn)
    out = _abstract(x, w, strides=strides, pads=pads, dn=dn)
    if residual is not None and (residual.shape != out.shape or residual.dtype != x.dtype):
        return None
    res = () if residual is None else (residual,)
    if _xla_faster(x, w, out.shape, dn):
        return _fused_reference(x, w, bias.astype(jnp.float32), *res, strides=strides, pads=pads, dn=dn,
                                relu=bool(relu))
    if jax.device_count() > 1 or any(isinstance(a, _BatchTracer) for a in (x, w, bias, residual)):
        return None
    return _fused(x, w, bias.astype(jnp.float32), res, strides, pads, dn, bool(relu))


def xla_faster(x, w, strides, padding, dn, smallest: int = 3) -> bool:
    """`_xla_faster` for a convolution given as `lax.conv_general_dilated`'s arguments.
    `smallest`: the smallest output side the rule covers (weight gradients: 1, see
    jaxcnn.dnnl.xla_faster)."""
    out = _abstract(x, w, strides=tuple(strides), pads=_pads(x.shape, w.shape, strides, padding, dn), dn=dn)
    return _xla_faster(x, w, out.shape, dn, smallest)


def _xla_faster(x, w, out_shape, dn, smallest: int = 3) -> bool:
    """f32 convolutions with a 3x3 to 5x5 pixel output and >= 256 channels in and out, where
    XLA's own (Eigen: im2col + one large GEMM, then the bias, residual and ReLU as one
    elementwise pass: `_fused_reference`) beat oneDNN's direct kernel, whose work there is mostly
    image border (resnet18_cifar's last stage). Batch 128, 2-core Xeon, ms, oneDNN with
    bias + ReLU / XLA: 512->512 at 4x4 40.4 / 31.9, 256->512 stride 2 to 4x4 21.6 / 15.3,
    512->512 at 3x3 30.5 / 16.3, at 5x5 47.8 / 42.3, at 6x6 60.2 / 62.3; 256->256 at 4x4 8.4 /
    8.1, 128->128 1.5 / 2.3. Not at 2x2 (XLA took 1 s there) nor in bf16 (oneDNN 2.6-3x faster).
    resnet18_cifar's fp32 eval step at batch 128: 463 and 493 -> 440 and 451 ms. In training
    (`xla_faster`, used by jaxcnn.ops) the forward and the input gradient, which XLA computes
    faster there too (512->512 at 4x4: 39.6 / 26.3 ms): resnet18_cifar's fp32 training step at
    batch 128, against the same step with these on oneDNN, alternating, median of 10 steps:
    1,573 / 1,510, 1,539 / 1,468, 1,518 / 1,450, 1,530 / 1,455 ms."""
    return (jnp.dtype(x.dtype) == jnp.float32 and all(smallest <= out_shape[d] <= 5 for d in dn.out_spec[2:])
            and x.shape[dn.lhs_spec[1]] >= 256 and w.shape[dn.rhs_spec[0]] >= 256)


@functools.lru_cache(maxsize=None)
def fused_usable() -> bool:
    """The post-ops work in this jaxlib: one small fused call agrees with XLA."""
    def check(rng):
        x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
        r = jnp.asarray(rng.standard_normal((2, 6, 5, 4)), jnp.float32)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        kw = dict(strides=(1, 1), pads=((1, 1), (1, 1)), dn=dn, relu=True)
        got = jax.jit(lambda *a: _fused_p.bind(*a, **kw))(x, w, b, r)
        return jnp.allclose(got, _fused_reference(x, w, b, r, **kw), rtol=1e-4, atol=1e-4)

    return usable() and _probe("fused oneDNN convolutions", check)


# --- Weight gradient of a 1x1 convolution: x^T g over the batch's rows, as a oneDNN matmul. ---

MATMUL_TARGET = "__onednn$matmul"
_matmul_p = _primitive("jaxcnn_onednn_matmul_tn")


@_matmul_p.def_abstract_eval
def _matmul_abstract(a, b):
    return jax.core.ShapedArray((a.shape[1], b.shape[1]), jnp.float32)


def _matmul_lower(ctx, a, b):
    # a is read as its transpose: oneDNN takes the [K, M] buffer with swapped strides, so the
    # [rows, channels] activations need no transposed copy.
    config = json.dumps({"outer_dimension_partitions": [],
                         "onednn_matmul_config": {"transpose_a": True, "transpose_b": False}})
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return _custom_call(MATMUL_TARGET, result_types=[out_type], operands=[a, b], api_version=1,
                        backend_config=config).results


def _matmul_reference(a, b):
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


mlir.register_lowering(_matmul_p, _matmul_lower, platform="cpu")
batching.primitive_batchers[_matmul_p] = lambda args, dims: (
    jax.vmap(_matmul_reference, in_axes=dims)(*args), 0)


def rows_summed(fn, sharding_rule: str, rows: str, others: tuple):
    """`fn(a, b)` (a product summed over the rows, dimension 0, of both operands) as a
    `custom_partitioning` function for several devices: the rows (the batch) may be sharded over
    mesh axes; each device applies `fn` to its own rows and the partial results are summed
    (psum), replicated. `sharding_rule` names the rows factor `rows`, every other one in `others`."""
    @custom_partitioning
    def f(a, b):
        return fn(a, b)

    def infer(mesh, arg_shapes, result_shape):
        return NamedSharding(mesh, PartitionSpec())

    def partition(mesh, arg_shapes, result_shape):
        axis = _sharded_axis(arg_shapes, 0)
        shards = tuple(NamedSharding(mesh, PartitionSpec(axis, *[None] * (len(s.shape) - 1)))
                       for s in arg_shapes)

        def local(a, b):
            y = fn(a, b)
            return y if axis is None else lax.psum(y, axis)
        return mesh, local, NamedSharding(mesh, PartitionSpec()), shards

    f.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                    reduction_factors=(rows,), need_replication_factors=others)
    return f


@functools.lru_cache(maxsize=None)
def _partitioned_matmul():
    return rows_summed(_matmul_p.bind, "k m, k n -> m n", "k", ("m", "n"))


def matmul_tn(a, b):
    """`a.T @ b` in float32 (a: [K, M], b: [K, N], one float dtype) by oneDNN, accumulating in
    float32. For a 1x1 convolution's weight gradient (K: batch x height x width rows) XLA:CPU
    upcast bf16 operands to f32 copies and then multiplied them by Eigen: [147968, 128] x
    [147968, 32] (128 x 34 x 34 rows) took 16.1 ms that way in bf16, 4.4 ms here (f32: 10.4 ->
    6.5; 2-core CPU).
    None where it does not apply: compute it with XLA then."""
    if not (a.ndim == b.ndim == 2 and a.shape[0] == b.shape[0] and a.dtype == b.dtype
            and jnp.dtype(a.dtype) in _DTYPES and matmul_usable()):
        return None
    if jax.device_count() > 1 and not any(isinstance(v, _BatchTracer) for v in (a, b)):
        return _partitioned_matmul()(a, b)
    return _matmul_p.bind(a, b)  # under vmap, the batching rule multiplies with XLA


@functools.lru_cache(maxsize=None)
def matmul_usable() -> bool:
    """The matmul call works in this jaxlib: a small one agrees with XLA's."""
    def check(rng):
        a = jnp.asarray(rng.standard_normal((37, 5)), jnp.float32)
        b = jnp.asarray(rng.standard_normal((37, 3)), jnp.float32)
        got = jax.jit(_matmul_p.bind)(a, b)
        return got.shape == (5, 3) and jnp.allclose(got, _matmul_reference(a, b), rtol=1e-4, atol=1e-4)

    return usable() and _probe("oneDNN matmuls", check)


def _pads(x_shape, w_shape, strides, padding, dn):
    if isinstance(padding, str):
        spatial = [x_shape[d] for d in dn.lhs_spec[2:]]
        window = [w_shape[d] for d in dn.rhs_spec[2:]]
        return tuple(lax.padtype_to_pads(spatial, window, strides, padding))
    return tuple(tuple(int(v) for v in p) for p in padding)


def applies(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups) -> bool:
    """Whether `conv` below may compute this convolution (see the module docstring)."""
    if not (x.ndim == 4 and groups == 1 and isinstance(dn, lax.ConvDimensionNumbers)
            and x.dtype == w.dtype and jnp.dtype(x.dtype) in _DTYPES
            and all(d == 1 for d in (lhs_dil or ())) and all(d == 1 for d in (rhs_dil or ()))):
        return False
    if any(p < 0 for pad in _pads(x.shape, w.shape, strides, padding, dn) for p in pad):
        return False
    return usable()


def conv(x, w, strides, padding, dn):
    """`lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)` by oneDNN.
    Call only where `applies` is true."""
    strides, pads = tuple(strides), _pads(x.shape, w.shape, strides, padding, dn)
    if jax.device_count() > 1:
        if isinstance(x, _BatchTracer) or isinstance(w, _BatchTracer):
            # custom_partitioning has no batching rule: under vmap, XLA's convolution
            return _xla_conv(x, w, strides=strides, pads=pads, dn=dn)
        return _partitioned(dn)(x, w, strides, pads)
    return _conv_p.bind(x, w, strides=strides, pads=pads, dn=dn)


def input_grad(g, w, x_shape, strides, padding, dn):
    """The input gradient of a convolution (cotangent `g`), by oneDNN. Stride 1: a forward
    convolution of g with the spatially flipped kernel, in/out features swapped, padded by
    k - 1 - pad on each side. Strided (NHWC/HWIO only): `_strided_input_grad`. None where
    neither applies (other layouts when strided, negative padding)."""
    if g.dtype != w.dtype:
        return None
    pads = _pads(x_shape, w.shape, strides, padding, dn)
    if any(s != 1 for s in strides):
        return _strided_input_grad(g, w, x_shape, tuple(strides), pads, dn)
    window = [w.shape[d] for d in dn.rhs_spec[2:]]
    grad_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(window, pads))
    if any(p < 0 for pad in grad_pads for p in pad):
        return None
    rhs = dn.rhs_spec
    grad_dn = lax.ConvDimensionNumbers(dn.out_spec, (rhs[1], rhs[0], *rhs[2:]), dn.lhs_spec)
    return conv(g, lax.rev(w, tuple(rhs[2:])), (1,) * len(window), grad_pads, grad_dn)


def _phase_taps(a: int, s: int, pad: int, k: int, n_out: int, n_in: int):
    """One spatial dimension of a strided convolution's input gradient, for the inputs
    i = s*m + a (phase a): dx[s*m + a] = sum over taps t with (a + pad - t) % s == 0 of
    g[m + d_t] * w[t], d_t = (a + pad - t) // s. Returns (taps ordered by d_t, the low and high
    padding of g that makes this a stride-1 correlation with one output per m, the number of
    those outputs); taps is empty when no tap reaches the phase."""
    taps = sorted((t for t in range(k) if (a + pad - t) % s == 0), key=lambda t: (a + pad - t) // s)
    m = -(-(n_in - a) // s)  # ceil: inputs of this phase
    if not taps or m <= 0:
        return [], (0, 0), max(m, 0)
    d_lo, d_hi = (a + pad - taps[0]) // s, (a + pad - taps[-1]) // s
    return taps, (-d_lo, m + d_hi - n_out), m


def _strided_input_grad(g, w, x_shape, strides, pads, dn):
    """A strided convolution's input gradient as one stride-1 oneDNN convolution per phase of
    the input (s_h * s_w of them: the inputs at i = s*m + a see only the kernel taps t with
    (a + pad - t) % s == 0), interleaved back by a reshape. The work is the forward's, where
    XLA's own input gradient (a base-dilated convolution) computes on the zero-interleaved
    cotangent: resnet18_cifar's three stride-2 ones took ~100 ms of a training step."""
    if tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.out_spec) != (0, 3, 1, 2) or \
            tuple(dn.rhs_spec) != (3, 2, 0, 1):
        return None
    n, h, wd, c_in = x_shape
    kh, kw = w.shape[:2]
    oh, ow = g.shape[1:3]
    w_t = jnp.swapaxes(w, 2, 3)  # HWIO -> HW(out)(in): the gradient maps C_out back to C_in
    grad_dn = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    mh, mw = -(-h // strides[0]), -(-wd // strides[1])
    rows = []
    for a in range(strides[0]):
        ta, (lo_h, hi_h), ma = _phase_taps(a, strides[0], pads[0][0], kh, oh, h)
        cols = []
        for b in range(strides[1]):
            tb, (lo_w, hi_w), mb = _phase_taps(b, strides[1], pads[1][0], kw, ow, wd)
            if ta and tb:
                # negative padding: crop g instead (oneDNN takes no negative padding)
                gp = g[:, max(0, -lo_h):oh - max(0, -hi_h), max(0, -lo_w):ow - max(0, -hi_w)]
                u = w_t[jnp.asarray(ta)][:, jnp.asarray(tb)]
                part = conv(gp, u, (1, 1), ((max(0, lo_h), max(0, hi_h)), (max(0, lo_w), max(0, hi_w))),
                            grad_dn)
            else:
                part = jnp.zeros((n, ma, mb, c_in), g.dtype)
            cols.append(jnp.pad(part, ((0, 0), (0, mh - ma), (0, mw - mb), (0, 0))))
        rows.append(jnp.stack(cols, axis=3))  # (n, mh, mw, s_w, c)
    dx = jnp.stack(rows, axis=2)  # (n, mh, s_h, mw, s_w, c)
    return dx.reshape(n, mh * strides[0], mw * strides[1], c_in)[:, :h, :wd]


@functools.lru_cache(maxsize=None)
def usable() -> bool:
    """oneDNN convolutions are on in this process: not switched off, CPU backend, jaxlib 0.10.x
    (the config encoding is that release's), and the probe agrees with XLA."""
    if os.environ.get("JAXCNN_ONEDNN", "1") in ("0", "false", "False"):
        return False
    if _custom_call is None or _jaxlib_version()[:2] != (0, 10) or jax.default_backend() != "cpu":
        return False

    def check(rng):
        x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 2, 3, 5)), jnp.float32)
        dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        params = dict(strides=(2, 1), pads=((1, 0), (0, 1)), dn=dn)
        got = jax.jit(lambda x, w: conv(x, w, params["strides"], params["pads"], dn))(x, w)
        want = _xla_conv(x, w, **params)
        return got.shape == want.shape and jnp.allclose(got, want, rtol=1e-4, atol=1e-4)

    return _probe("oneDNN convolutions", check)


def _probe(what: str, check) -> bool:
    """`check(rng)`, a small call compared with XLA's, run eagerly (even when first asked while a
    step is being traced); False, with a warning, when it disagrees or XLA rejects the call."""
    try:
        with jax.ensure_compile_time_eval():
            ok = bool(check(np.random.default_rng(0)))
    except Exception as e:  # an XLA that rejects the custom call: stay on XLA's convolutions
        warnings.warn(f"jaxcnn: {what} are off ({type(e).__name__}: {e})")
        return False
    if not ok:
        warnings.warn(f"jaxcnn: {what} are off (the probe disagreed with XLA's)")
    return ok
