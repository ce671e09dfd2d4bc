"""Convolution weight gradients by oneDNN's backward-weights kernels (libdnnl), on the CPU.

XLA:CPU computes a 3x3 convolution's weight gradient with Eigen: both operands are transposed to
[C, H, W, N] copies (bf16 ones upcast to f32 first) and contracted by a GEMM. oneDNN, which
PyTorch uses, has direct backward-weights kernels, including bf16 ones that accumulate in f32.
Batch 128, NHWC, 2-core Zen 5, ms (Eigen as XLA runs it / oneDNN here):

    3x3 conv          f32           bf16
    128->32 at 32x32  53.0 / 22.6   43.2 / 13.8
    64->64 at 32x32   38.8 / 21.2   34.7 / 12.3
    128->128 at 16x16 27.2 / 19.3   25.2 / 9.7
    256->256 at 8x8   21.4 / 16.7   20.8 / 10.5

jaxlib bundles oneDNN but runs only its forward convolutions and matmuls (jaxcnn.onednn), and
exports none of its symbols. So jaxcnn loads oneDNN's own shared library (the `onednn-cpu-gomp`
wheel, oneDNN 3.x, a dependency on Linux x86-64) with ctypes, builds the primitives with it,
and calls them from inside the compiled step as an XLA typed-FFI custom call. Its handler is
compiled C where `pip install` built it (jaxcnn.native), else a ctypes function (`ffi_handler`).
It gets the addresses of XLA's buffers (no copy), oneDNN writes the gradient in its preferred
blocked layout, and a oneDNN reorder writes it into XLA's output buffer as HWIO f32.

Threads: XLA runs independent operations side by side on its own thread pool, and a oneDNN call
on OpenMP threads of its own then shares cores with them. So a call is split by batch into one
chunk per pool thread, each a single-threaded oneDNN call into a partial gradient of its own;
the other chunks are offered to XLA's pool (XLA_FFI_ThreadPool_Schedule), and the calling
thread runs every chunk no idle pool thread took. The reorders add the partial gradients up.
On the 2-core Xeon (AMX), a bf16 128->32 gradient at 32x32 took 50-57 ms inside
resdensenet_cifar's step on two OpenMP threads, against 7 ms alone. JAXCNN_DNNL_SPLIT=0, or
several CPU devices (`_splits`), make one call on oneDNN's OpenMP threads instead.

When: where jaxcnn.onednn's convolutions apply, for NHWC/HWIO convolutions, not under vmap, and
only after a probe (a small strided, padded gradient compared with XLA's) passed in this
process. JAXCNN_DNNL=0 turns it off (JAXCNN_ONEDNN=0 too, with the other oneDNN paths);
JAXCNN_DNNL_LIB=/path/libdnnl.so.3 picks the library. With several devices the call runs per
device on its shard of the batch, followed by a psum (`onednn.rows_summed`).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from importlib import metadata
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import batching, mlir

from jaxcnn import native, onednn

# oneDNN 3.x C API constants (oneapi/dnnl/dnnl_types.h, dnnl_common_types.h)
_F32, _BF16 = 3, 2
_TAG_ANY, _TAG_AB, _TAG_NHWC, _TAG_HWIO = 1, 3, 22, 28
_FORWARD_TRAINING, _CONV_DIRECT, _CPU, _IN_ORDER = 64, 1, 1, 1
_ARG_SRC, _ARG_WEIGHTS, _ARG_DST, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS = 1, 33, 17, 145, 161
_ARG_SCRATCHPAD, _SCRATCHPAD_USER = 80, 1
_DT_UNDEF = 0
_QUERY_EXEC_ARG_MD, _QUERY_IMPL_INFO = 255, 8
_ISA_AMX = 0xFEF  # dnnl_cpu_isa_avx512_core_amx (its bits are in every later AMX ISA)
_Dims = ctypes.c_int64 * 12
_vp = ctypes.c_void_p
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _vp)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int),
                ("hash", ctypes.c_char_p), ("cpu_runtime", ctypes.c_uint), ("gpu_runtime", ctypes.c_uint)]


def _library_path():
    """libdnnl.so.3: JAXCNN_DNNL_LIB, else from an installed oneDNN wheel, else the system's."""
    if os.environ.get("JAXCNN_DNNL_LIB"):
        return os.environ["JAXCNN_DNNL_LIB"]
    for dist in ("onednn-cpu-gomp", "onednn-cpu-iomp", "onednn"):
        try:
            files = metadata.files(dist) or ()
        except metadata.PackageNotFoundError:
            continue
        for f in files:
            if f.name == "libdnnl.so.3":
                return str(f.locate())
    return ctypes.util.find_library("dnnl")


def _key(x_shape, g_shape, w_shape, strides, pads, dtype) -> tuple:
    """What a weight-gradient primitive is built for (the lowering and the handler both ask)."""
    return (tuple(x_shape), tuple(g_shape), tuple(w_shape), tuple(strides),
            tuple(tuple(p) for p in pads), jnp.dtype(dtype).name)


class _Dnnl:
    """One CPU engine and stream, and the weight-gradient primitives built so far (by shape)."""

    def __init__(self, path: str):
        self.lib = lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        v = lib.dnnl_version().contents
        if v.major != 3:
            raise OSError(f"{path} is oneDNN {v.major}.{v.minor}; jaxcnn needs oneDNN 3.x")
        self.version = f"{v.major}.{v.minor}.{v.patch}"
        # Picks the output sizes at which im2col + matmul gradients run (`by_matmul`).
        self.amx = lib.dnnl_get_effective_cpu_isa() & _ISA_AMX == _ISA_AMX
        lib.dnnl_primitive_desc_query_md.restype = _vp
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        self.engine = _vp()
        self._check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, 0), "engine")
        self._local = threading.local()  # a oneDNN stream per thread: chunks run on several
        # Scratchpads owned by jaxcnn, one per primitive and kept between calls, so that a call
        # allocates nothing (user scratchpad mode).
        self.attr, self.sum_attr, post_ops = _vp(), _vp(), _vp()
        for attr in (self.attr, self.sum_attr):
            self._check(lib.dnnl_primitive_attr_create(ctypes.byref(attr)), "attributes")
            self._check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "attributes")
        # A chunk's reorder adds its partial gradient to the output (a sum post-op).
        self._check(lib.dnnl_post_ops_create(ctypes.byref(post_ops)), "post-ops")
        self._check(lib.dnnl_post_ops_append_sum(post_ops, ctypes.c_float(1.0), 0, _DT_UNDEF), "post-ops")
        self._check(lib.dnnl_primitive_attr_set_post_ops(self.sum_attr, post_ops), "post-ops")
        # The OpenMP runtime this libdnnl runs on (dlsym through it finds its libgomp or libiomp5),
        # for single-threaded chunks (see `execute`); None: not an OpenMP build, no split.
        try:
            self.omp = lib
            lib.omp_get_max_threads.restype = ctypes.c_int
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        except AttributeError:
            self.omp = None
        self.lock = threading.Lock()  # the plans dict, and whole-batch calls (they use every core)
        self.plans = {}  # (key, slot) -> primitives; slot None: whole batch, oneDNN's own threads

    @staticmethod
    def _check(status: int, what: str):
        if status != 0:
            raise RuntimeError(f"oneDNN {what} failed (dnnl_status_t {status})")

    @property
    def stream(self):
        if not hasattr(self._local, "stream"):
            self._local.stream = _vp()
            self._check(self.lib.dnnl_stream_create(ctypes.byref(self._local.stream), self.engine, _IN_ORDER),
                        "stream")
        return self._local.stream

    def _memory(self, md):
        mem = _vp()
        self._check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, None), "memory")
        return mem

    def _md(self, dims, dtype, tag=None, strides=None):
        md = _vp()
        if strides is not None:
            self._check(self.lib.dnnl_memory_desc_create_with_strides(
                ctypes.byref(md), len(dims), _Dims(*dims), dtype, _Dims(*strides)), "memory descriptor")
        else:
            self._check(self.lib.dnnl_memory_desc_create_with_tag(
                ctypes.byref(md), len(dims), _Dims(*dims), dtype, tag), "memory descriptor")
        return md

    def owner(self, buffers: list):
        """owned(md) -> (memory, address): a memory on a zeroed 64-byte aligned buffer of
        jaxcnn's, set once; the buffer goes to `buffers`, which its plan keeps."""
        def owned(md):
            buf = np.zeros(self.lib.dnnl_memory_desc_get_size(md) + 64, np.uint8)
            buffers.append(buf)
            mem, address = self._memory(md), -(-buf.ctypes.data // 64) * 64
            self._set(mem, address)
            return mem, address
        return owned

    def _primitive(self, pd, args, owned) -> tuple:
        """The primitive of `pd` and its argument array (with a scratchpad of its own)."""
        p = _vp()
        self._check(self.lib.dnnl_primitive_create(ctypes.byref(p), pd), "primitive")
        pad_md = _vp(self.lib.dnnl_primitive_desc_query_md(pd, _QUERY_EXEC_ARG_MD, _ARG_SCRATCHPAD))
        args = args + [(_ARG_SCRATCHPAD, owned(pad_md)[0])]
        return p, (_Arg * len(args))(*(_Arg(a, m) for a, m in args))

    def _impl(self, pd) -> str:
        info = ctypes.c_char_p()
        self._check(self.lib.dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, ctypes.byref(info)), "query")
        return info.value.decode()

    def plan(self, key, slot=None) -> dict:
        """Primitives for one weight gradient into a buffer of the plan's, then a reorder into
        XLA's HWIO f32 output (from slot 1 on it adds to the output). slot None: for the whole
        batch, on oneDNN's OpenMP threads; slot i: for the i-th chunk of a split call, built and
        run on one thread. `_plan` builds each once, under the lock. The gradient is oneDNN's
        backward-weights convolution, or for small bf16 images an im2col and a matmul
        (`by_matmul`). A plan's `x` and `g` list its memories (with byte offsets) for x and g."""
        lib = self.lib
        buffers = []  # kept with the plan: the gradient, the scratchpads, the im2col buffer
        owned = self.owner(buffers)

        try:
            built = self._by_matmul(key, owned) if by_matmul(key, self.amx) else None
        except RuntimeError:  # a view or a matmul oneDNN rejects: its kernel then
            built = None
        if built is None:
            buffers.clear()
            built = self._by_conv(key, owned)
        reorder = _vp()
        self._check(lib.dnnl_reorder_primitive_desc_create(
            ctypes.byref(reorder), built["result_md"], self.engine, built["out_md"], self.engine,
            self.sum_attr if slot else self.attr), "reorder descriptor")
        out = self._memory(built["out_md"])  # XLA's output buffer: set on every call
        calls = [built["compute"], self._primitive(reorder, [(_ARG_SRC, built["result"]), (_ARG_DST, out)], owned)]
        # A plan runs on one thread at a time; its lock (with `self.lock` for whole-batch plans).
        return dict(calls=calls, x=built["x"], g=built["g"], out=out, buffers=buffers, impl=built["impl"],
                    lock=threading.Lock())

    def _by_conv(self, key, owned) -> dict:
        """oneDNN's backward-weights convolution into its preferred layout (`any`: forcing HWIO
        makes oneDNN fall back to im2col + GEMM, 2-3x slower); the reorder makes it HWIO."""
        x_shape, g_shape, w_shape, strides, pads, dtype = key
        lib, byref = self.lib, ctypes.byref
        (n, h, w, ci), (_, oh, ow, co), (kh, kw) = x_shape, g_shape, w_shape[:2]
        dt = _BF16 if dtype == "bfloat16" else _F32
        src = self._md([n, ci, h, w], dt, _TAG_NHWC)
        diff_dst = self._md([n, co, oh, ow], dt, _TAG_NHWC)
        weights = self._md([co, ci, kh, kw], dt, _TAG_ANY)
        diff_weights = self._md([co, ci, kh, kw], _F32, _TAG_ANY)
        geometry = (_Dims(*strides), _Dims(0, 0), _Dims(*(p[0] for p in pads)), _Dims(*(p[1] for p in pads)))
        fwd, bwd = _vp(), _vp()
        self._check(lib.dnnl_convolution_forward_primitive_desc_create(
            byref(fwd), self.engine, _FORWARD_TRAINING, _CONV_DIRECT, src, weights, None, diff_dst,
            *geometry, None), "forward hint")
        self._check(lib.dnnl_convolution_backward_weights_primitive_desc_create(
            byref(bwd), self.engine, _CONV_DIRECT, src, diff_weights, None, diff_dst, *geometry,
            fwd, self.attr), "backward-weights descriptor")
        blocked_md = _vp(lib.dnnl_primitive_desc_query_md(bwd, _QUERY_EXEC_ARG_MD, _ARG_DIFF_WEIGHTS))
        x_mem, g_mem, (blocked, _) = self._memory(src), self._memory(diff_dst), owned(blocked_md)
        call = self._primitive(bwd, [(_ARG_SRC, x_mem), (_ARG_DIFF_DST, g_mem), (_ARG_DIFF_WEIGHTS, blocked)], owned)
        return dict(compute=[call], x=[(x_mem, 0)], g=[(g_mem, 0)], result=blocked, result_md=blocked_md,
                    out_md=self._md([co, ci, kh, kw], _F32, _TAG_HWIO), impl=self._impl(bwd))

    def _by_matmul(self, key, owned) -> dict:
        """im2col then one matmul: every tap's valid window of x is copied (a strided oneDNN
        reorder) into its columns of a [rows, kh kw ci] bf16 buffer (rows: n oh ow) whose entries
        for padding stay zero, and the gradient is that buffer's transpose times g ([rows, co]),
        in f32: a [kh kw ci, co] matrix, which is HWIO's memory order, so the reorder into XLA's
        buffer only copies (or adds)."""
        x_shape, g_shape, w_shape, strides, pads, _ = key
        lib, byref = self.lib, ctypes.byref
        (n, h, w, ci), (_, oh, ow, co), (kh, kw) = x_shape, g_shape, w_shape[:2]
        (sh, sw), ((pt, _), (pl, _)) = strides, pads
        rows, taps, size = n * oh * ow, kh * kw * ci, 2  # bf16
        cols_md = self._md([taps, rows], _BF16, strides=[1, taps])  # the [rows, taps] buffer, transposed
        g_md = self._md([rows, co], _BF16, _TAG_AB)
        result_md = self._md([taps, co], _F32, _TAG_AB)
        matmul = _vp()
        self._check(lib.dnnl_matmul_primitive_desc_create(byref(matmul), self.engine, cols_md, g_md, None,
                                                          result_md, self.attr), "matmul descriptor")
        (cols, cols_addr), (result, _), g_mem = owned(cols_md), owned(result_md), self._memory(g_md)
        calls, x_mems = [], []
        for t, (i, j) in enumerate((i, j) for i in range(kh) for j in range(kw)):
            lo_h, hi_h = _window(i, sh, pt, h, oh)
            lo_w, hi_w = _window(j, sw, pl, w, ow)
            if lo_h > hi_h or lo_w > hi_w:
                continue  # this tap sees only padding: its columns stay zero
            dims = [n, hi_h - lo_h + 1, hi_w - lo_w + 1, ci]
            src_md = self._md(dims, _BF16, strides=[h * w * ci, sh * w * ci, sw * ci, 1])
            dst_md = self._md(dims, _BF16, strides=[oh * ow * taps, ow * taps, taps, 1])
            pd = _vp()
            self._check(lib.dnnl_reorder_primitive_desc_create(byref(pd), src_md, self.engine, dst_md,
                                                               self.engine, self.attr), "im2col reorder")
            src, dst = self._memory(src_md), self._memory(dst_md)
            self._set(dst, cols_addr + ((lo_h * ow + lo_w) * taps + t * ci) * size)
            x_mems.append((src, ((lo_h * sh + i - pt) * w + lo_w * sw + j - pl) * ci * size))
            calls.append(self._primitive(pd, [(_ARG_SRC, src), (_ARG_DST, dst)], owned))
        calls.append(self._primitive(matmul, [(_ARG_SRC, cols), (_ARG_WEIGHTS, g_mem), (_ARG_DST, result)], owned))
        return dict(compute=calls, x=x_mems, g=[(g_mem, 0)], result=result, result_md=result_md,
                    out_md=result_md, impl="im2col+matmul:" + self._impl(matmul))

    def _plan(self, key, slot=None) -> dict:
        with self.lock:
            if (key, slot) not in self.plans:
                with self._threads(1 if slot is not None else None):  # oneDNN sizes its work split now
                    self.plans[key, slot] = self.plan(key, slot)
            return self.plans[key, slot]

    @contextlib.contextmanager
    def _threads(self, n):
        """OpenMP's thread count for oneDNN on this thread, n (None: unchanged), then restored."""
        if n is None or self.omp is None:
            yield
            return
        before = self.omp.omp_get_max_threads()
        self.omp.omp_set_num_threads(n)
        try:
            yield
        finally:
            self.omp.omp_set_num_threads(before)

    def chunks(self, key, parts: int) -> list:
        """`key`'s batch split into `parts` (at most one per image): (chunk key, first image)."""
        x_shape, g_shape, *rest = key
        n = x_shape[0]
        parts = max(1, min(parts, n))
        sizes = [n // parts + (i < n % parts) for i in range(parts)]
        starts = np.cumsum([0] + sizes[:-1])
        return [((s, *x_shape[1:]), (s, *g_shape[1:]), *rest) for s in sizes], [int(v) for v in starts]

    def split_plans(self, key, parts: int) -> list:
        """`key`'s batch in `parts` chunks: (chunk i's plan, its byte offsets into x and g)."""
        keys, starts = self.chunks(key, parts)
        size = 2 if key[5] == "bfloat16" else 4
        x_img, g_img = (int(np.prod(shape[1:])) * size for shape in key[:2])
        return [(self._plan(k, i), s * x_img, s * g_img) for i, (k, s) in enumerate(zip(keys, starts))]

    def prepare(self, key, parts: Optional[int]):
        """Build the plans a call will use (at lowering: a shape oneDNN rejects fails then)."""
        if parts is None or self.omp is None:
            return [self._plan(key)]
        return [plan for plan, _, _ in self.split_plans(key, parts)]

    def _compute(self, plan, x: int, g: int):
        """A plan's gradient of x and g (raw addresses) into its own buffer."""
        for mems, address in ((plan["x"], x), (plan["g"], g)):
            for mem, offset in mems:
                self._set(mem, address + offset)
        for call in plan["calls"][0]:
            self._exec(call, "weight gradient")

    def _run(self, plan, x: int, g: int, out: int):
        """One plan's gradient and reorder on raw addresses (the caller holds its lock)."""
        self._compute(plan, x, g)
        self._set(plan["out"], out)
        self._exec(plan["calls"][1], "reorder")

    def execute(self, key, x: int, g: int, out: int, pool=None):
        """The gradient for `key` on raw buffer addresses: x, g (NHWC) -> out (HWIO f32).

        pool None: one call on oneDNN's OpenMP threads. Else `pool` is (threads, schedule): the
        batch is split into `threads` chunks, each a single-threaded oneDNN call on its own
        partial gradient; `schedule(fn)` offers fn to XLA's thread pool, and this thread runs
        every chunk no pool thread has started. A pool thread busy with other XLA work never
        shares its core with an OpenMP thread of ours (on the 2-core Xeon with AMX, a bf16
        128->32 gradient at 32x32 took 50-57 ms in a step that way against 7 ms alone)."""
        if pool is None or self.omp is None:
            plan = self._plan(key)
            with self.lock, plan["lock"]:
                self._run(plan, x, g, out)
            return
        parts = self.split_plans(key, pool[0])
        plans = [plan for plan, _, _ in parts]
        job = _Job(len(plans))

        def chunk(i):  # the partial gradient of chunk i, into its plan's own buffer
            plan, x_offset, g_offset = parts[i]
            with self._threads(1):
                self._compute(plan, x + x_offset, g + g_offset)

        # The plans (their blocked buffers) belong to this call until its sum is written: other
        # calls of the same shape (other devices' shards) wait. Taken in slot order, so two
        # calls never hold each other's.
        with contextlib.ExitStack() as held:
            for plan in plans:
                held.enter_context(plan["lock"])
            for i in range(1, len(plans)):
                pool[1](functools.partial(job.run, i, chunk))
            for i in range(len(plans)):
                job.run(i, chunk)
            job.wait()
            # Sum the partial gradients into `out`: chunk 0's reorder writes it, the others add.
            with self._threads(1):
                for plan in plans:
                    self._set(plan["out"], out)
                    self._exec(plan["calls"][1], "reorder")

    def _set(self, mem, address: int):
        self._check(self.lib.dnnl_memory_set_data_handle(mem, _vp(address)), "data handle")

    def _exec(self, call, what: str):
        prim, args = call
        self._check(self.lib.dnnl_primitive_execute(prim, self.stream, len(args), args), what)
        self._check(self.lib.dnnl_stream_wait(self.stream), "stream wait")


def _window(tap: int, stride: int, pad: int, size: int, out_size: int) -> tuple:
    """The output positions (first, last) whose input at kernel offset `tap` is not padding."""
    first = max(0, -(-(pad - tap) // stride))
    return first, min(out_size - 1, (size - 1 + pad - tap) // stride)


def by_matmul(key, amx: bool) -> bool:
    """Whether a gradient is an im2col and a matmul (`_Dnnl._by_matmul`) rather than oneDNN's
    backward-weights kernel: in bf16, with 128 or more channels in and out, for output images of
    at most 64 pixels on CPUs with AMX (`_Dnnl.amx`), never elsewhere (JAXCNN_DNNL_MATMUL=N sets
    the pixel limit on any CPU; 0: never). With AMX, oneDNN 3.2's kernel does little better than
    f32; 64 images on one thread of the 2-core Xeon (kernel / im2col + matmul, ms): 512->512 at
    4x4 33.7 / 7.6, 256->512 stride 2 to 4x4 19.6 / 3.8, 256->256 at 8x8 11.3 / 9.0, 128->256
    stride 2 to 8x8 7.4 / 4.8; but 128->128 at 16x16 4.9 / 12.7, 128->32 at 8x8 0.8 / 1.8.
    Without AMX (avx512_core_bf16, the 2-core Zen 5 EPYC; batch 128, jitted alone, median of 31
    calls, 3 alternated processes): 512->512 at 4x4 25.4-26.9 / 18.3-19.3, 256->512 stride 2 to
    4x4 19.3-20.5 / 10.0-11.0, 256->256 at 8x8 16.1-16.4 / 21.0-22.2; yet the matmul at <= 16
    pixels did not make resnet18_cifar's bf16 step faster there (alternated A/B, 4 pairs of
    8-step medians, benchmarks/NOTES.md session 20), so the default stays the kernel. Also only
    where oneDNN takes every tap's window as a strided view (a window of a stride-2 tap on an odd
    size can reach past the image's own extent)."""
    limit = int(os.environ.get("JAXCNN_DNNL_MATMUL", "64" if amx else "0"))
    (n, h, w, ci), (_, oh, ow, co), (kh, kw) = key[0], key[1], key[2][:2]
    (sh, sw), ((pt, _), (pl, _)) = key[3], key[4]
    if key[5] != "bfloat16" or oh * ow > limit or min(ci, co) < 128:
        return False
    for k, s, p, size, out in ((kh, sh, pt, h, oh), (kw, sw, pl, w, ow)):
        for tap in range(k):
            first, last = _window(tap, s, p, size, out)
            if (last - first + 1) * s > size:
                return False
    return True


class _Job:
    """The chunks of one split call: each runs once, on whichever thread claims it first."""

    def __init__(self, n: int):
        self.lock, self.claimed, self.left = threading.Lock(), [False] * n, n
        self.done, self.error = threading.Event(), None

    def run(self, i: int, fn):
        with self.lock:
            if self.claimed[i]:
                return
            self.claimed[i] = True
        try:
            fn(i)
        except BaseException as e:  # reported by `wait`, on the calling thread
            self.error = self.error or e
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def wait(self):
        self.done.wait()
        if self.error is not None:
            raise self.error


@functools.lru_cache(maxsize=None)
def _runtime():
    """The loaded library, or None (switched off, not installed, not oneDNN 3, no custom calls)."""
    off = ("0", "false", "False")  # JAXCNN_ONEDNN=0 turns off every oneDNN path, JAXCNN_DNNL=0 this one
    if os.environ.get("JAXCNN_DNNL", "1") in off or os.environ.get("JAXCNN_ONEDNN", "1") in off \
            or onednn._custom_call is None:
        return None
    path = _library_path()
    if not path:
        return None
    try:
        return _Dnnl(path)
    except (OSError, RuntimeError, AttributeError) as e:
        import warnings
        warnings.warn(f"jaxcnn: oneDNN weight gradients are off ({path}: {e})")
        return None


# --- The XLA custom call: a typed-FFI handler written with ctypes (XLA's C ABI, xla/ffi/api/c_api.h),
# used where jaxcnn's compiled handlers (jaxcnn.native) are not built. XLA's own Python callbacks
# copy every operand into a fresh NumPy array (67 MB per call for a 64->64 conv at 32x32, batch
# 128, with the page faults of new memory on top); the handler gets the buffers' addresses. The
# operands are x, g and int32 [stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right,
# split]: with the buffers' shapes and dtype, the key of the primitives (built when the call is
# lowered, or on first use by an executable from a compilation cache).

class _Ext(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int), ("next", _vp)]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("major", ctypes.c_int), ("minor", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32)]


class _MetadataExt(ctypes.Structure):
    _fields_ = [("base", _Ext), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("dtype", ctypes.c_int), ("data", _vp),
                ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Values(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("size", ctypes.c_int64), ("types", _vp),
                ("items", ctypes.POINTER(ctypes.POINTER(_Buffer)))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("size", ctypes.c_int64), ("types", _vp),
                ("names", _vp), ("attrs", _vp)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", ctypes.POINTER(_Ext)), ("api", _vp), ("ctx", _vp),
                ("stage", ctypes.c_int), ("args", _Values), ("rets", _Values), ("attrs", _Attrs),
                ("future", _vp)]


class _ErrorArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_FFI_API_VERSION = (0, 1)   # the oldest XLA FFI API that has everything used here
_FFI_EXECUTE, _FFI_INTERNAL, _FFI_BF16 = 3, 13, 16
_ERROR_CREATE = ctypes.CFUNCTYPE(_vp, ctypes.POINTER(_ErrorArgs))
TARGET = "jaxcnn_dnnl_weight_grad"


def _ffi_error(api: int, message: str):
    # XLA_FFI_Api: struct_size, extension_start, api_version (24 bytes), internal_api, then
    # XLA_FFI_Error_Create's pointer at byte 48.
    create = _ERROR_CREATE(ctypes.cast(api + 48, ctypes.POINTER(_vp))[0])
    args = _ErrorArgs(ctypes.sizeof(_ErrorArgs), None, message.encode()[:2000], _FFI_INTERNAL)
    return create(ctypes.byref(args))


class _ScheduleArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("ctx", _vp), ("task", _vp), ("data", _vp)]


class _NumThreadsArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("ctx", _vp),
                ("num_threads", ctypes.POINTER(ctypes.c_int64))]


class _DestroyArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("ext", _vp), ("error", _vp)]


# Byte offsets of XLA_FFI_Api's function pointers used here (c_api.h's struct order).
_API_ERROR_DESTROY, _API_SCHEDULE, _API_NUM_THREADS = 64, 136, 144
_TASKS = {}  # id -> callable, for tasks handed to XLA's thread pool
_TASK_IDS = iter(range(1, 1 << 62))


def _api_call(api: int, offset: int, args) -> bool:
    """Call XLA_FFI_Api's function at `offset` with `args`; False (error destroyed) if it failed."""
    fn = ctypes.CFUNCTYPE(_vp, _vp)(ctypes.cast(api + offset, ctypes.POINTER(_vp))[0])
    err = fn(ctypes.addressof(args))
    if err:
        destroy = ctypes.CFUNCTYPE(_vp, _vp)(ctypes.cast(api + _API_ERROR_DESTROY, ctypes.POINTER(_vp))[0])
        destroy(ctypes.addressof(_DestroyArgs(ctypes.sizeof(_DestroyArgs), None, err)))
    return not err


def _run_task(data):
    fn = _TASKS.pop(data, None)
    if fn is not None:
        fn()  # _Job.run: catches everything


_TASK = ctypes.CFUNCTYPE(None, ctypes.c_size_t)(_run_task)  # kept alive: XLA calls it


def _xla_pool(frame):
    """(threads, schedule) for XLA's intra-op thread pool of this call, or None (no pool, or one
    thread)."""
    n = ctypes.c_int64(0)
    if not _api_call(frame.api, _API_NUM_THREADS,
                     _NumThreadsArgs(ctypes.sizeof(_NumThreadsArgs), None, frame.ctx, ctypes.pointer(n))) \
            or n.value < 2:
        return None
    api, ctx = frame.api, frame.ctx

    def schedule(fn):  # if XLA refuses the task, the calling thread runs that chunk itself
        tid = next(_TASK_IDS)
        _TASKS[tid] = fn
        if not _api_call(api, _API_SCHEDULE, _ScheduleArgs(
                ctypes.sizeof(_ScheduleArgs), None, ctx, ctypes.cast(_TASK, _vp), tid)):
            _TASKS.pop(tid, None)

    return int(n.value), schedule


def buffers(frame) -> tuple:
    """(operand buffers, result buffers) of an XLA FFI call frame."""
    return ([frame.args.items[i].contents for i in range(frame.args.size)],
            [frame.rets.items[i].contents for i in range(frame.rets.size)])


def ffi_handler(name: str, run):
    """A typed-FFI handler (a ctypes function; keep it alive while XLA may call it) that passes
    each execution's frame and its argument and result buffers to `run(frame, args, rets)`, and
    reports whatever `run` raises to XLA as an error naming `name`."""
    def handler(frame_p):
        frame = frame_p.contents
        if frame.ext:  # XLA asks for the handler's metadata (API version, traits)
            if frame.ext.contents.type == 1:
                meta = ctypes.cast(frame.ext, ctypes.POINTER(_MetadataExt)).contents.metadata.contents
                meta.api_version.major, meta.api_version.minor = _FFI_API_VERSION
                meta.traits = 0
            return None
        if frame.stage != _FFI_EXECUTE:
            return None
        try:
            run(frame, *buffers(frame))
            return None
        except BaseException as e:  # never unwind into XLA: report the error to it
            return _ffi_error(frame.api, f"jaxcnn oneDNN {name}: {type(e).__name__}: {e}")
    return ctypes.CFUNCTYPE(_vp, ctypes.POINTER(_CallFrame))(handler)


def _call_key(args, rets) -> tuple:
    """(key, split) of a call from its buffers: x, g, the geometry operand [stride_h, stride_w,
    pad_top, pad_bottom, pad_left, pad_right, split] and the output; split: whether the call may
    be split over XLA's threads (decided when the step was lowered, `_splits`)."""
    x, g, geometry = args
    shape = lambda b: tuple(b.dims[i] for i in range(b.rank))
    v = ctypes.cast(geometry.data, ctypes.POINTER(ctypes.c_int32))
    return (_key(shape(x), shape(g), shape(rets[0]), (v[0], v[1]), ((v[2], v[3]), (v[4], v[5])),
                 jnp.bfloat16 if x.dtype == _FFI_BF16 else jnp.float32), bool(v[6]))


def _run_weight_grad(frame, args, rets):
    key, split = _call_key(args, rets)
    _runtime().execute(key, args[0].data, args[1].data, rets[0].data, _xla_pool(frame) if split else None)


_HANDLER = ffi_handler("weight gradient", _run_weight_grad)  # kept alive: XLA holds its address


def _program(frame_address: int, words: list) -> None:
    """The compiled handler's program for a call like `_run_weight_grad`'s (jaxcnn.native):
    the same plans, split the same way (`_Dnnl.execute`); words[1] is XLA's pool size."""
    _, args, rets = native.frame_buffers(frame_address)
    (key, split), rt, threads = _call_key(args, rets), _runtime(), words[1]
    split = split and rt.omp is not None and threads >= 2  # else one call on oneDNN's threads
    parts = rt.split_plans(key, threads) if split else [(rt._plan(key), 0, 0)]
    program = native.Program(words, parallel=len(parts) if split else 0, single_thread=split, global_lock=not split)
    for i, (plan, x_offset, g_offset) in enumerate(parts):
        seq = i if split else native.SERIAL
        program.lock(plan)  # in slot order, as `execute` takes them
        for operand, mems, start in ((0, plan["x"], x_offset), (1, plan["g"], g_offset)):
            for mem, offset in mems:
                program.set(seq, mem, native.ARG, operand, start + offset)
        for call in plan["calls"][0]:
            program.execute(seq, call)
    for plan, _, _ in parts:  # the reorders: the first writes the output, the others add to it
        program.set(native.SERIAL, plan["out"], native.RET, 0)
        program.execute(native.SERIAL, plan["calls"][1])
    program.publish()


native.register("weight_grad", _program)


def settle(tree) -> None:
    """Wait for the computations that produce `tree`'s arrays, errors ignored (a deleted, donated
    or failed array has nothing left to wait for). Whoever may leave the interpreter with a step
    still running calls this first: see `settle_at_exit`."""
    for leaf in jax.tree.leaves(tree):
        try:
            leaf.block_until_ready()
        except Exception:  # noqa: BLE001
            pass


@functools.lru_cache(maxsize=None)
def settle_at_exit() -> bool:
    """Have the interpreter wait, when it exits, for the computations still running. Handlers made
    by `ffi_handler` run Python inside XLA's computations; a script that ends with a step in
    flight (its outputs unread) tore the interpreter down under them, and XLA's client then waited
    forever for that step in its destructor (4 of 4 runs hung). The compiled handlers
    (jaxcnn.native) run Python only on a shape's first call, so this matters where they are not
    built and for a step's first execution. atexit runs this before jax's own
    clean-up (registered earlier, run later) and while Python still runs the handlers. It cannot
    see a computation whose outputs were all dropped; jaxcnn's training loop waits for its own."""
    atexit.register(lambda: settle(jax.live_arrays()))
    return True


_LOWEST = {4: (np.uint32, 0xFF7FFFFF, 0x7FC00000), 2: (np.uint16, 0xFF80, 0x7FC0)}  # itemsize -> bits


def restore_nans(address: int, count: int, itemsize: int) -> None:
    """NaN for the lowest value in a f32 (itemsize 4: the lowest finite float) or bf16 (2: -inf)
    buffer: what oneDNN's max-pool writes for a window of NaNs (jaxcnn.pool). As the compiled
    handlers' `restore_nans` (jaxcnn/csrc/native.c)."""
    kind, lowest, nan = _LOWEST[itemsize]
    v = np.ctypeslib.as_array(ctypes.cast(address, ctypes.POINTER(np.ctypeslib.as_ctypes_type(kind))), (count,))
    v[v == lowest] = nan


class Plans:
    """A cache of oneDNN primitives per key, each plan built once (`_build(key)`, by the
    subclass: a dict with `mem`, name -> memory whose data handle a call points at an XLA buffer,
    `calls`, name -> (primitive, arguments), and optionally `nans`, call name -> (memory name,
    element count, itemsize): the output whose lowest values become NaN after the call, see
    `restore_nans`); jaxcnn.bnorm and jaxcnn.pool."""
    what = "call"  # names the call in oneDNN's errors

    def __init__(self, rt):
        self.rt, self.lock, self.plans = rt, threading.Lock(), {}

    def get(self, key) -> dict:
        with self.lock:
            if key not in self.plans:
                self.plans[key] = self._build(key)
            return self.plans[key]

    def _build(self, key) -> dict:
        raise NotImplementedError

    def run(self, key, call, addresses: dict) -> None:
        """`key`'s `call` on XLA's buffers (memory name -> address), on oneDNN's OpenMP threads;
        one oneDNN call at a time (they use every core), which also keeps a plan's memories to
        one call."""
        plan = self.get(key)
        with self.rt.lock:
            for name, address in addresses.items():
                self.rt._set(plan["mem"][name], address)
            self.rt._exec(plan["calls"][call], f"{self.what} {call}")
        if call in plan.get("nans", {}):
            name, count, itemsize = plan["nans"][call]
            restore_nans(addresses[name], count, itemsize)

    def program(self, words, key, call, operands: dict):
        """The compiled handlers' Program (jaxcnn.native) for what `run` does: each memory named
        in `operands` pointed at its buffer, (native.ARG or native.RET, index), then `call`;
        one at a time, on oneDNN's OpenMP threads. Returned unpublished."""
        plan = self.get(key)
        program = native.Program(words, global_lock=True)
        for name, (source, index) in operands.items():
            program.set(native.SERIAL, plan["mem"][name], source, index)
        program.execute(native.SERIAL, plan["calls"][call])
        if call in plan.get("nans", {}):
            name, count, itemsize = plan["nans"][call]
            program.restore_nans(native.SERIAL, *operands[name], count, itemsize)
        return program


def plan_handlers(plans, call_of, targets: dict):
    """The FFI handlers of custom calls that run a `Plans`' calls (jaxcnn.bnorm, jaxcnn.pool).
    `plans()` gives the Plans; `call_of(args, rets, call)` a call's (key, call name, operands:
    memory name -> (native.ARG or native.RET, buffer index)) from its buffers; `targets`: {XLA
    target: (compiled handler's name, name in errors, call name or None)}, the call name passed
    to `call_of`. Registers the compiled handlers' program builders with jaxcnn.native and makes
    the ctypes handlers; returns `register()`, which registers the targets with XLA once (the
    compiled handler where jaxcnn.native is built, else the ctypes one) and is True."""
    def runner(default):
        def run(frame, args, rets):
            key, call, operands = call_of(args, rets, default)
            buffers = (args, rets)
            plans().run(key, call, {name: buffers[source][index].data
                                    for name, (source, index) in operands.items()})
        return run

    def builder(default):
        def build(frame_address: int, words: list) -> None:
            _, args, rets = native.frame_buffers(frame_address)
            key, call, operands = call_of(args, rets, default)
            plans().program(words, key, call, operands).publish()
        return build

    handlers = {}  # kept alive by `register`: XLA holds the ctypes handlers' addresses
    for target, (name, what, default) in targets.items():
        native.register(name, builder(default))
        handlers[target] = (name, ffi_handler(what, runner(default)))

    @functools.lru_cache(maxsize=None)
    def register() -> bool:
        for target, (name, fallback) in handlers.items():
            jax.ffi.register_ffi_target(target, native.handler(name) or jax.ffi.pycapsule(fallback), platform="cpu")
        return settle_at_exit()
    return register


def config_calls(targets, aliases: Optional[dict] = None):
    """`call(target, operands, results, config)`: binds one of `targets`, custom calls whose last
    operand is an int32 `config` (jaxcnn.bnorm, jaxcnn.pool); `results` ((shape, dtype), ...);
    `aliases` {target: {operand: result}} lets a result reuse an operand's buffer."""
    def abstract(*args, results, config):
        return [jax.core.ShapedArray(shape, dtype) for shape, dtype in results]

    def lowering(target):
        def lower(ctx, *ops, results, config):
            types = [mlir.aval_to_ir_type(ctx.module_context, a) for a in ctx.avals_out]
            return onednn._custom_call(target, result_types=types,
                                       operands=[*ops, mlir.ir_constant(np.array(config, np.int32))],
                                       api_version=4, backend_config={}, has_side_effect=False,
                                       operand_output_aliases=(aliases or {}).get(target)).results
        return lower

    prims = {}
    for target in targets:
        prims[target] = onednn._primitive(target)
        prims[target].multiple_results = True
        prims[target].def_abstract_eval(abstract)
        mlir.register_lowering(prims[target], lowering(target), platform="cpu")

    def call(target, operands, results, config):
        return prims[target].bind(*operands, results=tuple((tuple(s), jnp.dtype(d)) for s, d in results),
                                  config=tuple(int(v) for v in config))
    return call


@functools.lru_cache(maxsize=None)
def _registered() -> bool:
    handler = native.handler("weight_grad") or jax.ffi.pycapsule(_HANDLER)
    jax.ffi.register_ffi_target(TARGET, handler, platform="cpu")
    return settle_at_exit()


_wgrad_p = onednn._primitive("jaxcnn_dnnl_weight_grad")


@_wgrad_p.def_abstract_eval
def _abstract(x, g, *, w_shape, strides, pads):
    return jax.core.ShapedArray(w_shape, jnp.float32)


def _lower(ctx, x, g, *, w_shape, strides, pads):
    ax, ag = ctx.avals_in
    # Built now, so that a shape oneDNN rejects fails the compilation, not the step.
    _runtime().prepare(_key(ax.shape, ag.shape, w_shape, strides, pads, ax.dtype), _split_guess())
    geometry = mlir.ir_constant(np.array([*strides, *pads[0], *pads[1], _splits()], np.int32))
    out_type = mlir.aval_to_ir_type(ctx.module_context, ctx.avals_out[0])
    return onednn._custom_call(TARGET, result_types=[out_type], operands=[x, g, geometry], api_version=4,
                               backend_config={}, has_side_effect=False).results


def _reference(x, g, *, w_shape, strides, pads):
    """The same gradient by XLA (vmap, and the probe's yardstick)."""
    w = jnp.zeros(w_shape, x.dtype)
    conv = lambda w: lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC,
                                              preferred_element_type=jnp.float32)
    return jax.vjp(conv, w)[1](g.astype(jnp.float32))[0].astype(jnp.float32)


mlir.register_lowering(_wgrad_p, _lower, platform="cpu")
batching.primitive_batchers[_wgrad_p] = lambda args, dims, **params: (
    jax.vmap(functools.partial(_reference, **params), in_axes=dims)(*args), 0)


@functools.lru_cache(maxsize=None)
def _partitioned(w_shape, strides, pads):
    """With several devices: each device takes the gradient over its own shard of the batch
    (x and g sharded alike on dim 0), then the partial gradients are summed."""
    return onednn.rows_summed(functools.partial(_wgrad_p.bind, w_shape=w_shape, strides=strides, pads=pads),
                              "n h w c, n p q k -> i j c k", "n", ("h", "w", "c", "p", "q", "k", "i", "j"))


def applies(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups) -> bool:
    """Where jaxcnn.onednn's convolutions apply, NHWC/HWIO, and the library is usable."""
    return dn == _NHWC and onednn.applies(x, w, strides, padding, lhs_dil, rhs_dil, dn, groups) and usable()


def xla_faster(x, w, strides, padding) -> bool:
    """f32 weight gradients of convolutions with an output of at most 5x5 px and >= 256 channels
    in and out (resnet18_cifar's last stage), where XLA's (Eigen: im2col + one large GEMM) beats
    oneDNN's backward-weights kernel, which there runs at 90-250 GFLOP/s against Eigen's 250-330.
    2-core Xeon, random data, ms, oneDNN / XLA: batch 128, 512->512 at 4x4 42.8 / 31.2, at 2x2
    27.5 / 8.8, at 5x5 57.2 / 54.6, at 6x6 72.5 / 69.1 (kept on oneDNN: within noise), at 8x8
    116.5 / 133.6; 256->512 stride 2 to 4x4 24.9 / 19.1, 256->256 at 4x4 9.2 / 8.1; batch 32
    (a device's share of 128 on 4 devices): 512->512 at 4x4 12.6 / 8.1, 256->512 stride 2 7.0 / 4.4.
    Not with fewer channels (128->32 at 4x4: 0.8 / 1.9) nor in bf16 (oneDNN 2.7-3x faster).
    The forward convolutions' rule (jaxcnn.onednn.xla_faster), down to 1x1 px outputs: unlike
    XLA's forward convolution at 2x2 (over 1 s), its weight gradient is fast there."""
    return onednn.xla_faster(x, w, strides, padding, _NHWC, smallest=1)


def weight_grad(x, g, w_shape, strides, padding, dtype):
    """The weight gradient (HWIO, `dtype`) of the NHWC convolution of `x` that gave cotangent
    `g` (same dtype as x), by oneDNN. Call where `applies`."""
    params = dict(w_shape=tuple(w_shape), strides=tuple(strides),
                  pads=onednn._pads(x.shape, w_shape, strides, padding, _NHWC))
    if jax.device_count() > 1 and not any(isinstance(v, onednn._BatchTracer) for v in (x, g)):
        return _partitioned(**params)(x, g).astype(dtype)
    return _wgrad_p.bind(x, g, **params).astype(dtype)  # under vmap, the batching rule takes XLA's


@functools.lru_cache(maxsize=None)
def usable() -> bool:
    """oneDNN's library loaded, the CPU backend, and a probe (a strided, padded gradient in f32
    and bf16, compared with XLA's) passed."""
    if jax.default_backend() != "cpu" or _runtime() is None or not _registered():
        return False

    def check(rng):
        ok = True
        for dtype, tol in ((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)):
            x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), dtype)
            g = jnp.asarray(rng.standard_normal((2, 4, 6, 5)), dtype)
            params = dict(w_shape=(3, 2, 3, 5), strides=(2, 1), pads=((1, 1), (0, 1)))
            got = jax.jit(functools.partial(_wgrad_p.bind, **params))(x, g)
            want = _reference(x, g, **params)
            ok = ok and got.shape == want.shape and bool(jnp.allclose(got, want, rtol=tol, atol=tol))
        return ok

    return onednn._probe("oneDNN weight gradients", check)


def implementation(x_shape, g_shape, w_shape, strides, pads, dtype) -> str:
    """oneDNN's name for the kernel it picked for this gradient, e.g. 'jit_bf16:avx512_core_bf16'
    (for benchmarks and tests); builds the primitive if needed."""
    return _runtime()._plan(_key(x_shape, g_shape, w_shape, strides, pads, dtype))["impl"]


def _splits() -> bool:
    """Whether calls are split over XLA's threads: not with JAXCNN_DNNL_SPLIT=0, and not with
    several CPU devices, whose programs already keep the cores busy side by side (4 simulated
    devices, resnet18_cifar fp32, batch 128 on the 2-core Xeon: 63.3 and 62.9 img/s split,
    68.2 and 68.1 not)."""
    return os.environ.get("JAXCNN_DNNL_SPLIT", "1") not in ("0", "false", "False") \
        and _local_devices() == 1


@functools.lru_cache(maxsize=None)
def _local_devices() -> int:
    return jax.local_device_count()


def _split_guess() -> Optional[int]:
    """The chunks a call will likely be split into (XLA's pool has a thread per core); None: off."""
    if not _splits():
        return None
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return n if n > 1 else None
