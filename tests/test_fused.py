"""jaxcnn.train.fused: AdamW and the step's norms in one compiled pass, against optax."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.train import TrainConfig, fused
from jaxcnn.train.optim import make_optimizer

pytestmark = pytest.mark.skipif(not fused.available(), reason="jaxcnn's compiled library is not built")


def _params(rng):
    """Kernels (decayed), biases and BatchNorm scales (not), sizes around the 64K-element chunk."""
    shapes = {"conv": {"kernel": (3, 3, 64, 80), "bias": (80,)}, "bn": {"scale": (80,), "bias": (80,)},
              "fc": {"kernel": (80, 10), "bias": (10,)}, "stem": {"kernel": (3, 3, 3, 64)}}
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _sum_sq64(tree):
    return sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("kw", [
    dict(),
    dict(clip_norm=0.5),                                    # clipped: the gradient norm is ~30
    dict(clip_norm=1e3, bias_lr_scale=8.0, freeze_norm_scales=True, schedule="onecycle"),
])
def test_fused_adamw_matches_optax_and_sums_its_norms(kw):
    rng = np.random.default_rng(0)
    config = TrainConfig(optimizer="adamw", learning_rate=0.01, weight_decay=0.05, **kw)
    tx, _ = make_optimizer(config, 10)
    assert isinstance(tx, fused.FusableTransformation)
    params = _params(rng)
    state = tx.init(params)
    ref_p, ref_s, p, s = params, state, params, state

    @jax.jit
    def reference(g, s, p):
        u, s = tx.update(g, s, p)
        u = jax.tree.map(lambda x: x * 0.5, u)
        return optax.apply_updates(p, u), s, u

    one_pass = jax.jit(lambda g, s, p: fused.update(tx, g, s, p, jnp.float32(0.5)))
    for _ in range(4):
        g = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
        ref_p, ref_s, u = reference(g, ref_s, ref_p)
        p, s, sums = one_pass(g, s, p)
    assert jax.tree.structure(s) == jax.tree.structure(ref_s)
    for a, b in zip(jax.tree.leaves((p, s)), jax.tree.leaves((ref_p, ref_s))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(sums), [_sum_sq64(g), _sum_sq64(ref_p), _sum_sq64(u)], rtol=1e-5)
    if kw.get("freeze_norm_scales"):  # a multiplier of 0 freezes: the scale never moves
        np.testing.assert_array_equal(np.asarray(p["bn"]["scale"]), np.asarray(params["bn"]["scale"]))


def test_fused_update_steps_aside_where_it_does_not_apply():
    rng = np.random.default_rng(1)
    params = _params(rng)
    g = jax.tree.map(jnp.ones_like, params)
    sgd, _ = make_optimizer(TrainConfig(optimizer="sgd", learning_rate=0.1), 10)
    assert fused.update(sgd, g, sgd.init(params), params, 1.0) is None  # not AdamW
    adamw, _ = make_optimizer(TrainConfig(optimizer="adamw", learning_rate=0.1), 10)
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    assert fused.update(adamw, half, adamw.init(half), half, 1.0) is None  # not float32
    assert fused.update(adamw, g, adamw.init(params), params, 1.0) is not None


def test_train_step_runs_the_fused_call_and_reports_the_same_metrics(monkeypatch):
    from test_train import _step_setup
    state, step, batch, _ = _step_setup()
    assert "jaxcnn_adamw" in step.lower(state, batch).as_text()
    monkeypatch.setattr(fused, "available", lambda: False)
    ref_state, ref_step, _, _ = _step_setup()
    assert "jaxcnn_adamw" not in ref_step.lower(ref_state, batch).as_text()
    for _ in range(2):
        state, m = step(state, batch)
        ref_state, ref_m = ref_step(ref_state, batch)
    for k in ("loss", "grad_norm", "param_norm", "update_norm"):
        np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-4, err_msg=k)
    assert float(m["update_norm"]) > 0
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_state.opt_state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


FOUR_DEVICES = r"""
import sys; sys.path.insert(0, sys.argv[1])
import jax, numpy as np
assert jax.device_count() == 4
from test_train import _step_setup
from jaxcnn.train import fused
from jaxcnn.train.state import make_mesh
state, step, batch, _ = _step_setup(mesh=make_mesh(4))
assert "jaxcnn_adamw" in step.lower(state, batch).as_text()
fused.available = lambda: False
ref_state, ref_step, _, _ = _step_setup(mesh=make_mesh(4))
for _ in range(2):
    state, m = step(state, batch)
    ref_state, ref_m = ref_step(ref_state, batch)
for k in ("loss", "grad_norm", "param_norm", "update_norm"):
    np.testing.assert_allclose(float(m[k]), float(ref_m[k]), rtol=1e-4, err_msg=k)
print("ok", float(m["update_norm"]), float(ref_m["update_norm"]))
"""


def test_fused_update_on_four_simulated_devices():
    # The state is replicated: each device runs the call on its own copy and gets the same result.
    from test_train import on_four_devices
    r = on_four_devices(FOUR_DEVICES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ok" in r.stdout
