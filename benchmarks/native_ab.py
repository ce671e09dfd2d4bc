"""What the compiled FFI handlers (jaxcnn.native) change, step for step, against the Python ones.

    python benchmarks/native_ab.py                                   # simple_cnn and resnet18_cifar, fp32
    python benchmarks/native_ab.py --models densenet_bc_100_12 --batches 32 --pairs 4
    python benchmarks/native_ab.py --what infer --precision bf16
    python benchmarks/native_ab.py --models resnet18_cifar --batches 128 --devices 4   # simulated devices
    python benchmarks/native_ab.py --models resnet18_cifar --batches 128 --devices 1 4 --pairs 4

For each model and batch, `--pairs` pairs of processes, one with the compiled handlers and one
with JAXCNN_NATIVE=0 (the Python handlers), alternating which goes first. Each process compiles
jaxcnn's own train (or eval) step (benchmarks/throughput.py's `_jax_steps`), runs 2 untimed
steps, then times 8 rounds of `--steps` steps (0: enough for ~0.5 s) and reports the median ms
per step. Prints each pair and the medians over pairs; writes no file.

With several `--devices` counts it measures each handler's data-parallel overhead instead: per
pass, for each handler (alternating which goes first), one process per device count (their order
alternating too), each the benchmark's own sharded fp32 train step (throughput.py's
`_sharded_train`, the step its devices table times) at the same global batch; a pass's overhead
at N devices is its N-device step time over its fewest-device one, minus 1, and the table gives
every pass's overhead and their median. Processes of one pass run minutes apart at most, so a
pass's ratio holds on a VM whose speed drifts over the hour.

Why processes and not one process with both: compiling both executables into one process (the
Python handlers registered under other target names) made the Python handlers' steps slower
than in a process of their own (resnet18_cifar bf16 at batch 128: 1,135 against ~800-860 ms,
while two executables of the compiled handlers in one process timed alike), which no user sees.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _worker(a) -> None:
    import throughput
    from jaxcnn import native
    if a.sharded:
        run = throughput._sharded_train(a.model, a.batch, a.devices)
    else:
        run = throughput._jax_steps(a.model, a.batch, a.precision)[0 if a.what == "train" else 1]
    run(2)
    steps = a.steps
    if not steps:
        t = time.perf_counter()
        run(1)
        steps = max(1, int(0.5 / max(time.perf_counter() - t, 1e-4)))
    times = []
    for _ in range(8):
        t = time.perf_counter()
        run(steps)
        times.append((time.perf_counter() - t) / steps * 1e3)
    print("RESULT", float(np.median(times)), native.active(), flush=True)


def _one(a, model: str, batch: int, native: bool, devices: int, sharded: bool) -> float:
    env = dict(os.environ, JAXCNN_NATIVE="1" if native else "0")
    if devices > 1:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--batch", str(batch),
           "--precision", a.precision, "--what", a.what, "--steps", str(a.steps), "--devices", str(devices)]
    cmd += ["--sharded"] if sharded else []
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT")]
    if p.returncode or not lines:
        raise SystemExit(f"worker failed ({model}, batch {batch}, native={native}):\n{p.stderr[-3000:]}")
    ms, active = float(lines[-1].split()[1]), lines[-1].split()[2] == "True"
    if active != native:
        raise SystemExit(f"the worker ran the {'compiled' if active else 'Python'} handlers, not the ones asked for "
                         "(is jaxcnn._native built? pip install -e . builds it)")
    return ms


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["simple_cnn", "resnet18_cifar"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--what", default="train", choices=["train", "infer"])
    p.add_argument("--pairs", type=int, default=3, help="pairs of processes per model and batch")
    p.add_argument("--steps", type=int, default=0, help="steps per timed round (0: enough for ~0.5 s)")
    p.add_argument("--devices", type=int, nargs="+", default=[1],
                   help="simulated CPU devices (fp32 train): the batch is split; several counts: the overhead")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--sharded", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.devices = a.devices[0]
        _worker(a)
        return 0
    if min(a.devices) < 1:
        p.error(f"--devices {a.devices}: device counts must be 1 or more")
    if max(a.devices) > 1 and (a.what, a.precision) != ("train", "fp32"):
        p.error("--devices above 1 times the sharded fp32 train step: drop --what/--precision, or --devices")
    if len(set(a.devices)) > 1:
        return _overheads(a)
    devices = a.devices[0]
    print(f"{a.what} step, {a.precision}, {devices} device(s): ms per step, median of 8 rounds per process; "
          f"{a.pairs} pairs of processes, alternating which goes first")
    print("| model | batch | compiled handlers | Python handlers | ratio (median) | pairs (compiled / Python) |")
    print("|---|---|---|---|---|---|")
    for model in a.models:
        for batch in a.batches:
            pairs = []
            for i in range(a.pairs):
                order = (True, False) if i % 2 == 0 else (False, True)
                got = {native: _one(a, model, batch, native, devices, devices > 1) for native in order}
                pairs.append((got[True], got[False]))
            c, py = np.median([x for x, _ in pairs]), np.median([y for _, y in pairs])
            ratio = np.median([y / x for x, y in pairs])
            shown = ", ".join(f"{x:.1f} / {y:.1f}" for x, y in pairs)
            print(f"| {model} | {batch} | {c:.2f} | {py:.2f} | {ratio:.3f} | {shown} |", flush=True)
    return 0


def _overheads(a) -> int:
    """Each handler's overhead at every device count against the fewest (see the docstring)."""
    counts = sorted(set(a.devices))
    print(f"fp32 train step at the same global batch on {', '.join(map(str, counts))} simulated devices: "
          f"overhead = ms per step on N devices / on {counts[0]} - 1, per pass ({a.pairs} passes; "
          "each process the median of 8 rounds)")
    print("| model | batch | handlers | devices | ms per step (passes) | overhead (passes) | median overhead |")
    print("|---|---|---|---|---|---|---|")
    for model in a.models:
        for batch in a.batches:
            ms = {(native, n): [] for native in (True, False) for n in counts}
            for i in range(a.pairs):
                for native in ((True, False) if i % 2 == 0 else (False, True)):
                    for n in (counts if i % 2 == 0 else counts[::-1]):
                        ms[native, n].append(_one(a, model, batch, native, n, True))
            for native in (True, False):
                base = ms[native, counts[0]]
                for n in counts[1:]:
                    over = [t / b - 1 for t, b in zip(ms[native, n], base)]
                    print(f"| {model} | {batch} | {'compiled' if native else 'Python'} | {n} vs {counts[0]} | "
                          f"{', '.join(f'{t:.0f}' for t in ms[native, n])} vs {', '.join(f'{t:.0f}' for t in base)} | "
                          f"{', '.join(f'{o:.0%}' for o in over)} | {np.median(over):.0%} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
