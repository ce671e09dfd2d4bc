"""Build of the compiled oneDNN FFI handlers and the one-pass AdamW (jaxcnn/csrc/native.c ->
jaxcnn._native).

Everything else about the package is in pyproject.toml. The library is optional: without a C
compiler the install goes on and jaxcnn uses its Python handlers (jaxcnn/native.py says what
the compiled ones change) and optax's AdamW. It links against neither Python nor oneDNN: jaxcnn passes it
oneDNN's functions at run time.
"""
import sys

from setuptools import Extension, setup

native = Extension(
    "jaxcnn._native",
    sources=["jaxcnn/csrc/native.c"],
    depends=["jaxcnn/csrc/xla_ffi_c_api.h"],
    include_dirs=["jaxcnn/csrc"],
    extra_compile_args=["-O3", "-fno-math-errno", "-std=c11", "-fvisibility=hidden"],  # -O3: restore_nans and AdamW vectorized (sqrtf too: no errno)
    libraries=["pthread"],
    optional=True,  # a failed build warns; the install succeeds without it
)

setup(ext_modules=[native] if sys.platform.startswith("linux") else [])
