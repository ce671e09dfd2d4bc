"""What a run leaves for its user: metrics.jsonl, TensorBoard events, the seed-004 epoch line,
curves.png, confusion_matrix.png, per-class accuracy and summary.json.

Every file is written atomically (temporary file, then rename) so a killed run never leaves a
half-written plot or summary behind.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from typing import Dict, List, Optional, Sequence

import numpy as np


def _atomic_write(path: str, data: bytes) -> None:
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def environment() -> Dict[str, object]:
    """Hardware and library versions, for summary.json and benchmark tables."""
    import jax
    import flax
    import optax
    import orbax.checkpoint

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "platform": devices[0].platform,
        "devices": [getattr(d, "device_kind", str(d)) for d in devices],
        "device_count": len(devices),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "flax": flax.__version__,
        "optax": optax.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # huge pages: jaxcnn/_malloc.py
        "orbax_checkpoint": _version("orbax-checkpoint") or getattr(orbax.checkpoint, "__version__", None),
    }


def _version(dist: str) -> Optional[str]:
    from importlib import metadata
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def epoch_line(m: Dict[str, float]) -> str:
    """Seed 004's per-epoch line. With a validation split its columns say Val_, not Test_: the
    figures that pick the best model must never be mistaken for test accuracy."""
    ev = "val" if "val_acc" in m else "test"
    col = ev.capitalize()
    head = "Epoch:{:2d}, Train_acc:{:.1f}%, Train_loss:{:.3f}, ".format(
        int(m["epoch"]), 100 * m["train_acc"], m["train_loss"])
    if f"{ev}_acc" not in m:  # an epoch without an evaluation (--eval-every)
        return head + "Lr:{:.2E}".format(m["lr"])
    return head + "{c}_acc:{:.1f}%, {c}_loss:{:.3f}, Lr:{:.2E}".format(
        100 * m[f"{ev}_acc"], m[f"{ev}_loss"], m["lr"], c=col)


class Reporter:
    """Writes the per-epoch and end-of-run artefacts of one run into `workdir`."""

    def __init__(self, workdir: str, class_names: Sequence[str], resume: bool = False,
                 print_fn=print):
        os.makedirs(workdir, exist_ok=True)
        self.workdir = workdir
        self.class_names = list(class_names)
        self.print = print_fn
        self.metrics_path = os.path.join(workdir, "metrics.jsonl")
        if not resume and os.path.exists(self.metrics_path):
            # A fresh run in a used directory: keep the old log beside, never silently append.
            os.replace(self.metrics_path, self.metrics_path + ".old")
        self._tb = None
        try:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except Exception as e:  # TensorBoard is a convenience; the jsonl log is the record.
            self.print(f"warning: TensorBoard logging disabled ({e})")

    def history(self) -> List[Dict[str, float]]:
        """Epoch records logged so far (including those of the run being resumed), last one per epoch."""
        if not os.path.exists(self.metrics_path):
            return []
        by_epoch: Dict[int, Dict[str, float]] = {}
        with open(self.metrics_path) as f:
            for line in f:
                line = line.strip()
                if line:
                    rec = json.loads(line)
                    by_epoch[int(rec["epoch"])] = rec
        return [by_epoch[k] for k in sorted(by_epoch)]

    def log_epoch(self, metrics: Dict[str, float]) -> None:
        rec = {k: (float(v) if isinstance(v, (int, float, np.floating, np.integer)) else v)
               for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self._tb is not None:
            for k, v in rec.items():
                if k != "epoch" and isinstance(v, float):
                    self._tb.add_scalar(k.replace("_", "/", 1), v, int(rec["epoch"]))
            self._tb.flush()
        self.print(epoch_line(rec))

    def plot_curves(self) -> Optional[str]:
        """curves.png: accuracy and loss, train vs validation/test, as the seeds plot them."""
        hist = self.history()
        if not hist:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ev = "val" if any("val_acc" in h for h in hist) else "test"
        label = "Validation" if ev == "val" else "Test"
        ep = [h["epoch"] for h in hist]
        # --eval-every: only some epochs have evaluation figures; mark them, since they may be few
        ev_hist = [h for h in hist if f"{ev}_acc" in h]
        ev_ep = [h["epoch"] for h in ev_hist]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 3.5))
        a1.plot(ep, [h["train_acc"] for h in hist], label="Training Accuracy")
        a1.plot(ev_ep, [h[f"{ev}_acc"] for h in ev_hist], marker=".", label=f"{label} Accuracy")
        a1.set_title("Training and Validation Accuracy"); a1.set_xlabel("epoch"); a1.legend(loc="lower right")
        a2.plot(ep, [h["train_loss"] for h in hist], label="Training Loss")
        a2.plot(ev_ep, [h[f"{ev}_loss"] for h in ev_hist], marker=".", label=f"{label} Loss")
        a2.set_title("Training and Validation Loss"); a2.set_xlabel("epoch"); a2.legend(loc="upper right")
        fig.tight_layout()
        return self._savefig(fig, "curves.png")

    def plot_confusion(self, predictions: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """confusion_matrix.png (rows: true class, columns: predicted); returns the matrix."""
        n = len(self.class_names)
        cm = np.zeros((n, n), np.int64)
        np.add.at(cm, (np.asarray(labels, np.int64), np.asarray(predictions, np.int64)), 1)
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        size = max(4.0, 0.5 * n + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        ax.imshow(cm, cmap="Blues")
        if n <= 30:
            ax.set_xticks(range(n), self.class_names, rotation=90)
            ax.set_yticks(range(n), self.class_names)
            thresh = cm.max() / 2 if cm.size else 0
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                            color="white" if cm[i, j] > thresh else "black")
        ax.set_xlabel("predicted"); ax.set_ylabel("true"); ax.set_title("Confusion matrix (test)")
        fig.tight_layout()
        self._savefig(fig, "confusion_matrix.png")
        return cm

    def _savefig(self, fig, name: str) -> str:
        import io
        import matplotlib.pyplot as plt
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        path = os.path.join(self.workdir, name)
        _atomic_write(path, buf.getvalue())
        return path

    def finish(self, summary: Dict[str, object], *, predictions: np.ndarray,
               labels: np.ndarray) -> Dict[str, object]:
        """Plots, per-class accuracy and summary.json at the end of a run; returns the summary."""
        self.plot_curves()
        cm = self.plot_confusion(predictions, labels)
        totals = cm.sum(axis=1)
        per_class = {c: (float(cm[i, i] / totals[i]) if totals[i] else None)
                     for i, c in enumerate(self.class_names)}
        self.print("Per-class test accuracy:")
        for c, a in per_class.items():
            self.print(f"  {c:>20s}: {'n/a' if a is None else f'{100 * a:.1f}%'}")
        summary = {**summary, "per_class_accuracy": per_class, "environment": environment()}
        _atomic_write(os.path.join(self.workdir, "summary.json"),
                      json.dumps(summary, indent=2, default=str).encode())
        if self._tb is not None:
            self._tb.close()
        return summary
