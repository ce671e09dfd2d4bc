"""Max-pools by oneDNN (jaxcnn.pool): the same values and gradients as jaxcnn.ops's own path (itself
tested against flax.linen.max_pool in tests/test_ops.py), one library call each way."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, pool

pytestmark = pytest.mark.skipif(not pool.usable(), reason="oneDNN's library (onednn-cpu-gomp) is not usable here")


def _targets(fn, *args) -> tuple:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return tuple(hlo.count(f'custom_call_target="{t}"') for t in (pool.FWD_TARGET, pool.BWD_TARGET))


def _pool_and_grad(x, g, window, stride, pad, on: bool):
    """(inference y, training y, dx) and the custom calls of the gradient, with oneDNN's pools on/off."""
    f = lambda x: ops.max_pool(x, window, stride, pad)
    grad = lambda x, g: jax.vjp(f, x)[1](g)[0]
    with ops.switched(DNNL_POOL=on):
        y_infer = jax.jit(f)(x)
        y, vjp = jax.vjp(jax.jit(f), x)
        return (y_infer, y, jax.jit(grad)(x, g)), _targets(grad, x, g)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("window,stride,pad,size", [(2, 2, 0, 8), (2, 2, 0, 9), (3, 2, 1, 9), (3, 2, 1, 8),
                                                    (3, 1, 1, 5), (3, 2, 0, 9)])
def test_max_pool_matches_the_xla_path(dtype, window, stride, pad, size):
    rng = np.random.default_rng(0)
    # small integers: many ties, where the first maximum in row-major order gets the gradient
    x = jnp.asarray(rng.integers(-3, 4, (3, size, size, 20)), dtype)
    out = pool.out_side(size, window, stride, pad)
    g = jnp.asarray(rng.standard_normal((3, out, out, 20)) * 10, dtype)
    got, calls = _pool_and_grad(x, g, window, stride, pad, True)
    want, xla_calls = _pool_and_grad(x, g, window, stride, pad, False)
    assert calls == (1, 1) and xla_calls == (0, 0)
    for a, b in zip(got[:2], want[:2]):
        assert a.dtype == dtype
        np.testing.assert_array_equal(np.float32(a), np.float32(b))
    dx, dx_want = np.float32(got[2]), np.float32(want[2])
    if window <= stride or dtype == jnp.float32:
        # one cotangent per input (exact), or float32 sums in another order
        np.testing.assert_allclose(dx, dx_want, rtol=1e-6, atol=1e-5)
    else:
        # Overlapping windows in bf16: oneDNN rounds after each add (up to window**2 - 1 adds,
        # each off by at most 2**-9 of the sum of the |cotangents| so far), jaxcnn.ops sums in
        # f32 and rounds once.
        (_, _, scale), _ = _pool_and_grad(x.astype(jnp.float32), jnp.abs(g).astype(jnp.float32), window, stride,
                                          pad, False)
        assert np.all(np.abs(dx - dx_want) <= window ** 2 * 2.0 ** -9 * np.asarray(scale))
        assert np.mean(dx == dx_want) > 0.9


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_windows_of_nans_stay_nan(dtype):
    """A window of NaNs gives NaN (oneDNN alone gives the lowest value: restored by the handlers);
    a window with some NaNs gives the maximum of its numbers (jaxcnn.ops's path gives NaN); inf
    is the maximum of its window."""
    x = (jnp.ones((1, 4, 4, 16), dtype).at[0, 0:2, 0:2, 0].set(jnp.nan).at[0, 2, 2, 1].set(jnp.nan)
         .at[0, 2:4, 0:2, 2].set(jnp.inf))
    y = np.float32(jax.jit(lambda x: ops.max_pool(x, 2, 2))(x))
    y_train = np.float32(jax.vjp(lambda x: ops.max_pool(x, 2, 2), x)[0])
    # (an f32 2x2 pool's inference is XLA's, which propagates every NaN: `xla_infers_faster`)
    for v in (y_train,) if pool.xla_infers_faster(dtype, 2, 2) else (y, y_train):
        assert np.isnan(v[0, 0, 0, 0]) and np.isnan(v).sum() == 1
        assert v[0, 1, 1, 1] == 1.0 and v[0, 1, 0, 2] == np.inf


def test_f32_tiled_inference_stays_on_xla():
    """Without a gradient, an f32 2x2 pool is XLA's fused maximum (faster there); bf16 and
    overlapping f32 pools are oneDNN's, and every pool's training forward and backward are."""
    f = lambda window, stride, pad: lambda x: ops.max_pool(x, window, stride, pad)
    x32 = jnp.ones((2, 8, 8, 16), jnp.float32)
    assert _targets(f(2, 2, 0), x32) == (0, 0)
    assert _targets(f(2, 2, 0), x32.astype(jnp.bfloat16)) == (1, 0)
    assert _targets(f(3, 2, 1), x32) == (1, 0)
    assert _targets(jax.grad(lambda x: f(2, 2, 0)(x).sum()), x32) == (1, 1)


def test_not_for_empty_outputs():
    """A pool whose output would be empty (an image smaller than the window) is not oneDNN's:
    its kernels divide by zero (SIGFPE), where jaxcnn.ops's path raises an error (which
    `python -m jaxcnn summary` reports: tests/test_train.py)."""
    assert not pool.applies(jnp.ones((2, 1, 1, 16)), 2, 2, 0)
    assert pool.applies(jnp.ones((2, 2, 2, 16)), 2, 2, 0)


def test_not_under_vmap():
    """A vmapped pool (per-example gradients) stays on jaxcnn.ops's path, with the same values."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 9, 9, 16)), jnp.float32)
    f = jax.vmap(lambda x: ops.max_pool(x, 3, 2, 1))
    assert _targets(f, x) == (0, 0)
    one = jax.jit(lambda x: ops.max_pool(x, 3, 2, 1))
    np.testing.assert_array_equal(jax.jit(f)(x), jnp.stack([one(v) for v in x]))


def test_a_fastnet_step_runs_its_pools_on_onednn():
    """fastnet's three 2x2 pools (on odd sides: 31, 15, 7 px; here 15, 7, 3) in a training gradient:
    one forward and one backward call each, and the same gradients as without."""
    model = jaxcnn.create_model("fastnet", widths=(16, 32, 32), stem_width=16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((4, 16, 16, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x)

    def loss(params, x):
        y, _ = model.apply({**v, "params": params}, x, train=True, mutable=["batch_stats"])
        return (y * jnp.arange(10.0)).sum()

    grads = {}
    for on in (True, False):
        with ops.switched(DNNL_POOL=on):
            grad = lambda p, x: jax.grad(loss)(p, x)  # a new function per trace
            grads[on] = jax.jit(grad)(v["params"], x)
            assert _targets(grad, v["params"], x) == ((3, 3) if on else (0, 0))
    for a, b in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
