"""How much of a jaxcnn training step its 3x3 convolutions take, and what the step costs the CPU.

    python benchmarks/step_breakdown.py                          # resnet18_cifar, batch 128
    python benchmarks/step_breakdown.py --model densenet_bc_100_12 --steps 6
    python benchmarks/step_breakdown.py --quick                  # smoke run: simple_cnn, batch 8

Two variants of jaxcnn's own train step (benchmarks/throughput.py's `_jax_steps`), each in a
process of its own: "real", and "stand-in", where every convolution that `jaxcnn.ops` computes
with a convolution kernel (every k x k one, oneDNN's or XLA's, forward and gradients; 1x1 ones are
matmuls) is replaced by a strided slice of its
input, tiled to the output channels and scaled by one row of its weight: the same shapes and
the same gradient plumbing (fences, BatchNorm, ReLU, adds, shortcuts, AdamW), nearly no
convolution work. Per step: wall time (median and mean), CPU time in user and kernel mode, and
page faults (getrusage), after 3 warm-up steps. Prints a markdown table; writes no file.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _stand_in(x, w, strides, *_):
    """Same output shape as the convolution, almost no work (see the module docstring)."""
    import jax.numpy as jnp
    y = x[:, ::strides[0], ::strides[1], :]
    co = w.shape[-1]
    y = jnp.concatenate([y] * -(-co // y.shape[-1]), axis=-1)[..., :co]
    return y * w[0, 0, 0, :]


def worker(a) -> dict:
    if a.worker == "stand-in":
        from jaxcnn import ops
        # read when the step is traced; the gradients are the stand-in's too
        ops._conv = ops._xla_conv = _stand_in
        ops.ONEDNN = False
    from throughput import _jax_steps

    train, _, _, _ = _jax_steps(a.model, a.batch, "fp32")
    train(3)
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(a.steps):
        t = time.perf_counter(); train(1); times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    n = a.steps
    return dict(median_ms=1e3 * float(np.median(times)), mean_ms=1e3 * float(np.mean(times)),
                user_s=(r1.ru_utime - r0.ru_utime) / n, sys_s=(r1.ru_stime - r0.ru_stime) / n,
                faults=(r1.ru_minflt - r0.ru_minflt) / n)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant")
    ap.add_argument("--quick", action="store_true", help="simple_cnn, batch 8, 2 steps")
    ap.add_argument("--worker", choices=["real", "stand-in"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick:
        a.model, a.batch, a.steps = "simple_cnn", 8, 2
    if a.worker:
        print("RESULT " + json.dumps(worker(a)), flush=True)
        return 0
    from throughput import _run_worker

    rows = {}
    for v in ("real", "stand-in"):
        rows[v] = _run_worker([v, "--model", a.model, "--batch", str(a.batch), "--steps", str(a.steps)],
                              script=__file__)
        if "error" in rows[v]:
            sys.exit(f"the {v} worker failed: {rows[v]['error']}")
    print(f"{a.model}, batch {a.batch}, fp32, {a.steps} steps per variant; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}\n")
    print("| step | median ms | mean ms | user s | kernel s | page faults |\n|---|---|---|---|---|---|")
    for v, r in rows.items():
        print(f"| {v} | {r['median_ms']:.0f} | {r['mean_ms']:.0f} | {r['user_s']:.2f} | {r['sys_s']:.2f} | "
              f"{r['faults']:,.0f} |")
    conv = rows["real"]["median_ms"] - rows["stand-in"]["median_ms"]
    print(f"\nconvolutions (real - stand-in, medians): {conv:.0f} ms of {rows['real']['median_ms']:.0f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import jaxcnn
    jaxcnn.reexec_with_huge_pages()
    sys.exit(main())
