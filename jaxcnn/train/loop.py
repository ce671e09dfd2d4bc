"""The training loop: data -> jitted steps on a device mesh -> metrics -> checkpoints -> report."""
from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn._malloc import release_free_memory
from jaxcnn.dnnl import settle
from jaxcnn.layers import recomputes
from jaxcnn.train.checkpoint import CheckpointStore, open_for_reading, write_json_atomic
from jaxcnn.train.config import TrainConfig
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.precision import compute_dtype
from jaxcnn.train.recipes import describe
from jaxcnn.train.state import (TrainState, create_train_state, data_sharded, make_mesh, param_count,
                                replicated)
from jaxcnn.train.step import TraceCounter, make_eval_step, make_fold_step, make_train_step, normalization
from jaxcnn.train.whiten import StemError, stem_kernel_path, whitening_init

# fp16: this many skipped (non-finite) steps in a row means the loss scale cannot recover.
MAX_CONSECUTIVE_SKIPS = 25


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step."""


class StopOnInterrupt:
    """Ctrl-C (SIGINT) during training as a request to stop: the loop stops at the next step
    boundary, once the step in flight has finished, and raises KeyboardInterrupt from there; a
    second Ctrl-C raises KeyboardInterrupt where it lands or, with `exit_on_second`, ends the
    process at once (os._exit, like SIGKILL: finished checkpoints stay whole, tests/test_train.py).
    Why not let KeyboardInterrupt fly from anywhere: jaxcnn's oneDNN and BatchNorm kernels
    (jaxcnn.dnnl, jaxcnn.bnorm) are called back through Python inside XLA's computations, and an
    interpreter that exits while one of them is in flight hangs in XLA's teardown (2 of 8 Ctrl-Cs
    at random moments did; jaxcnn.dnnl.settle_at_exit cannot see a step whose outputs were
    never returned). Installed only from the main thread and over
    Python's default handler: a handler of the user's own, or SIGINT ignored, stays as it is."""

    def __init__(self, exit_on_second: bool = False):
        self.requested = False
        self.exit_on_second = exit_on_second
        self._old = None

    def __enter__(self) -> "StopOnInterrupt":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if not self.exit_on_second:
                raise KeyboardInterrupt
            print("\nSecond Ctrl-C: stopping now.", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(128 + signal.SIGINT)
        self.requested = True
        print("\nCtrl-C: stopping after the step in flight (press it again to stop at once).",
              file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt("stopped by Ctrl-C")


# ----------------------------------------------------------------------------- setup
@dataclass
class Run:
    """Everything built from a config and a data set that the epochs need."""
    config: TrainConfig
    data: Any
    mesh: Any
    model: Any
    init_state: Any              # () -> TrainState (jitted; compiled only when a run starts fresh)
    abstract_state: TrainState
    schedule: Any
    steps_per_epoch: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    image_size: int
    train_step: Any
    eval_step: Any
    fold_step: Any
    counter: TraceCounter


def load_data_for(config: TrainConfig):
    """The DataSplits a config describes."""
    from jaxcnn.data import load_data
    return load_data(config.dataset, config.data_dir, image_size=config.image_size,
                     val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                     seed=config.seed, limit_per_class=config.limit_per_class, cache_dir=config.cache_dir)


def build_model(config: TrainConfig, num_classes: int):
    from jaxcnn.models import create_model
    return create_model(config.model, num_classes=num_classes, dtype=compute_dtype(config.precision),
                        **config.model_kwargs)


def check_workdir(workdir: str) -> None:
    """Refuse a work directory that cannot be written before any data is read or step compiled."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"workdir {workdir} is a file, not a folder; pass --workdir a folder path")
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir}: {parent} is not writable; pass --workdir a folder "
                         "you can write to")


def build(config: TrainConfig, data, *, init: bool = True) -> Run:
    """Model, optimizer, mesh, (abstract) state and jitted steps for `config` on `data`."""
    num_classes = data.num_classes
    if config.num_classes is not None and config.num_classes != num_classes:
        raise ValueError(f"num_classes={config.num_classes} but the data set has {num_classes} classes "
                         f"({', '.join(data.class_names[:10])}{', ...' if num_classes > 10 else ''})")
    mesh = make_mesh(config.devices)
    n_dev = mesh.devices.size
    eval_bs = config.eval_batch_size or config.batch_size
    micro = config.batch_size // config.grad_accum_steps
    for what, bs in (("batch_size", config.batch_size), ("eval_batch_size", eval_bs),
                     ("batch_size / grad_accum_steps", micro)):
        if bs % n_dev:
            raise ValueError(f"{what}={bs} is not divisible by the {n_dev} devices in use; "
                             f"pick a multiple of {n_dev} or --devices")
    if num_classes < 2:
        raise ValueError(f"{data.source} has {num_classes} class ({', '.join(data.class_names)}); a "
                         "classifier needs at least two, one sub-folder of images each")
    if len(data.train) < config.batch_size:
        raise ValueError(f"batch_size={config.batch_size} is larger than the {len(data.train)} "
                         f"training images; pass --batch-size {len(data.train)} or less, or more data")
    from jaxcnn.data import Loader
    steps = Loader(data.train, config.batch_size, shuffle=True, drop_last=True, seed=config.seed).steps_per_epoch
    if config.steps_per_epoch:
        steps = min(steps, config.steps_per_epoch)
    image_size = int(data.train.images.shape[1])
    if config.tta_translate >= image_size // 2:  # checked here: the first evaluation comes after an epoch
        raise ValueError(f"tta_translate={config.tta_translate} pixels is too far for {image_size} px "
                         f"images; pass at most {image_size // 2 - 1} (airbench uses 1 at 32 px)")
    dtype = compute_dtype(config.precision)
    model = build_model(config, num_classes)
    tx, schedule = make_optimizer(config, steps)
    mean, std = normalization(config.normalize, data.mean, data.std)
    repl = replicated(mesh)

    def init_fn(init_params=None):
        # lookahead keeps its slow weights where the EMA would be (the two exclude each other)
        return create_train_state(model, tx, image_size=image_size, seed=config.seed,
                                  precision=config.precision, dtype=dtype, init_params=init_params,
                                  ema=config.ema_decay > 0 or config.lookahead > 0)

    try:
        abstract = jax.eval_shape(init_fn)
    except StemError:  # raised by the optimizer's frozen-stem mask: the setting, not the model's build
        raise
    except (TypeError, ValueError) as e:  # e.g. model_kwargs of the wrong type, images too small
        from jaxcnn.models.registry import build_error
        raise build_error(config.model, image_size, e, config.model_kwargs) from e
    init_params = None
    if config.whiten_stem != "off":  # checked now, before any step compiles
        if init:  # ~1 s for 5,000 CIFAR images
            init_params = whitening_init(abstract.params, data.train.images, mean, std)
        else:  # a resumed run restores the kernel; the model must still have one stem
            stem_kernel_path(abstract.params)
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract)
    state = jax.jit(functools.partial(init_fn, init_params), out_shardings=repl) if init else None
    counter = TraceCounter()
    train_step = make_train_step(
        num_classes=num_classes, mean=mean, std=std, augment=config.augment_config(),
        label_smoothing=config.label_smoothing, grad_accum_steps=config.grad_accum_steps,
        ema_decay=config.ema_decay, lookahead=config.lookahead, total_steps=config.epochs * steps,
        compute_dtype=dtype, mesh=mesh, counter=counter, recomputes=recomputes(model))
    eval_step = make_eval_step(num_classes=num_classes, mean=mean, std=std,
                               label_smoothing=config.label_smoothing, use_ema=config.ema_decay > 0,
                               tta_flip=config.tta_flip, tta_translate=config.tta_translate,
                               compute_dtype=dtype, mesh=mesh, counter=counter)
    fold_step = make_fold_step(use_ema=config.ema_decay > 0, compute_dtype=dtype)
    return Run(config, data, mesh, model, state, abstract, schedule, steps, mean, std, image_size,
               train_step, eval_step, fold_step, counter)


# ----------------------------------------------------------------------------- epochs
def evaluate_dataset(run: Run, state: TrainState, ds, stop: Optional[StopOnInterrupt] = None
                     ) -> Dict[str, Any]:
    """Loss, accuracy and predictions of `state` on an ArrayDataset (every example counted once)."""
    from jaxcnn.data import Loader, prefetch, shard_batch
    loader = Loader(ds, run.config.eval_batch_size or run.config.batch_size, shuffle=False, drop_last=False)
    sharding = data_sharded(run.mesh)
    loss = correct = count = 0.0
    preds: List[np.ndarray] = []
    # BatchNorm folded into the conv-BN units' kernels once for the pass, not in every batch
    folded = run.fold_step(state, image_shape=tuple(ds.images.shape[1:]))
    for batch in prefetch(shard_batch(b, sharding) for b in loader.epoch(0)):
        m = jax.device_get(run.eval_step(state, batch, folded))
        mask = np.asarray(batch["mask"])
        loss += float(m["loss_sum"]); correct += float(m["correct"]); count += float(m["count"])
        preds.append(np.asarray(m["pred"])[mask])
        if stop is not None:
            stop.check()
    release_free_memory()  # the eval step's compiler garbage (first call), before training goes on
    return dict(loss=loss / max(count, 1), acc=correct / max(count, 1), count=int(count),
                predictions=np.concatenate(preds) if preds else np.zeros(0, np.int64))


def train_epoch(run: Run, state: TrainState, epoch: int, loop: Dict[str, Any], last_good: str,
                stop: Optional[StopOnInterrupt] = None) -> Tuple[TrainState, Dict[str, float]]:
    """One epoch (0-based `epoch`). Raises NonFiniteLossError naming the step if the loss breaks,
    KeyboardInterrupt if `stop` was requested; either only once the step in flight has finished."""
    from tqdm.auto import tqdm
    from jaxcnn.data import Loader, prefetch, shard_batch
    cfg = run.config
    loader = Loader(run.data.train, cfg.batch_size, shuffle=True, drop_last=True, seed=cfg.seed,
                    alternate_flip=cfg.alternate_flip)
    sharding = data_sharded(run.mesh)
    batches = prefetch(shard_batch(b, sharding) for b in itertools.islice(loader.epoch(epoch), run.steps_per_epoch))
    bar = tqdm(total=run.steps_per_epoch, desc=f"Epoch {epoch + 1}/{cfg.epochs}", unit="step",
               disable=not cfg.progress, leave=False, dynamic_ncols=True)
    sums = dict(loss=0.0, correct=0.0, count=0.0, grad_norm=0.0, update_norm=0.0, param_norm=0.0, steps=0)
    timing = {"t0": time.perf_counter(), "timed_images": 0}
    t_start = timing["t0"]
    skipped = 0

    def consume(i: int, m) -> None:
        nonlocal skipped
        m = jax.device_get(m)
        step = epoch * run.steps_per_epoch + i + 1
        if not bool(m["finite"]):
            if cfg.precision == "fp16":
                skipped += 1
                loop["consecutive_skips"] = loop.get("consecutive_skips", 0) + 1
                if loop["consecutive_skips"] > MAX_CONSECUTIVE_SKIPS:
                    raise NonFiniteLossError(
                        f"fp16: {loop['consecutive_skips']} steps in a row with non-finite gradients "
                        f"up to step {step} (loss scale {float(m['loss_scale']):g}); stopping. "
                        f"{last_good} Try --precision bf16 or a lower learning rate.")
            else:
                raise NonFiniteLossError(
                    f"non-finite loss ({float(m['loss'])}) at step {step} (epoch {epoch + 1}, batch "
                    f"{i + 1} of {run.steps_per_epoch}); stopping. {last_good}")
        else:
            loop["consecutive_skips"] = 0
            n = float(m["count"])
            sums["loss"] += float(m["loss"]) * n
            sums["correct"] += float(m["correct"]); sums["count"] += n
            sums["grad_norm"] += float(m["grad_norm"]); sums["update_norm"] += float(m["update_norm"])
            sums["param_norm"] = float(m["param_norm"]); sums["steps"] += 1
        if i == 0:  # the first step carries the compilation: time from its end
            release_free_memory()  # what the compiler freed, before the peak of step 2
            timing["t0"], timing["timed_images"] = time.perf_counter(), 0
        else:
            timing["timed_images"] += cfg.batch_size
        ips = timing["timed_images"] / max(time.perf_counter() - timing["t0"], 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{sums['loss'] / max(sums['count'], 1):.3f}",
                        acc=f"{100 * sums['correct'] / max(sums['count'], 1):.1f}%",
                        img_s=f"{ips:.0f}", refresh=False)

    pending = None
    try:
        for i, batch in enumerate(batches):
            state, metrics = run.train_step(state, batch)
            if pending is not None:  # read step i-1 while step i runs: keeps the device busy
                consume(*pending)
            pending = (i, metrics)
            if stop is not None:
                stop.check()
        if pending is not None:
            consume(*pending)
    except BaseException:
        settle((state, pending))  # the step dispatched last may still be running
        raise
    finally:
        bar.close()
        batches.close()
    t_end = time.perf_counter()
    timed = timing["timed_images"]
    ips = timed / max(t_end - timing["t0"], 1e-9) if timed else \
        run.steps_per_epoch * cfg.batch_size / max(t_end - t_start, 1e-9)
    out = dict(train_loss=sums["loss"] / max(sums["count"], 1), train_acc=sums["correct"] / max(sums["count"], 1),
               grad_norm=sums["grad_norm"] / max(sums["steps"], 1),
               update_norm=sums["update_norm"] / max(sums["steps"], 1), param_norm=sums["param_norm"],
               images_per_sec=ips,
               train_time=t_end - t_start, skipped_steps=skipped)
    return state, out


def _improved(metric: str, value: float, best: Optional[float]) -> bool:
    if best is None:
        return True
    return value < best if metric.endswith("loss") else value > best


def current_lr(run: Run, state: TrainState) -> float:
    return float(run.schedule(int(state.step))) * float(state.lr_scale)


def update_callbacks(run: Run, state: TrainState, loop: Dict[str, Any], ev: Dict[str, float]
                     ) -> TrainState:
    """Reduce-on-plateau and early stopping, as Keras' callbacks do at the end of an epoch."""
    cfg = run.config
    if cfg.plateau_patience:
        v = ev[cfg.plateau_metric]
        if _improved(cfg.plateau_metric, v, loop["plateau_best"]):
            loop["plateau_best"], loop["plateau_wait"] = v, 0
        else:
            loop["plateau_wait"] += 1
            if loop["plateau_wait"] >= cfg.plateau_patience:
                scale = float(state.lr_scale)
                floor = cfg.plateau_min_lr / cfg.learning_rate
                new = max(scale * cfg.plateau_factor, floor)
                if new < scale:
                    print(f"ReduceLROnPlateau: {cfg.plateau_metric} has not improved for "
                          f"{cfg.plateau_patience} epochs; lr x{new / scale:g} -> {new * cfg.learning_rate:.2E}")
                    state = state.replace(lr_scale=jax.device_put(jnp.float32(new), replicated(run.mesh)))
                loop["plateau_wait"] = 0
    if cfg.early_stopping_patience:
        v = ev[cfg.early_stopping_metric]
        if _improved(cfg.early_stopping_metric, v, loop["early_best"]):
            loop["early_best"], loop["early_wait"] = v, 0
        else:
            loop["early_wait"] += 1
            if loop["early_wait"] >= cfg.early_stopping_patience:
                loop["stopped_early"] = True
                print(f"EarlyStopping: {cfg.early_stopping_metric} has not improved for "
                      f"{cfg.early_stopping_patience} epochs; stopping after epoch {loop['epoch']}.")
    return state


def _new_loop_state() -> Dict[str, Any]:
    return dict(epoch=0, best_val_acc=None, best_epoch=None, plateau_best=None, plateau_wait=0,
                early_best=None, early_wait=0, stopped_early=False, skipped_steps=0, consecutive_skips=0,
                train_time=0.0, epoch_images_per_sec=[])


def _config_diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    ignore = {"resume", "progress", "eval_only", "checkpoint"}
    old, new = json.loads(json.dumps(old, default=list)), json.loads(json.dumps(new, default=list))
    return [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(new)
            if k not in ignore and old.get(k) != new[k]]


def _restore_or_init(run: Run, store: CheckpointStore, cfg_dict: Dict[str, Any]
                     ) -> Tuple[TrainState, Dict[str, Any], bool]:
    """(state, loop state, resumed): the latest checkpoint if there is one (after checking that it
    fits this run), else a freshly initialised state."""
    latest = store.latest_epoch()
    if latest is None:
        if run.config.resume:
            raise FileNotFoundError(f"--resume: no checkpoint in {store.directory}")
        return run.init_state(), _new_loop_state(), False
    store.check_compatible(latest, run.abstract_state, cfg_dict, run.data.class_names)
    state, meta = store.restore(latest, run.abstract_state)
    changed = _config_diff(meta["config"], cfg_dict)
    print(f"Resuming {run.config.workdir} after epoch {meta['loop']['epoch']} (step {int(state.step)})"
          + ("; changed settings: " + "; ".join(changed) if changed else ""))
    return state, meta["loop"], True


# ----------------------------------------------------------------------------- entry points
def train_and_evaluate(config: TrainConfig, *, data=None, exit_on_second_interrupt: bool = False
                       ) -> Dict[str, Any]:
    """Train `config` (resuming from its work directory when it holds checkpoints), evaluate the
    test set with the best (or last) model and write the run's report.

    Args:
      config: the run; see TrainConfig.
      data: DataSplits to use instead of loading `config`'s data set (tests).
      exit_on_second_interrupt: a second Ctrl-C while the first is being honoured ends the
        process at once (the command line's choice); otherwise it raises KeyboardInterrupt.

    Returns:
      The summary written to summary.json.

    Raises:
      IncompatibleCheckpointError: the work directory holds another model's checkpoints.
      NonFiniteLossError: the loss became NaN/Inf (the message names the step).
      KeyboardInterrupt: Ctrl-C; the run stops at the next step, the finished checkpoints kept.
    """
    from jaxcnn.train.report import Reporter
    t_wall = time.perf_counter()
    config = config.validate()
    workdir = os.path.abspath(config.resolved_workdir)
    config = config.replace(workdir=workdir)
    check_workdir(workdir)
    print(describe(config), flush=True)
    if data is None:
        data = load_data_for(config)
    if data.skipped:
        print(f"data: skipped {data.skipped} unreadable files")
    run = build(config, data)
    cfg_dict = config.replace(num_classes=data.num_classes).to_dict()
    store = CheckpointStore(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    try:
        state, loop, resumed = _restore_or_init(run, store, cfg_dict)
    except BaseException:
        store.close()
        raise
    write_json_atomic(os.path.join(workdir, "config.json"), cfg_dict)
    write_json_atomic(os.path.join(workdir, "class_names.json"), list(data.class_names))
    n_params = param_count(state.params)
    ev_name = "val" if data.val is not None else "test"
    ev_ds = data.val if data.val is not None else data.test
    print(f"{config.model}: {n_params:,} parameters; {data.source}: {len(data.train)} train, "
          f"{len(data.val) if data.val is not None else 0} val, {len(data.test)} test, "
          f"{data.num_classes} classes, {run.image_size}px; {run.mesh.devices.size} x "
          f"{run.mesh.devices.flat[0].platform} device(s), {config.precision}; "
          f"{run.steps_per_epoch} steps/epoch of {config.batch_size}")
    chooses = [k for k, on in (("the best epoch", config.keep_best),
                               ("plateau decay", config.plateau_patience > 0),
                               ("early stopping", config.early_stopping_patience > 0)) if on]
    from jaxcnn.models import list_models, model_info
    native = model_info(config.model).image_size
    if run.image_size * 2 <= native:  # legal, but rarely meant: say how to get what was meant
        small = [n for n in list_models()  # resdensenet -> resdensenet_cifar
                 if n.startswith(config.model) and model_info(n).image_size <= run.image_size]
        print(f"note: {config.model} is built for {native} px images and these are {run.image_size} px; "
              f"pass --image-size {native} to resize them" + (f", or use {small[0]}" if small else ""))
    if ev_name == "test" and chooses:
        print(f"warning: no validation split (--val-fraction 0): {', '.join(chooses)} "
              "will be chosen on the test set")
    data_meta = dict(class_names=list(data.class_names), image_size=run.image_size, mean=list(run.mean),
                     std=list(run.std), source=data.source)
    reporter = Reporter(workdir, data.class_names, resume=resumed)
    stop = StopOnInterrupt(exit_on_second_interrupt)
    try:
        with stop:
            state, test, used_epoch = _epochs(run, state, loop, store, reporter, stop, cfg_dict,
                                              data_meta, ev_name, ev_ds)
    except KeyboardInterrupt:
        done = loop["epoch"]
        print(f"\nStopped by Ctrl-C after {done} completed epoch(s). " +
              (f"The checkpoint of epoch {done} is kept in {store.directory}; run the same command "
               "again to resume from it." if done else "No checkpoint was written."), flush=True)
        raise
    finally:
        store.close()
    ips = loop["epoch_images_per_sec"]  # each epoch's first step (compilation) is not timed
    summary = dict(
        model=config.model, recipe=config.recipe, dataset=config.dataset, data_source=data.source,
        parameters=n_params, num_classes=data.num_classes, image_size=run.image_size,
        epochs_run=loop["epoch"], stopped_early=loop["stopped_early"], best_epoch=loop["best_epoch"],
        monitored_split=ev_name, best_val_acc=loop["best_val_acc"], evaluated_epoch=used_epoch,
        test_acc=test["acc"], test_loss=test["loss"], test_images=test["count"],
        train_time_s=loop["train_time"], wall_time_s=time.perf_counter() - t_wall,
        images_per_sec=float(np.median(ips)) if ips else None,
        devices=int(run.mesh.devices.size), precision=config.precision,
        skipped_steps=loop["skipped_steps"], compilations=dict(run.counter.counts),
        workdir=workdir, config=cfg_dict)
    return reporter.finish(summary, predictions=test["predictions"], labels=data.test.labels)


def _evaluates(config: TrainConfig, epoch: int) -> bool:
    """Whether 1-based `epoch` ends with an evaluation: every `eval_every`-th and the last."""
    return epoch == config.epochs or bool(config.eval_every and epoch % config.eval_every == 0)


def _epochs(run: Run, state: TrainState, loop: Dict[str, Any], store: CheckpointStore, reporter,
            stop: StopOnInterrupt, cfg_dict: dict, data_meta: dict, ev_name: str, ev_ds):
    """The epochs still to run, then the test set on the chosen epoch: (state, test, epoch)."""
    config = run.config
    last_ev = None  # the last epoch's evaluation, when this call ran that epoch and evaluated it
    while loop["epoch"] < config.epochs and not loop["stopped_early"]:
        epoch = loop["epoch"]
        last_good = (f"The last good checkpoint (epoch {epoch}) is kept in {store.directory}."
                     if epoch else "No checkpoint was written.")
        t0 = time.perf_counter()
        state, tr = train_epoch(run, state, epoch, loop, last_good, stop)
        ev = evaluate_dataset(run, state, ev_ds, stop) if _evaluates(config, epoch + 1) else None
        loop["epoch"] = epoch + 1
        loop["skipped_steps"] += tr["skipped_steps"]
        loop["train_time"] += tr["train_time"]
        loop["epoch_images_per_sec"].append(tr["images_per_sec"])
        if ev is not None:
            if loop["best_val_acc"] is None or ev["acc"] >= loop["best_val_acc"]:
                # ties go to the later epoch, as Orbax's best_step() does
                loop["best_val_acc"], loop["best_epoch"] = ev["acc"], epoch + 1
            state = update_callbacks(run, state, loop, {"val_loss": ev["loss"], "val_acc": ev["acc"]})
        ev_figures = {} if ev is None else {f"{ev_name}_loss": ev["loss"], f"{ev_name}_acc": ev["acc"]}
        record = dict(epoch=epoch + 1, train_loss=tr["train_loss"], train_acc=tr["train_acc"],
                      **ev_figures, lr=current_lr(run, state), images_per_sec=tr["images_per_sec"],
                      epoch_time=time.perf_counter() - t0, grad_norm=tr["grad_norm"],
                      update_norm=tr["update_norm"], param_norm=tr["param_norm"])
        if config.precision == "fp16":
            record.update(skipped_steps=tr["skipped_steps"], loss_scale=float(state.loss_scale.scale))
        # a copy: Orbax may serialise the meta after `loop` has moved on to the next epoch
        store.save(epoch + 1, state, copy.deepcopy(dict(epoch=epoch + 1, loop=loop, config=cfg_dict,
                                                        data=data_meta)), None if ev is None else ev["acc"])
        reporter.log_epoch(record)
        last_ev = ev
    store.wait()
    final_epoch = loop["epoch"]
    best = store.best_epoch()
    if config.keep_best and best is not None and best != final_epoch:
        print(f"Restoring the best epoch {best} ({ev_name} accuracy {100 * loop['best_val_acc']:.1f}%)")
        state, _ = store.restore(best, run.abstract_state)
    used_epoch = best if (config.keep_best and best is not None) else final_epoch
    if ev_name == "test" and last_ev is not None and used_epoch == final_epoch:
        test = last_ev  # this very model was just evaluated on the test set (no validation split)
    else:
        test = evaluate_dataset(run, state, run.data.test, stop)
    print(f"Test accuracy {100 * test['acc']:.2f}% (loss {test['loss']:.4f}) on {test['count']} images, "
          f"model of epoch {used_epoch}")
    return state, test, used_epoch


EVAL_OVERRIDABLE = ("dataset", "data_dir", "cache_dir", "limit_per_class", "batch_size", "eval_batch_size",
                    "devices", "precision", "progress", "tta_flip", "tta_translate")


def evaluate(checkpoint: str, *, overrides: Optional[Dict[str, Any]] = None, data=None,
             split: str = "test") -> Dict[str, Any]:
    """Evaluate a saved model on its data set's test (or val) split.

    Args:
      checkpoint: a work directory (its best checkpoint, else the latest), its checkpoints/ folder
        or one epoch's folder.
      overrides: settings to change from the saved config; only EVAL_OVERRIDABLE fields (where the
        data is, batch size, devices, precision, test-time augmentation).
      data: DataSplits to use instead of loading the saved config's data set.
      split: 'test' or 'val'.

    Returns:
      dict with loss, acc, count, epoch, checkpoint, split.
    """
    store, epoch = open_for_reading(checkpoint)
    try:
        meta = store.meta(epoch)
        saved = dict(meta["config"])
        bad = sorted(set(overrides or {}) - set(EVAL_OVERRIDABLE))
        if bad:
            raise ValueError(f"evaluation cannot change {', '.join(bad)}; it can change "
                             f"{', '.join(EVAL_OVERRIDABLE)}")
        saved.update(overrides or {})
        config = TrainConfig.from_dict({**saved, "eval_only": False, "checkpoint": None})
        if data is None:
            data = load_data_for(config)
        if list(data.class_names) != list(meta["data"]["class_names"]):
            raise ValueError(f"the data set's classes {data.class_names} differ from the checkpoint's "
                             f"{meta['data']['class_names']}")
        run = build(config, data, init=False)
        store.check_compatible(epoch, run.abstract_state, config.to_dict(), data.class_names)
        state, _ = store.restore(epoch, run.abstract_state)
    finally:
        store.close()
    ds = data.test if split == "test" else data.val
    if ds is None:
        raise ValueError(f"the data has no {split} split")
    res = evaluate_dataset(run, state, ds)
    print(f"{config.model} epoch {epoch} on {split} ({res['count']} images): "
          f"accuracy {100 * res['acc']:.2f}%, loss {res['loss']:.4f}")
    res.pop("predictions")
    return dict(res, epoch=epoch, checkpoint=store.directory, split=split)
