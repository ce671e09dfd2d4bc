"""What the compiled FFI handlers (jaxcnn.native) change, step for step, against the Python ones.

    python benchmarks/native_ab.py                                   # simple_cnn and resnet18_cifar, fp32
    python benchmarks/native_ab.py --models densenet_bc_100_12 --batches 32 --rounds 8
    python benchmarks/native_ab.py --what infer --precision bf16
    python benchmarks/native_ab.py --models resnet18_cifar --batches 128 --devices 4   # simulated devices

One process compiles each train step (or eval step) twice: once with jaxcnn's oneDNN custom
calls on their compiled handlers, once on the Python handlers (registered here under other
target names, which this script's lowering uses for the second executable). Each round times
`--steps` steps of one executable, then of the other, alternating which goes first, so that
this VM's drift between processes and over minutes hits both alike. Prints the median ms per
step of each and their ratio, per model and batch; writes no file.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["simple_cnn", "resnet18_cifar"])
    p.add_argument("--batches", nargs="+", type=int, default=[32, 128])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--what", default="train", choices=["train", "infer"])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=0, help="steps per round (0: enough for ~0.5 s)")
    p.add_argument("--devices", type=int, default=1, help="simulated CPU devices (train only): the batch is split")
    args = p.parse_args(argv)
    if args.devices > 1:  # before jax starts
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={args.devices}").strip()

    import jax
    from jaxcnn import bnorm, dnnl, native, onednn

    if not (native.active() and dnnl.usable() and bnorm.usable()):
        print("the compiled handlers are not active (not built, JAXCNN_NATIVE=0, or no oneDNN): nothing to compare")
        return 1
    targets = {dnnl.TARGET: dnnl._HANDLER, bnorm.FWD_TARGET: bnorm._FWD_HANDLER, bnorm.BWD_TARGET: bnorm._BWD_HANDLER}
    for target, handler in targets.items():
        jax.ffi.register_ffi_target(target + "_python", jax.ffi.pycapsule(handler), platform="cpu")
    real = onednn._custom_call

    @contextlib.contextmanager
    def python_handlers():  # lowerings inside emit the "_python" targets
        onednn._custom_call = lambda target, *a, **k: real(target + "_python" if target in targets else target, *a, **k)
        try:
            yield
        finally:
            onednn._custom_call = real

    import throughput
    print(f"{args.what} step, {args.precision}, {args.devices} device(s), ms per step "
          f"(median of {args.rounds} alternated rounds)")
    print("| model | batch | compiled handlers | Python handlers | ratio | custom calls per step |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for batch in args.batches:
            pick = 0 if args.what == "train" else 1
            steps_of = (lambda: throughput._jax_steps(name, batch, args.precision)[pick]) if args.devices == 1 \
                else (lambda: _sharded_train(name, batch, args.devices))
            fast = steps_of()
            with python_handlers():
                slow = steps_of()
                if args.what == "infer":
                    slow(1)  # the eval step compiles on first use
            fast(1)
            t = time.perf_counter()
            fast(1)
            steps = args.steps or max(1, int(0.5 / max(time.perf_counter() - t, 1e-4)))
            times = {"native": [], "python": []}
            for r in range(args.rounds):
                order = (("native", fast), ("python", slow)) if r % 2 == 0 else (("python", slow), ("native", fast))
                for key, fn in order:
                    t = time.perf_counter()
                    fn(steps)
                    times[key].append((time.perf_counter() - t) / steps * 1e3)
            a, b = np.median(times["native"]), np.median(times["python"])
            calls = _custom_calls(name, batch, args.precision) if args.what == "train" and args.devices == 1 else "-"
            print(f"| {name} | {batch} | {a:.2f} | {b:.2f} | {b / a:.3f} | {calls} |", flush=True)
    return 0


def _sharded_train(name: str, batch: int, devices: int):
    """fp32 train steps over `devices` devices, as benchmarks/throughput.py's devices worker."""
    import jax
    import jaxcnn
    from jaxcnn.layers import recomputes
    from jaxcnn.train.state import create_train_state, data_sharded, make_mesh, replicated
    from jaxcnn.train.step import make_train_step

    import throughput
    size = jaxcnn.model_info(name).image_size
    model = jaxcnn.create_model(name, num_classes=10)
    mesh = make_mesh(devices)
    tx, batch_np, stats = throughput._adamw_and_batch(batch, size)
    box = {"s": jax.jit(lambda: create_train_state(model, tx, image_size=size, seed=0),
                        out_shardings=replicated(mesh))()}
    data = jax.device_put(batch_np, data_sharded(mesh))
    step = make_train_step(augment=None, mesh=mesh, recomputes=recomputes(model), **stats)
    step = step.lower(box["s"], data).compile()  # now, under the caller's choice of handlers

    def run(n):
        s = box["s"]
        for _ in range(n):
            s, m = step(s, data)
        jax.block_until_ready(m["loss"])
        box["s"] = s
    return run


def _custom_calls(name: str, batch: int, precision: str) -> int:
    """The oneDNN weight-gradient and BatchNorm calls in one compiled train step."""
    import re

    import jax
    import jaxcnn
    from jaxcnn.layers import recomputes
    from jaxcnn.train.precision import compute_dtype
    from jaxcnn.train.state import create_train_state
    from jaxcnn.train.step import make_train_step

    import throughput
    size, dtype = jaxcnn.model_info(name).image_size, compute_dtype(precision)
    model = jaxcnn.create_model(name, num_classes=10, dtype=dtype)
    tx, batch_np, stats = throughput._adamw_and_batch(batch, size, 10)
    state = jax.eval_shape(lambda: create_train_state(model, tx, image_size=size, seed=0, precision=precision,
                                                      dtype=dtype))
    step = make_train_step(augment=None, compute_dtype=dtype, recomputes=recomputes(model), **stats)
    text = step.lower(state, batch_np).compile().as_text()
    return len(re.findall(r'custom_call_target="jaxcnn_dnnl_', text))


if __name__ == "__main__":
    sys.exit(main())
