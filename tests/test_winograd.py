"""Winograd F(4x4, 3x3) inference convolutions (jaxcnn.winograd): the same values as the direct
convolution, where the rule sends a conv-BN unit there, and folded once by fold_batchnorm."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxcnn import ops, winograd
from jaxcnn.layers import FOLDED, ConvBNAct, fold_batchnorm

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.mark.parametrize("side", [1, 3, 4, 5, 7, 8, 9])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, True)])
def test_matches_the_direct_convolution(side, residual, relu):
    """Any image side (whole tiles or not), with bias, residual and ReLU, to float32 rounding
    of the transforms (float64 reference)."""
    rng = np.random.default_rng(side)
    n, c, k = 3, 16, 24
    x = rng.standard_normal((n, side, side, c))
    w = rng.standard_normal((3, 3, c, k)) / np.sqrt(9 * c)
    b = rng.standard_normal(k)
    r = rng.standard_normal((n, side, side, k)) if residual else None
    want = np.asarray(lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)) + b
    if residual:
        want = want + r
    want = np.maximum(want, 0) if relu else want
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32)
    got = jax.jit(lambda x, w, b, r: winograd.fused_conv(x, winograd.kernel(w), b, r, relu))(f32(x), f32(w), f32(b), f32(r))
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("x_shape,w_shape,strides,pads,dtype,expected", [
    ((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),   # resnet18_cifar stage 4
    ((32, 7, 7, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),    # resnet18/34/50 at 224
    ((1, 3, 3, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.float32, True),
    ((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), jnp.bfloat16, False),  # f32 only
    ((128, 8, 8, 256), (3, 3, 256, 256), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),  # no faster
    ((128, 5, 5, 512), (3, 3, 512, 512), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),  # padding tiles
    ((128, 4, 4, 128), (3, 3, 128, 128), (1, 1), ((1, 1), (1, 1)), jnp.float32, False),  # too narrow
    ((128, 8, 8, 256), (3, 3, 256, 512), (2, 2), ((1, 1), (1, 1)), jnp.float32, False),  # strided
    ((128, 4, 4, 512), (1, 1, 512, 512), (1, 1), ((0, 0), (0, 0)), jnp.float32, False),  # 1x1
    ((128, 4, 4, 512), (3, 3, 512, 512), (1, 1), ((0, 0), (0, 0)), jnp.float32, False),  # unpadded
])
def test_the_rule(x_shape, w_shape, strides, pads, dtype, expected):
    assert winograd.applies(x_shape, w_shape, strides, pads, dtype) == expected


def _unit_and_variables(channels: int, side: int, dtype=jnp.float32):
    unit = ConvBNAct(channels, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, side, side, channels)), dtype)
    v = unit.init(jax.random.PRNGKey(0), x)
    stats = jax.tree_util.tree_map(lambda a: a + 0.5, v["batch_stats"])  # not the identity BN
    return unit, {**v, "batch_stats": stats}, x


def test_conv_bn_unit_takes_winograd_and_folds_its_kernel_once():
    """A 256-channel conv-BN-ReLU unit on 4x4 images in float32 inference: the Winograd path
    (no convolution left in the compiled step), the same values as the unfolded unit and as
    the switch turned off, and fold_batchnorm stores the transformed kernel ([36, C, K])
    instead of the 3x3 one."""
    unit, v, x = _unit_and_variables(256, 4)
    fwd = jax.jit(lambda v, x: unit.apply(v, x))
    hlo = fwd.lower(v, x).compile().as_text()
    assert "convolution(" not in hlo and "custom_call_target" not in hlo
    got = fwd(v, x)
    with ops.switched(WINOGRAD=False):
        direct = jax.jit(lambda v, x: unit.apply(v, x))(v, x)
        off = jax.jit(lambda v: fold_batchnorm(unit.apply, v, x.shape[1:]))(v)[FOLDED]
    with ops.switched(FOLD_BN=False):
        unfolded = jax.jit(lambda v, x: unit.apply(v, x))(v, x)
    for want in (direct, unfolded):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    folded = jax.jit(lambda v: fold_batchnorm(unit.apply, v, x.shape[1:]))(v)
    leaves = {jax.tree_util.keystr(p): a.shape for p, a in jax.tree_util.tree_leaves_with_path(folded[FOLDED])}
    assert sorted(leaves.values(), key=len) == [(256,), (36, 256, 256)], leaves
    assert any("winograd" in p for p in leaves) and any("kernel" in jax.tree_util.keystr(p)
                                                       for p, _ in jax.tree_util.tree_leaves_with_path(off))
    np.testing.assert_array_equal(fwd(folded, x), got)  # the stored transform, not a new one
    zeroed = {**folded, FOLDED: jax.tree.map(jnp.zeros_like, folded[FOLDED])}
    assert not np.allclose(fwd(zeroed, x), got)


@pytest.mark.parametrize("dtype,side,channels", [(jnp.bfloat16, 4, 256), (jnp.float32, 8, 256)])
def test_other_units_keep_their_path(dtype, side, channels):
    """bf16, and images where Winograd was not faster, keep the folded 3x3 kernel."""
    unit, v, x = _unit_and_variables(channels, side, dtype)
    folded = jax.jit(lambda v: fold_batchnorm(unit.apply, v, x.shape[1:], dtype))(v)[FOLDED]
    shapes = sorted((a.shape for a in jax.tree.leaves(folded)), key=len)
    assert shapes == [(channels,), (3, 3, channels, channels)], shapes
