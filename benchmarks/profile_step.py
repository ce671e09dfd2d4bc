"""Where a training (or inference) step's time goes, op by op, in jaxcnn and in PyTorch.

    python benchmarks/profile_step.py --model densenet_bc_100_12 --batch 128
    python benchmarks/profile_step.py --model resnet18_cifar --framework torch --infer

jaxcnn: the same jitted step as benchmarks/throughput.py, traced with `jax.profiler` and XLA:CPU's
per-op trace events (`--xla_cpu_enable_xprof_traceme`); each compiled op (a convolution, a
fusion of elementwise work, a YNNPACK matmul, a copy) is one event per step. PyTorch: the same
model (jaxcnn.torch_ref) under `torch.profiler`, by aten op. Prints the top ops by time per step,
with their share of the step, grouped into kinds (convolution, matmul, elementwise/fusion, ...).
Tracing adds overhead: compare shares, and take absolute speed from throughput.py.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _kind(name: str) -> str:
    n = name.lower()
    for key, kind in [("conv", "convolution"), ("ynn", "matmul (YNNPACK)"), ("dot", "matmul"),
                      ("mm", "matmul"), ("addmm", "matmul"), ("linear", "matmul"),
                      ("batch_norm", "batchnorm"), ("native_batch", "batchnorm"),
                      ("while", "fence (while loop)"), ("copy", "copy/transpose"),
                      ("transpose", "copy/transpose"), ("cat", "concatenate"),
                      ("concatenate", "concatenate"), ("reduce", "reduction"), ("fusion", "fusion"),
                      ("pool", "pooling"), ("adam", "optimizer"), ("foreach", "optimizer")]:
        if key in n:
            return kind
    return "other"


def profile_jax(model: str, batch: int, precision: str, steps: int, infer: bool):
    import jax
    from jax._src.lib import _profile_data
    import throughput

    train_n, infer_n, _, _ = throughput._jax_steps(model, batch, precision)
    run = infer_n if infer else train_n
    run(2)  # compile and warm up outside the trace
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        with jax.profiler.trace(d):
            run(steps)
        wall = (time.perf_counter() - t0) / steps
        path = next(os.path.join(r, f) for r, _, fs in os.walk(d) for f in fs if f.endswith(".xplane.pb"))
        data = _profile_data.ProfileData.from_file(path)
    totals = collections.Counter()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if "XLA" not in line.name and "Eigen" not in line.name and "tf_" not in line.name:
                continue
            for ev in line.events:
                # XLA:CPU's op events carry the HLO name (convolution.3, fusion.12, ...); the
                # runtime's own events span them.
                if "::" in ev.name or ev.name.startswith(_SKIP):
                    continue
                totals[ev.name] += ev.duration_ns / 1e6 / steps
    return wall * 1e3, totals


_SKIP = ("ThunkExecutor", "PjRt", "Execute", "CpuExecutable", "XlaModule", "$")


def profile_torch(model: str, batch: int, precision: str, steps: int, infer: bool):
    import torch
    import throughput

    train_n, infer_n = throughput._torch_steps(model, batch, precision)
    run = infer_n if infer else train_n
    run(2)
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
    wall = (time.perf_counter() - t0) / steps
    totals = collections.Counter()
    for e in prof.key_averages():
        # self time: an aten op's own kernels, not the ops it calls (no double counting)
        totals[e.key] += e.self_cpu_time_total / 1e3 / steps
    return wall * 1e3, totals


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--framework", default="jax", choices=["jax", "torch"])
    ap.add_argument("--infer", action="store_true", help="profile the inference step instead")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args(argv)
    if a.framework == "jax":
        flag = "--xla_cpu_enable_xprof_traceme=true"
        if flag not in os.environ.get("XLA_FLAGS", ""):
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
        wall, totals = profile_jax(a.model, a.batch, a.precision, a.steps, a.infer)
    else:
        wall, totals = profile_torch(a.model, a.batch, a.precision, a.steps, a.infer)
    total = sum(totals.values())
    what = "inference" if a.infer else "training"
    print(f"{a.framework} {a.model} batch {a.batch} {a.precision} {what}: {wall:.1f} ms per step "
          f"(traced), ops sum to {total:.1f} ms")
    kinds = collections.Counter()
    for name, ms in totals.items():
        kinds[_kind(name)] += ms
    print("\n| kind | ms/step | share |\n|---|---|---|")
    for k, ms in kinds.most_common():
        print(f"| {k} | {ms:.1f} | {100 * ms / max(total, 1e-9):.0f}% |")
    print("\n| op | ms/step | share |\n|---|---|---|")
    for name, ms in totals.most_common(a.top):
        print(f"| {name[:70]} | {ms:.2f} | {100 * ms / max(total, 1e-9):.1f}% |")


if __name__ == "__main__":
    import jaxcnn
    jaxcnn.reexec_with_huge_pages()
    main()
