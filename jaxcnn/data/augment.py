"""Batched, jittable augmentation and normalisation, run inside the train/eval step."""
import dataclasses
import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Per-example random augmentation; the defaults are the classic CIFAR pad-crop + flip.

    Frozen (hashable) so it can be a static argument of a jitted function.
    """
    crop_padding: int = 4     # pad by this many pixels, then take a random crop of the original size
    # Reflect, not zero padding: no black borders for the net to learn about, and airbench found it
    # at least as good on CIFAR. "constant" gives torchvision's RandomCrop(padding=4) behaviour.
    pad_mode: str = "reflect"
    flip: bool = True         # horizontal, p=0.5
    brightness: float = 0.0   # add U(-b, b) * 255 (tf.image.random_brightness's max_delta)
    contrast: float = 0.0     # blend with the image's mean grey by a factor U(1-c, 1+c)
    saturation: float = 0.0   # blend with the greyscale image by a factor U(1-s, 1+s)
    rotation: float = 0.0     # max degrees
    shift: float = 0.0        # max fraction of height/width
    zoom: float = 0.0         # scale U(1-z, 1+z), the same on both axes
    cutout: int = 0           # square side in pixels, 0 = off
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # with mixup too, each example picks one of the two at random

    def __post_init__(self):
        # Caught here, at config time, rather than as a shape error deep inside the jitted step.
        if self.pad_mode not in ("reflect", "constant"):
            raise ValueError(f"pad_mode must be 'reflect' or 'constant', got {self.pad_mode!r}")
        numbers = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pad_mode"}
        bad = [k for k, v in numbers.items() if v < 0]
        if bad or self.zoom >= 1 or self.shift >= 1:
            raise ValueError(f"augmentation strengths must be >= 0 (zoom, shift < 1): {bad or numbers}")


def preprocess(rng: jax.Array, images_uint8: jax.Array, labels: jax.Array, *, num_classes: int,
               mean: Sequence[float], std: Sequence[float], augment: Optional[AugmentConfig],
               dtype=jnp.float32) -> Tuple[jax.Array, jax.Array]:
    """uint8 images -> (normalised images in `dtype`, soft labels float32 [B, num_classes]).

    Pure and jittable; meant to be called inside the jitted step so that only uint8 crosses
    host->device. Every random choice is per example and drawn from `rng`.

    Args:
      rng: PRNG key; unused when augment is None.
      images_uint8: uint8 [B, H, W, 3].
      labels: int [B].
      num_classes: width of the one-hot labels.
      mean, std: per-channel statistics on the 0..255 scale (DataSplits.mean/std).
      augment: None for the eval path (normalise only).
      dtype: output image dtype (bf16 for mixed precision); labels stay float32.
    """
    x = images_uint8
    y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    aug = augment
    if aug is not None:
        # Every per-example choice comes from one block of uniforms, one column each. Each
        # separate draw was a rolled threefry loop plus a dozen small thunks on XLA:CPU:
        # ~0.8 of the 3 ms the heavy pipeline spent per batch of 128 (2-core CPU).
        mixes = aug.mixup_alpha > 0 or aug.cutmix_alpha > 0
        k_draw, k_mix = jax.random.split(rng) if mixes else (rng, None)  # a key is used once
        u = jax.random.uniform(k_draw, (x.shape[0], _DRAWS))
        warp = bool(aug.rotation or aug.shift or aug.zoom)
        flips = u[:, _FLIP.start] < 0.5 if aug.flip else None
        # Crop and flip are pure data movement: doing them on uint8 moves 4x fewer bytes.
        if aug.crop_padding > 0:
            x = crop_at(u[:, _CROP], x, aug.crop_padding, aug.pad_mode)
        if flips is not None and not warp:
            x = flip_where(flips, x)
    x = x.astype(jnp.float32)
    if aug is not None:
        # Colour before the warp, and the flip inside it: XLA fuses a producer into each of its
        # consumers, so a flip, or colour jitter's two reads of the image (its mean grey, then the
        # blend), re-ran the warp's gathers per read: 5.2 ms per batch of 128 instead of 1.2
        # (benchmarks/throughput.py's heavy pipeline, 2-core CPU). Both orders are valid
        # augmentations; colour ops are per pixel except contrast's mean grey, taken here over
        # the unwarped crop.
        if aug.brightness or aug.contrast or aug.saturation:
            x = jitter_at(u[:, _COLOR], x, aug.brightness, aug.contrast, aug.saturation)
        if warp:
            x = affine_at(u[:, _AFFINE], x, aug.rotation, aug.shift, aug.zoom, flip=flips)
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    if aug is not None:
        if aug.cutout > 0:  # after normalising, so the hole is the mean colour (DeVries & Taylor)
            sides = jnp.full(x.shape[0], aug.cutout)
            x = x * (1.0 - _box_masks(u[:, _CUT], x.shape, sides))[..., None]
        if mixes:
            x, y = mix(k_mix, x, y, aug.mixup_alpha, aug.cutmix_alpha)
    return x.astype(dtype), y


def _columns(*widths):
    """Consecutive column slices of the given widths, and their total."""
    ends = np.cumsum(widths)
    return [slice(int(e) - n, int(e)) for n, e in zip(widths, ends)], int(ends[-1])


# preprocess's uniform draws: the columns read by crop_at, the flip, affine_at, jitter_at and
# _box_masks (cutout), in that order.
(_CROP, _FLIP, _AFFINE, _COLOR, _CUT), _DRAWS = _columns(2, 1, 4, 3, 2)


def _between(u, lo, hi):
    """Uniform floats in [0, 1) -> uniform floats in [lo, hi)."""
    return lo + (hi - lo) * u


def _scaled_int(u, n: int):
    """Uniform floats in [0, 1) -> uniform ints in [0, n)."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)  # min: u * n may round to n


def crop_at(u, x, padding: int, mode: str = "reflect"):
    """Pads by `padding` and crops back to the original size at an offset per image, from the
    uniforms `u` [B, 2] (rows, columns)."""
    b, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), mode=mode)
    off = _scaled_int(u, 2 * padding + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    return jax.vmap(crop)(xp, off)


def flip_where(flips, x):
    """Mirrors the images `x` [B, H, W, C] left-right where the bools `flips` [B] are set."""
    return jnp.where(flips[:, None, None, None], x[:, :, ::-1], x)


def random_affine(key, x, rotation: float, shift: float, zoom: float, flip=None):
    """Rotation, shift and zoom as one bilinear warp per image; outside pixels repeat the edge.

    Edge repetition is Keras ImageDataGenerator's default fill_mode='nearest' (seed 001's recipe).
    `flip`: optional bools [B]; those images are mirrored left-right first, by reading the
    mirrored column in the warp (exact: the border clamp is symmetric) instead of by a pass of
    its own.
    """
    return affine_at(jax.random.uniform(key, (x.shape[0], 4)), x, rotation, shift, zoom, flip)


def affine_at(u, x, rotation: float, shift: float, zoom: float, flip=None):
    """random_affine with its choices from the uniforms `u` [B, 4]: angle, row shift, column
    shift, scale."""
    b, h, w, _ = x.shape
    theta = jnp.deg2rad(_between(u[:, 0], -rotation, rotation))
    t = jnp.stack([_between(u[:, 1], -shift, shift) * h, _between(u[:, 2], -shift, shift) * w], axis=1)
    s = _between(u[:, 3], 1.0 - zoom, 1.0 + zoom)
    # Inverse map: for each output pixel, where to sample in the input (about the image centre).
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                              jnp.arange(w, dtype=jnp.float32) - cx, indexing="ij")
    cos, sin = (jnp.cos(theta) / s)[:, None, None], (jnp.sin(theta) / s)[:, None, None]
    src_r = cos * rows - sin * cols + cy - t[:, 0, None, None]
    src_c = sin * rows + cos * cols + cx - t[:, 1, None, None]
    if flip is not None:  # the mirror image's column c is the input's column w-1-c
        src_c = jnp.where(flip[:, None, None], (w - 1) - src_c, src_c)
    return jax.vmap(_bilinear)(x, src_r, src_c)


def _bilinear(img, r, c):
    """Samples img [H, W, C] at float coords r, c [H, W], clamping to the border."""
    h, w, ch = img.shape
    r = jnp.clip(r, 0.0, h - 1.0)
    c = jnp.clip(c, 0.0, w - 1.0)
    r0 = jnp.floor(r).astype(jnp.int32)
    c0 = jnp.floor(c).astype(jnp.int32)
    r1 = jnp.minimum(r0 + 1, h - 1)
    c1 = jnp.minimum(c0 + 1, w - 1)
    wr = (r - r0)[..., None]
    wc = (c - c0)[..., None]
    flat = img.reshape(h * w, ch)
    at = lambda rr, cc: jnp.take(flat, rr * w + cc, axis=0)  # one gather per corner
    top = at(r0, c0) * (1 - wc) + at(r0, c1) * wc
    bottom = at(r1, c0) * (1 - wc) + at(r1, c1) * wc
    return top * (1 - wr) + bottom * wr


_GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _grey(x):
    # Written out rather than as `x @ weights`: XLA:CPU ran that [N, 3] x [3] product as a dot of
    # its own (0.2 ms per CIFAR batch of 128) instead of fusing it with the blend around it.
    return x[..., 0] * _GREY[0] + x[..., 1] * _GREY[1] + x[..., 2] * _GREY[2]


def jitter_at(u, x, brightness: float, contrast: float, saturation: float):
    """torchvision-style jitter on float 0..255 images, in a fixed order, clamped after each op;
    its factors from the uniforms `u` [B, 3] (brightness, contrast, saturation)."""
    factor = lambda col, m: _between(u[:, col], 1.0 - m, 1.0 + m)[:, None, None, None]
    if brightness:
        x = jnp.clip(x + 255.0 * _between(u[:, 0], -brightness, brightness)[:, None, None, None], 0, 255)
    if contrast:
        # The mean grey is the grey of the mean colour. Reducing the image to its mean colour
        # first is the same sum in another order, and XLA:CPU's reduction of the grey image was a
        # slow fusion that re-read the blends before it: 1.1 of the heavy pipeline's 3 ms.
        m = _grey(x.mean(axis=(1, 2)))[:, None, None, None]
        x = jnp.clip(m + factor(1, contrast) * (x - m), 0, 255)
    if saturation:
        g = _grey(x)[..., None]
        x = jnp.clip(g + factor(2, saturation) * (x - g), 0, 255)
    return x


def _box_masks(u, shape, sizes):
    """float [B, H, W]: 1 inside a square of side sizes[i] centred at the pixel the uniforms
    `u` [B, 2] pick (row, column); the square may be clipped at the border."""
    b, h, w = shape[0], shape[1], shape[2]
    cy, cx = _scaled_int(u[:, 0], h), _scaled_int(u[:, 1], w)
    y0 = (cy - sizes // 2)[:, None, None]
    x0 = (cx - sizes // 2)[:, None, None]
    side = sizes[:, None, None]
    rows = jnp.arange(h)[None, :, None]
    cols = jnp.arange(w)[None, None, :]
    inside = (rows >= y0) & (rows < y0 + side) & (cols >= x0) & (cols < x0 + side)
    return inside.astype(jnp.float32)


def mix(key, x, y, mixup_alpha: float, cutmix_alpha: float):
    """Per-example mixup / cutmix with a random partner from the same batch; labels mix to match."""
    b, h, w, _ = x.shape
    k_perm, k_lam, k_box, k_which = jax.random.split(key, 4)
    perm = jax.random.permutation(k_perm, b)
    x2, y2 = x[perm], y[perm]
    out_x, out_y = [], []
    if mixup_alpha > 0:
        lam = jax.random.beta(k_lam, mixup_alpha, mixup_alpha, (b,))
        out_x.append(lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * x2)
        out_y.append(lam[:, None] * y + (1 - lam[:, None]) * y2)
    if cutmix_alpha > 0:
        lam = jax.random.beta(jax.random.fold_in(k_lam, 1), cutmix_alpha, cutmix_alpha, (b,))
        side = jnp.round(math.sqrt(h * w) * jnp.sqrt(1.0 - lam)).astype(jnp.int32)
        box = _box_masks(jax.random.uniform(k_box, (b, 2)), x.shape, side)
        kept = 1.0 - box.mean(axis=(1, 2))  # the true share after clipping at the border
        out_x.append(jnp.where(box[..., None] > 0, x2, x))
        out_y.append(kept[:, None] * y + (1 - kept[:, None]) * y2)
    if len(out_x) == 1:
        return out_x[0], out_y[0]
    use_cut = jax.random.bernoulli(k_which, 0.5, (b,))
    return (jnp.where(use_cut[:, None, None, None], out_x[1], out_x[0]),
            jnp.where(use_cut[:, None], out_y[1], out_y[0]))
