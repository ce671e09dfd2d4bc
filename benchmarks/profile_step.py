"""Where a jaxcnn training step spends its time, per XLA operation, from a `jax.profiler` trace.

    python benchmarks/profile_step.py                                  # resnet18_cifar, batch 128, fp32
    python benchmarks/profile_step.py --model densenet_bc_100_12 --steps 5
    python benchmarks/profile_step.py --model simple_cnn --precision bf16 --top 20
    python benchmarks/profile_step.py --model densenet_bc_100_12 --infer        # the eval step

Builds jaxcnn's own train step (benchmarks/throughput.py's `_jax_steps`), runs 5 untraced steps,
then traces `--steps` steps and sums the duration of every XLA:CPU thunk by name (ms per step):
the top operations, then the same grouped by kind (the name without its number: `ynn_fusion`,
`jaxcnn_onednn_conv`, `transpose_copy_fusion`, ...). Thunks run concurrently on several cores,
so the sums can exceed the wall time; XLA's own (Eigen) convolutions run asynchronously and their
spans are only the dispatch (resnet18_cifar's 16 weight-gradient convolutions showed 3 ms), so
the wall time minus the sums is roughly theirs. To see what an operation is, dump the optimized HLO
(`XLA_FLAGS=--xla_dump_to=DIR --xla_dump_hlo_as_text`) and look its name up in
`*train_step.cpu_after_optimizations.txt`. `--per-step` adds each traced step's time and, for
steps that vary, the kinds that differ most between the slowest and the fastest one. Prints
text; writes no file outside a temporary folder.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# Trace events that are not XLA operations: the runtime's own spans and Python frames.
_NOT_OPS = re.compile(r"^\$|Execute|PjitFunction|Await|CreateOutputs|Handle inputs|ParseArguments")


def _events(trace_dir: str) -> list:
    """The complete ("X") events of the perfetto trace under `trace_dir`."""
    path = glob.glob(os.path.join(trace_dir, "**", "*.json.gz"), recursive=True)[0]
    trace = json.load(gzip.open(path))
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace) if e.get("ph") == "X"]


def thunk_times(events: list, steps: int, window=None) -> dict:
    """ms per step of each XLA operation, over the whole trace or the (start, end) `window` (us)."""
    total = collections.Counter()
    for e in events:
        if not _NOT_OPS.search(e["name"]) and (window is None or window[0] <= e["ts"] < window[1]):
            total[e["name"]] += e.get("dur", 0) / 1e3 / steps  # microseconds -> ms per step
    return dict(total)


def step_windows(events: list) -> list:
    """(start, end) of each executed step: the runtime's wait for all of a step's thunks."""
    steps = sorted((e for e in events if e["name"] == "ThunkExecutor::Execute (wait for completion)"),
                   key=lambda e: e["ts"])
    return [(e["ts"], e["ts"] + e["dur"]) for e in steps]


def by_kind(times: dict) -> dict:
    """Sum operations of the same kind: 'ynn_fusion.12' and 'ynn_fusion.3' -> 'ynn_fusion'."""
    kinds = collections.Counter()
    for name, ms in times.items():
        kinds[re.sub(r"\.\d+", "", name.split("__")[0])] += ms
    return dict(kinds)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18_cifar")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=10, help="traced steps")
    ap.add_argument("--top", type=int, default=15, help="operations listed")
    ap.add_argument("--infer", action="store_true", help="the inference (eval) step instead of the training step")
    ap.add_argument("--per-step", action="store_true",
                    help="also each step's time, and the kinds that differ most between the slowest and fastest step")
    a = ap.parse_args(argv)
    import jax
    from throughput import _jax_steps

    train, infer, _, _ = _jax_steps(a.model, a.batch, a.precision)
    step = infer if a.infer else train
    step(5)
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(a.steps):  # one at a time, so each step is a span of its own
                step(1)
        wall = 1e3 * (time.perf_counter() - t) / a.steps
        events = _events(d)
    times = thunk_times(events, a.steps)
    print(f"{a.model}, batch {a.batch}, {a.precision}, {a.steps} traced {'inference' if a.infer else 'training'} steps: {wall:.1f} ms per step "
          f"(tracing included), thunks {sum(times.values()):.1f} ms; "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')}\n")
    for title, table in (("operation", times), ("kind", by_kind(times))):
        print(f"| {title} | ms per step |\n|---|---|")
        for name, ms in sorted(table.items(), key=lambda kv: -kv[1])[:a.top]:
            print(f"| {name} | {ms:.2f} |")
        print()
    if a.per_step:
        windows = step_windows(events)
        ms = [(end - start) / 1e3 for start, end in windows]
        print("step ms: " + ", ".join(f"{v:.0f}" for v in ms) + "\n")
        if len(windows) > 1:
            slow, fast = (by_kind(thunk_times(events, 1, windows[ms.index(f(ms))])) for f in (max, min))
            print(f"| kind | slowest step ({max(ms):.0f}) ms | fastest step ({min(ms):.0f}) ms |\n|---|---|---|")
            for k in sorted(set(slow) | set(fast), key=lambda k: fast.get(k, 0) - slow.get(k, 0))[:a.top]:
                print(f"| {k} | {slow.get(k, 0):.1f} | {fast.get(k, 0):.1f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    import jaxcnn
    jaxcnn.reexec_with_huge_pages()
    sys.exit(main())
