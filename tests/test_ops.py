"""jaxcnn.ops: the CPU-friendly convolution, max-pool and BatchNorm equal the plain versions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn
from jax import lax

from jaxcnn import dnnl, layers, onednn, ops, pool

DN = ("NHWC", "HWIO", "NHWC")


def _rand(shape, seed, scale=1.0, shift=0.0):
    return jnp.asarray(np.random.default_rng(seed).normal(shift, scale, size=shape), jnp.float32)


def _value_and_grads(f, *args):
    w = _rand(jax.eval_shape(f, *args).shape, 99)
    return jax.value_and_grad(lambda *a: (f(*a) * w).sum(), argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("kernel,stride,pad,groups", [
    (3, 1, 1, 1), (3, 2, 1, 1), (1, 1, 0, 1), (1, 2, 0, 1), (7, 2, 3, 1), (3, 1, 1, 4)])
def test_conv_equals_lax(kernel, stride, pad, groups):
    x = _rand((4, 9, 9, 8), 0)
    w = _rand((kernel, kernel, 8 // groups, 12), 1)
    args = ((stride, stride), ((pad, pad), (pad, pad)))
    ours = jax.jit(lambda x, w: ops.conv_general_dilated(x, w, *args, dimension_numbers=DN,
                                                         feature_group_count=groups))
    ref = jax.jit(lambda x, w: lax.conv_general_dilated(x, w, *args, dimension_numbers=DN,
                                                        feature_group_count=groups))
    np.testing.assert_allclose(ours(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    (v1, g1), (v2, g2) = _value_and_grads(ours, x, w), _value_and_grads(ref, x, w)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_conv_fences_only_in_the_gradient_on_cpu():
    x, w = _rand((2, 8, 8, 4), 0), _rand((3, 3, 4, 4), 1)
    f = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
    grad_hlo = lambda: jax.jit(jax.grad(lambda x, w: f(x, w).sum(), (0, 1))).lower(x, w).as_text()
    with ops.switched(DNNL_WGRAD=False):  # XLA's weight gradient: fenced
        assert "while" in grad_hlo()
        with ops.switched(FENCES=False):
            assert "while" not in grad_hlo()
    assert "while" not in jax.jit(f).lower(x, w).as_text()  # inference is a bare convolution
    if dnnl.usable():  # oneDNN's weight gradient reads its operands from buffers: no fence
        hlo = grad_hlo()
        assert "while" not in hlo and hlo.count(dnnl.TARGET) == 1


def test_pointwise_conv_weight_gradient_is_a_matmul():
    x, w = _rand((2, 8, 8, 4), 0), _rand((1, 1, 4, 6), 1)
    f = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), ((0, 0), (0, 0)), dimension_numbers=DN)
    grad = lambda x, w: jax.grad(lambda x, w: f(x, w).sum(), (0, 1))(x, w)
    # a new function each time: jit caches traces per function, and the switches are read in tracing
    hlo = lambda fn: jax.jit(lambda x, w: fn(x, w)).lower(x, w).as_text()
    assert "stablehlo.convolution" not in hlo(grad)
    # oneDNN: the forward and input gradient are convolutions, the weight gradient its matmul
    assert hlo(grad).count("dot_general") == (0 if onednn.matmul_usable() else 3)
    with ops.enabled(False):
        assert "stablehlo.convolution" in hlo(f)
    with ops.switched(ONEDNN=False):  # without oneDNN every part is a matmul
        assert "dot_general" in hlo(f) and "convolution" not in hlo(f)
    with pytest.raises(ValueError, match="unknown switches"):
        ops.switched(ONE_DNN=False).__enter__()


@pytest.mark.parametrize("window,stride,pad,size", [(2, 2, 0, 8), (2, 2, 0, 9), (3, 2, 1, 9), (3, 2, 1, 8),
                                                    (3, 1, 1, 5), (3, 2, 0, 9)])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dnnl_pool", [False, True])
def test_max_pool_equals_flax(window, stride, pad, size, ties, dnnl_pool):
    """Both CPU paths: jaxcnn.ops's fusions and oneDNN's kernels (jaxcnn.pool, where usable)."""
    if dnnl_pool and not pool.usable():
        pytest.skip("oneDNN's library (onednn-cpu-gomp) is not usable here")
    x = _rand((3, size, size, 5), 0)
    if ties:  # many equal maxima per window (as after a ReLU): the first one gets the gradient
        x = jnp.maximum(jnp.round(x), 0.0)
    with ops.switched(DNNL_POOL=dnnl_pool):
        ours = jax.jit(lambda x: ops.max_pool(x, window, stride, pad))
        ref = jax.jit(lambda x: nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad))))
        on_dnnl = dnnl_pool and not pool.xla_infers_faster(x.dtype, window, stride)  # f32 2x2: XLA's
        assert (pool.FWD_TARGET in ours.lower(x).as_text()) == on_dnnl
        (v1, (g1,)), (v2, (g2,)) = _value_and_grads(ours, x), _value_and_grads(ref, x)
        np.testing.assert_array_equal(ours(x), ref(x))
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window,stride,pad", [(2, 2, 0), (3, 2, 1)])
def test_max_pool_forward_is_elementwise_and_exact_in_bf16(window, stride, pad):
    """jaxcnn.ops's own path (oneDNN's, jaxcnn.pool, skips a NaN next to numbers: tests/test_pool.py)."""
    x = _rand((2, 9, 9, 4), 0).astype(jnp.bfloat16).at[0, 1, 1, 0].set(jnp.nan)
    with ops.switched(DNNL_POOL=False):
        ours = jax.jit(lambda x: ops.max_pool(x, window, stride, pad))
        assert "reduce_window" not in ours.lower(x).as_text()  # the taps' maximum on the CPU
        got = ours(x)
    ref = nn.max_pool(x, (window, window), (stride, stride), padding=((pad, pad), (pad, pad)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(ref, np.float32))  # NaN too


def test_max_pool_gradient_has_no_argmax_window():
    x = _rand((2, 8, 8, 3), 0)
    hlo = jax.jit(jax.grad(lambda x: ops.max_pool(x, 2, 2).sum())).lower(x).as_text()
    assert "select_and_scatter" not in hlo


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(6, 5, 5, 7), (4, 9)])
def test_batchnorm_equals_flax(dtype, shape):
    x = _rand(shape, 0, scale=3.0, shift=1.0)
    ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=dtype)
    ours = layers.BatchNorm(use_running_average=False, dtype=dtype)
    v = ref.init(jax.random.PRNGKey(0), x)
    assert jax.tree.structure(v) == jax.tree.structure(ours.init(jax.random.PRNGKey(0), x))
    # Not the initial values, so that scale, bias and the running statistics all matter.
    v = jax.tree.map(lambda a: a + jnp.linspace(0.1, 0.5, a.size).reshape(a.shape), v)
    w = _rand(shape, 1)

    def loss(m, v, x):
        y, upd = m.apply(v, x.astype(dtype), mutable=["batch_stats"])
        return (y.astype(jnp.float32) * w).sum(), upd

    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    (l1, u1), g1 = jax.value_and_grad(loss, (1, 2), has_aux=True)(ref, v, x)
    (l2, u2), g2 = jax.value_and_grad(loss, (1, 2), has_aux=True)(ours, v, x)
    np.testing.assert_allclose(l1, l2, **tol)
    for a, b in zip(jax.tree.leaves((g1, u1)), jax.tree.leaves((g2, u2))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)
    y1 = nn.BatchNorm(use_running_average=True, dtype=dtype).apply(v, x)
    y2 = layers.BatchNorm(use_running_average=True, dtype=dtype).apply(v, x)
    assert y1.dtype == y2.dtype == dtype
    np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32), **tol)


def test_overlapping_max_pool_gradient_sums_bf16_in_f32():
    """3x3/2 windows overlap: an input that is the maximum of several windows gets the sum of their
    cotangents. In bf16 that sum is taken in f32 and rounded once, so it equals the f32 gradient
    (of the same bf16 inputs) rounded to bf16, exactly; rounding after each add did not. (oneDNN's
    kernels, jaxcnn.pool, do round after each add: tests/test_pool.py bounds them.)"""
    rng = np.random.default_rng(3)
    # small integers make many ties between windows' maxima, hence many multi-window sums
    x = jnp.asarray(rng.integers(0, 3, (2, 13, 12, 3)), jnp.bfloat16)
    g = jnp.asarray(rng.standard_normal((2, 7, 6, 3)) * 100, jnp.bfloat16)
    grad = lambda x: jax.vjp(lambda x: ops.max_pool(x, 3, 2, 1), x)[1](g.astype(x.dtype))[0]
    with ops.switched(DNNL_POOL=False):
        got = jax.jit(grad)(x)
        want = jax.jit(grad)(x.astype(jnp.float32)).astype(jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.float32(got), np.float32(want))
