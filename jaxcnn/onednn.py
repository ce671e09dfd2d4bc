"""oneDNN's direct convolution kernels on the CPU, through XLA:CPU's own oneDNN runtime.

XLA:CPU computes a convolution as Eigen's im2col packing plus a GEMM: a 3x3 64->64 conv at
32x32, batch 128, packs 302 MB of patches into freshly mapped memory on every call, and the
packing and page zeroing were ~20% of a ResNet-18 training step (README, "Where the time goes").
PyTorch runs the same convolution with oneDNN's direct kernels, which need no patch buffer.
jaxlib 0.10 ships those kernels too, with a runtime thunk for an XLA custom call
`__onednn$convolution`; XLA's own rewriter only emits that call in builds with
ENABLE_ONEDNN_ASYNC, which jaxlib's wheels are not. jaxcnn emits the call itself.

Measured alone (benchmarks/conv_kernels.py, batch 128, f32, ms): forward 64->64 at 32x32 35 -> 29,
48->12 at 32x32 9.9 -> 5.1; in bf16 the forward is 3-4x faster than Eigen's (46 -> 10.5 ms).

What goes to oneDNN: forward convolutions, and input gradients of stride-1 convolutions (a forward
convolution of the cotangent with the flipped kernel). Weight gradients stay on Eigen: as a forward
convolution their window is the whole image, and oneDNN's kernels for that ran for minutes.

When: 2-D, feature_group_count 1, no dilation, padding >= 0, f32 or bf16 operands of one dtype,
on the CPU backend of jaxlib 0.10.x with a single device (XLA's SPMD partitioner does not know
the custom call and would replicate it over devices), and only after a probe (one small strided,
padded convolution compared with XLA's) passed in this process. JAXCNN_ONEDNN=0 turns it off;
`jaxcnn.ops.enabled(False)` too. Under `jax.vmap` the convolution falls back to XLA's.
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
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

try:  # not public API: with a jax that lacks it, the convolutions stay XLA's
    from jax._src.interpreters.mlir import custom_call as _custom_call
except ImportError:  # pragma: no cover
    _custom_call = None

TARGET = "__onednn$convolution"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _backend_config(dn: lax.ConvDimensionNumbers, window, pads, strides) -> str:
    """xla.cpu.BackendConfig (JSON) for the custom call. Field meanings as in XLA's
    OneDnnContractionRewriter for jaxlib 0.10: zero-based dims, actual window values."""
    lhs, rhs, out = dn
    data = lambda s: {"batch_dim": s[0], "feature_dim": s[1], "spatial_dims": list(s[2:])}
    rank = len(lhs)
    return json.dumps({"outer_dimension_partitions": [], "onednn_conv_config": {
        "dims": rank, "feature_groups": 1,
        "input": {"dims": rank, "data": data(lhs)},
        "kernel": {"dims": rank, "filter": {"output_feature_dim": rhs[0], "input_feature_dim": rhs[1],
                                            "spatial_dims": list(rhs[2:])}},
        "output": {"dims": rank, "data": data(out)},
        "window": {"size": list(window), "pad_left": [p[0] for p in pads],
                   "pad_right": [p[1] for p in pads], "strides": list(strides),
                   "window_dilations": [1] * len(window)}}})


def _xla_conv(x, w, *, strides, pads, dn):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=dn)


_conv_p = jex_core.Primitive("jaxcnn_onednn_conv")
# Outside a trace, bind compiles the call like any jitted function.
_conv_p.def_impl(lambda x, w, **params: jax.jit(functools.partial(_conv_p.bind, **params))(x, w))


@_conv_p.def_abstract_eval
def _abstract(x, w, *, strides, pads, dn):
    out = jax.eval_shape(functools.partial(_xla_conv, strides=strides, pads=pads, dn=dn), x, w)
    return jax.core.ShapedArray(out.shape, out.dtype)


def _lower(ctx, x, w, *, strides, pads, dn):
    rhs_shape = ctx.avals_in[1].shape
    window = [rhs_shape[d] for d in dn.rhs_spec[2:]]
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return _custom_call(TARGET, result_types=[out_type], operands=[x, w], api_version=1,
                        backend_config=_backend_config(dn, window, pads, strides)).results


mlir.register_lowering(_conv_p, _lower, platform="cpu")


def _batch(args, dims, **params):
    # No batched oneDNN call: vmap the same convolution in XLA.
    return jax.vmap(functools.partial(_xla_conv, **params), in_axes=dims)(*args), 0


batching.primitive_batchers[_conv_p] = _batch


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
    return _conv_p.bind(x, w, strides=tuple(strides), dn=dn,
                        pads=_pads(x.shape, w.shape, strides, padding, dn))


def input_grad(g, w, x_shape, strides, padding, dn):
    """The input gradient of a stride-1 convolution (cotangent `g`), by oneDNN: a forward
    convolution of g with the spatially flipped kernel, in/out features swapped, padded by
    k - 1 - pad on each side. None where that does not apply (strides, negative padding)."""
    if any(s != 1 for s in strides) or g.dtype != w.dtype:
        return None
    pads = _pads(x_shape, w.shape, strides, padding, dn)
    window = [w.shape[d] for d in dn.rhs_spec[2:]]
    grad_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(window, pads))
    if any(p < 0 for pad in grad_pads for p in pad):
        return None
    rhs = dn.rhs_spec
    grad_dn = lax.ConvDimensionNumbers(dn.out_spec, (rhs[1], rhs[0], *rhs[2:]), dn.lhs_spec)
    return conv(g, lax.rev(w, tuple(rhs[2:])), (1,) * len(window), grad_pads, grad_dn)


def _jaxlib_version() -> tuple:
    from jaxcnn._xla import _jaxlib_version as v
    return v()


@functools.lru_cache(maxsize=None)
def usable() -> bool:
    """oneDNN convolutions are on in this process: not switched off, CPU backend, jaxlib 0.10.x
    (the config encoding is that release's), one device, and the probe agrees with XLA."""
    if os.environ.get("JAXCNN_ONEDNN", "1") in ("0", "false", "False"):
        return False
    if (_custom_call is None or _jaxlib_version()[:2] != (0, 10) or jax.default_backend() != "cpu"
            or jax.device_count() != 1):
        return False
    # The probe runs eagerly even when `usable` is first asked while a step is being traced.
    try:
        with jax.ensure_compile_time_eval():
            rng = np.random.default_rng(0)
            x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
            w = jnp.asarray(rng.standard_normal((3, 2, 3, 5)), jnp.float32)
            dn = lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
            params = dict(strides=(2, 1), pads=((1, 0), (0, 1)), dn=dn)
            got = jax.jit(lambda x, w: _conv_p.bind(x, w, **params))(x, w)
            want = _xla_conv(x, w, **params)
            ok = got.shape == want.shape and bool(jnp.allclose(got, want, rtol=1e-4, atol=1e-4))
    except Exception as e:  # an XLA that rejects the custom call: stay on XLA's convolutions
        warnings.warn(f"jaxcnn: oneDNN convolutions are off ({type(e).__name__}: {e})")
        return False
    if not ok:
        warnings.warn("jaxcnn: oneDNN convolutions are off (the probe disagreed with XLA's)")
    return ok
