"""The run artefacts a user reads: the seed-004 epoch line, metrics.jsonl, plots, summary.json."""
import json
import os

import numpy as np

from jaxcnn.train.report import Reporter, epoch_line


def test_epoch_line_matches_seed_004_format():
    m = dict(epoch=1, train_acc=0.636, train_loss=0.92, test_acc=0.327, test_loss=1.586, lr=9.76e-4)
    assert epoch_line(m) == ("Epoch: 1, Train_acc:63.6%, Train_loss:0.920, Test_acc:32.7%, "
                             "Test_loss:1.586, Lr:9.76E-04")
    m = dict(epoch=10, train_acc=0.5, train_loss=1.0, val_acc=0.25, val_loss=2.0, lr=1e-6)
    assert epoch_line(m).startswith("Epoch:10, Train_acc:50.0%, Train_loss:1.000, Val_acc:25.0%")
    # an epoch that --eval-every skips has no evaluation columns
    m = dict(epoch=3, train_acc=0.5, train_loss=1.0, lr=1e-3)
    assert epoch_line(m) == "Epoch: 3, Train_acc:50.0%, Train_loss:1.000, Lr:1.00E-03"


def test_reporter_writes_every_artefact(tmp_path):
    lines = []
    rep = Reporter(str(tmp_path), ["a", "b", "c"], print_fn=lines.append)
    for e in (1, 2):
        rep.log_epoch(dict(epoch=e, train_loss=1.0 / e, train_acc=0.3 * e, val_loss=1.2 / e,
                           val_acc=0.25 * e, lr=1e-3, images_per_sec=100.0, epoch_time=1.0))
    preds = np.array([0, 1, 2, 2, 1])
    labels = np.array([0, 1, 2, 1, 1])
    summary = rep.finish({"model": "x", "test_acc": 0.8}, predictions=preds, labels=labels)
    for f in ("metrics.jsonl", "curves.png", "confusion_matrix.png", "summary.json"):
        assert os.path.getsize(tmp_path / f) > 0, f
    assert any(n.startswith("events") for n in os.listdir(tmp_path / "tensorboard"))
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["per_class_accuracy"] == {"a": 1.0, "b": 2 / 3, "c": 1.0}
    assert saved["environment"]["jax"] and summary["model"] == "x"
    assert [h["epoch"] for h in rep.history()] == [1, 2]
    # A resumed run appends; a fresh run in the same directory keeps the old log aside.
    Reporter(str(tmp_path), ["a", "b", "c"], resume=True, print_fn=lines.append).log_epoch(
        dict(epoch=3, train_loss=0.1, train_acc=0.9, val_loss=0.2, val_acc=0.8, lr=1e-4))
    assert len(Reporter(str(tmp_path), ["a"], resume=True, print_fn=lines.append).history()) == 3
    Reporter(str(tmp_path), ["a"], resume=False, print_fn=lines.append)
    assert os.path.exists(tmp_path / "metrics.jsonl.old")
