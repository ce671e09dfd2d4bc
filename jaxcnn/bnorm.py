"""BatchNorm (+ ReLU) in training by oneDNN's batch-normalization kernels (libdnnl), on the CPU.

XLA:CPU computes a BatchNorm's channel sums with YNNPACK reductions that take float32 operands
only: a bf16 activation is first copied to float32 in memory (once per BatchNorm, forward and
backward), and the backward pass's masked cotangent and broadcasts are materialised the same
way. oneDNN's kernels read bf16 directly and fuse the ReLU. Batch 128, [32, 32, 128] bf16 on the
2-core Xeon, ms: statistics alone 9.9 by XLA, the whole oneDNN forward (statistics,
normalise, ReLU) 2.7; the backward (both channel sums and dx, ReLU mask included) 40-50 by XLA,
3.7 by oneDNN.

Calls, as XLA typed-FFI custom calls (handlers compiled, jaxcnn.native, or ctypes, jaxcnn.dnnl):
  forward(x, scale, shift)              -> y, mean, var, workspace   (batch statistics)
  forward(x, scale, shift, mean, var)   -> y, workspace              (given statistics)
  backward(x, g, mean, var, scale, ws)  -> dx, d_scale, d_shift
The workspace is oneDNN's ReLU mask (one bit per element), kept for the backward pass instead
of the BatchNorm's output. Statistics and affine parameters are float32 (biased variance),
x, y, g and dx one dtype (f32 or bf16), NHWC.

When: rank-4 NHWC inputs, one device (a BatchNorm's statistics are over the global batch; with
several devices the XLA path in jaxcnn.ops, whose reductions XLA's partitioner makes global,
stays), not under vmap, and only after a probe (forward and backward against the XLA path)
passed in this process. JAXCNN_DNNL_BN=0 turns it off, as do JAXCNN_DNNL=0 and JAXCNN_ONEDNN=0.
"""
from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn import dnnl, native, onednn

# oneDNN 3.x constants (dnnl_types.h): normalization flags, propagation kinds, argument indices
GLOBAL_STATS, _USE_SCALE, _USE_SHIFT, RELU = 0x1, 0x2, 0x4, 0x8
_BACKWARD = 128
_SRC, _DST, _MEAN, _VAR, _SCALE, _SHIFT, _WS = 1, 17, 49, 50, 51, 52, 64
_DIFF_SRC, _DIFF_DST, _DIFF_SCALE, _DIFF_SHIFT = 129, 145, 255, 256
_TAG_A = 2
FWD_TARGET, BWD_TARGET = "jaxcnn_dnnl_bn_fwd", "jaxcnn_dnnl_bn_bwd"


class _Plans(dnnl.Plans):
    """Forward and backward primitives per (shape, dtype, eps, flags), each with the memories
    whose data handles a call sets to XLA's buffers."""
    what = "batch norm"

    def _build(self, key) -> dict:
        rt, byref = self.rt, ctypes.byref
        (n, h, w, c), dtype, eps, flags = key
        flags |= _USE_SCALE | _USE_SHIFT
        dt = dnnl._BF16 if dtype == "bfloat16" else dnnl._F32
        data, vec = rt._md([n, c, h, w], dt, dnnl._TAG_NHWC), rt._md([c], dnnl._F32, _TAG_A)
        fwd, bwd = dnnl._vp(), dnnl._vp()
        rt._check(rt.lib.dnnl_batch_normalization_forward_primitive_desc_create(
            byref(fwd), rt.engine, dnnl._FORWARD_TRAINING, data, data, ctypes.c_float(eps),
            ctypes.c_uint(flags), rt.attr), "batch-norm forward descriptor")
        rt._check(rt.lib.dnnl_batch_normalization_backward_primitive_desc_create(
            byref(bwd), rt.engine, _BACKWARD, data, data, data, ctypes.c_float(eps),
            ctypes.c_uint(flags), fwd, rt.attr), "batch-norm backward descriptor")
        ws_md = dnnl._vp(rt.lib.dnnl_primitive_desc_query_md(fwd, dnnl._QUERY_EXEC_ARG_MD, _WS))
        ws_size = rt.lib.dnnl_memory_desc_get_size(ws_md) if flags & RELU else 0
        buffers = []  # the scratchpads, kept with the plan
        owned = rt.owner(buffers)

        m = {name: rt._memory(data) for name in ("x", "y", "g", "dx")}
        m.update({name: rt._memory(vec) for name in ("mean", "var", "scale", "shift", "d_scale", "d_shift")})
        if ws_size:
            m["ws"] = rt._memory(ws_md)
        ws = [(_WS, m["ws"])] if ws_size else []
        forward = rt._primitive(fwd, [(_SRC, m["x"]), (_DST, m["y"]), (_MEAN, m["mean"]), (_VAR, m["var"]),
                                      (_SCALE, m["scale"]), (_SHIFT, m["shift"])] + ws, owned)
        backward = rt._primitive(bwd, [(_SRC, m["x"]), (_DIFF_DST, m["g"]), (_MEAN, m["mean"]),
                                       (_VAR, m["var"]), (_SCALE, m["scale"])] + ws +
                                 [(_DIFF_SRC, m["dx"]), (_DIFF_SCALE, m["d_scale"]),
                                  (_DIFF_SHIFT, m["d_shift"])], owned)
        return dict(calls=dict(forward=forward, backward=backward), mem=m, ws_size=int(ws_size), buffers=buffers,
                    impl=(rt._impl(fwd), rt._impl(bwd)))


@functools.lru_cache(maxsize=None)
def _plans():
    if os.environ.get("JAXCNN_DNNL_BN", "1") in ("0", "false", "False"):
        return None
    rt = dnnl._runtime()
    return None if rt is None else _Plans(rt)


# --- the custom calls. The last operand is int32 [flags, eps as float32 bits].

def _key(shape, dtype, eps: float, flags: int) -> tuple:
    """A plan's key; eps as the float32 the call carries."""
    return tuple(shape), jnp.dtype(dtype).name, float(np.float32(eps)), flags


def _flags(relu: bool, global_stats: bool) -> int:
    return (RELU if relu else 0) | (GLOBAL_STATS if global_stats else 0)


def _key_of(x, config) -> tuple:
    """The key of a call, from its x buffer and its config operand [flags, eps's float32 bits]."""
    flags = ctypes.cast(config.data, ctypes.POINTER(ctypes.c_int32))[0]
    eps = ctypes.cast(config.data + 4, ctypes.POINTER(ctypes.c_float))[0]
    return (tuple(x.dims[i] for i in range(x.rank)), "bfloat16" if x.dtype == dnnl._FFI_BF16 else "float32",
            eps, flags)


def _operands(flags: int, direction: str) -> dict:
    """Which buffer each of a plan's memories points at: name -> (native.ARG or native.RET, index)."""
    A, R = native.ARG, native.RET
    if direction == "forward":
        where = dict(x=(A, 0), scale=(A, 1), shift=(A, 2), y=(R, 0))
        where.update(dict(mean=(A, 3), var=(A, 4)) if flags & GLOBAL_STATS else dict(mean=(R, 1), var=(R, 2)))
        if flags & RELU:
            where["ws"] = (R, 1 if flags & GLOBAL_STATS else 3)
    else:
        where = dict(x=(A, 0), g=(A, 1), mean=(A, 2), var=(A, 3), scale=(A, 4), dx=(R, 0), d_scale=(R, 1),
                     d_shift=(R, 2))
        if flags & RELU:
            where["ws"] = (A, 5)
    return where


def _call_of(args, rets, direction: str) -> tuple:
    key = _key_of(args[0], args[-1])
    return key, direction, _operands(key[3], direction)


_registered = dnnl.plan_handlers(_plans, _call_of, {
    FWD_TARGET: ("bn_forward", "batch norm", "forward"),
    BWD_TARGET: ("bn_backward", "batch norm gradient", "backward")})


def _config(eps: float, flags: int) -> tuple:
    return flags, int(np.array([eps], np.float32).view(np.int32)[0])


def _ws_size(shape, dtype, eps: float, flags: int) -> int:
    """The ReLU mask's bytes (0 without ReLU); builds the plan, so that a shape oneDNN rejects
    fails when the step is traced, not when it runs."""
    return _plans().get(_key(shape, dtype, eps, flags))["ws_size"]


# The backward pass writes dx over g (oneDNN computes it in place): one activation-sized buffer
# less at the peak, which is in the backward pass; XLA copies g first if it is still needed.
_call = dnnl.config_calls((FWD_TARGET, BWD_TARGET), aliases={BWD_TARGET: {1: 0}})


def forward(x, scale, shift, eps: float, relu: bool, stats=None):
    """(y, mean, var, ws) with batch statistics, or (y, ws) with `stats` = (mean, var) given."""
    flags = _flags(relu, stats is not None)
    ws = _ws_size(x.shape, x.dtype, eps, flags)
    c = x.shape[-1]
    y, vec, mask = (x.shape, x.dtype), ((c,), jnp.float32), ((max(ws, 1),), jnp.uint8)
    f32 = lambda v: v.astype(jnp.float32)
    if stats is None:
        return _call(FWD_TARGET, (x, f32(scale), f32(shift)), (y, vec, vec, mask), _config(eps, flags))
    return _call(FWD_TARGET, (x, f32(scale), f32(shift), f32(stats[0]), f32(stats[1])), (y, mask),
                 _config(eps, flags))


def backward(x, g, mean, var, scale, ws, eps: float, relu: bool, global_stats: bool):
    """(dx, d_scale, d_shift): d_scale = sum(g' x-hat), d_shift = sum(g'), g' the cotangent masked
    by the ReLU; dx includes the statistics' terms unless `global_stats`."""
    flags = _flags(relu, global_stats)
    _ws_size(x.shape, x.dtype, eps, flags)  # the plan (built by the forward pass already)
    vec = ((x.shape[-1],), jnp.float32)
    return _call(BWD_TARGET, (x, g.astype(x.dtype), mean, var, scale.astype(jnp.float32), ws),
                 ((x.shape, x.dtype), vec, vec), _config(eps, flags))


def applies(x, dtype) -> bool:
    """NHWC rank 4, f32 or bf16 computed in its own dtype, one device, not under vmap, usable,
    and a JIT kernel for the shape. oneDNN 3.2 has them for channel counts that fill its vectors
    (multiples of 16 with AVX-512); for others it picks a generic C++ kernel ('nspc_bnorm:any'),
    3x slower than XLA in densenet_bc_100_12's training step (k = 12: 36, 60, ... channels)."""
    if not (x.ndim == 4 and jnp.dtype(x.dtype) == jnp.dtype(dtype) and jnp.dtype(dtype) in onednn._DTYPES
            and not isinstance(x, onednn._BatchTracer) and jax.device_count() == 1 and usable()):
        return False
    return all("jit" in name for name in implementation(x.shape, dtype))


@functools.lru_cache(maxsize=None)
def usable() -> bool:
    """The library loaded, the CPU backend, and a probe passed (forward and backward, with and
    without ReLU and given statistics, against `reference`)."""
    if jax.default_backend() != "cpu" or onednn._custom_call is None or _plans() is None \
            or not _registered():
        return False

    def check(rng):
        x = jnp.asarray(rng.standard_normal((3, 4, 5, 6)) * 2 + 1, jnp.float32)
        g = jnp.asarray(rng.standard_normal((3, 4, 5, 6)), jnp.float32)
        scale, shift = jnp.linspace(0.5, 1.5, 6), jnp.linspace(-0.3, 0.3, 6)
        ok = True
        for relu in (False, True):
            y, mean, var, ws = jax.jit(lambda x: forward(x, scale, shift, 1e-5, relu))(x)
            m, v = x.mean((0, 1, 2)), x.var((0, 1, 2))
            want = (x - m) / jnp.sqrt(v + 1e-5) * scale + shift
            want = jnp.maximum(want, 0) if relu else want
            ok = ok and bool(jnp.allclose(y, want, atol=1e-4)) and bool(jnp.allclose(mean, m, atol=1e-5))
            dx, ds, db = jax.jit(lambda *a: backward(*a, 1e-5, relu, False))(x, g, mean, var, scale, ws)
            gm = jnp.where(want > 0, g, 0) if relu else g
            ok = ok and bool(jnp.allclose(db, gm.sum((0, 1, 2)), atol=1e-4))
        return ok

    return onednn._probe("oneDNN batch norms", check)


def implementation(shape, dtype, eps: float = 1e-5, relu: bool = True, global_stats: bool = False) -> tuple:
    """oneDNN's names for the forward and backward kernels it picked (tests, benchmarks)."""
    return _plans().get(_key(shape, dtype, eps, _flags(relu, global_stats)))["impl"]
