"""Where images come from (TFDS, image folders, CIFAR python batches), as uint8 arrays in memory."""
import dataclasses
import logging
import pickle
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from jaxcnn.data import decode, imagefolder
from jaxcnn.data.decode import channel_histograms

# Image-classification TFDS sets with `image`/`label` features, train+test splits, that fit in RAM.
KNOWN_TFDS_DATASETS = ("cifar10", "cifar100", "mnist", "fashion_mnist", "kmnist", "svhn_cropped")

_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclasses.dataclass
class ArrayDataset:
    images: np.ndarray  # uint8 [N, H, W, 3], RGB
    labels: np.ndarray  # int32 [N]

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {self.images.dtype} "
                             f"{self.images.shape}")
        self.labels = np.asarray(self.labels, np.int32)
        if self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be [{len(self.images)}], got {self.labels.shape}")

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx) -> "ArrayDataset":
        return ArrayDataset(self.images[idx], self.labels[idx])


@dataclasses.dataclass
class DataSplits:
    train: ArrayDataset
    val: Optional[ArrayDataset]  # carved from train by val_fraction (seed), None if 0
    test: ArrayDataset
    class_names: List[str]
    mean: Tuple[float, float, float]  # per channel, 0..255 scale, computed on `train`
    std: Tuple[float, float, float]
    source: str
    skipped: int = 0  # unreadable/non-image files skipped

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_data(dataset: str = "cifar10", data_dir: Optional[str] = None, *, image_size: Optional[int] = None,
              val_fraction: float = 0.0, test_fraction: float = 0.2, seed: int = 0,
              limit_per_class: Optional[int] = None, cache_dir: Optional[str] = None) -> DataSplits:
    """Loads a whole dataset into memory as uint8 arrays, with train/val/test splits and statistics.

    Args:
      dataset: TFDS name (see KNOWN_TFDS_DATASETS), used when `data_dir` is None; with a
        `data_dir` it only picks cifar10 vs cifar100 batches or a prepared TFDS folder inside it.
      data_dir: an image folder (DIR/train/<class>/*, DIR/test/<class>/* or a single DIR/<class>/*),
        a CIFAR python-batch folder (or its parent), or a TFDS data dir holding `dataset`.
      image_size: resize every image to image_size x image_size (bilinear). None keeps the size,
        which must then be the same for all images.
      val_fraction: share of train moved to `val` (stratified per class, by `seed`).
      test_fraction: test share when a single DIR/<class>/* folder is split (stratified, by `seed`).
      seed: seed of those splits only; keep it fixed across training seeds to compare runs.
      limit_per_class: keep the first N images of each class in each split (sorted file names or
        source order), for tests and quick runs.
      cache_dir: where decoded image folders are cached; default $JAXCNN_CACHE or ~/.cache/jaxcnn.

    Raises:
      ValueError: missing/empty folders, classes without readable images, train/test class
        mismatch, mixed image sizes without image_size, bad fractions.
      RuntimeError: the TFDS dataset is not on disk and cannot be downloaded/prepared.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cache = Path(cache_dir).expanduser() if cache_dir else decode.default_cache_dir()
    train, test, names, source, skipped, train_hist = _read(
        dataset, data_dir, image_size=image_size, test_fraction=test_fraction, seed=seed,
        limit_per_class=limit_per_class, cache_dir=cache)
    if skipped:
        # One warning for the whole load, not one per file: a stray folder can hold thousands.
        warnings.warn(f"skipped {len(skipped)} unreadable or non-image files, e.g. "
                      f"{', '.join(str(p) for p in skipped[:3])}",
                      stacklevel=2)
    val = None
    if val_fraction > 0:
        tr_idx, val_idx = imagefolder.stratified_split(train.labels, val_fraction, seed)
        if len(val_idx) == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves no validation images; raise it or use 0.")
        train, val = train.take(tr_idx), train.take(val_idx)
        if train_hist is not None:
            train_hist = train_hist - channel_histograms(val.images)
    mean, std = channel_stats(train.images, hist=train_hist)
    logging.info("loaded %s: %d train, %d val, %d test, %d classes", source, len(train),
                 len(val) if val else 0, len(test), len(names))
    return DataSplits(train, val, test, list(names), mean, std, source, len(skipped))


def _read(dataset, data_dir, *, image_size, test_fraction, seed, limit_per_class, cache_dir):
    """(train, test, class_names, source, skipped paths, train channel histograms or None)."""
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        if not root.exists():
            raise ValueError(f"data_dir {root} does not exist; pass --data-dir pointing at an image "
                             "folder or a cifar-10-batches-py folder.")
        if not root.is_dir():
            raise ValueError(f"data_dir {root} is a file, not a folder; unpack it first "
                             "(e.g. `tar xzf file.tar.gz -C DIR`) and pass the folder.")
        cifar = _find_cifar_batches(root, dataset)
        is_tfds_dir = (root / dataset).is_dir() and any((root / dataset).glob("*/dataset_info.json"))
        if cifar is None and not is_tfds_dir:
            tr, te, source = imagefolder.load_image_folder(
                root, image_size=image_size, test_fraction=test_fraction, seed=seed,
                limit_per_class=limit_per_class, cache_dir=cache_dir)
            return (ArrayDataset(tr.images, tr.labels), ArrayDataset(te.images, te.labels), tr.class_names,
                    source, tr.skipped + te.skipped, tr.hist)
        if cifar is not None:
            train, test, names = _load_cifar_batches(cifar)
            source = f"CIFAR python batches {cifar}"
        else:
            train, test, names, source = _load_tfds(dataset, root, download=False)
    else:
        train, test, names, source = _load_tfds(dataset, None, download=True)
    # In-memory sources: limit and resize the arrays (image folders did it per file).
    if limit_per_class is not None:
        train, test = _first_per_class(train, limit_per_class), _first_per_class(test, limit_per_class)
    if image_size is not None:
        train = ArrayDataset(decode.resize_array(train.images, image_size), train.labels)
        test = ArrayDataset(decode.resize_array(test.images, image_size), test.labels)
    return train, test, names, source, [], None


def channel_stats(images: Optional[np.ndarray] = None, *, hist: Optional[np.ndarray] = None
                  ) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std on the 0..255 scale, from the images or their channel_histograms."""
    hist = channel_histograms(images) if hist is None else hist
    v = np.arange(256, dtype=np.float64)
    n = np.maximum(hist.sum(1), 1).astype(np.float64)
    mean = hist @ v / n
    std = np.sqrt(np.maximum(hist @ v ** 2 / n - mean ** 2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(d, 1e-3)) for d in std)


def _first_per_class(ds: ArrayDataset, n: int) -> ArrayDataset:
    keep = np.zeros(len(ds), bool)
    for c in np.unique(ds.labels):
        keep[np.flatnonzero(ds.labels == c)[:n]] = True
    return ds.take(keep)


def _find_cifar_batches(root: Path, dataset: str) -> Optional[Path]:
    """`root` itself or a child of it, if it is a CIFAR python-batch folder; cifar100 only if asked."""
    def kind(d: Path) -> Optional[str]:
        if (d / "batches.meta").is_file() and (d / "data_batch_1").is_file():
            return "cifar10"
        if (d / "meta").is_file() and (d / "train").is_file() and (d / "test").is_file():
            return "cifar100"
        return None

    if kind(root):
        return root
    order = ["cifar100", "cifar10"] if dataset == "cifar100" else ["cifar10", "cifar100"]
    for name in order:
        if kind(root / _CIFAR_DIRS[name]):
            return root / _CIFAR_DIRS[name]
    return None


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _cifar_arrays(d: dict, label_key: str) -> ArrayDataset:
    # Rows are 3072 bytes: the red plane, then green, then blue (CHW), 32x32 each.
    images = np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayDataset(np.ascontiguousarray(images), np.asarray(d[label_key], np.int32))


def _load_cifar_batches(d: Path):
    if (d / "batches.meta").is_file():
        names = [n.decode() for n in _unpickle(d / "batches.meta")["label_names"]]
        parts = [_cifar_arrays(_unpickle(p), "labels") for p in sorted(d.glob("data_batch_*"))]
        train = ArrayDataset(np.concatenate([p.images for p in parts]),
                             np.concatenate([p.labels for p in parts]))
        return train, _cifar_arrays(_unpickle(d / "test_batch"), "labels"), names
    names = [n.decode() for n in _unpickle(d / "meta")["fine_label_names"]]
    return (_cifar_arrays(_unpickle(d / "train"), "fine_labels"),
            _cifar_arrays(_unpickle(d / "test"), "fine_labels"), names)


def _load_tfds(name: str, data_dir: Optional[Path], download: bool):
    """TFDS through `tfds.data_source` (array_record, no TensorFlow needed to read)."""
    import tensorflow_datasets as tfds  # imported here: slow, and only this source needs it

    try:
        srcs = tfds.data_source(name, split=["train", "test"], data_dir=data_dir and str(data_dir),
                                download=download)
    except Exception as e:
        raise RuntimeError(
            f"could not load TFDS dataset '{name}' ({type(e).__name__}: {e}). Downloading needs internet, "
            "and preparing most TFDS datasets needs TensorFlow, which jaxcnn does not install (pip install 'jaxcnn[tfds]' "
            "adds it). Or pass "
            "--data-dir (data_dir=) pointing at an image folder (DIR/train/<class>/*.jpg + DIR/test/<class>/"
            "*.jpg, or one DIR/<class>/* folder) or at a CIFAR python-batch folder (cifar-10-batches-py, "
            "cifar-100-python from https://www.cs.toronto.edu/~kriz/cifar.html).") from e
    train, test = (_read_tfds_source(s) for s in srcs)
    label = srcs[0].dataset_info.features["label"]
    names = list(label.names) if hasattr(label, "names") else [str(i) for i in range(label.num_classes)]
    where = f", data_dir={data_dir}" if data_dir else ""
    return train, test, names, f"tfds {name} (array_record data_source{where})"


def _read_tfds_source(src) -> ArrayDataset:
    # One record at a time: __getitems__ is faster but breaks under tfds.testing.mock_data.
    examples = [src[i] for i in range(len(src))]
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    if images.shape[-1] == 1:  # mnist-like greyscale: the models take RGB
        images = np.repeat(images, 3, axis=-1)
    return ArrayDataset(images, np.asarray([ex["label"] for ex in examples], np.int32))
