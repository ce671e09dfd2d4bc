"""Parallel image decoding to uint8 RGB arrays, and an atomic on-disk cache of the result."""
import hashlib
import io
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

# Bumped whenever decoding changes what ends up in the arrays, so old caches are not reused.
_CACHE_VERSION = "2"
_HIGH_BIT_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _workers() -> int:
    # PIL releases the GIL while decoding and resizing, so threads scale with cores.
    return max(1, min(32, (os.cpu_count() or 1) * 2))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, F, ...) as 8-bit RGB."""
    if im.mode in _HIGH_BIT_DEPTH:
        # PIL's convert() clips 16-bit values at 255 instead of rescaling them.
        a = np.asarray(im, dtype=np.float32) / 257.0
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        a = a * 255.0 if a.size and a.max() <= 1.0 else a
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    # Same as torchvision's pil_loader (alpha is dropped, not composited), so numbers compare.
    return im if im.mode == "RGB" else im.convert("RGB")


def _resize(im: Image.Image, image_size: Optional[int]) -> Image.Image:
    if image_size is None or im.size == (image_size, image_size):
        return im
    # Square output, aspect ratio not kept: the models take fixed square inputs.
    return im.resize((image_size, image_size), Image.BILINEAR)


def decode_file(path: str, image_size: Optional[int]) -> Optional[np.ndarray]:
    """One file as uint8 [H, W, 3], or None if it is not a readable image."""
    try:
        with open(path, "rb") as f:
            im = Image.open(io.BytesIO(f.read()))
        if image_size is not None and im.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale (never below image_size): several times
            # faster for photo folders resized to 224, and the bilinear resize then has less to do.
            im.draft(im.mode, (image_size, image_size))
        im.load()  # Image.open is lazy; truncated/corrupt files only fail here
        try:
            im = ImageOps.exif_transpose(im)  # camera photos carry their rotation in EXIF
        except Exception:  # a broken EXIF block should not cost us the pixels
            pass
        return np.asarray(_resize(to_rgb(im), image_size), dtype=np.uint8)
    except Exception:  # any failure means "not an image we can use": counted by the caller
        return None


def decode_files(paths: Sequence[str], image_size: Optional[int]) -> List[Optional[np.ndarray]]:
    """Decodes in a thread pool; returns one array (or None for unreadable) per path, in order."""
    with ThreadPoolExecutor(_workers()) as pool:
        return list(pool.map(lambda p: decode_file(p, image_size), paths, chunksize=64))


def resize_array(images: np.ndarray, image_size: Optional[int]) -> np.ndarray:
    """Bilinear resize of uint8 [N, H, W, C] to [N, S, S, 3] (C=1 is repeated to RGB)."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    if image_size is None or images.shape[1:3] == (image_size, image_size):
        return images
    out = np.empty((len(images), image_size, image_size, 3), np.uint8)

    def one(i):
        out[i] = np.asarray(_resize(Image.fromarray(images[i]), image_size))

    with ThreadPoolExecutor(_workers()) as pool:
        list(pool.map(one, range(len(images)), chunksize=256))
    return out


def channel_histograms(images: np.ndarray) -> np.ndarray:
    """int64 [3, 256] counts of each uint8 value per channel; exact, and subtractable."""
    return np.stack([np.bincount(images[..., c].ravel(), minlength=256) for c in range(3)]).astype(np.int64)


def default_cache_dir() -> Path:
    return Path(os.environ.get("JAXCNN_CACHE") or Path.home() / ".cache" / "jaxcnn")


def cache_key(*parts) -> str:
    h = hashlib.sha256(_CACHE_VERSION.encode())
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def cached(path: Path, build: Callable[[], dict]) -> dict:
    """Loads the arrays stored at `path`, or builds, stores and returns them.

    The write goes to a temporary file that is renamed into place, so a run killed mid-write
    (or two runs racing) never leaves a truncated cache that a later run would trust.
    """
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except Exception as e:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache {path}: {e}")
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            # Uncompressed: reloading 60k CIFAR images is then a ~0.2 s read instead of a
            # multi-second inflate, and the data is JPEG noise that barely compresses anyway.
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:  # read-only home, full disk: run on, just slower next time
        warnings.warn(f"could not write data cache {path} ({e}); set JAXCNN_CACHE or cache_dir")
    return arrays
