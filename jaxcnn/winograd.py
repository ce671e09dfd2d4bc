"""Winograd F(4x4, 3x3) convolutions for float32 inference of wide, small-image layers.

A 3x3 convolution computes each 4x4 block of outputs from a 6x6 block of input. Winograd's
minimal filtering (Lavin & Gray 2016, "Fast Algorithms for Convolutional Neural Networks")
transforms both into a 6x6 domain where the convolution becomes 36 independent matrix products
([tiles, C] x [C, K]), then transforms back: 36 multiplies per 4x4 output tile and channel
pair instead of 4*4*9 = 144, a quarter of the arithmetic. The transforms are cheap next to the products when the
channels are many and the image is small, which is where jaxcnn's other paths are slowest:
resnet18_cifar's last stage (512 channels at 4x4) runs on XLA's Eigen convolution, whose work
there is mostly image border (`onednn._xla_faster`).

Kernel alone, float32, + bias + residual + ReLU, ms (session 31, 2-core Xeon with AMX, XLA's
batched dot for the products; current path / this):

    512->512 at 4x4, batch 128   30.3 / 14.4      256->256 at 4x4, batch 128    8.4 / 4.3
    512->512 at 3x3, batch 128   16.9 / 13.5      384->384 at 4x4, batch 128   15.7 / 8.2
    512->512 at 7x7, batch 32    20.5 / 14.5      512->512 at 8x8, batch 32    27.5 / 15.1
    512->512 at 7x7, batch 8      6.4 /  4.9
  slower or no faster, so left out (`applies`):
    512->512 at 5x5 and 6x6 (mostly padding tiles), 256->256 at 8x8 (25.7 / 25.2),
    256->256 at 14x14 (19.0 / 25.9), 128->128 at 8x8 (6.3 / 8.2)

The kernel's transform (36 x C x K floats, 4x the 3x3 kernel) is computed once per set of
weights: `jaxcnn.layers.conv_bn` stores it in the "folded" collection with the folded
BatchNorm (`fold_batchnorm`); computing it inside every call cost 14 ms for 512->512.

Accuracy: the transforms' constants (up to 8, and 1/24) cost some float32 precision: the
largest error relative to the largest output was 2e-6 to 1e-5 in the shapes above, against
5e-8 to 1e-6 for the direct convolutions (both against float64). Float32 only: in bf16 the
transformed operands would lose too much. `ops.switched(WINOGRAD=False)` or
JAXCNN_PLAIN_OPS=1 turns it off.
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp

from jaxcnn import onednn

M, R = 4, 3          # output tile side, kernel side
A = M + R - 1        # input tile side (6)
# Lavin & Gray's F(4x4, 3x3) matrices (points 0, +-1, +-2, infinity)
_BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], np.float64)
_G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], np.float64)
_AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]], np.float64)
# The 2-D transforms as one matrix each over a tile's flattened (row, column) positions
_IN = np.kron(_BT, _BT).astype(np.float32)     # [36, 36]
_KERNEL = np.kron(_G, _G).astype(np.float32)   # [36, 9]
_OUT = np.kron(_AT, _AT).astype(np.float32)    # [16, 36]


def applies(x_shape, w_shape, strides, padding, dtype) -> bool:
    """float32 3x3, stride 1, padding 1 (NHWC/HWIO), and a shape of the measured gains above:
    3x3 or 4x4 images with >= 256 channels in and out, 7x7 or 8x8 with >= 512."""
    if jnp.dtype(dtype) != jnp.float32 or tuple(w_shape[:2]) != (R, R) or tuple(strides) != (1, 1):
        return False
    if tuple(tuple(p) for p in padding) != ((1, 1), (1, 1)) or len(x_shape) != 4:
        return False
    (_, h, w, c), k = x_shape, w_shape[3]
    sides = {h, w}
    return (sides <= {3, 4} and min(c, k) >= 256) or (sides <= {7, 8} and min(c, k) >= 512)


def kernel(w):
    """A [3, 3, C, K] (HWIO) kernel in the Winograd domain: [36, C, K] float32."""
    _, _, c, k = w.shape
    return (jnp.asarray(_KERNEL) @ w.astype(jnp.float32).reshape(R * R, c * k)).reshape(A * A, c, k)


def fused_conv(x, u, bias, residual=None, relu: bool = False):
    """`conv(x, w) + bias (+ residual)`, then ReLU if `relu`: x NHWC float32, `u` = kernel(w),
    stride 1, padding 1 (where `applies`)."""
    n, h, w, c = x.shape
    th, tw = -(-h // M), -(-w // M)
    # Pad to whole tiles: 1 pixel before, 1 + what completes the last tile after
    xp = jnp.pad(x, ((0, 0), (1, th * M + 1 - h), (1, tw * M + 1 - w), (0, 0)))
    # Position (i, j) of every tile: one strided slice each, [36, n, th, tw, C]
    d = jnp.stack([xp[:, i:i + th * M:M, j:j + tw * M:M, :] for i in range(A) for j in range(A)])
    v = (jnp.asarray(_IN) @ d.reshape(A * A, -1)).reshape(A * A, n * th * tw, c)
    products = jnp.einsum("ptc,pck->ptk", v, u)                            # [36, tiles, K]
    y = (jnp.asarray(_OUT) @ products.reshape(A * A, -1)).reshape(M, M, n, th, tw, -1)
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, th * M, tw * M, -1)[:, :h, :w]
    return onednn.epilogue(y, bias, residual, relu, jnp.float32)
