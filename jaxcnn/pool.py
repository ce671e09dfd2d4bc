"""Max-pooling by oneDNN's pooling kernels (libdnnl), on the CPU, forward and backward.

XLA:CPU has no pooling kernel that keeps the argmax: jaxcnn.ops computes the pool as the
maximum of its taps' strided slices and the gradient from each window's first-max index, all
elementwise fusions, which in bf16 run through converts to f32. oneDNN's training forward
writes y and a workspace (each window's argmax, one byte per output element); its backward
scatters the cotangent through that workspace. Session 30, 2-core Zen 5 (`benchmarks/NOTES.md`),
bf16, forward + backward, ms:

    pool                                  jaxcnn.ops        oneDNN
    2x2, [256, 31, 31, 64]  (fastnet)     24.3              0.7 + 1.2   (alone, warm caches)
    2x2, [256, 15, 15, 256] (fastnet)     18.4              0.7 + 1.3
    fastnet's three, inside its step      25.5 (profile)    11.2
    3x3/2 pad 1, [32, 112, 112, 64]       62.4              24.2        (resnet/densenet stems)

fastnet's bf16 train step at batch 256: 1,239 -> 1,289 img/s (A/B in one process); the `fast`
recipe's loop, 2 epochs: 1,242-1,316 -> 1,371-1,406 img/s.

Calls, as XLA typed-FFI custom calls (handlers compiled, jaxcnn.native, or ctypes, jaxcnn.dnnl):
  forward(x)       -> y             (inference: no workspace)
  forward(x)       -> y, workspace  (training)
  backward(g, ws)  -> dx
each with a last int32 operand [window, stride, padding, mode]. Same values as jaxcnn.ops's
pool: floor mode, padding counts as -inf, the gradient goes to each window's first maximum in
row-major order (the probe checks ties). NaNs: oneDNN compares with an ordered `<`, starting
from the lowest value, so it skips a window's NaNs (the result is the maximum of its other taps)
and writes float32's lowest finite value (bf16: -inf) for a window of NaNs only (or of -infs:
those become NaN here too). The handlers set those back to NaN (`dnnl.restore_nans`, a pass over y
while it is in cache), so that a NaN tensor stays NaN and a diverged run still ends in a NaN
loss, which the training loop reports.
jaxcnn.ops's maximum, like PyTorch's pool, propagates every NaN; a window with some NaNs is the
one difference.

Overlapping windows (3x3/2) in bf16: oneDNN rounds the gradient after each add where windows
share an input (within 1-2 bf16 ulps of the sum; tests/test_pool.py bounds it); jaxcnn.ops sums
in f32 and rounds once.

When: rank-4 NHWC f32 or bf16, one device (as jaxcnn.bnorm), not under vmap, a non-empty output,
oneDNN JIT kernels for the shape, and only after a probe passed in this process; except the
inference of f32 2x2 pools, where XLA's fusion is faster (`xla_infers_faster`). JAXCNN_DNNL_POOL=0 or
`ops.switched(DNNL_POOL=False)` turns it off, as do JAXCNN_DNNL=0 and JAXCNN_ONEDNN=0.
"""
from __future__ import annotations

import ctypes
import functools
import os

import jax
import jax.numpy as jnp

from jaxcnn import dnnl, native, onednn

_POOL_MAX = 0x1ff                 # dnnl_pooling_max
_SRC, _DST, _WS, _DIFF_SRC, _DIFF_DST = 1, 17, 64, 129, 145
_FORWARD_INFERENCE = 96
INFER, TRAIN, BACKWARD = 0, 1, 2  # the call's mode (last config word)
FWD_TARGET, BWD_TARGET = "jaxcnn_dnnl_pool_fwd", "jaxcnn_dnnl_pool_bwd"
_D2 = ctypes.c_int64 * 2


def out_side(size: int, window: int, stride: int, padding: int) -> int:
    """A pool's output side in floor mode (PyTorch's default; jaxcnn.ops uses it too)."""
    return (size + 2 * padding - window) // stride + 1


class _Plans(dnnl.Plans):
    """Per (x's shape, dtype, window, stride, padding): the inference and training forward and
    the backward primitives, with the memories whose data handles a call sets to XLA's buffers."""
    what = "max-pool"

    def _build(self, key) -> dict:
        rt, byref = self.rt, ctypes.byref
        (n, h, w, c), dtype, window, stride, padding = key
        ho, wo = out_side(h, window, stride, padding), out_side(w, window, stride, padding)
        dt = dnnl._BF16 if dtype == "bfloat16" else dnnl._F32
        src, dst = rt._md([n, c, h, w], dt, dnnl._TAG_NHWC), rt._md([n, c, ho, wo], dt, dnnl._TAG_NHWC)
        # Floor mode: the right/bottom padding that makes the last window end where it does (it
        # may be negative: rows past the last window are in no window, as in floor mode).
        geometry = (_D2(stride, stride), _D2(window, window), _D2(0, 0), _D2(padding, padding),
                    _D2((ho - 1) * stride + window - h - padding, (wo - 1) * stride + window - w - padding))
        infer, train, bwd = dnnl._vp(), dnnl._vp(), dnnl._vp()
        for pd, kind in ((infer, _FORWARD_INFERENCE), (train, dnnl._FORWARD_TRAINING)):
            rt._check(rt.lib.dnnl_pooling_forward_primitive_desc_create(
                byref(pd), rt.engine, kind, _POOL_MAX, src, dst, *geometry, rt.attr), "pooling forward descriptor")
        rt._check(rt.lib.dnnl_pooling_backward_primitive_desc_create(
            byref(bwd), rt.engine, _POOL_MAX, src, dst, *geometry, train, rt.attr), "pooling backward descriptor")
        ws_md = dnnl._vp(rt.lib.dnnl_primitive_desc_query_md(train, dnnl._QUERY_EXEC_ARG_MD, _WS))
        buffers = []  # the scratchpads, kept with the plan
        owned = rt.owner(buffers)
        m = dict(x=rt._memory(src), dx=rt._memory(src), y=rt._memory(dst), g=rt._memory(dst), ws=rt._memory(ws_md))
        calls = {INFER: rt._primitive(infer, [(_SRC, m["x"]), (_DST, m["y"])], owned),
                 TRAIN: rt._primitive(train, [(_SRC, m["x"]), (_DST, m["y"]), (_WS, m["ws"])], owned),
                 BACKWARD: rt._primitive(bwd, [(_DIFF_DST, m["g"]), (_WS, m["ws"]), (_DIFF_SRC, m["dx"])], owned)}
        # oneDNN writes its lowest value for a window of NaNs: both forwards set it back to NaN
        nans = ("y", n * ho * wo * c, 2 if dt == dnnl._BF16 else 4)
        return dict(calls=calls, mem=m, nans={INFER: nans, TRAIN: nans},
                    ws_size=int(rt.lib.dnnl_memory_desc_get_size(ws_md)), buffers=buffers,
                    impl=(rt._impl(infer), rt._impl(train), rt._impl(bwd)))


@functools.lru_cache(maxsize=None)
def _plans():
    if os.environ.get("JAXCNN_DNNL_POOL", "1") in ("0", "false", "False"):
        return None
    rt = dnnl._runtime()
    return None if rt is None else _Plans(rt)


def _key(shape, dtype, window: int, stride: int, padding: int) -> tuple:
    return tuple(int(d) for d in shape), jnp.dtype(dtype).name, int(window), int(stride), int(padding)


def _call_key(args, rets) -> tuple:
    """(plan key, mode) of a call from its buffers: x (forward) or dx (backward) sets the shape,
    the last operand is [window, stride, padding, mode]."""
    config = ctypes.cast(args[-1].data, ctypes.POINTER(ctypes.c_int32))
    window, stride, padding, mode = (config[i] for i in range(4))
    x = rets[0] if mode == BACKWARD else args[0]
    shape = tuple(x.dims[i] for i in range(x.rank))
    return _key(shape, "bfloat16" if x.dtype == dnnl._FFI_BF16 else "float32", window, stride, padding), mode


def _operands(mode: int) -> dict:
    """Which buffer each of a plan's memories points at: name -> (native.ARG or native.RET, index)."""
    A, R = native.ARG, native.RET
    if mode == BACKWARD:
        return dict(g=(A, 0), ws=(A, 1), dx=(R, 0))
    return dict(x=(A, 0), y=(R, 0), **({"ws": (R, 1)} if mode == TRAIN else {}))


def _call_of(args, rets, _) -> tuple:
    key, mode = _call_key(args, rets)
    return key, mode, _operands(mode)


# The call (inference, training, backward) is the config's mode, not the target's.
_registered = dnnl.plan_handlers(_plans, _call_of, {FWD_TARGET: ("pool_forward", "max-pool", None),
                                                    BWD_TARGET: ("pool_backward", "max-pool gradient", None)})


_call = dnnl.config_calls((FWD_TARGET, BWD_TARGET))


def _plan_of(x_shape, dtype, window, stride, padding) -> dict:
    """The plan, built when the step is traced: a shape oneDNN rejects fails there, not at run time."""
    return _plans().get(_key(x_shape, dtype, window, stride, padding))


def _y_shape(x_shape, window, stride, padding) -> tuple:
    n, h, w, c = x_shape
    return n, out_side(h, window, stride, padding), out_side(w, window, stride, padding), c


def xla_infers_faster(dtype, window: int, stride: int) -> bool:
    """Inference (no gradient) of f32 pools whose windows tile the image (2x2/2): XLA's fused
    maximum of the taps beats oneDNN's kernel and its NaN pass. simple_cnn's fp32 eval step at
    batch 128, processes alternated: 9.0 and 9.3 ms against 9.8 and 11.2; [256, 31, 31, 64]
    alone 1.48 against 2.03 ms. In bf16 (1.88 against 1.00 ms) and for overlapping windows (a
    3x3/2 stem pool in f32: 33.8 against 12.5 ms) oneDNN is faster. Training always uses oneDNN:
    its backward pass needs the forward's argmax."""
    return jnp.dtype(dtype) == jnp.float32 and window == stride


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding: int):
    """`jaxcnn.ops.max_pool` by oneDNN (call where `applies`)."""
    if xla_infers_faster(x.dtype, window, stride):
        from jaxcnn import ops
        return ops._max_of_taps(x, window, stride, padding)
    _plan_of(x.shape, x.dtype, window, stride, padding)
    y, = _call(FWD_TARGET, (x,), ((_y_shape(x.shape, window, stride, padding), x.dtype),),
               (window, stride, padding, INFER))
    return y


def _fwd(x, window, stride, padding):
    ws = _plan_of(x.shape, x.dtype, window, stride, padding)["ws_size"]
    y, ws = _call(FWD_TARGET, (x,), ((_y_shape(x.shape, window, stride, padding), x.dtype), ((ws,), jnp.uint8)),
                  (window, stride, padding, TRAIN))
    return y, (ws, jnp.zeros((0,) + x.shape[1:], x.dtype))  # the second carries x's shape only


def _bwd(window, stride, padding, res, g):
    ws, like = res
    x_shape = (g.shape[0],) + like.shape[1:]
    dx, = _call(BWD_TARGET, (g.astype(like.dtype), ws), ((x_shape, like.dtype),),
                (window, stride, padding, BACKWARD))
    return (dx,)


max_pool.defvjp(_fwd, _bwd)


def applies(x, window: int, stride: int, padding: int) -> bool:
    """NHWC rank 4, f32 or bf16, one device, not under vmap, usable, a non-empty output, and JIT
    kernels for the shape."""
    if not (x.ndim == 4 and jnp.dtype(x.dtype) in onednn._DTYPES and not isinstance(x, onednn._BatchTracer)
            and jax.device_count() == 1 and 0 <= padding < window and usable()):
        return False
    if min(_y_shape(x.shape, window, stride, padding)) < 1:  # empty: oneDNN's kernels divide by zero
        return False
    return all("jit" in name for name in implementation(x.shape, x.dtype, window, stride, padding))


@functools.lru_cache(maxsize=None)
def usable() -> bool:
    """The library loaded, the CPU backend, and a probe passed: values and gradients equal to
    jaxcnn.ops's pool for tiled and overlapping, padded windows, with ties."""
    if jax.default_backend() != "cpu" or onednn._custom_call is None or _plans() is None or not _registered():
        return False

    def check(rng):
        from jaxcnn import ops
        # small integers: many ties, where the first maximum must get the gradient
        x = jnp.asarray(rng.integers(-2, 3, (2, 7, 6, 16)), jnp.float32)
        ok = True
        for window, stride, padding in ((2, 2, 0), (3, 2, 1)):
            g = jnp.asarray(rng.standard_normal(_y_shape(x.shape, window, stride, padding)), jnp.float32)
            ours = lambda x: max_pool(x, window, stride, padding)
            ref = lambda x: ops._max_pool(x, window, stride, padding)
            (y, vjp), (y_ref, vjp_ref) = (jax.vjp(jax.jit(f), x) for f in (ours, ref))
            inferred = jax.jit(ours)(x)
            # overlapping windows sum cotangents, in another order: not bit for bit
            ok = ok and bool(jnp.array_equal(y, y_ref)) and bool(jnp.array_equal(inferred, y_ref)) \
                and bool(jnp.allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6))
        return ok

    return onednn._probe("oneDNN max-pools", check)


def implementation(x_shape, dtype, window: int, stride: int, padding: int = 0) -> tuple:
    """oneDNN's names for the inference, training and backward kernels it picked."""
    return _plan_of(x_shape, dtype, window, stride, padding)["impl"]
