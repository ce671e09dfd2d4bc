"""Orbax checkpoints of a run: the last N epochs plus the best by validation accuracy.

Layout of a work directory:
    config.json, class_names.json          what the run is (written atomically)
    checkpoints/<epoch>/state              TrainState (params, opt state, BatchNorm stats, RNG, step)
    checkpoints/<epoch>/meta               JSON: epoch, loop state (best, plateau, early stopping),
                                           data (class names, image size, mean/std), config
Orbax writes each step into a temporary folder and renames it when complete, so a run killed at
any moment leaves only whole checkpoints (the partial one is removed at the next start).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

BEST_METRIC = "val_acc"


class _UnevaluatedEpochFilter(logging.Filter):
    """Orbax warns on every save without metrics; with --eval-every that is by design (the epoch
    was not evaluated and can never be the best one), so the warning would only mislead."""
    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_UnevaluatedEpochFilter())


class IncompatibleCheckpointError(ValueError):
    """The checkpoint was written by a different model, class set or optimizer."""


def write_json_atomic(path: str, obj: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=list)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _normalise(v):
    """JSON round trip (tuples -> lists) so saved and live values compare equal."""
    return json.loads(json.dumps(v, sort_keys=True, default=list))


def structure(config: Dict[str, Any], class_names: List[str]) -> Dict[str, Any]:
    """What fixes the saved state's structure and meaning; a restore must agree on all of it."""
    return _normalise({
        "model": config["model"],
        "model_kwargs": config.get("model_kwargs", {}),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "optimizer": config["optimizer"],
        "sgd momentum": bool(config.get("momentum")) if config["optimizer"] == "sgd" else None,
        "EMA of weights": bool(config.get("ema_decay")),
    })


def _shapes(tree, prefix: str) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path)
        out[f"{prefix}/{key}"] = (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
    return out


class CheckpointStore:
    """Keeps the last `keep` epoch checkpoints of a run plus the one with the best `val_acc`."""

    def __init__(self, directory: str, keep: int = 3, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        policy = ocm.AnyPreservationPolicy([
            ocm.LatestN(n=keep),
            ocm.BestN(get_metric_fn=lambda m: m[BEST_METRIC], reverse=False, n=1,
                      keep_checkpoints_without_metrics=False)])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m[BEST_METRIC], best_mode="max",
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=True, save_interval_steps=0 if read_only else 1)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

    # -- queries
    def epochs(self) -> List[int]:
        return list(self.manager.all_steps())

    def latest_epoch(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_epoch(self) -> Optional[int]:
        return self.manager.best_step()

    # -- save / restore
    def save(self, epoch: int, state, meta: Dict[str, Any], val_acc: Optional[float]) -> None:
        """Asynchronous: arrays are copied off the devices before this returns, so the caller may
        donate `state` to the next step right away. `val_acc` None: an epoch that was not
        evaluated (`eval_every`), never the best one."""
        self.manager.save(epoch, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         meta=ocp.args.JsonSave(meta)),
                          metrics=None if val_acc is None else {BEST_METRIC: float(val_acc)})

    def meta(self, epoch: int) -> Dict[str, Any]:
        return self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, epoch: int, abstract_state, config: Dict[str, Any],
                         class_names: List[str]) -> Dict[str, Any]:
        """Raises IncompatibleCheckpointError naming every difference; returns the saved meta."""
        meta = self.meta(epoch)
        saved = structure(meta["config"], meta["data"]["class_names"])
        live = structure(config, class_names)
        diffs = [f"{k}: checkpoint has {saved[k]!r}, this run has {live[k]!r}"
                 for k in live if saved.get(k) != live[k]]
        if not diffs:
            md = self.manager.item_metadata(epoch)["state"]
            md = getattr(md, "tree", md)
            for part in ("params", "batch_stats"):
                have = _shapes(md.get(part, {}), part) if isinstance(md, dict) else {}
                want = _shapes(getattr(abstract_state, part), part)
                for k in sorted(set(have) | set(want)):
                    if k not in want:
                        diffs.append(f"{k}: in the checkpoint, not in this model")
                    elif k not in have:
                        diffs.append(f"{k}: in this model, not in the checkpoint")
                    elif have[k][0] != want[k][0]:
                        diffs.append(f"{k}: checkpoint shape {have[k][0]}, this model {want[k][0]}")
        if diffs:
            shown = diffs[:12] + ([f"... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])
            raise IncompatibleCheckpointError(
                f"checkpoint {self.directory}/{epoch} does not fit this run (nothing was "
                "overwritten):\n  " + "\n  ".join(shown) +
                "\nUse another --workdir, or the checkpoint's own settings.")
        return meta

    def restore(self, epoch: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
        """The state (placed as `abstract_state`'s shardings say) and the meta of `epoch`."""
        out = self.manager.restore(epoch, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_checkpoint(path: str) -> Tuple[str, Optional[int]]:
    """(checkpoints folder, epoch or None for 'best, else latest') for a work directory, its
    checkpoints/ folder or one epoch's folder."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    base = os.path.basename(path.rstrip("/"))
    if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
        return os.path.dirname(path), int(base)
    if any(d.isdigit() for d in os.listdir(path)):
        return path, None
    raise FileNotFoundError(f"no checkpoint in {path}: expected a work directory (with "
                            "checkpoints/), a checkpoints/ folder or an epoch folder (<N>/state)")


def open_for_reading(path: str) -> Tuple[CheckpointStore, int]:
    """A read-only store and the epoch to use (the named one, else the best, else the latest)."""
    directory, epoch = resolve_checkpoint(path)
    store = CheckpointStore(directory, read_only=True)
    if epoch is None:
        epoch = store.best_epoch() or store.latest_epoch()
    if epoch is None or epoch not in store.epochs():
        raise FileNotFoundError(f"no complete checkpoint in {directory} (epochs: {store.epochs()})")
    return store, epoch
