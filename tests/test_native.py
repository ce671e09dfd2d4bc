"""The compiled FFI handlers (jaxcnn.native): built where a C compiler is, the same results as
the Python handlers, errors reported to XLA instead of crashing, and the Python handlers still
right where the library is not built (JAXCNN_NATIVE=0)."""
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn  # noqa: F401  (XLA flags before the backend starts)
from jaxcnn import dnnl, native, ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(not dnnl.usable(), reason="oneDNN's library (onednn-cpu-gomp) is not usable here")
compiled = pytest.mark.skipif(not native.active(), reason="jaxcnn._native is not built or is switched off")
NHWC = ("NHWC", "HWIO", "NHWC")


def _grad(x, w):
    loss = lambda x, w: jnp.sum(jnp.sin(ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)))
    return jax.jit(jax.grad(loss, 1))(x, w)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler: the library is optional")
def test_built_and_used_where_a_compiler_is():
    assert native.path() is not None, "pip install did not build jaxcnn/csrc/native.c (see its log)"
    if os.environ.get("JAXCNN_NATIVE", "1") not in ("0", "false", "False"):
        assert native.active()


_STEP = """
import sys, numpy as np, jax, jax.numpy as jnp, optax, jaxcnn
from jaxcnn import native
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import make_train_step
model = jaxcnn.create_model("resnet18_cifar", num_classes=10, width=16)
state = jax.jit(lambda: create_train_state(model, optax.adamw(1e-3), image_size=16, seed=0))()
rng = np.random.default_rng(0)
batch = {"image": rng.integers(0, 255, (6, 16, 16, 3), np.uint8), "label": rng.integers(0, 10, 6).astype(np.int32),
         "mask": np.ones(6, np.float32)}
step = make_train_step(num_classes=10, mean=(0.5,) * 3, std=(0.25,) * 3, augment=None)
for _ in range(2):
    state, metrics = step(state, batch)
leaves = jax.tree.leaves(state.params) + jax.tree.leaves(state.batch_stats)
np.savez(sys.argv[1], *[np.asarray(v, np.float32) for v in leaves])
print("native", native.active(), len(native.programs()))
"""


@compiled
def test_a_training_step_matches_the_python_handlers(tmp_path):
    """Two resnet18 (narrow) training steps at 16 px: oneDNN weight gradients (split over XLA's
    threads) and BatchNorm-ReLU forward and backward, through either handler, same parameters."""
    out = {}
    for flag in ("1", "0"):
        path = tmp_path / f"{flag}.npz"
        run = subprocess.run([sys.executable, "-c", _STEP, str(path)], capture_output=True, text=True,
                             timeout=300, env={**os.environ, "JAXCNN_NATIVE": flag}, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
        out[flag] = np.load(path)
        line = run.stdout.strip().splitlines()[-1].split()
        assert line[1] == ("True" if flag == "1" else "False"), run.stdout
        if flag == "1":
            assert int(line[2]) > 0, "no program was built: the compiled handlers did not run"
    assert out["1"].files == out["0"].files
    for name in out["1"].files:
        np.testing.assert_allclose(out["1"][name], out["0"][name], rtol=1e-5, atol=1e-6)


@compiled
def test_a_failing_build_is_reported(monkeypatch):
    def broken(frame, words):  # noqa: ARG001
        raise RuntimeError("simulated build failure")
    monkeypatch.setitem(native._builders, 0, broken)
    x, w = jnp.ones((2, 5, 7, 3)), jnp.ones((3, 3, 3, 2))  # a shape no other test builds
    with pytest.raises(Exception, match="simulated build failure"):
        jax.block_until_ready(_grad(x, w))


@compiled
@pytest.mark.parametrize("target", ["pool_forward", "pool_backward"])
def test_a_failing_pool_build_names_the_call(monkeypatch, target):
    """Every target's errors name its call (the C handlers' names, one per target id)."""
    from jaxcnn import pool
    if not pool.usable():
        pytest.skip("oneDNN max-pools are off here")

    def broken(frame, words):  # noqa: ARG001
        raise RuntimeError("simulated build failure")
    monkeypatch.setitem(native._builders, native.TARGETS.index(target), broken)
    x = jnp.ones((3, 10, 9, 16), jnp.bfloat16)  # a shape no other test builds
    loss = lambda x: jnp.sum(pool.max_pool(x, 2, 2, 0).astype(jnp.float32))
    name = "max-pool gradient" if target == "pool_backward" else "max-pool"
    with pytest.raises(Exception, match=f"jaxcnn oneDNN {name}: .*simulated build failure"):
        jax.block_until_ready(jax.jit(jax.grad(loss))(x))


@compiled
@pytest.mark.parametrize("parallel", [0, 2])
def test_a_failing_onednn_call_is_reported(monkeypatch, parallel):
    """A primitive oneDNN refuses (here none at all), in the serial part or in a chunk that may
    run on XLA's pool: the call fails with an error, the process goes on."""
    def build(frame, words):  # noqa: ARG001
        program = native.Program(words, parallel=parallel, single_thread=bool(parallel), global_lock=not parallel)
        no_args = (native._vp * 0)()
        program.execute(parallel - 1 if parallel else native.SERIAL, (None, no_args))
        program.publish()
    monkeypatch.setitem(native._builders, 0, build)
    x, w = jnp.ones((2 + parallel, 6, 5, 3)), jnp.ones((3, 3, 3, 2))
    with pytest.raises(Exception, match="oneDNN call failed"):
        jax.block_until_ready(_grad(x, w))
    monkeypatch.undo()
    assert np.isfinite(np.asarray(_grad(jnp.ones((5, 6, 5, 3)), w))).all()  # other shapes still run


@pytest.mark.skipif(not native.active(), reason="the Python handlers are already the ones these tests ran with")
def test_the_python_handlers_pass_the_kernel_tests():
    """Where jaxcnn._native is not built, the Python handlers run: the weight-gradient,
    BatchNorm and max-pool tests, with them, except those marked `routing` (which path a call takes: decided
    when the step is lowered, the same for both handlers, and run with the compiled ones)."""
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_dnnl.py", "tests/test_bnorm.py", "tests/test_pool.py", "-m", "not routing"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, "JAXCNN_NATIVE": "0"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout
