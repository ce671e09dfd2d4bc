"""The compiled XLA FFI handlers for jaxcnn's oneDNN calls (`jaxcnn/csrc/native.c`).

jaxcnn.dnnl (weight gradients), jaxcnn.bnorm (BatchNorm) and jaxcnn.pool (max-pools) build
their oneDNN primitives here in Python, with ctypes. Their calls inside a compiled step run
through handlers compiled from C when `pip install` could build them (the `jaxcnn._native`
library; needs a C compiler, else the install goes on without it), through handlers written in
Python otherwise. The compiled ones run without the GIL: ~170 us of Python per call saved (a
densenet_bc_100_12 training step makes 179 of them), and no Python runs inside XLA's
computations, which is what hung the interpreter's exit with a step in flight
(jaxcnn.dnnl.settle_at_exit).

A call's first execution calls back into Python once (`_build`): the handler passes its key (the
call's shapes, dtypes, XLA's pool size and its geometry operand) and the module that owns the
target builds a `Program`: which oneDNN memory points at which buffer, which primitives run, in
which order, under which locks. Later calls with that key run the program in C.

JAXCNN_NATIVE=0 keeps the Python handlers (A/B measurements, and the fallback's tests).
"""
from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
import traceback
from typing import Optional

ARG, RET = 0, 1  # a memory points at an operand buffer or at a result buffer
SERIAL = -1      # the program's serial sequence (>= 0: a parallel one)
# the C handlers' names, by target id
TARGETS = ("weight_grad", "bn_forward", "bn_backward", "pool_forward", "pool_backward")

_vp, _i64 = ctypes.c_void_p, ctypes.c_int64
_BUILD = ctypes.CFUNCTYPE(ctypes.c_int, _vp, ctypes.c_int, ctypes.POINTER(_i64), _i64, _vp, _i64)
_builders = {}  # target id -> fn(frame, words): builds and publishes the Program for `words`
_published = []  # (target, parallel sequences, key words) of every Program published: `programs`


def path() -> Optional[str]:
    """The built library next to this file, or None (not built: no compiler at install time)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = os.path.join(here, "_native" + suffix)
        if os.path.exists(candidate):
            return candidate
    return None


def register(target: str, builder) -> None:
    """`builder(frame, words)` builds the Program of `target`'s calls (see `_build`)."""
    _builders[TARGETS.index(target)] = builder


@functools.lru_cache(maxsize=None)
def library():
    """The loaded library, initialised with oneDNN's functions, or None (switched off with
    JAXCNN_NATIVE=0, not built, or oneDNN not loaded)."""
    if os.environ.get("JAXCNN_NATIVE", "1") in ("0", "false", "False"):
        return None
    from jaxcnn import dnnl
    rt, where = dnnl._runtime(), path()
    if rt is None or where is None:
        return None
    try:
        lib = ctypes.CDLL(where)
    except OSError as e:
        import warnings
        warnings.warn(f"jaxcnn: the compiled oneDNN handlers are off ({where}: {e}); using the Python ones")
        return None
    lib.jaxcnn_mutex_new.restype = _vp
    lib.jaxcnn_program_new.restype = _vp
    lib.jaxcnn_program_new.argtypes = [ctypes.POINTER(_i64), _i64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.jaxcnn_program_lock.argtypes = [_vp, _vp]
    lib.jaxcnn_program_set.argtypes = [_vp, ctypes.c_int, _vp, ctypes.c_int, ctypes.c_int, _i64]
    lib.jaxcnn_program_exec.argtypes = [_vp, ctypes.c_int, _vp, ctypes.c_int, _vp]
    lib.jaxcnn_program_nans.argtypes = [_vp, ctypes.c_int, ctypes.c_int, ctypes.c_int, _i64, ctypes.c_int]
    lib.jaxcnn_program_publish.argtypes = [_vp]
    address = lambda fn: ctypes.cast(fn, _vp).value
    omp = (address(rt.lib.omp_set_num_threads), address(rt.lib.omp_get_max_threads)) if rt.omp else (None, None)
    lib.jaxcnn_init.argtypes = [_vp] * 8
    lib.jaxcnn_init(address(rt.lib.dnnl_memory_set_data_handle), address(rt.lib.dnnl_primitive_execute),
                    address(rt.lib.dnnl_stream_wait), address(rt.lib.dnnl_stream_create), rt.engine,
                    *omp, ctypes.cast(_BUILD_FN, _vp))
    return lib


def handler(target: str):
    """The compiled handler of `target` as a PyCapsule for jax.ffi.register_ffi_target, or None."""
    lib = library()
    if lib is None:
        return None
    import jax
    return jax.ffi.pycapsule(getattr(lib, "jaxcnn_" + target))


def active() -> bool:
    """Whether jaxcnn's oneDNN calls run through the compiled handlers in this process."""
    return library() is not None


class Program:
    """What one call of one key does, built step by step, then `publish`ed to the handlers."""

    def __init__(self, words, parallel: int = 0, single_thread: bool = False, global_lock: bool = True):
        """`parallel` sequences that may run side by side (each on one OpenMP thread if
        `single_thread`), then the serial one; `global_lock`: the call uses every core (one such
        call at a time)."""
        self.lib, self.words, self.parallel = library(), tuple(words), parallel
        key = (_i64 * len(words))(*words)
        self.handle = self.lib.jaxcnn_program_new(key, len(words), parallel, int(single_thread), int(global_lock))
        if not self.handle:
            raise MemoryError("jaxcnn: no memory for a oneDNN program")

    def lock(self, plan: dict) -> None:
        """Hold `plan`'s lock during the call (its memories' handles are set per call)."""
        if "native_lock" not in plan:
            plan["native_lock"] = self.lib.jaxcnn_mutex_new()
        self._check(self.lib.jaxcnn_program_lock(self.handle, plan["native_lock"]))

    def set(self, seq: int, memory, source: int, index: int, offset: int = 0) -> None:
        """Point `memory` at operand (ARG) or result (RET) buffer `index`, `offset` bytes in."""
        self._check(self.lib.jaxcnn_program_set(self.handle, seq, memory, source, index, offset))

    def execute(self, seq: int, call) -> None:
        """Run `call`, a (primitive, argument array) pair as jaxcnn.dnnl builds them."""
        primitive, args = call
        self._check(self.lib.jaxcnn_program_exec(self.handle, seq, primitive, len(args), args))

    def restore_nans(self, seq: int, source: int, index: int, count: int, itemsize: int) -> None:
        """Set back to NaN what a oneDNN max-pool wrote for windows of NaNs in buffer `index`
        (`count` elements of `itemsize` bytes, f32 or bf16; jaxcnn.dnnl.restore_nans)."""
        self._check(self.lib.jaxcnn_program_nans(self.handle, seq, source, index, count, itemsize))

    def publish(self) -> None:
        self.lib.jaxcnn_program_publish(self.handle)
        _published.append((TARGETS[self.words[0]], self.parallel, self.words))

    @staticmethod
    def _check(status: int) -> None:
        if status:
            raise MemoryError("jaxcnn: no memory for a oneDNN program")


def programs() -> list:
    """(target, parallel sequences, key words) of each Program built in this process, in order
    (for tests and benchmarks: e.g. whether a weight gradient was split)."""
    return list(_published)


def frame_buffers(frame_address: int):
    """(frame, operand buffers, result buffers) of an XLA FFI call frame's address."""
    from jaxcnn import dnnl
    frame = ctypes.cast(frame_address, ctypes.POINTER(dnnl._CallFrame)).contents
    return (frame, *dnnl.buffers(frame))


def _build(frame_address, target, key, key_len, error, error_len) -> int:
    """Called by a handler on the first execution of a key: build and publish its Program."""
    try:
        from jaxcnn import bnorm, dnnl, pool  # noqa: F401  (they register their builders on import)
        _builders[target](frame_address, [key[i] for i in range(key_len)])
        return 0
    except BaseException as e:  # never unwind into XLA: the handler reports the message
        message = f"{type(e).__name__}: {e}".encode()[: max(0, error_len - 1)] + b"\0"
        ctypes.memmove(error, message, len(message))
        if os.environ.get("JAXCNN_TRACEBACK"):
            traceback.print_exc()
        return 1


_BUILD_FN = _BUILD(_build)  # kept alive: the library holds its address
