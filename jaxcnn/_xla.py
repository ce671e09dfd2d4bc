"""XLA:CPU settings the library makes before JAX creates its CPU backend.

jaxlib 0.10 routes every f32 convolution on the CPU, the weight-gradient ones included, to
YNNPACK by default (`xla_cpu_experimental_ynn_fusion_type` contains INDIVIDUAL_CONVOLUTION).
YNNPACK's weight-gradient convolution is 3-4x slower than XLA's own (Eigen) one on this project's
AVX-512 Xeon (a 3x3 64->64 conv at 32x32, batch 128: 401 ms vs 105 ms; PyTorch/oneDNN 83-122 ms),
and it dominates a training step. Removing convolutions from the YNNPACK set (dots and reductions
stay) makes a CPU training step about twice as fast; see benchmarks/RESULTS.md.

Set JAXCNN_KEEP_XLA_FLAGS=1 to leave XLA_FLAGS untouched. A setting of the same flag already in
XLA_FLAGS always wins. The flag only reaches XLA if jaxcnn is imported before JAX first runs a
computation (the backend reads XLA_FLAGS once).
"""
from __future__ import annotations

import os
from importlib import metadata

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
SCHEDULER_FLAG = "xla_cpu_scheduler_type"
NO_YNN_CONV = f"--{YNN_FLAG}=-individual_convolution"


def _jaxlib_version() -> tuple:
    try:
        return tuple(int(p) for p in metadata.version("jaxlib").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return (0, 0)


def _knows_flags() -> bool:
    """Whether this jaxlib is one the flags were measured with (0.10.x). Older ones do not know
    them, and XLA aborts at start-up on an unknown flag in XLA_FLAGS; a newer one may have renamed
    or dropped them, so it is left alone until checked (pyproject pins jax < 0.11)."""
    return (0, 10) <= _jaxlib_version() < (0, 11)


def _hands_off(flag: str = YNN_FLAG) -> bool:
    """True when jaxcnn must leave `flag` alone: opted out, or the user set it in XLA_FLAGS."""
    return bool(os.environ.get("JAXCNN_KEEP_XLA_FLAGS")) or \
        flag in os.environ.get("XLA_FLAGS", "").replace(NO_YNN_CONV, "")


def _cpu_option(flag: str, value: str) -> dict:
    """{flag: value} as a per-`jit` option when jaxcnn may set it: on the CPU backend, with a
    jaxlib that knows the flag, and not left to the user (`_hands_off`); else {}."""
    import jax

    if _hands_off(flag) or not _knows_flags() or jax.default_backend() != "cpu":
        return {}
    return {flag: value}


def configure_xla_cpu() -> bool:
    """Append the convolution setting to XLA_FLAGS when it applies; returns whether it did."""
    flags = os.environ.get("XLA_FLAGS", "")
    if _hands_off() or NO_YNN_CONV in flags:
        return False
    if not _knows_flags():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {NO_YNN_CONV}".strip()
    return True


def eval_compiler_options() -> dict:
    """Per-`jit` XLA options for inference-only computations (eval step, Predictor).

    With YNNPACK's REDUCE fusions on (needed in training: XLA's own reductions made BatchNorm
    statistics ~7x slower), XLA:CPU pulls a forward pass's convolutions into YNNPACK fusions
    around the pooling and mean reductions, and YNNPACK's forward convolution is slower than
    Eigen's. Inference has no batch statistics, so it keeps only YNNPACK matmuls: simple_cnn at
    batch 32 ran 3,700 -> 6,900 images/s, resnet18_cifar at batch 128 207 -> 224.
    Empty (XLA defaults) off the CPU, with JAXCNN_KEEP_XLA_FLAGS=1, or when the user set the flag.
    """
    return _cpu_option(YNN_FLAG, "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")


def train_compiler_options(recomputes: bool = False) -> dict:
    """Per-`jit` XLA options for a training step on the CPU.

    XLA:CPU's default scheduler orders a step for concurrency and keeps more activations alive
    than it needs to. The memory-optimized one cut resnet18_cifar's step buffers at batch 128 from
    936 to 642 MB at the same speed (78 vs 76 images/s; simple_cnn 78 -> 58 MB). It does the
    opposite to steps that recompute activations in the backward pass (dense blocks with remat on
    the CPU, `jaxcnn.layers.recomputes`): densenet_bc_100_12 2.3 -> 3.1 GB and 38 -> 31 images/s,
    so those keep the default. Empty off the CPU, with JAXCNN_KEEP_XLA_FLAGS=1, or when the user
    chose a scheduler in XLA_FLAGS.
    """
    return {} if recomputes else _cpu_option(SCHEDULER_FLAG, "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED")
