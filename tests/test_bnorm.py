"""Training BatchNorm (+ ReLU) by oneDNN (jaxcnn.bnorm): the same values and gradients as the
XLA path of jaxcnn.ops, one library call each way where it applies, XLA's elsewhere."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn  # noqa: F401  (XLA flags before the backend starts)
from jaxcnn import bnorm, layers, native, ops

pytestmark = pytest.mark.skipif(not bnorm.usable(), reason="oneDNN's library (onednn-cpu-gomp) is not usable here")
JIT_SHAPE = (6, 5, 4, 32)  # 32 channels: a JIT kernel wherever oneDNN has one (AVX2 and up)


def _jit_kernels(shape, dtype) -> bool:
    return all("jit" in name for name in bnorm.implementation(shape, dtype))


def _targets(fn, *args) -> tuple:
    hlo = jax.jit(fn).lower(*args).compile().as_text()
    return tuple(hlo.count(f'custom_call_target="{t}"') for t in (bnorm.FWD_TARGET, bnorm.BWD_TARGET))


def _module_loss(relu, dtype, w):
    bn = layers.BatchNorm(use_running_average=False, dtype=dtype)

    def loss(v, x):
        y, upd = bn.apply(v, x.astype(dtype), relu=relu, mutable=["batch_stats"])
        return (y.astype(jnp.float32) * w).sum(), upd
    return bn, loss


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
def test_batchnorm_matches_the_xla_path(dtype, relu):
    if not _jit_kernels(JIT_SHAPE, dtype):
        pytest.skip("no oneDNN JIT kernel for this shape on this CPU (XLA's path is used)")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(JIT_SHAPE) * 3 + 1, jnp.float32)
    w = jnp.asarray(rng.standard_normal(JIT_SHAPE), jnp.float32)
    bn, loss = _module_loss(relu, dtype, w)
    v = bn.init(jax.random.PRNGKey(0), x)
    v = jax.tree.map(lambda a: a + jnp.linspace(0.1, 0.5, a.size).reshape(a.shape), v)
    grad = lambda: jax.value_and_grad(loss, (0, 1), has_aux=True)  # a new function per trace
    (l1, u1), g1 = jax.jit(grad())(v, x)
    assert _targets(grad(), v, x) == ((1, 1) if relu else (0, 0))  # only BN-ReLU goes to oneDNN
    with ops.switched(DNNL_BN=False):
        (l2, u2), g2 = jax.jit(grad())(v, x)
        assert _targets(grad(), v, x) == (0, 0)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == jnp.float32 else dict(rtol=2e-2, atol=3e-2)
    np.testing.assert_allclose(l1, l2, **tol)
    for a, b in zip(jax.tree.leaves((g1, u1)), jax.tree.leaves((g2, u2))):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol)


@pytest.mark.parametrize("relu", [False, True])
def test_given_statistics_match_the_xla_path(relu):
    """A dense layer's norm1: statistics from `ops.batch_stats`, differentiated through them."""
    if not _jit_kernels(JIT_SHAPE, jnp.float32):
        pytest.skip("no oneDNN JIT kernel for this shape on this CPU")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(JIT_SHAPE) * 2 - 0.5, jnp.float32)
    w = jnp.asarray(rng.standard_normal(JIT_SHAPE), jnp.float32)
    scale, bias = jnp.linspace(0.5, 1.5, 32), jnp.linspace(-0.4, 0.4, 32)

    def loss(x, scale, bias):
        mean, var = ops.batch_stats(x)
        y = ops.batch_norm_given_stats(x, mean, var, scale, bias, 1e-5, jnp.dtype(jnp.float32), relu)
        return (jnp.sin(y) * w).sum()

    grad = lambda: jax.grad(loss, (0, 1, 2))  # a new function per trace
    got = jax.jit(grad())(x, scale, bias)
    assert _targets(grad(), x, scale, bias) == ((1, 1) if relu else (0, 0))
    with ops.switched(DNNL_BN=False):
        want = jax.jit(grad())(x, scale, bias)
        assert _targets(grad(), x, scale, bias) == (0, 0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_relu_is_fused_and_its_mask_comes_from_the_forward_pass():
    """relu=True equals ReLU after the BatchNorm, gradient included (the mask is oneDNN's
    workspace from the forward pass, one bit per element)."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(JIT_SHAPE), jnp.float32)
    w = jnp.asarray(rng.standard_normal(JIT_SHAPE), jnp.float32)
    scale, bias = jnp.linspace(0.5, 1.5, 32), jnp.linspace(-0.4, 0.4, 32)
    fused = lambda x: (ops.batch_norm_train(x, scale, bias, 1e-5, jnp.dtype(jnp.float32), True)[0] * w).sum()
    apart = lambda x: (jax.nn.relu(ops.batch_norm_train(x, scale, bias, 1e-5, jnp.dtype(jnp.float32))[0]) * w).sum()
    np.testing.assert_allclose(jax.grad(fused)(x), jax.grad(apart)(x), rtol=1e-4, atol=1e-5)
    if _jit_kernels(JIT_SHAPE, jnp.float32):
        _, _, _, ws = bnorm.forward(x, scale, bias, 1e-5, True)
        assert ws.dtype == jnp.uint8 and ws.size * 8 == x.size


@pytest.mark.routing
def test_other_shapes_stay_on_xla():
    """Channel counts without a JIT kernel (oneDNN's generic one was 3x slower than XLA), other
    ranks, mixed dtypes and vmap keep the XLA path."""
    x = jnp.ones((4, 3, 3, 12), jnp.float32)
    if _jit_kernels(x.shape, jnp.float32):
        pytest.skip("this CPU has a JIT kernel for 12 channels")
    s = jnp.ones((12,))
    f = lambda x: ops.batch_norm_train(x, s, s, 1e-5, jnp.dtype(jnp.float32), True)[0].sum()
    assert _targets(jax.grad(f), x) == (0, 0)
    assert not bnorm.applies(jnp.ones((4, 32)), jnp.float32)
    assert not bnorm.applies(jnp.ones(JIT_SHAPE), jnp.bfloat16)  # f32 data computed in bf16
    s32 = jnp.ones((32,))
    g = lambda x: ops.batch_norm_train(x, s32, s32, 1e-5, jnp.dtype(jnp.float32), True)[0].sum()
    assert _targets(jax.vmap(jax.grad(g)), jnp.ones((2,) + JIT_SHAPE)) == (0, 0)


@pytest.mark.skipif(native.active(), reason="patches the Python handlers (tests/test_native.py runs it with them)")
def test_a_failing_call_raises_instead_of_crashing(monkeypatch):
    def broken(self, key, direction, addresses):  # noqa: ARG001
        raise RuntimeError("simulated oneDNN batch-norm failure")
    monkeypatch.setattr(bnorm._Plans, "run", broken)
    x = jnp.ones(JIT_SHAPE, jnp.float32) + jnp.arange(32.0)
    s = jnp.ones((32,))
    if not _jit_kernels(JIT_SHAPE, jnp.float32):
        pytest.skip("no oneDNN JIT kernel for this shape on this CPU")
    with pytest.raises(Exception, match="simulated oneDNN batch-norm failure"):
        jax.block_until_ready(jax.jit(lambda x: ops.batch_norm_train(x, s, s, 1e-5, jnp.dtype(jnp.float32), True)[0])(x))


@pytest.mark.routing
def test_off_with_several_devices_and_when_switched_off():
    """A BatchNorm's statistics are over the global batch: with several devices XLA's path (whose
    reductions the partitioner makes global) stays."""
    code = ("import jaxcnn, jax, jax.numpy as jnp; from jaxcnn import bnorm; "
            "print(bnorm.applies(jnp.ones((6, 5, 4, 32)), jnp.float32))")
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    for env in ({"XLA_FLAGS": flags}, {"JAXCNN_DNNL_BN": "0"}):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]
