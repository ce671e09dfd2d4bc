"""jaxcnn vs PyTorch, side by side: training and inference images/s, compile time, peak memory,
the input pipeline, and data-parallel overhead. Writes a markdown table to benchmarks/RESULTS.md.

    python benchmarks/throughput.py                       # every model, 2 batch sizes, fp32+bf16
    python benchmarks/throughput.py --models resnet18_cifar --batch-sizes 128 --precisions fp32
    python benchmarks/throughput.py --quick               # smoke run (tiny, seconds per model)

Method. Each (model, batch, precision) runs in fresh subprocesses. They build jaxcnn's own jitted
train step (jaxcnn.train.step: preprocessing of uint8 input, forward, backward, AdamW, BatchNorm
update, state donated) and eval step, and the same architecture in PyTorch (jaxcnn.torch_ref: the
parity tests' reference modules; eager and torch.compile'd, channels-last, AdamW, bf16 by CPU/CUDA
autocast). In fp32 it also times jaxcnn with jaxcnn.ops switched off ("plain ops"). Each
framework runs in a process of its own (sharing one slowed XLA's steps by a third), one after
another as a user would run it: warm-up, then timed rounds back to back, all training rounds
before the inference ones (as a training loop runs); each figure is the median over rounds.
`--alternate` makes the processes take turns instead, one round each, which cancels slow drifts
of a noisy machine but skewed the figures on the project's VM (see _run_sides). `--passes N` runs
each case's processes N times, one after another as above, the frameworks' order reversed every
other pass, and reports medians over passes and, as ratios, the median of each pass's own ratio:
drifts over minutes then move both sides of a ratio together.
Peak memory is measured in two more subprocesses, one per framework running only its training
step (host peak RSS on a CPU; peak device memory on a GPU). The arithmetic-rate table turns
the images/s into GFLOP/s (the model's flops per image from XLA's cost analysis, `_model_gflop`)
next to a large matrix multiply's rate in each framework (`worker_gemm`), to show how close to
the CPU's limit a figure is. Speed targets live here, never in the unit tests.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Dict, List, Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MODELS = ["simple_cnn", "resnet18_cifar", "densenet_bc_100_12", "resdensenet_cifar", "resdensenet"]


def default_batches(image_size: int, gpu: bool = False) -> List[int]:
    """Two batch sizes per model: the CPU's [32, 128] (224 px: [8, 32]); on a GPU, where those
    leave most of the chip idle, [128, 512] (224 px: [32, 128])."""
    if gpu:
        return [128, 512] if image_size <= 64 else [32, 128]
    return [32, 128] if image_size <= 64 else [8, 32]


def _gpu_present() -> bool:
    """Whether JAX's default backend is a GPU (the parent asks once; its workers inherit the
    answer through the arguments it gives them)."""
    import jax
    return jax.default_backend() == "gpu"


def _device_peak_mb(framework: str) -> Optional[float]:
    """Peak device memory of this process so far, MB (None on a CPU)."""
    if framework == "jax":
        import jax
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        return stats.get("peak_bytes_in_use", 0) / 2**20 if stats else None
    import torch
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


# ----------------------------------------------------------------------------- workers
def _adamw_and_batch(batch: int, size: int, num_classes: int = 10):
    """What every jaxcnn worker steps with: AdamW (its hyperparameters do not change its cost),
    one fixed random uint8 batch (numpy), and the steps' class count and input normalisation."""
    from jaxcnn.train import TrainConfig
    from jaxcnn.train.optim import make_optimizer

    tx, _ = make_optimizer(TrainConfig(optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4), 100)
    rng = np.random.default_rng(0)
    data = {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (batch,), dtype=np.int32),
            "mask": np.ones((batch,), bool)}
    return tx, data, dict(num_classes=num_classes, mean=(120.0,) * 3, std=(64.0,) * 3)


def _jax_steps(name: str, batch: int, precision: str, num_classes: int = 10, plain_ops: bool = False,
               remat: Optional[bool] = None):
    """jaxcnn's train/eval steps. `plain_ops`: trace with jaxcnn.ops switched off (plain Flax/XLA
    layers), to show what the library's CPU kernels change. `remat`: the dense-block field (None:
    the model's default, which stores)."""
    import jax
    import jaxcnn
    from jaxcnn.train.precision import compute_dtype
    from jaxcnn.train.state import create_train_state
    from jaxcnn.layers import recomputes
    from jaxcnn.train.step import make_eval_step, make_fold_step, make_train_step

    from jaxcnn import ops

    size = jaxcnn.model_info(name).image_size
    dtype = compute_dtype(precision)
    model = jaxcnn.create_model(name, num_classes=num_classes, dtype=dtype, **({} if remat is None else dict(remat=remat)))
    tx, batch_np, stats = _adamw_and_batch(batch, size, num_classes)
    state = jax.jit(lambda: create_train_state(model, tx, image_size=size, seed=0, precision=precision,
                                               dtype=dtype))()
    data = jax.device_put(batch_np)
    evaluate = make_eval_step(compute_dtype=dtype, **stats)
    fold = make_fold_step(compute_dtype=dtype)
    t0 = time.perf_counter()
    with ops.enabled(not plain_ops):  # the switches are read while tracing
        train = make_train_step(augment=None, compute_dtype=dtype, recomputes=recomputes(model), **stats)
        compiled = train.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    jaxcnn.release_free_memory()  # as the training loop does after its first step
    mem = compiled.memory_analysis()
    xla_bytes = None
    if mem is not None:
        xla_bytes = sum(getattr(mem, k, 0) or 0 for k in
                        ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes"))
    box = {"state": state}

    def train_n(n):
        s = box["state"]
        for _ in range(n):
            s, m = compiled(s, data)
        jax.block_until_ready(m["loss"])
        box["state"] = s

    def infer_n(n):  # compiled on first use (never in the memory runs), with jaxcnn.ops on
        # As the training loop's evaluation and Predictor do: the conv-BN units' BatchNorm folded
        # into their kernels once per pass over the data, here once per round (timed with it).
        folded = fold(box["state"], image_shape=(size, size, 3))
        for _ in range(n):
            out = evaluate(box["state"], data, folded)
        jax.block_until_ready(out["pred"])

    return train_n, infer_n, compile_s, xla_bytes


def _model_gflop(name: str, batch: int, num_classes: int = 10) -> Dict:
    """The model's arithmetic per image, GFLOP, as XLA's cost analysis counts it in the plain Flax
    graph (jaxcnn.ops off, dense blocks stored rather than recomputed, lowered, not compiled):
    the eval step's forward pass and the whole train step (forward, backward, AdamW). Convolutions
    count 2 flops per multiply-add over the taps that fall inside the image (padding excluded), so
    resnet18_cifar's forward is 0.97 GFLOP, not the 1.11 of the usual 0.56 GMAC. jaxcnn's own
    kernels do the same multiply-adds or fewer (DenseNet transitions pool before their 1x1
    convolution), so a rate from this count is the model's work over the step's time."""
    import jax
    import jaxcnn
    from jaxcnn import ops
    from jaxcnn.train.state import create_train_state
    from jaxcnn.train.step import make_eval_step, make_train_step

    size = jaxcnn.model_info(name).image_size
    model = jaxcnn.create_model(name, num_classes=num_classes)  # dense blocks store by default
    tx, data, stats = _adamw_and_batch(batch, size, num_classes)
    state = jax.eval_shape(lambda: create_train_state(model, tx, image_size=size, seed=0))  # shapes only
    out = {}
    with ops.enabled(False):
        for key, step in (("train_gflop", make_train_step(augment=None, **stats)), ("infer_gflop", make_eval_step(**stats))):
            try:  # on the H200 (jax 0.11.2) this gave no flop count: no rate table there
                cost = step.lower(state, data).cost_analysis()
            except Exception:
                continue
            cost = cost[0] if isinstance(cost, list) else cost
            if cost and cost.get("flops"):
                out[key] = cost["flops"] / batch / 1e9
    return out


def _torch_steps(name: str, batch: int, precision: str, num_classes: int = 10, compiled: bool = False):
    import contextlib
    import torch
    import torch.nn.functional as F
    import jaxcnn
    from jaxcnn.torch_ref import torch_model

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    else:  # fixed shapes: let cuDNN pick its fastest algorithms, as a tuned PyTorch script does
        torch.backends.cudnn.benchmark = True
    size = jaxcnn.model_info(name).image_size
    model = torch_model(name, num_classes).to(dev).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=1e-4)
    if compiled:
        model = torch.compile(model)
    x = torch.randn(batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    amp = (torch.autocast(device_type=dev.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])
           if precision != "fp32" else contextlib.nullcontext())
    scaler = torch.amp.GradScaler(dev.type) if precision == "fp16" else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def train_n(n):
        model.train()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(model(x), y)
            if scaler is not None:
                scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
            else:
                loss.backward(); opt.step()
        sync()

    def infer_n(n):
        model.eval()
        with torch.no_grad(), amp:
            for _ in range(n):
                model(x)
        sync()
        model.train()

    return train_n, infer_n


def _median_rate(fn, n, batch, rounds):
    ts = []
    for _ in range(rounds):
        t = time.perf_counter(); fn(n); ts.append(time.perf_counter() - t)
    return batch * n / float(np.median(ts))


def _side_steps(a):
    """The timed functions of one side ("jax", "torch" or "torchc") and what it knows already."""
    if a.framework == "jax":
        train, infer, compile_s, xla_bytes = _jax_steps(a.model, a.batch, a.precision)
        fns, info = {"jax_train": train, "jax_infer": infer}, dict(compile_s=compile_s, xla_step_bytes=xla_bytes)
        info.update(_model_gflop(a.model, a.batch))
        if a.plain_ops:
            fns["jax_plain_train"] = _jax_steps(a.model, a.batch, a.precision, plain_ops=True)[0]
        return fns, info
    if a.framework == "torch":
        train, infer = _torch_steps(a.model, a.batch, a.precision)
        return {"torch_train": train, "torch_infer": infer}, {}
    train, infer = _torch_steps(a.model, a.batch, a.precision, compiled=True)
    return {"torchc_train": train, "torchc_infer": infer}, {}  # compiled in the warm-up


PHASES = ("train", "plain_train", "infer")  # the order in which a side's timed rounds run


def _phase(key: str) -> str:
    """"jax_plain_train" -> "plain_train": a timed function's key without its framework."""
    return key.split("_", 1)[1]


def worker_side(a) -> Dict:
    """One framework's steps, timed one round at a time when the parent says so (_run_sides).
    Each framework lives in a process of its own: with PyTorch in the same process, jaxcnn's
    resnet18_cifar step (b128) ran 59 instead of 90 img/s, and inductor's runtime slowed it ~20%.

    Protocol: "phase <name>" runs one untimed step of that phase's function, then each "round"
    times it alone. A training loop runs hundreds of steps between two evaluations; rounds that
    mixed train and inference steps measured the transient after each switch instead (jaxcnn
    resnet18_cifar b128: the first train step after 6 inference steps took 2.1-2.2 s instead of
    1.3-1.6 s, 1.2-1.4 s of it in the kernel mapping fresh memory)."""
    try:
        fns, out = _side_steps(a)
        t0 = time.perf_counter()
        for f in fns.values():  # warm-up: compilation, allocator and thread-pool start-up
            f(1)
        if a.framework == "torchc":  # inductor compiles here (it needs a C++ compiler)
            out["torch_compile_s"] = time.perf_counter() - t0
        peak = _device_peak_mb("jax" if a.framework == "jax" else "torch")
        if peak is not None:  # a GPU: this process's peak over one train and one eval step
            out[f"{a.framework}_peak_mb"] = peak
    except Exception as e:  # e.g. torch.compile without a C++ compiler: report, don't die
        return {"error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"}
    by_phase = {_phase(k): k for k in fns}
    print("READY " + " ".join(by_phase), flush=True)
    times = {k: [] for k in fns}
    key = None
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["phase"]:
            key = by_phase[cmd[1]]
            t = time.perf_counter()
            fns[key](1)  # untimed: the switch from the previous phase
            # Steps per round: at least --steps (2x for inference), and enough for a round of
            # --min-round-s, so that a small model's round is not a few 30 ms steps, where one
            # late thread wake-up moves the figure by a third.
            n = a.steps if "train" in key else 2 * a.steps
            n = max(n, int(np.ceil(a.min_round_s / max(time.perf_counter() - t, 1e-6))))
        elif cmd == ["round"] and key is not None:
            t = time.perf_counter(); fns[key](n); times[key].append(a.batch * n / (time.perf_counter() - t))
        else:
            break
        print("DONE", flush=True)
    out.update({k: float(np.median(v)) for k, v in times.items() if v})
    return out


def worker_memory(a) -> Dict:
    if a.framework == "jax":
        import jax
        train, _, _, _ = _jax_steps(a.model, a.batch, a.precision, remat=True if a.remat else None)
        train(1)
        t = time.perf_counter(); train(2)
        rate = 2 * a.batch / (time.perf_counter() - t)
        dev = jax.devices()[0]
        stats = dev.memory_stats() if dev.platform != "cpu" else None
        if stats:
            return dict(peak_mb=stats.get("peak_bytes_in_use", 0) / 2**20, kind="device", train_img_s=rate)
        return dict(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kind="host RSS",
                    train_img_s=rate)
    else:
        import torch
        train, _ = _torch_steps(a.model, a.batch, a.precision)
        train(3)
        if torch.cuda.is_available():
            return dict(peak_mb=torch.cuda.max_memory_allocated() / 2**20, kind="device")
    return dict(peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, kind="host RSS")


def _sharded_train(name: str, batch: int, devices: int):
    """run(n): n fp32 train steps of jaxcnn's step with `batch` split over `devices` devices
    (simulated CPU ones: XLA_FLAGS set before jax starts), the state replicated."""
    import jax
    import jaxcnn
    from jaxcnn.layers import recomputes
    from jaxcnn.train.state import create_train_state, data_sharded, make_mesh, replicated
    from jaxcnn.train.step import make_train_step

    size = jaxcnn.model_info(name).image_size
    model = jaxcnn.create_model(name, num_classes=10)
    mesh = make_mesh(devices)
    tx, batch_np, stats = _adamw_and_batch(batch, size)
    state = jax.jit(lambda: create_train_state(model, tx, image_size=size, seed=0),
                    out_shardings=replicated(mesh))()
    data = jax.device_put(batch_np, data_sharded(mesh))
    step = make_train_step(augment=None, mesh=mesh, recomputes=recomputes(model), **stats)
    box = {"s": state}

    def run(n):
        s = box["s"]
        for _ in range(n):
            s, m = step(s, data)
        jax.block_until_ready(m["loss"]); box["s"] = s
    return run


def worker_devices(a) -> Dict:
    """Same global batch on N simulated CPU devices (XLA_FLAGS set by the parent)."""
    run = _sharded_train(a.model, a.batch, a.devices)
    run(1)
    return dict(devices=a.devices, train_img_s=_median_rate(run, a.steps, a.batch, a.rounds))


def worker_gemm(a) -> Dict:
    """This CPU's dense matrix-multiply rate, GFLOP/s, in one framework: a reference point for the
    models' rates (oneDNN's best direct convolutions ran up to ~20% above it in f32 on the 2-core
    Xeon). The median of --rounds timings of an n x n x n product on random data (zeros
    multiply faster on this CPU), f32 and bf16 operands (bf16 accumulated in f32); n = 4096, on a
    GPU 8192, and 1024 for --quick (a smoke run: its rate says little). Returns the rates and n."""
    n, rng = (1024 if a.quick else 8192 if a.gpu else 4096), np.random.default_rng(0)
    a_np, b_np = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    if a.framework == "jax":
        import jax
        import jax.numpy as jnp
        from jaxcnn import _xla
        dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32),
                      compiler_options=_xla.eval_compiler_options())
        dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16}
        operand, product = jnp.asarray, lambda x, y: dot(x, y).block_until_ready()
    else:
        import torch
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        operand = lambda v, dt: torch.from_numpy(v).to(dev, dt)
        product = lambda x, y: (torch.mm(x, y), sync())
    out = {}
    for prec, dt in dtypes.items():
        x, y = operand(a_np, dt), operand(b_np, dt)
        run = lambda k: [product(x, y) for _ in range(k)]
        run(1)
        # _median_rate's "batch" is the GFLOP of one product: it returns GFLOP/s
        k = 20 if a.gpu else 2  # products per timed round: a GPU's take ~1 ms each
        out[prec] = _median_rate(run, k, 2 * n ** 3 / 1e9, a.rounds)
    return dict(out, n=n)


def _device_rows(a, common: List[str]) -> List[Dict]:
    """The devices workers, `--device-passes` passes over the device counts, one process each.
    This VM's speed drifts by 10-20% over minutes, more than the overhead measured, so each
    pass's overhead is taken against the 1-device run of the same pass, and the medians over
    passes are reported (rate and overhead).

    Each pass also runs one device at each count's per-device batch (128 / N): N devices run N
    such steps side by side on the same cores, so its overhead against the batch-128 run is
    the part of N devices' overhead that comes from the smaller per-device batch rather than
    from the devices' collectives and waits (on the 2-core Xeon it was all of it)."""
    passes = {n: [] for n in a.devices or []}
    alone = {n: [] for n in passes if n > 1 and 1 in passes and 128 % n == 0}
    for i in range(a.device_passes if passes else 0):
        for n in passes:
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                              f" --xla_force_host_platform_device_count={n}").strip())
            r = _run_worker(["devices", "--num-devices", str(n), "--model", a.devices_model, "--batch", "128"]
                            + common, env=env)
            passes[n].append(r.get("train_img_s"))
            print(f"    pass {i + 1}, {n} devices:", r, flush=True)
        for n in alone:
            r = _run_worker(["devices", "--num-devices", "1", "--model", a.devices_model,
                             "--batch", str(128 // n)] + common)
            alone[n].append(r.get("train_img_s"))
            print(f"    pass {i + 1}, 1 device at batch {128 // n}:", r, flush=True)
    def summary(rates, base):  # medians of the rates and of each pass's overhead against `base`
        over = [b / v - 1 for b, v in zip(base, rates) if b and v]
        ok = [v for v in rates if v]
        return (float(np.median(ok)) if ok else None), (float(np.median(over)) if over else None), over

    rows = []
    for n, rates in passes.items():
        base = passes.get(1, [None] * len(rates))
        img_s, overhead, overheads = summary(rates, base)
        row = dict(n=n, train_img_s=img_s, rates=rates, overhead=overhead, overheads=overheads)
        if n in alone:
            row["alone_img_s"], row["alone_overhead"], row["alone_overheads"] = summary(alone[n], base)
        rows.append(row)
    return rows


def worker_pipeline(a) -> Dict:
    """Images/s of the data path alone: CIFAR-10 in memory (augmented in jit) and JPEG decoding."""
    import glob
    from jaxcnn.data import AugmentConfig, load_data, pipeline_throughput
    from jaxcnn.data.decode import decode_files

    out = {}
    if a.data_dir:
        splits = load_data(data_dir=a.data_dir)
        for label, aug in [("pad-crop+flip", AugmentConfig()),
                           ("+rotation/shift/zoom+colour", AugmentConfig(rotation=15, shift=0.1, zoom=0.1,
                                                                          brightness=0.2, contrast=0.2,
                                                                          saturation=0.1))]:
            # A step here takes ~10 ms: at least 50 per round, median over the rounds.
            out[f"cifar10 in memory, {label}, batch 128"] = float(np.median([pipeline_throughput(
                splits.train, 128, aug, steps=max(50, a.steps * 25)) for _ in range(a.rounds)]))
        files = sorted(glob.glob(os.path.join(a.data_dir, "train", "*", "*.jpg")))[:: 50][:512]
        t = time.perf_counter(); decode_files(files, 224)
        out["JPEG folder, decode + resize to 224 (first epoch; later epochs use the uint8 cache)"] = \
            len(files) / (time.perf_counter() - t)
    return out


# ----------------------------------------------------------------------------- driver
def _worker_cmd(args: List[str], script: str = __file__) -> List[str]:
    return [sys.executable, os.path.abspath(script), "--worker", *args]


def _result(stdout: str, stderr: str) -> Dict:
    """A worker's RESULT line, or {"error": the last line it wrote to stderr}."""
    lines = [l for l in stdout.splitlines() if l.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][7:])
    return {"error": (stderr.strip().splitlines() or ["no output"])[-1][:200]}


def _run_worker(args: List[str], env=None, script: str = __file__) -> Dict:
    """`script --worker ARGS` in a process of its own: its RESULT, or {"error": ...}."""
    p = subprocess.run(_worker_cmd(args, script), capture_output=True, text=True, env=env)
    return _result(p.stdout if p.returncode == 0 else "", p.stderr)


def _launch_side(args: List[str]):
    """Start a `--worker side` process (it compiles and warms up on its own): (process, stderr file)."""
    import tempfile
    err = tempfile.TemporaryFile(mode="w+")  # a pipe could fill up with warnings and block
    p = subprocess.Popen(_worker_cmd(["side", *args]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=err, text=True)
    return p, err


def _await_side(p, err):
    """Wait for a launched side's READY: (process, stderr file, the phases it times), or
    (None, its result, None) if it stopped before READY."""
    line = p.stdout.readline()
    while line and not line.startswith(("READY", "RESULT ")):
        line = p.stdout.readline()
    if line.startswith("READY"):
        return p, err, line.split()[1:]
    return None, _finish(p, err, stdout=line), None


def _start_side(args: List[str]):
    """A warmed-up `--worker side` process (see _await_side)."""
    return _await_side(*_launch_side(args))


def _send(p, msg: str):
    try:
        p.stdin.write(msg + "\n"); p.stdin.flush()
    except BrokenPipeError:  # the side died: _finish reports its error
        return
    line = "?"
    while line and not line.startswith("DONE"):  # "" is EOF: the side died
        line = p.stdout.readline()


def _finish(p, err, stdout: str = "") -> Dict:
    """Tell a side to stop and read its result (the medians, or its error)."""
    rest, _ = p.communicate("end\n")
    err.seek(0)
    res = _result(stdout + rest, err.read())
    err.close()
    return res


def _run_sides(sides: List[List[str]], rounds: int, alternate: bool = False, ready=None) -> Dict:
    """One `--worker side` process per entry of `sides` (jaxcnn, PyTorch eager, PyTorch compiled).

    Default: one framework at a time, as a user runs it: start, warm up, `rounds` timed rounds back
    to back, exit; then the next. `alternate`: start all (one after another, so compile times are
    measured on a quiet machine), then take turns, one round each. Alternating cancels slow drifts
    of a noisy machine, but on the project's 2-core VM it skewed both frameworks: resnet18_cifar
    b128, jaxcnn 87 img/s alone and 59 alternating with PyTorch; PyTorch 76 alone and 100
    alternating (the PyTorch process, idle, used no CPU; the cause was not found). A failed side
    reports "<framework>_error" and the others go on. Within a side, every round of one phase
    (train, plain-ops train, inference) runs before the next phase starts (see worker_side).
    `ready`: the sides' processes, already started and warmed up (`_launch_side`, `_await_side`;
    see `--prestart`), one per entry of `sides`: timed here as above."""
    out = {}

    def collect(fw, res):
        out.update({(f"{fw}_error" if k == "error" else k): v for k, v in res.items()})

    def run(group):
        for phase in PHASES:
            sides = [p for _, p, _, phases in group if phase in phases]
            for p in sides:
                _send(p, f"phase {phase}")
            for _ in range(rounds):
                for p in sides:
                    _send(p, "round")
        for fw, p, err, _ in group:
            collect(fw, _finish(p, err))

    live = []
    for i, args in enumerate(sides):
        fw = args[args.index("--framework") + 1]
        p, err, phases = ready[i] if ready else _start_side(args)
        if p is None:
            collect(fw, err)
            continue
        live.append((fw, p, err, phases))
        if not alternate:
            run(live)
            live = []
    run(live)
    return out


def _pass_ratios(r: Dict) -> Dict:
    """A run's ratios, jaxcnn / PyTorch eager and / the faster of eager and compiled (the report's
    columns; with --passes, each pass's)."""
    out = {}
    for what in ("train", "infer"):
        j, eager, comp = r.get(f"jax_{what}"), r.get(f"torch_{what}"), r.get(f"torchc_{what}")
        if j and eager:
            out[f"ratio_{what}"] = j / eager
        if j and (eager or comp):
            out[f"ratio_{what}_best"] = j / max(t for t in (eager, comp) if t)
    return out


def _merge_passes(passes: List[Dict]) -> Dict:
    """Several passes of one case (`--passes`): each number the median over the passes that have it,
    each ratio the median of the passes' own ratios (a framework measured minutes apart from the
    other on a VM whose speed drifts is compared within its pass), and `pass_ratios` the list."""
    out = {}
    for key in dict.fromkeys(k for r in passes for k in r):
        nums = [r[key] for r in passes if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        out[key] = float(np.median(nums)) if nums else next(r[key] for r in passes if key in r)
    per = [_pass_ratios(r) for r in passes]
    for key in dict.fromkeys(k for p in per for k in p):
        out[key] = float(np.median([p[key] for p in per if key in p]))
    out["pass_ratios"] = per
    return out


def machine() -> Dict:
    from jaxcnn.train.report import environment
    env = environment()
    try:
        import torch
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()} (PyTorch's)"
            env["tf32"] = (f"PyTorch cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
                           f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    except ImportError:
        env["torch"] = None
    env["commit"] = _commit()
    return env


def _commit() -> str:
    """The git commit of the jaxcnn that is measured (the checkout or worktree it is imported
    from), marked when it has uncommitted changes; 'not a git checkout' for an installed copy."""
    import subprocess
    import jaxcnn
    given = os.environ.get("JAXCNN_COMMIT")  # a copy of a checkout (a lent GPU machine) whose .git
    if given:                                 # may be older than its files: the caller says which
        return f"{given} (as stated by JAXCNN_COMMIT)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(jaxcnn.__file__)))
    git = lambda *a: subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return "not a git checkout"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "not a git checkout"
    return head.stdout.strip() + (" with uncommitted changes" if dirty else "")


def _gpu_memory_rows(rows) -> List[Dict]:
    """On a GPU the side workers report their own peak device memory (one train and one eval step
    after compilation): one row per case."""
    return [dict(model=r["model"], batch=r["batch"], precision=r["precision"], jax=r.get("jax_peak_mb"),
                 torch=r.get("torch_peak_mb"), kind="device",
                 xla_mb=r["xla_step_bytes"] / 2**20 if r.get("xla_step_bytes") else None) for r in rows
            if r.get("jax_peak_mb") or r.get("torch_peak_mb")]


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def _fresh_memory(mib: int = 256, wait: float = 3.0) -> str:
    """What fresh memory costs on this machine, in ms per GiB touched: `mib` MiB allocated and
    written just after the same amount was freed, and again after it sat free for `wait` s. On a VM
    whose kernel reports free pages to its host (virtio-balloon free page reporting,
    /sys/module/page_reporting) the second is 10-20x the first (the project's EPYC VM: ~100
    against ~1,200 ms/GiB): the host took the pages back and faults them in again. Both
    frameworks allocate every step's large buffers afresh, so a step that leaves memory free for
    long pays this, and timings on such a VM swing with it."""
    def touch() -> float:
        t = time.perf_counter()
        np.empty(mib << 18, np.float32).fill(1.0)  # mib MiB of float32, freed on return
        return (time.perf_counter() - t) * 1e3 * 1024 / mib
    touch()  # first touch: pages this process never had
    hot = touch()
    time.sleep(wait)
    cold = touch()
    order = None
    try:
        with open("/sys/module/page_reporting/parameters/page_reporting_order") as f:
            order = f.read().strip()
    except OSError:
        pass
    where = (f"this kernel reports free pages to its host, page_reporting_order {order}" if order
             else "no free page reporting found")
    return f"{hot:,.0f} ms/GiB just freed, {cold:,.0f} after {wait:g} s free; {where}"


def fmt(v, nd=0):
    return "—" if v is None else f"{v:,.{nd}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batch-sizes", nargs="+", type=int, help="default: 32 128 (32 px), 8 32 (224 px)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds (median reported)")
    ap.add_argument("--steps", type=int, default=2, help="train steps per timed round (inference: 2x)")
    ap.add_argument("--min-round-s", type=float, default=1.0,
                    help="more steps per timed round for fast models, so a round lasts this long")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--passes", type=int, default=1,
                    help="run each case's processes this many times, the frameworks' order reversed every "
                         "other pass; figures are medians over passes, ratios medians of same-pass ratios")
    ap.add_argument("--alternate", action="store_true",
                    help="frameworks take turns, one round each (default: one after another)")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                    help="skip the torch.compile columns (fp32 only; inductor needs a C++ compiler)")
    ap.add_argument("--no-plain-ops", dest="plain_ops", action="store_false",
                    help="skip the fp32 column that traces jaxcnn with jaxcnn.ops switched off")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--devices", nargs="*", type=int, default=[1, 2, 4],
                    help="simulated CPU device counts for the data-parallel overhead (empty: skip)")
    ap.add_argument("--devices-model", default="resnet18_cifar")
    ap.add_argument("--device-passes", type=int, default=3,
                    help="passes over the device counts (overheads are medians of same-pass ratios)")
    ap.add_argument("--data-dir", help="CIFAR-10 image folder for the input-pipeline figures")
    ap.add_argument("--quick", action="store_true", help="1 round, 1 step, first model only")
    ap.add_argument("--prestart", type=int, default=0,
                    help="start (compile, warm up) the processes of up to N cases side by side, then "
                         "time them one at a time; default 1 on a CPU (compile times on a quiet machine), "
                         "8 on a GPU (its host has the cores; compile s then overlap)")
    ap.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
    # worker-only arguments
    ap.add_argument("--worker", choices=["side", "memory", "devices", "pipeline", "gemm"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    ap.add_argument("--framework", help=argparse.SUPPRESS)
    ap.add_argument("--num-devices", dest="ndev", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--remat", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--gpu", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        if a.worker == "devices":
            a.devices = a.ndev
        res = {"side": worker_side, "memory": worker_memory, "devices": worker_devices,
               "pipeline": worker_pipeline, "gemm": worker_gemm}[a.worker](a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import jaxcnn
    unknown = [m for m in a.models if m not in jaxcnn.list_models()]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(jaxcnn.list_models())}")
    if a.passes < 1:
        ap.error(f"--passes {a.passes}: give 1 or more")
    if a.passes > 1 and a.prestart > 1:
        ap.error("--passes runs each case's processes anew every pass; it cannot be combined with --prestart")
    if a.quick:
        a.rounds, a.steps, a.min_round_s, a.models, a.device_passes = 1, 1, 0.0, a.models[:1], 1
    gpu = _gpu_present()
    if gpu and a.devices:  # one GPU here: the simulated-CPU-devices table would not measure it
        print("a GPU is present: skipping the simulated CPU devices (--devices)", flush=True)
        a.devices = []
    command = "python benchmarks/throughput.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_start = _loadavg()
    fresh_start = _fresh_memory(wait=0.1 if a.quick else 3.0)  # --quick: a smoke run
    common = ["--rounds", str(a.rounds), "--steps", str(a.steps)]  # devices and pipeline workers
    rows, mem_rows = [], []
    env = dict(machine(), load=f"{load_start} at start", fresh=fresh_start)

    def report(gemm=None, dev_rows=(), pipe=None):  # after every case: a cut-short run keeps its rows
        write_report(a.out, command, dict(env, load=f"{load_start} at start, {_loadavg()} at end"), rows,
                     mem_rows if not gpu else _gpu_memory_rows(rows), list(dev_rows), pipe or {},
                     a.min_round_s, gemm)

    cases = [(name, b, precision) for name in a.models for precision in a.precisions
             for b in (a.batch_sizes or default_batches(jaxcnn.model_info(name).image_size, gpu))]
    prestart = 1 if a.passes > 1 else (a.prestart or (8 if gpu else 1))
    for i in range(0, len(cases), prestart):
        chunk = []
        for name, b, precision in cases[i:i + prestart]:
            fp32 = precision == "fp32"
            frameworks = ["jax"] + ([] if a.skip_torch else ["torch"]) + \
                (["torchc"] if fp32 and a.torch_compile and not a.skip_torch else [])
            sides = [["--framework", fw, "--model", name, "--batch", str(b), "--precision", precision,
                      "--steps", str(a.steps), "--min-round-s", str(a.min_round_s)]
                     + ([] if fp32 and a.plain_ops else ["--no-plain-ops"]) for fw in frameworks]
            chunk.append((name, b, precision, sides))
        ready = None
        if prestart > 1:  # compile side by side; every side is READY (idle) before any is timed
            print(f"[{time.strftime('%H:%M:%S')}] starting {sum(len(c[3]) for c in chunk)} processes "
                  f"for {len(chunk)} cases", flush=True)
            launched = [[_launch_side(args) for args in c[3]] for c in chunk]
            ready = [[_await_side(*l) for l in ls] for ls in launched]
        for j, (name, b, precision, sides) in enumerate(chunk):
            size = jaxcnn.model_info(name).image_size
            print(f"[{time.strftime('%H:%M:%S')}] {name} {size}px batch {b} {precision} ...", flush=True)
            if a.passes > 1:
                r = _merge_passes([_run_sides(sides if k % 2 == 0 else sides[::-1], a.rounds, a.alternate)
                                   for k in range(a.passes)])
            else:
                r = _run_sides(sides, a.rounds, a.alternate, ready=ready[j] if ready else None)
            rows.append(dict(model=name, size=size, batch=b, precision=precision, **r))
            print("   ", r, flush=True)
            report()
        for name in dict.fromkeys(c[0] for c in chunk):
            if a.no_memory or gpu or any(c[0] == name for c in cases[i + prestart:]):
                continue  # a model's memory runs follow its last case (on a GPU: from the sides)
            b = max(a.batch_sizes or default_batches(jaxcnn.model_info(name).image_size))
            mem = {fw: _run_worker(["memory", "--framework", fw, "--model", name, "--batch", str(b),
                                    "--precision", "fp32"])
                   for fw in (["jax"] if a.skip_torch else ["jax", "torch"])}
            if "remat" in getattr(jaxcnn.create_model(name), "__dataclass_fields__", {}):
                mem["jax_remat"] = _run_worker(["memory", "--framework", "jax", "--model", name, "--batch",
                                                str(b), "--precision", "fp32", "--remat"])
            xla = next((r.get("xla_step_bytes") for r in rows if r["model"] == name and r["batch"] == b
                        and r["precision"] == "fp32"), None)
            mem_rows.append(dict(model=name, batch=b, **{fw: m.get("peak_mb") for fw, m in mem.items()},
                                 jax_rate=mem["jax"].get("train_img_s"),
                                 remat_rate=mem.get("jax_remat", {}).get("train_img_s"),
                                 xla_mb=xla / 2**20 if xla else None,
                                 kind=next(iter(mem.values())).get("kind", "")))
            print("    memory", mem, flush=True)
            report()
    gemm = {fw: _run_worker(["gemm", "--framework", fw] + common + (["--gpu"] if gpu else [])
                            + (["--quick"] if a.quick else []))
            for fw in (["jax"] if a.skip_torch else ["jax", "torch"])}
    report(gemm)
    dev_rows = _device_rows(a, common)
    pipe = _run_worker(["pipeline", "--data-dir", a.data_dir] + common) if a.data_dir else {}
    report(gemm, dev_rows, pipe)
    print(f"wrote {a.out}")
    return 0


def write_report(path, command, env, rows, mem_rows, dev_rows, pipe, min_round_s=0.0, gemm=None):
    from jaxcnn import _xla
    L = ["# jaxcnn vs PyTorch: measured throughput", "",
         f"Command: `{command}`  ", f"Commit: {env.get('commit')}  ",
         f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  ",
         f"Machine: {env.get('cpu')}, {env.get('cpu_cores')} cores"
         + (f", GPU {env['gpu']}" if env.get("gpu") else ", no GPU") + f"; JAX platform {env.get('platform')}  ",
         f"Versions: jax {env.get('jax')}, jaxlib {env.get('jaxlib')}, flax {env.get('flax')}, "
         f"optax {env.get('optax')}, torch {env.get('torch')}, Python {env.get('python')}  ",
         *([f"GPU: {env['gpu']}; {env.get('cuda')}; fp32 convolutions: {env.get('tf32')}; JAX's default "
            "precision (XLA lets cuDNN use TF32 for f32 convolutions and dots); processes of several cases "
            "compiled side by side (--prestart), so their compile s overlap; timed one at a time  "]
           if env.get("gpu") else []),
         f"XLA_FLAGS (set by jaxcnn, see jaxcnn/_xla.py): `{os.environ.get('XLA_FLAGS', '')}`; per-jit "
         f"options: train step `{_xla.train_compiler_options()}` (none for models that recompute), "
         f"eval step `{_xla.eval_compiler_options()}`  ",
         f"GLIBC_TUNABLES (set by jaxcnn's entry points for both frameworks, see jaxcnn/_malloc.py): "
         f"`{os.environ.get('GLIBC_TUNABLES', '')}`  ",
         f"Load average (1/5/15 min): {env.get('load')}. PyTorch's OpenMP threads slow down far more "
         "than XLA's when other processes share the cores, so only figures taken at a load below ~0.5 "
         "per core compare the frameworks fairly.  ",
         *([f"Fresh memory at the start (touching newly allocated pages): {env['fresh']}. Where the "
            "second figure is far above the first, the host reclaims freed memory and timings swing with "
            "how long each step leaves its buffers free (benchmarks/NOTES.md, session 20)."]
           if env.get("fresh") else []), "",
         "Training: full step (uint8 input normalised in the step, forward, backward, AdamW, BatchNorm "
         "update). PyTorch: eager and `torch.compile` (fp32 only), channels-last, same batch, AdamW, "
         "precision via autocast. Each framework (jaxcnn, PyTorch eager, PyTorch compiled) runs in a "
         "process of its own, " + ("the processes taking turns, one timed round each (--alternate). "
                                   if "--alternate" in command else
                                   ("one after another, its timed rounds back to back, as a user runs it: every "
                                    "training round, with one untimed step first, before the inference rounds. "))
         + "(Sharing one process slowed jaxcnn's steps: resnet18_cifar b128 59 instead of 90 img/s with "
         "PyTorch eager beside it. Taking turns skewed both frameworks on this VM, jaxcnn down and PyTorch "
         "up; see `_run_sides` in the script.) \"plain ops\": jaxcnn traced with "
         "`jaxcnn.ops` switched off (plain Flax/XLA convolution, max-pool and BatchNorm), in the jaxcnn "
         "process, to show what the library's CPU kernels change. A round is --steps steps (2x for "
         f"inference), or more if that takes less than {min_round_s:g} s (--min-round-s). "
         "jaxcnn's inference is its eval step as its evaluation and `Predictor` run it: each conv-BN "
         "unit's BatchNorm folded into the kernel once per pass over the data (`make_fold_step`), here "
         "once per timed round, the fold included in the round's time. "
         "Images/s are medians over rounds; ratios "
         "are jaxcnn / PyTorch eager and jaxcnn / the faster of PyTorch eager and compiled.", "",
         "| model | px | batch | prec. | compile s | train jaxcnn | plain ops | PyTorch eager | PyTorch compiled "
         "| ratio eager | ratio best | infer jaxcnn | PyTorch eager | PyTorch compiled | ratio eager | ratio best |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    for r in rows:
        if "jax_error" in r:
            L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | error: {r['jax_error']} |" + "|" * 11)
            continue
        g = r.get
        ratios = r if "pass_ratios" in r else _pass_ratios(r)  # --passes: medians of same-pass ratios
        rt, rtb, ri, rib = (fmt(ratios[k], 2) if ratios.get(k) else "—"
                            for k in ("ratio_train", "ratio_train_best", "ratio_infer", "ratio_infer_best"))
        L.append(f"| {r['model']} | {r['size']} | {r['batch']} | {r['precision']} | {fmt(g('compile_s'), 1)} | "
                 f"{fmt(g('jax_train'), 1)} | {fmt(g('jax_plain_train'), 1)} | {fmt(g('torch_train'), 1)} | "
                 f"{fmt(g('torchc_train'), 1)} | {rt} | {rtb} | {fmt(g('jax_infer'), 1)} | "
                 f"{fmt(g('torch_infer'), 1)} | {fmt(g('torchc_infer'), 1)} | {ri} | {rib} |")
    passed = [r for r in rows if r.get("pass_ratios")]
    if passed:
        show = lambda r, what: ", ".join(fmt(p[f"ratio_{what}"], 2) for p in r["pass_ratios"] if f"ratio_{what}" in p) or "—"
        L += ["", f"--passes: each case's processes ran {len(passed[0]['pass_ratios'])} times, the frameworks' "
              "order reversed every other pass; images/s are medians over passes, ratios medians of each "
              "pass's own ratio. Per pass, jaxcnn / PyTorch eager: "
              + "; ".join(f"{r['model']} b{r['batch']} {r['precision']} training {show(r, 'train')}, "
                          f"inference {show(r, 'infer')}" for r in passed) + "."]
    for fw, what in (("torch", "PyTorch eager"), ("torchc", "torch.compile")):
        errs = [f"{r['model']} b{r['batch']} {r['precision']}: {r[fw + '_error']}" for r in rows if r.get(fw + "_error")]
        if errs:
            L += ["", f"{what} failed for: " + "; ".join(errs)]
    L += _rate_table(rows, gemm or {})
    if mem_rows and "precision" in mem_rows[0]:
        L += ["", "Peak device memory (GPU), MB: each timed process's own peak over one training and one "
              "inference step after compilation (jaxcnn: `peak_bytes_in_use` of XLA's allocator, "
              "XLA_PYTHON_CLIENT_PREALLOCATE=false; PyTorch: `torch.cuda.max_memory_allocated`). Both hold "
              "the weights, AdamW's state, the batch and the step's activations; jaxcnn's also what XLA's compiler "
              "and autotuner allocated (a floor of ~418 MB on the H200). \"XLA plan\": the train step's "
              "arguments + outputs + temporaries as XLA planned them (`memory_analysis`; the donated state may "
              "count twice).", "",
              "| model | batch | prec. | jaxcnn MB | PyTorch MB | jaxcnn / PyTorch | XLA plan MB |",
              "|---|---|---|---|---|---|---|"]
        L += [f"| {m['model']} | {m['batch']} | {m['precision']} | {fmt(m.get('jax'))} | {fmt(m.get('torch'))} | "
              f"{fmt(m['jax'] / m['torch'], 2) if m.get('jax') and m.get('torch') else '—'} | "
              f"{fmt(m.get('xla_mb'))} |" for m in mem_rows]
    elif mem_rows:
        L += ["", "Peak memory of a training step (fp32; one framework per process; host RSS includes each "
              "framework's own runtime and, for jaxcnn, XLA's compiler). Dense blocks store their layers' "
              "activations by default; \"remat=True\": the same model recomputing them in the backward pass. "
              "\"XLA buffers\": what XLA plans for the step (arguments + outputs + temporaries). Images/s "
              "here come from the memory runs (2 steps, not interleaved), to show what remat does to speed.", "",
              "| model | batch | jaxcnn MB | jaxcnn remat=True MB | PyTorch MB | XLA buffers MB | jaxcnn img/s | remat=True img/s | kind |",
              "|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {m['model']} | {m['batch']} | {fmt(m.get('jax'))} | {fmt(m.get('jax_remat'))} | "
              f"{fmt(m.get('torch'))} | {fmt(m.get('xla_mb'))} | {fmt(m.get('jax_rate'), 1)} | "
              f"{fmt(m.get('remat_rate'), 1)} | {m['kind']} |" for m in mem_rows]
    if dev_rows:
        passes = len(dev_rows[0].get("rates", [None]))
        L += ["", "Data parallel, same global batch 128 on N simulated CPU devices (they share the same cores). "
              f"{passes} passes over the device counts, a process per run; overhead = step time / the same "
              "pass's 1-device step time - 1; medians over passes, each pass's figure after it. The last "
              "two columns: one device alone at N devices' per-device batch (128 / N), its images/s and its "
              "overhead against the same pass's batch-128 run: the share of N devices' overhead that the "
              "smaller per-device batch explains by itself.",
              "", "| devices | train img/s | overhead vs 1 | per pass | 1 device at batch 128/N, img/s | "
              "its overhead (per pass) |", "|---|---|---|---|---|---|"]
        pct = lambda o: "—" if o is None else f"{100 * o:.0f}%"
        for d in dev_rows:
            each = ", ".join(pct(o) for o in d.get("overheads", [])) or "—"
            alone = ", ".join(pct(o) for o in d.get("alone_overheads", []))
            alone = f"{pct(d.get('alone_overhead'))} ({alone})" if alone else "—"
            L.append(f"| {d['n']} | {fmt(d.get('train_img_s'), 1)} | {pct(d.get('overhead'))} | {each} | "
                     f"{fmt(d.get('alone_img_s'), 1)} | {alone} |")
    if pipe and "error" not in pipe:
        L += ["", "Input pipeline alone (images/s):", "", "| path | images/s |", "|---|---|"]
        L += [f"| {k} | {fmt(v)} |" for k, v in pipe.items()]
    elif pipe:
        L += ["", f"Input pipeline: error {pipe['error']}"]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def _rate_table(rows, gemm) -> List[str]:
    """Arithmetic rate: each measured figure times the model's GFLOP per image (_model_gflop)."""
    rated = [r for r in rows if r.get("infer_gflop")]
    if not rated:
        return []
    names = {"jax": "XLA (jnp.dot)", "torch": "PyTorch (torch.mm)"}
    mm = "; ".join(f"{names[fw]} fp32 {fmt(g['fp32'])}, bf16 {fmt(g['bf16'])}"
                   for fw, g in gemm.items() if "error" not in g)
    n = next((g["n"] for g in gemm.values() if "n" in g), 4096)  # the size measured (8192 on a GPU)
    L = ["", "Arithmetic rate, GFLOP/s: images/s above x the model's GFLOP per image, counted by XLA's cost "
         "analysis in the plain Flax graph (jaxcnn.ops off, no recompute; convolution taps on padding not "
         "counted; training: forward, backward and AdamW). The same count for both frameworks, so the ratios "
         "are those above; the rates say how much of the CPU's arithmetic each framework uses. "
         + (f"Reference, a {n}^3 matrix multiply on random data in this run: {mm} GFLOP/s." if mm else ""), "",
         "| model | batch | prec. | GFLOP/img train | GFLOP/img infer | train jaxcnn | train PyTorch eager "
         "| infer jaxcnn | infer PyTorch eager |", "|---|---|---|---|---|---|---|---|---|"]
    rate = lambda v, f: fmt(v * f) if (v and f) else "—"
    for r in rated:
        g, t, i = r.get, r.get("train_gflop"), r.get("infer_gflop")
        L.append(f"| {r['model']} | {r['batch']} | {r['precision']} | {fmt(t, 3)} | {fmt(i, 3)} | "
                 f"{rate(g('jax_train'), t)} | {rate(g('torch_train'), t)} | {rate(g('jax_infer'), i)} | "
                 f"{rate(g('torch_infer'), i)} |")
    return L


if __name__ == "__main__":
    # Several worker processes share one GPU: none may take most of its memory up front (JAX's
    # default), and the device-memory figures are then what each step really used.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Both frameworks' workers inherit the huge-page tunable (jaxcnn/_malloc.py): PyTorch's
    # allocator gains from it as much as XLA's, so the ratios compare like with like.
    from jaxcnn import reexec_with_huge_pages
    reexec_with_huge_pages()
    sys.exit(main())
