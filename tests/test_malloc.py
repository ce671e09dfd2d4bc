"""The huge-page re-exec of the training entry points (jaxcnn/_malloc.py)."""
import os
import subprocess
import sys

import pytest

from jaxcnn import _malloc

_CLEAN = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "JAXCNN_KEEP_MALLOC")}
needs_thp = pytest.mark.skipif(not _malloc.wants_tunable(_CLEAN),
                               reason="not Linux/glibc>=2.35 with transparent huge pages")


def test_env_with_tunable_keeps_other_tunables_and_marks_the_run():
    env = _malloc.env_with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert env["X"] == "1" and not _malloc.wants_tunable(env)  # the re-executed run stops there
    assert _malloc.env_with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"


@needs_thp
def test_user_settings_and_the_marker_stop_the_reexec():
    assert _malloc.wants_tunable(_CLEAN)
    assert not _malloc.wants_tunable(dict(_CLEAN, JAXCNN_KEEP_MALLOC="1"))
    assert not _malloc.wants_tunable(dict(_CLEAN, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"))
    assert not _malloc.wants_tunable(_malloc.env_with_tunable(_CLEAN))
    assert not _malloc._thp_available("/nonexistent/thp")


_PROBE = ("import os, jaxcnn; jaxcnn.reexec_with_huge_pages(); "
          "print('RUN', os.environ.get('GLIBC_TUNABLES'), flush=True)")


@needs_thp
def test_reexec_runs_the_command_once_with_the_tunable():
    out = subprocess.run([sys.executable, "-c", _PROBE], env=_CLEAN, capture_output=True, text=True,
                         check=True).stdout
    assert out.count("RUN") == 1, out  # the first process was replaced, not run twice
    assert "RUN glibc.malloc.hugetlb=1" in out
    out = subprocess.run([sys.executable, "-c", _PROBE], env=dict(_CLEAN, JAXCNN_KEEP_MALLOC="1"),
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "RUN None"


# glibc's malloc directly (numpy would madvise huge pages itself), 256 MiB: served by mmap.
_TOUCH = ("import ctypes, resource; libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = "
          "ctypes.c_void_p; n = 1 << 28; p = libc.malloc(n); ctypes.memset(p, 1, n); "
          "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)")


@needs_thp
def test_the_tunable_cuts_page_faults_of_large_allocations():
    """The mechanism itself: touching a fresh 256 MiB buffer takes ~65,536 faults with 4 KiB
    pages and a few hundred with 2 MiB ones."""
    def faults(env):
        return int(subprocess.run([sys.executable, "-c", _TOUCH], env=env, capture_output=True,
                                  text=True, check=True).stdout)
    plain = faults(_CLEAN)
    huge = faults(dict(_CLEAN, GLIBC_TUNABLES=_malloc.TUNABLE))
    assert plain > 60_000
    assert plain - huge > 40_000, (plain, huge)


# 2,000 x 64 KiB blocks (below the mmap threshold: served from the heap), freed all but the last
# (which pins the heap's top, so free() alone cannot shrink it), then release_free_memory().
_TRIM = ("import ctypes, jaxcnn; libc = ctypes.CDLL('libc.so.6'); libc.malloc.restype = ctypes.c_void_p\n"
         "rss = lambda: int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
         "ps = [libc.malloc(1 << 16) for _ in range(2000)]\n"
         "[ctypes.memset(p, 1, 1 << 16) for p in ps]\n"
         "[libc.free(ctypes.c_void_p(p)) for p in ps[:-1]]\n"
         "before = rss(); released = jaxcnn.release_free_memory(); print(before, rss(), released)")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_free_memory_returns_the_freed_heap_to_the_os():
    before, after, released = subprocess.run(
        [sys.executable, "-c", _TRIM], env=_CLEAN, capture_output=True, text=True, check=True
    ).stdout.split()
    assert released == "True"
    assert int(before) - int(after) > 100, (before, after)  # of the ~125 MB freed
