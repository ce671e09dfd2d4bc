"""Image-folder datasets: DIR/train/<class>/* + DIR/test/<class>/*, or one DIR/<class>/* we split."""
import os
import re
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from jaxcnn.data import decode
from jaxcnn.data.decode import channel_histograms

# Accepted names for the held-out split next to train/, in order of preference.
TEST_DIR_NAMES = ("test", "val", "validation")


class Split(NamedTuple):
    images: np.ndarray   # uint8 [N, H, W, 3]
    labels: np.ndarray   # int32 [N]
    class_names: List[str]
    skipped: List[str]   # paths that are not usable images
    hist: np.ndarray     # int64 [3, 256] channel histograms, cached so statistics cost nothing


def _is_class_dir(entry: os.DirEntry) -> bool:
    # Hidden folders (.ipynb_checkpoints, .git) are never classes.
    return entry.is_dir() and not entry.name.startswith(".")


def _scan(split_dir: Path, limit_per_class: Optional[int]):
    """Lists (class_names, files, labels, stats, skipped) without reading any pixels."""
    entries = sorted(os.scandir(split_dir), key=lambda e: e.name)
    class_dirs = [e for e in entries if _is_class_dir(e)]
    skipped = [e.path for e in entries if not _is_class_dir(e)]
    if not class_dirs:
        raise ValueError(
            f"{split_dir} has no class sub-folders. Expected {split_dir}/<class_name>/<image files>, "
            "one folder per class.")
    files, labels, stats = [], [], []
    for label, cdir in enumerate(class_dirs):
        cfiles = []
        for e in sorted(os.scandir(cdir.path), key=lambda e: e.name):
            (cfiles if e.is_file() else skipped).append(e)
        if not cfiles:
            raise ValueError(f"class folder {cdir.path} contains no files; add images or delete it.")
        for e in cfiles[:limit_per_class]:
            st = e.stat()
            files.append(e.path)
            labels.append(label)
            stats.append((e.name, st.st_size, st.st_mtime_ns))
    skipped = [s.path if isinstance(s, os.DirEntry) else s for s in skipped]
    return [e.name for e in class_dirs], files, labels, stats, skipped


def _decode(files: List[str], labels: List[int], class_names: List[str], split_dir: Path,
            image_size: Optional[int]) -> Dict[str, np.ndarray]:
    arrays = decode.decode_files(files, image_size)
    ok = [i for i, a in enumerate(arrays) if a is not None]
    present = {labels[i] for i in ok}
    for label, name in enumerate(class_names):
        if label not in present:
            raise ValueError(
                f"class folder {split_dir / name} has no readable images (all files failed to decode); "
                "fix or remove it.")
    shapes = {}
    for i in ok:
        shapes.setdefault(arrays[i].shape, files[i])
    if len(shapes) > 1:
        (s1, f1), (s2, f2) = list(shapes.items())[:2]
        raise ValueError(
            f"images under {split_dir} have different sizes ({f1}: {s1[1]}x{s1[0]}, {f2}: {s2[1]}x{s2[0]}); "
            "pass --image-size (image_size=...) to resize them all to one square size.")
    images = np.stack([arrays[i] for i in ok])
    return {
        "images": images,
        "hist": channel_histograms(images),
        "labels": np.asarray([labels[i] for i in ok], np.int32),
        "bad": np.asarray([f for f, a in zip(files, arrays) if a is None], dtype=str),
    }


def load_split(split_dir: Path, image_size: Optional[int], limit_per_class: Optional[int],
               cache_dir: Path) -> Split:
    """Decodes one <class>/<file> tree, through the on-disk cache."""
    class_names, files, labels, stats, skipped = _scan(split_dir, limit_per_class)
    resolved = split_dir.resolve()
    # mtimes and sizes catch edited/replaced files without hashing 60k files' contents.
    key = decode.cache_key(str(resolved), image_size, class_names, stats)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{resolved.parent.name}-{resolved.name}").strip("-")
    arrays = decode.cached(cache_dir / f"imagefolder-{slug}-{key}.npz",
                           lambda: _decode(files, labels, class_names, split_dir, image_size))
    return Split(arrays["images"], arrays["labels"], class_names, skipped + list(arrays["bad"]),
                 arrays["hist"])


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Stratified train/test indices: every class keeps its share on both sides."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_image_folder(root: Path, *, image_size: Optional[int], test_fraction: float, seed: int,
                      limit_per_class: Optional[int], cache_dir: Path) -> Tuple[Split, Split, str]:
    """Returns (train, test, source description) for either folder layout."""
    train_dir = root / "train"
    test_dir = next((root / n for n in TEST_DIR_NAMES if (root / n).is_dir()), None)
    if train_dir.is_dir() and test_dir is not None:
        train = load_split(train_dir, image_size, limit_per_class, cache_dir)
        test = load_split(test_dir, image_size, limit_per_class, cache_dir)
        if train.class_names != test.class_names:
            only_tr = sorted(set(train.class_names) - set(test.class_names))
            only_te = sorted(set(test.class_names) - set(train.class_names))
            raise ValueError(
                f"class folders differ between {train_dir} and {test_dir}: only in train {only_tr}, "
                f"only in test {only_te}. Both splits need the same <class> folders.")
        return train, test, f"image folder {root} ({train_dir.name}/{test_dir.name})"
    if train_dir.is_dir() or test_dir is not None:
        have = train_dir if train_dir.is_dir() else test_dir
        raise ValueError(
            f"{root} has {have.name}/ but not the matching "
            f"{'test/ (or val/)' if have == train_dir else 'train/'} folder. Add it, or point "
            f"data_dir at {have} to split that one folder by test_fraction.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"{root} is a single <class>/ folder, so test_fraction must be in (0, 1) "
                         f"to carve a test split; got {test_fraction}.")
    whole = load_split(root, image_size, limit_per_class, cache_dir)
    tr, te = stratified_split(whole.labels, test_fraction, seed)
    if len(te) == 0:
        raise ValueError(f"test_fraction={test_fraction} leaves no test images in {root}; raise it.")
    names = whole.class_names
    test = Split(whole.images[te], whole.labels[te], names, [], channel_histograms(whole.images[te]))
    train = Split(whole.images[tr], whole.labels[tr], names, whole.skipped, whole.hist - test.hist)
    return train, test, (f"image folder {root} (one folder, {test_fraction:.0%} test by "
                             f"stratified split, seed {seed})")
