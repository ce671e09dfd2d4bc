"""Patch-whitening initialisation of a model's first convolution (airbench's `init_whiten`).

The first convolution's filters become the leading eigenvectors of the covariance of the
training images' (normalised) patches, each scaled by 1 / sqrt(eigenvalue + eps), as a +/- pair
so that a ReLU after it passes both signs. Its outputs start decorrelated and of unit variance:
the network sees the pixels' strongest directions first, on an equal footing. airbench keeps the
filters fixed (`whiten_stem='frozen'`); 'init' only starts from them.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

WHITEN_IMAGES = 5000   # airbench: the first 5,000 training images
WHITEN_EPS = 5e-4      # airbench's eps (normalised pixels)
WHITEN_PATCHES = WHITEN_IMAGES * 31 * 31  # 2x2 patches of 5,000 32x32 images: fewer, larger images


class StemError(ValueError):
    """The model has no single first convolution to whiten (a setting error, not a build error)."""


def stem_kernel_path(params) -> Tuple[str, ...]:
    """Path (module names..., 'kernel') of the one convolution kernel that reads the RGB input:
    the only 4-D parameter with 3 input channels. Raises StemError when a model has none or
    several."""
    found = [tuple(k.key for k in path) for path, p in jax.tree_util.tree_flatten_with_path(params)[0]
             if getattr(p, "ndim", 0) == 4 and p.shape[2] == 3 and getattr(path[-1], "key", None) == "kernel"]
    if len(found) != 1:
        where = ", ".join("/".join(f) for f in found) or "none"
        raise StemError(f"whiten_stem needs exactly one convolution reading the 3 input channels; this "
                        f"model has {len(found)} ({where}); use --whiten-stem off")
    return found[0]


def is_stem_kernel(path, stem: Tuple[str, ...]) -> bool:
    return tuple(getattr(k, "key", None) for k in path) == stem


def whitening_kernel(images: np.ndarray, mean: Sequence[float], std: Sequence[float],
                     shape: Tuple[int, int, int, int], eps: float = WHITEN_EPS) -> np.ndarray:
    """An HWIO kernel of `shape` (kh, kw, 3, cout) whose output channel i < cout // 2 is the i-th
    eigenvector (largest eigenvalue first) of the kh x kw patch covariance of `images` (uint8
    NHWC, 0..255, normalised by mean/std as the train step does) over sqrt(eigenvalue + eps), and
    channel cout // 2 + i its negative. An odd last channel is left zero.

    The covariance is E[p p^T] over every valid patch position of the first WHITEN_IMAGES images,
    fewer where they would give more than WHITEN_PATCHES patches (not centred, as airbench's: the normalised pixels have mean ~0)."""
    kh, kw, cin, cout = shape
    d = kh * kw * cin
    if cin != 3 or images.shape[-1] != 3:
        raise ValueError(f"whitening needs RGB images and a 3-channel kernel, got {images.shape}, {shape}")
    if cout // 2 > d:
        raise ValueError(f"the first convolution has {cout} filters but {kh}x{kw}x3 patches have only "
                         f"{d} directions ({2 * d} filters with both signs); use --whiten-stem off")
    if images.shape[1] < kh or images.shape[2] < kw:
        raise ValueError(f"images of {images.shape[1:3]} are smaller than the {kh}x{kw} filters")
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    per_image = (images.shape[1] - kh + 1) * (images.shape[2] - kw + 1)
    # Large images: fewer of them, about as many patches as 5,000 CIFAR images give (airbench's).
    images = images[:min(WHITEN_IMAGES, max(1, WHITEN_PATCHES // per_image))]
    chunk = max(1, 500_000 // per_image)  # all 4.8M patches x 27 values at once would be ~0.5 GB
    cov = np.zeros((d, d), np.float64)
    n = 0
    for i in range(0, len(images), chunk):
        x = (images[i:i + chunk].astype(np.float32) - mean) / std
        p = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))  # N, H', W', C, kh, kw
        p = p.transpose(0, 1, 2, 4, 5, 3).reshape(-1, d).astype(np.float64)  # HWIO's (kh, kw, c) order
        cov += p.T @ p
        n += len(p)
    eigval, eigvec = np.linalg.eigh(cov / n)          # ascending
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]    # largest first
    k = cout // 2
    filters = eigvec[:, :k] / np.sqrt(eigval[:k] + eps)
    w = np.zeros((d, cout), np.float32)
    w[:, :k], w[:, k:2 * k] = filters, -filters
    return w.reshape(kh, kw, cin, cout)


def whitening_init(params, images: np.ndarray, mean: Sequence[float], std: Sequence[float]
                   ) -> Callable[[Any], Any]:
    """For create_train_state(init_params=...): replaces the stem kernel of `params` (shapes are
    enough: jax.eval_shape's) by `whitening_kernel` of `images`."""
    path = stem_kernel_path(params)
    leaf = params
    for k in path:
        leaf = leaf[k]
    kernel = whitening_kernel(images, mean, std, tuple(leaf.shape))
    return lambda p: jax.tree_util.tree_map_with_path(
        lambda q, v: jnp.asarray(kernel, v.dtype) if is_stem_kernel(q, path) else v, p)
