"""A few real CIFAR-10 JPEGs for tests: from $JAXCNN_CIFAR_JPEG, else from the shared tarball.

CI has only ../shared/data/cifar10-jpeg.tar.gz (relative to the repo root), so tests never
assume an unpacked copy exists; they unpack just the members they need.
"""
import os
import shutil
import tarfile
from collections import defaultdict
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
SPLITS = ("train", "test")


def _pick(names, n_per_class):
    """First n names (sorted) per (split, class) among 'split/class/file' paths."""
    groups = defaultdict(list)
    for name in names:
        parts = name[2:].split("/") if name.startswith("./") else name.split("/")
        if len(parts) == 3 and parts[0] in SPLITS and parts[2]:
            groups[parts[0], parts[1]].append(name)
    return {name for (split, _), g in groups.items() for name in sorted(g)[:n_per_class[split]]}


def cifar_jpeg_subset(dest: Path, train_per_class: int = 20, test_per_class: int = 10) -> Path:
    """Fills dest/{train,test}/<class>/ with the first images of each class; returns dest."""
    n = {"train": train_per_class, "test": test_per_class}
    env = os.environ.get("JAXCNN_CIFAR_JPEG")
    if env:
        src = Path(env)
        names = [str(p.relative_to(src)) for split in SPLITS for p in (src / split).glob("*/*")]
        for name in sorted(_pick(names, n)):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dest / name)
        return dest
    if not TARBALL.exists():
        pytest.skip(f"real-data test: set JAXCNN_CIFAR_JPEG to an unpacked CIFAR-10 JPEG folder, "
                    f"or provide {TARBALL}")
    # Two streaming passes (names, then the chosen members): a gzip stream cannot seek cheaply.
    with tarfile.open(TARBALL, "r|gz") as tar:
        wanted = _pick([m.name for m in tar if m.isfile()], n)
    with tarfile.open(TARBALL, "r|gz") as tar:
        for m in tar:
            if m.name in wanted:
                out = dest / m.name.removeprefix("./")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(m).read())
    return dest
