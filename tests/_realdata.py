"""A few real CIFAR-10 JPEGs for tests: from $JAXCNN_CIFAR_JPEG, else from the shared tarball.

CI has only ../shared/data/cifar10-jpeg.tar.gz (relative to the repo root), so tests never
assume an unpacked copy exists; they unpack just the members they need.
"""
import bisect
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SPLITS = ("train", "test")


def cifar_jpeg_subset(dest: Path, train_per_class: int = 20, test_per_class: int = 10) -> Path:
    """Fills dest/{train,test}/<class>/ with the first images of each class; returns dest."""
    n = {"train": train_per_class, "test": test_per_class}
    env = os.environ.get("JAXCNN_CIFAR_JPEG")
    if env:
        for split in SPLITS:
            for cdir in sorted(p for p in (Path(env) / split).iterdir() if p.is_dir()):
                (dest / split / cdir.name).mkdir(parents=True, exist_ok=True)
                for f in sorted(cdir.iterdir())[:n[split]]:
                    shutil.copyfile(f, dest / split / cdir.name / f.name)
        return dest
    if not TARBALL.exists():
        pytest.skip(f"real-data test: set JAXCNN_CIFAR_JPEG to an unpacked CIFAR-10 JPEG folder, "
                    f"or provide {TARBALL}")
    # One streaming pass (a gzip stream cannot seek): keep the n smallest names per class seen so
    # far, writing a member when it enters that set and deleting the one it pushes out.
    kept = defaultdict(list)
    with tarfile.open(TARBALL, "r|gz") as tar:
        for m in tar:
            parts = m.name.removeprefix("./").split("/")
            if not (m.isfile() and len(parts) == 3 and parts[0] in SPLITS):
                continue
            group = kept[parts[0], parts[1]]
            if len(group) == n[parts[0]] and parts[2] > group[-1]:
                continue
            out = dest.joinpath(*parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(m).read())
            bisect.insort(group, parts[2])
            if len(group) > n[parts[0]]:
                (out.parent / group.pop()).unlink()
    return dest
