"""Transparent huge pages for the large buffers of a CPU training step (Linux, glibc).

XLA:CPU allocates a training step's temporary buffer (~1 GB for resnet18_cifar at batch 128),
and Eigen's convolution kernels allocate their packing buffers (up to ~300 MB each), afresh on
every step. glibc serves them with mmap and returns them with munmap, so every step touches
fresh 4 KiB pages: about 268,000 page faults and ~0.6 s of kernel time per resnet18_cifar step
on the 2-core CPU (measured with getrusage). The glibc tunable `glibc.malloc.hugetlb=1`
(glibc >= 2.35) makes malloc ask for transparent huge pages (2 MiB) instead: ~2,000 faults per
step, and the step ran 68 -> 81 img/s. PyTorch's CPU allocator gains from it too (72 -> 93).

Those buffers still come fresh from the kernel on every step (~3.9 GB of zeroed pages per
resnet18_cifar step: XLA's 673 MB temporary and Eigen's im2col packing buffers, up to 302 MB
each). They are allocated on worker threads, whose glibc arenas cannot hold more than 64 MB, so
only `glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0` keeps them in a reusable heap. That
removed the page faults but raised the peak RSS from 1.28 to 1.8-2.5 GB (strace shows the next
step's temporary mapped while the last one is being unmapped, so a heap holds two), so it is not
the default.

glibc reads tunables once, when a process starts, so the training entry points
(experiments/*.py, `python -m jaxcnn`, benchmarks/throughput.py) re-execute themselves once with
the tunable added to GLIBC_TUNABLES. Importing jaxcnn never does this; in your own scripts, set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` in the environment. JAXCNN_KEEP_MALLOC=1 opts out; a
hugetlb setting already in GLIBC_TUNABLES wins.

Compiling a step leaves the heap with ~300 MB that the compiler (LLVM) freed but glibc keeps
(resnet18_cifar's train step: 732 MB resident after compiling, 452 MB after `malloc_trim`).
The step's own buffers are mmap'd fresh, so that memory is never reused and only raises the
peak: `release_free_memory` hands it back; the training loop calls it after its first step.
"""
from __future__ import annotations

import ctypes
import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_ok() -> bool:
    lib, ver = platform.libc_ver()
    try:
        return lib == "glibc" and tuple(int(p) for p in ver.split(".")[:2]) >= (2, 35)
    except ValueError:
        return False


def _thp_available(path: str = _THP) -> bool:
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def wants_tunable(env: Mapping[str, str] = os.environ) -> bool:
    """Whether adding the tunable would change anything (and the user has not opted out). False
    in the re-executed process, whose GLIBC_TUNABLES has it: the re-exec never loops."""
    return (sys.platform.startswith("linux") and not env.get("JAXCNN_KEEP_MALLOC")
            and "glibc.malloc.hugetlb" not in env.get("GLIBC_TUNABLES", "")
            and _glibc_ok() and _thp_available())


def env_with_tunable(env: Mapping[str, str]) -> dict:
    """`env` with TUNABLE appended to GLIBC_TUNABLES (colon-separated, as glibc expects)."""
    old = env.get("GLIBC_TUNABLES", "")
    return dict(env, GLIBC_TUNABLES=f"{old}:{TUNABLE}" if old else TUNABLE)


def reexec_with_huge_pages(argv: Optional[list] = None) -> None:
    """Replace this process by the same command with the tunable set; return if not wanted.

    Call it first thing in a script's `if __name__ == "__main__":` block, before any work.
    `argv`: the full command line (default: `sys.orig_argv`, the interpreter's own)."""
    argv = list(sys.orig_argv if argv is None else argv)
    # `python -` reads the program from stdin, which a second run could not read again.
    if not wants_tunable() or len(argv) < 2 or argv[1] == "-":
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *argv[1:]], env_with_tunable(os.environ))
    except OSError:  # cannot exec (odd sandbox): run on with 4 KiB pages
        return


def release_free_memory() -> bool:
    """Return the heap's free memory to the OS (glibc `malloc_trim(0)`); True if any was.
    A no-op returning False elsewhere. Cheap (a few ms), and safe while computations run."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
