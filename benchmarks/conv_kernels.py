"""The convolutions alone: what a jaxcnn step runs (oneDNN's direct kernels for the forward and the
input gradient, jaxcnn/onednn.py; oneDNN's backward-weights kernels for the weight gradient,
jaxcnn/dnnl.py, since 4732fcb: RESULTS-conv*.md predate it), XLA:CPU's own kernels
(JAXCNN_ONEDNN=0, which turns both off) and PyTorch's (oneDNN), shape by shape, for the 3x3 convolutions of
resnet18_cifar and densenet_bc_100_12 at batch 128.

    python benchmarks/conv_kernels.py                  # writes benchmarks/RESULTS-conv.md
    python benchmarks/conv_kernels.py --rounds 3 --out /tmp/conv.md
    python benchmarks/conv_kernels.py --quick --out /tmp/conv.md    # smoke run: one small shape

A whole training step also has BatchNorm, ReLU, adds, pooling and the optimizer, and there
jaxcnn's fused elementwise work is cheaper than PyTorch's (see benchmarks/RESULTS.md). This
script isolates the convolution kernels. "inference" is one
forward convolution; "training" is forward + input gradient + weight gradient of the same
convolution (jaxcnn: `jaxcnn.ops.conv_general_dilated` under `jax.grad`, with the library's XLA
flags; "XLA": the same with JAXCNN_ONEDNN=0; PyTorch: `nn.Conv2d` channels-last, `backward()`). Each framework runs in a process of its
own, one after the other; every figure is the median over rounds. The per-model totals weight
each shape by how often the model runs it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 128
# (model, in channels, out channels, input size, stride, times per step)
SHAPES = [
    ("resnet18_cifar", 3, 64, 32, 1, 1), ("resnet18_cifar", 64, 64, 32, 1, 4),
    ("resnet18_cifar", 64, 128, 32, 2, 1), ("resnet18_cifar", 128, 128, 16, 1, 3),
    ("resnet18_cifar", 128, 256, 16, 2, 1), ("resnet18_cifar", 256, 256, 8, 1, 3),
    ("resnet18_cifar", 256, 512, 8, 2, 1), ("resnet18_cifar", 512, 512, 4, 1, 3),
    ("densenet_bc_100_12", 48, 12, 32, 1, 16), ("densenet_bc_100_12", 48, 12, 16, 1, 16),
    ("densenet_bc_100_12", 48, 12, 8, 1, 16),
]


def _median_ms(fn, rounds: int) -> float:
    fn(); fn()  # compile / warm up
    times = []
    for _ in range(rounds):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def _gflops(ci: int, co: int, hw: int, s: int) -> float:
    """Multiply-adds x 2 of one 3x3 convolution (padding 1) at batch BATCH, in GFLOP."""
    return 2 * BATCH * (hw // s) ** 2 * co * ci * 9 / 1e9


def _sgemm_gflops(n: int = 4096, rounds: int = 3) -> float:
    """NumPy's f32 n x n matmul (its BLAS, every core) on random data: what this machine's
    f32 multiply-adds reach, for the kernels' GFLOP/s to be read against."""
    a = np.random.default_rng(0).random((n, n), np.float32)
    return 2 * n ** 3 / (_median_ms(lambda: a @ a, rounds) / 1e3) / 1e9


def worker_jax(rounds: int, shapes, bf16: bool = False):
    import jax
    import jax.numpy as jnp
    from jaxcnn import _xla, ops

    out = []
    for _, ci, co, hw, s, _ in shapes:
        dtype = jnp.bfloat16 if bf16 else jnp.float32
        x = jax.random.normal(jax.random.PRNGKey(0), (BATCH, hw, hw, ci), dtype)
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, ci, co), dtype) * 0.05
        conv = lambda x, w: ops.conv_general_dilated(x, w, (s, s), ((1, 1), (1, 1)),
                                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        fwd = jax.jit(conv, compiler_options=_xla.eval_compiler_options())
        grad = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w).astype(jnp.float32) * 1.5), argnums=(0, 1)),
                       compiler_options=_xla.train_compiler_options())
        out.append(dict(infer=_median_ms(lambda: jax.block_until_ready(fwd(x, w)), rounds),
                        train=_median_ms(lambda: jax.block_until_ready(grad(x, w)), rounds)))
    return out


def worker_torch(rounds: int, shapes, bf16: bool = False):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    out = []
    for _, ci, co, hw, s, _ in shapes:
        x = torch.randn(BATCH, ci, hw, hw).to(memory_format=torch.channels_last).requires_grad_()
        conv = torch.nn.Conv2d(ci, co, 3, s, 1, bias=False).to(memory_format=torch.channels_last)

        def infer():
            with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                conv(x)

        def train():
            with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                y = conv(x)
            (y.float() * 1.5).sum().backward()

        out.append(dict(infer=_median_ms(infer, rounds), train=_median_ms(train, rounds)))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS-conv.md"))
    ap.add_argument("--quick", action="store_true", help="the smallest shape only, 1 round")
    ap.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args(argv)
    shapes = SHAPES[-1:] if a.quick else SHAPES
    rounds = 1 if a.quick else a.rounds
    if a.worker:
        worker = worker_jax if a.worker == "jax" else worker_torch
        print("RESULT " + json.dumps(worker(rounds, shapes, a.precision == "bf16")))
        return 0
    from throughput import _run_worker, machine

    res = {}
    for fw, worker, env in (("jax", "jax", {}), ("xla", "jax", {"JAXCNN_ONEDNN": "0"}), ("torch", "torch", {})):
        res[fw] = _run_worker([worker, "--rounds", str(rounds), "--precision", a.precision]
                              + (["--quick"] if a.quick else []), {**os.environ, **env}, __file__)
        if isinstance(res[fw], dict):  # {"error": ...}; a worker's result is a list of shapes
            sys.exit(f"the {fw} worker failed: {res[fw]['error']}")
    env = machine()
    command = "python benchmarks/conv_kernels.py" + "".join(f" {x}" for x in (argv or sys.argv[1:]))
    L = ["# Convolution kernels alone: jaxcnn vs XLA:CPU's own vs PyTorch (oneDNN)", "",
         f"Command: `{command}`  ", f"Commit: {env.get('commit')}  ",
         f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
         f"Machine: {env.get('cpu')}, {env.get('cpu_cores')} cores; jax {env.get('jax')}, "
         f"torch {env.get('torch')}  ",
         f"XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`; GLIBC_TUNABLES: `{os.environ.get('GLIBC_TUNABLES', '')}`",
         "", f"Batch 128, {a.precision}, 3x3 kernels, padding 1. ms per call, median of {rounds} rounds; "
         "ratio = PyTorch time / jaxcnn time (above 1: jaxcnn faster). \"XLA\": jaxcnn with "
         "JAXCNN_ONEDNN=0 (XLA's Eigen convolutions).", "",
         f"\"GFLOP/s\": jaxcnn's inference; NumPy's f32 4096x4096 matmul on this machine, measured "
         f"after the workers: {_sgemm_gflops():.0f} GFLOP/s.", "",
         "| model | conv | size | per step | infer jaxcnn | infer XLA | infer PyTorch | ratio "
         "| train jaxcnn | train XLA | train PyTorch | ratio | GFLOP/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    totals = {}
    for (model, ci, co, hw, s, n), j, x, t in zip(shapes, res["jax"], res["xla"], res["torch"]):
        L.append(f"| {model} | {ci}->{co}{' /2' if s == 2 else ''} | {hw} | {n} | {j['infer']:.2f} | "
                 f"{x['infer']:.2f} | {t['infer']:.2f} | {t['infer'] / j['infer']:.2f} | {j['train']:.2f} | "
                 f"{x['train']:.2f} | {t['train']:.2f} | {t['train'] / j['train']:.2f} | "
                 f"{_gflops(ci, co, hw, s) / j['infer'] * 1e3:.0f} |")
        tot = totals.setdefault(model, np.zeros(6))
        tot += n * np.array([j["infer"], x["infer"], t["infer"], j["train"], x["train"], t["train"]])
    L += ["", "Per model, every 3x3 convolution of one step (ms):", "",
          "| model | infer jaxcnn | infer XLA | infer PyTorch | ratio | train jaxcnn | train XLA "
          "| train PyTorch | ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for model, (ji, xi, ti, jt, xt, tt) in totals.items():
        L.append(f"| {model} | {ji:.0f} | {xi:.0f} | {ti:.0f} | {ti / ji:.2f} | {jt:.0f} | {xt:.0f} | "
                 f"{tt:.0f} | {tt / jt:.2f} |")
    with open(a.out, "w") as f:
        f.write("\n".join(L) + "\n")
    print("\n".join(L))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import jaxcnn
    jaxcnn.reexec_with_huge_pages()
    sys.exit(main())
