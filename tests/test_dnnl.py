"""oneDNN weight gradients (jaxcnn.dnnl): the same gradients as XLA's, one library call per
convolution where they apply, XLA's elsewhere, and errors reported instead of crashing."""
import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcnn  # noqa: F401  (XLA flags before the backend starts)
from jaxcnn import dnnl, native, ops

pytestmark = pytest.mark.skipif(not dnnl.usable(), reason="oneDNN's library (onednn-cpu-gomp) is not usable here")
# Tests that patch the Python handlers' code; tests/test_native.py runs this file with them too.
python_handlers = pytest.mark.skipif(native.active(), reason="the compiled handlers are on (JAXCNN_NATIVE=0 runs it)")
NHWC = ("NHWC", "HWIO", "NHWC")


def _calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(f'custom_call_target="{dnnl.TARGET}"')


def _loss(conv, strides, padding):
    return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC).astype(jnp.float32)))


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((4, 9, 9, 5), (3, 3, 5, 6), (1, 1), "SAME"),
    ((4, 8, 8, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1))),   # ResNet's downsampling
    ((4, 8, 8, 5), (3, 3, 5, 6), (2, 2), "SAME"),             # asymmetric: (0, 1)
    ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3))),  # ImageNet stem
    ((2, 9, 8, 3), (3, 2, 3, 5), (2, 1), ((1, 0), (0, 1))),
    ((3, 8, 7, 4), (3, 3, 4, 4), (1, 1), "VALID")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_weight_gradient_matches_xla(x_shape, w_shape, strides, padding, dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(x_shape), dtype)
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.3, dtype)
    mine = jax.jit(jax.grad(_loss(ops.conv_general_dilated, strides, padding), 1))
    with ops.switched(DNNL_WGRAD=False):
        ref = jax.jit(jax.grad(_loss(ops.conv_general_dilated, strides, padding), 1))(x, w)
    exact = jax.grad(_loss(lax.conv_general_dilated, strides, padding), 1)(x.astype(jnp.float32), w.astype(jnp.float32))
    got = mine(x, w)
    assert got.dtype == dtype and got.shape == w.shape
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.float32(got), np.float32(ref), rtol=tol, atol=tol * np.abs(exact).max())
    if dtype == jnp.bfloat16:  # accumulated in f32 and rounded once: at least as close as XLA's
        err = lambda a: np.abs(np.float32(a) - exact).max()
        assert err(got) <= err(ref) * 1.01 + 1e-6
    assert _calls(jax.grad(_loss(ops.conv_general_dilated, strides, padding), 1), x, w) == 1
    with ops.switched(DNNL_WGRAD=False):
        assert _calls(jax.grad(_loss(ops.conv_general_dilated, strides, padding), 1), x, w) == 0


@pytest.mark.parametrize("dtype,hw,cin,cout,strides,on_dnnl", [
    (jnp.float32, 4, 256, 256, (1, 1), False), (jnp.float32, 8, 256, 256, (2, 2), False),
    (jnp.float32, 2, 256, 256, (1, 1), False), (jnp.float32, 6, 256, 256, (1, 1), True),
    (jnp.float32, 4, 128, 256, (1, 1), True), (jnp.bfloat16, 4, 256, 256, (1, 1), True)])
@pytest.mark.routing
def test_small_f32_images_with_many_channels_take_xla_weight_gradient(dtype, hw, cin, cout, strides, on_dnnl):
    """dnnl.xla_faster: an f32 weight gradient with an output of at most 5x5 px and >= 256
    channels in and out is XLA's (faster there on this CPU), with the same values; larger
    outputs, fewer channels and bf16 stay oneDNN's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, hw, hw, cin)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 3, cin, cout)) * 0.05, dtype)
    grad = jax.grad(_loss(ops.conv_general_dilated, strides, ((1, 1), (1, 1))), 1)
    assert _calls(grad, x, w) == int(on_dnnl)
    got = jax.jit(grad)(x, w)
    exact = jax.grad(_loss(lax.conv_general_dilated, strides, ((1, 1), (1, 1))), 1)(
        x.astype(jnp.float32), w.astype(jnp.float32))
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.float32(got), exact, rtol=tol, atol=tol * np.abs(exact).max())


def test_kernels_are_oneDNN_jit_ones():
    """The blocked weight layout lets oneDNN pick its direct kernels; a forced HWIO one made it
    fall back to im2col + GEMM ('gemm:jit', 2-3x slower)."""
    impl = dnnl.implementation((8, 16, 16, 32), (8, 16, 16, 32), (3, 3, 32, 32), (1, 1), ((1, 1), (1, 1)),
                               jnp.float32)
    assert impl.startswith("jit") and "gemm" not in impl, impl


@pytest.mark.parametrize("x_shape,w_shape,strides,padding", [
    ((3, 4, 4, 128), (3, 3, 128, 128), (1, 1), "SAME"),
    ((3, 8, 8, 128), (3, 3, 128, 160), (2, 2), "SAME"),              # pads (0, 1)
    ((3, 2, 2, 128), (3, 3, 128, 128), (2, 2), ((1, 1), (1, 1)))])   # tap 0 sees only padding
@pytest.mark.routing
def test_small_bf16_images_take_im2col_and_matmul(x_shape, w_shape, strides, padding, monkeypatch):
    """bf16, at most 64 output pixels, 128+ channels: the gradient is an im2col and a matmul,
    as close to the exact one as XLA's, split over XLA's threads or not. The default takes the
    matmul only with AMX; JAXCNN_DNNL_MATMUL turns it on here on any CPU."""
    monkeypatch.setenv("JAXCNN_DNNL_MATMUL", "64")
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.05, jnp.bfloat16)
    grad = lambda: jax.jit(jax.grad(_loss(ops.conv_general_dilated, strides, padding), 1))
    got = grad()(x, w)
    monkeypatch.setenv("JAXCNN_DNNL_SPLIT", "0")
    whole = grad()(x + 0, w)
    with ops.switched(DNNL_WGRAD=False):
        ref = grad()(x, w)
    exact = jax.grad(_loss(lax.conv_general_dilated, strides, padding), 1)(x.astype(jnp.float32), w.astype(jnp.float32))
    err = lambda a: np.abs(np.float32(a) - exact).max()
    assert err(got) <= err(ref) * 1.01 + 1e-6 and err(whole) <= err(ref) * 1.01 + 1e-6, (err(got), err(ref))
    assert err(ref) < 0.05 * np.abs(exact).max()
    g_shape = jax.eval_shape(lambda x, w: ops.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC),
                             x, w).shape
    pads = dnnl.onednn._pads(x_shape, w_shape, strides, padding, dnnl._NHWC)
    assert dnnl.implementation(x_shape, g_shape, w_shape, strides, pads, jnp.bfloat16).startswith("im2col+matmul")


def test_which_gradients_take_the_matmul(monkeypatch):
    key = lambda x, g, w, s, dtype="bfloat16": (x, g, w, s, ((1, 1), (1, 1)), dtype)
    assert dnnl.by_matmul(key((64, 4, 4, 512), (64, 4, 4, 512), (3, 3, 512, 512), (1, 1)), True)
    assert not dnnl.by_matmul(key((64, 4, 4, 512), (64, 4, 4, 512), (3, 3, 512, 512), (1, 1)), False)  # no AMX
    monkeypatch.setenv("JAXCNN_DNNL_MATMUL", "64")  # the limit on any CPU
    for amx in (True, False):
        assert dnnl.by_matmul(key((64, 4, 4, 512), (64, 4, 4, 512), (3, 3, 512, 512), (1, 1)), amx)
        assert not dnnl.by_matmul(key((64, 4, 4, 512), (64, 4, 4, 512), (3, 3, 512, 512), (1, 1), "float32"), amx)
        assert not dnnl.by_matmul(key((64, 16, 16, 128), (64, 16, 16, 128), (3, 3, 128, 128), (1, 1)), amx)  # 256 px
        assert not dnnl.by_matmul(key((64, 8, 8, 128), (64, 8, 8, 32), (3, 3, 128, 32), (1, 1)), amx)  # 32 out
        # stride 2 on 7 rows: a tap's window (rows 0, 2, 4, 6) spans more than the image as oneDNN counts
        assert not dnnl.by_matmul(key((64, 7, 7, 128), (64, 4, 4, 128), (3, 3, 128, 128), (2, 2)), amx)
        assert dnnl.by_matmul(key((64, 14, 14, 256), (64, 7, 7, 512), (3, 3, 256, 512), (2, 2)), amx)
    monkeypatch.setenv("JAXCNN_DNNL_MATMUL", "16")
    assert not dnnl.by_matmul(key((64, 14, 14, 256), (64, 7, 7, 512), (3, 3, 256, 512), (2, 2)), True)  # 49 px


@pytest.mark.routing
def test_vmap_and_other_layouts_stay_on_xla():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8, 4)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 5)), jnp.float32)
    g = lambda x, w: jax.grad(_loss(ops.conv_general_dilated, (1, 1), "SAME"), 1)(x, w)
    per = jax.jit(jax.vmap(g, in_axes=(0, None)))
    np.testing.assert_allclose(per(x, w)[1], jax.grad(_loss(lax.conv_general_dilated, (1, 1), "SAME"), 1)(x[1], w),
                               rtol=1e-4, atol=1e-4)
    assert _calls(jax.vmap(g, in_axes=(0, None)), x, w) == 0
    xn = jnp.transpose(x[0], (0, 3, 1, 2))  # NCHW
    f = lambda x, w: jnp.sum(ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW")))
    assert _calls(jax.grad(f, 1), xn, w) == 0


@python_handlers
def test_a_failing_call_raises_instead_of_crashing(monkeypatch):
    def broken(self, key, x, g, out, pool=None):  # noqa: ARG001
        raise RuntimeError("simulated oneDNN failure")
    monkeypatch.setattr(type(dnnl._runtime()), "execute", broken)
    x = jnp.ones((2, 6, 6, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 4), jnp.float32)
    with pytest.raises(Exception, match="simulated oneDNN failure"):
        jax.block_until_ready(jax.jit(jax.grad(_loss(ops.conv_general_dilated, (1, 1), "SAME"), 1))(x, w))


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="XLA's thread pool has one thread")
def test_split_over_xla_threads_matches_one_call(monkeypatch):
    """With XLA's pool of 2+ threads the batch is split into single-threaded chunks (3 images:
    2 + 1), whose partial gradients add up to the whole-batch call's."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 10, 10, 8)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 8, 16)) * 0.3, jnp.float32)
    grad = lambda: jax.grad(_loss(ops.conv_general_dilated, (1, 1), "SAME"), 1)
    runs = []  # the chunks of each call: from the Python handler, or the compiled one's programs
    real, before = dnnl._Dnnl.execute, len(native.programs())
    monkeypatch.setattr(dnnl._Dnnl, "execute", lambda self, *a: runs.append(a[-1] and a[-1][0]) or real(self, *a))
    split = jax.jit(grad())(x, w)
    monkeypatch.setenv("JAXCNN_DNNL_SPLIT", "0")
    whole = jax.jit(grad())(x + 0.0, w)  # same values, a new trace (the variable is read when lowering)
    runs += [parallel for _, parallel, _ in native.programs()[before:]]
    assert runs[0] >= 2 and not runs[-1]
    np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
    key = dnnl._key((3, 10, 10, 8), (3, 10, 10, 16), (3, 3, 8, 16), (1, 1), ((1, 1), (1, 1)), jnp.float32)
    keys, starts = dnnl._runtime().chunks(key, 2)
    assert [k[0][0] for k in keys] == [2, 1] and starts == [0, 2]


@python_handlers
def test_a_failing_chunk_on_a_pool_thread_is_reported(monkeypatch):
    x = jnp.ones((4, 6, 6, 3), jnp.float32)
    w = jnp.ones((3, 3, 3, 4), jnp.float32)
    f = jax.jit(jax.grad(_loss(ops.conv_general_dilated, (1, 1), "SAME"), 1))
    jax.block_until_ready(f(x, w))  # compiled, plans built

    @contextlib.contextmanager
    def broken(self, n):  # noqa: ARG001
        raise RuntimeError("simulated chunk failure")
        yield
    monkeypatch.setattr(dnnl._Dnnl, "_threads", broken)
    with pytest.raises(Exception, match="simulated chunk failure"):
        jax.block_until_ready(f(x, w))


@pytest.mark.routing
@pytest.mark.parametrize("var", ["JAXCNN_DNNL", "JAXCNN_ONEDNN"])
def test_off_when_switched_off(var):
    code = "import jaxcnn, jax; from jaxcnn import dnnl; print(dnnl.usable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, var: "0"})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


@pytest.mark.routing
def test_no_split_with_several_devices():
    """Several CPU devices keep the cores busy side by side: one call each, no chunks."""
    code = "import jaxcnn; from jaxcnn import dnnl; print(dnnl._splits(), dnnl._split_guess())"
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "XLA_FLAGS": flags})
    assert out.stdout.strip().splitlines()[-1] == "False None", out.stderr[-2000:]
    assert dnnl._splits() == (os.environ.get("JAXCNN_DNNL_SPLIT", "1") != "0")  # this process: 1 device


_EXIT_IN_FLIGHT = """
import jax, numpy as np
from jaxcnn.models import create_model
from jaxcnn.train import TrainConfig
from jaxcnn.train.optim import make_optimizer
from jaxcnn.train.state import create_train_state
from jaxcnn.train.step import make_train_step
model = create_model("simple_cnn", num_classes=4)
tx, _ = make_optimizer(TrainConfig(optimizer="adamw", learning_rate=1e-3), 10)
state = jax.jit(lambda: create_train_state(model, tx, image_size=32, seed=0))()
step = make_train_step(num_classes=4, mean=(120.,) * 3, std=(64.,) * 3, augment=None)
r = np.random.default_rng(0)
batch = {"image": r.integers(0, 255, (64, 32, 32, 3), dtype=np.uint8),
         "label": r.integers(0, 4, 64).astype(np.int32), "mask": np.ones(64, bool)}
state, m = step(state, batch)
jax.block_until_ready(m)
for _ in range(3):
    state, m = step(state, batch)  # still running when the script ends
"""


def test_a_script_ending_with_steps_in_flight_exits():
    """The steps' oneDNN calls run Python inside XLA: without dnnl.settle_at_exit the interpreter
    tore down under them and hung in XLA's client destructor (3 of 3 runs of this script)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    try:
        r = subprocess.run([sys.executable, "-c", _EXIT_IN_FLIGHT], env=env, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the script did not exit within 120 s")
    assert r.returncode == 0, r.stderr[-2000:]
