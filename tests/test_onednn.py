"""oneDNN convolutions (jaxcnn.onednn): same values and gradients as XLA's, used where they apply,
XLA's everywhere else."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxcnn  # noqa: F401  (XLA flags before the backend starts)
from jaxcnn import _xla, onednn, ops

pytestmark = pytest.mark.skipif(
    _xla._jaxlib_version() != (0, 10) or jax.default_backend() != "cpu",
    reason="oneDNN convolutions are for jaxlib 0.10 on the CPU")
NHWC = ("NHWC", "HWIO", "NHWC")


def _onednn_calls(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().as_text().count(f'custom_call_target="{onednn.TARGET}"')


def _pair(x_shape, w_shape, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.standard_normal(x_shape), dtype),
            jnp.asarray(rng.standard_normal(w_shape) * 0.3, dtype))


def test_probe_passes_here():
    assert onednn.usable()


# (input, kernel, strides, padding, oneDNN calls in value+grad: the forward, plus the input
# gradient: one call at stride 1, one per input phase (s_h * s_w) when strided)
CASES = [((4, 9, 9, 5), (3, 3, 5, 6), (1, 1), ((1, 1), (1, 1)), 2),
         ((4, 9, 9, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1)), 5),
         ((4, 8, 8, 5), (3, 3, 5, 6), (2, 2), ((1, 1), (1, 1)), 5),     # ResNet's downsampling
         ((2, 16, 16, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), 5),   # ImageNet stem
         ((2, 9, 8, 3), (3, 3, 3, 5), (2, 1), ((1, 0), (0, 1)), 3),
         ((2, 10, 10, 3), (3, 3, 3, 5), (3, 3), ((1, 1), (2, 0)), 10),
         ((2, 8, 7, 3), (2, 2, 3, 4), (2, 2), ((0, 0), (0, 0)), 5),
         ((3, 8, 8, 4), (3, 3, 4, 4), (1, 1), "SAME", 2),
         ((3, 8, 7, 4), (3, 3, 4, 4), (1, 1), "VALID", 2),
         ((2, 6, 6, 4), (2, 2, 4, 3), (1, 1), ((0, 1), (1, 0)), 2),
         # 1x1 (jaxcnn.ops' pointwise path): forward and input gradient on oneDNN, weight
         # gradient a matmul; strided ones subsample first
         ((4, 9, 9, 5), (1, 1, 5, 6), (1, 1), ((0, 0), (0, 0)), 2),
         ((4, 9, 9, 5), (1, 1, 5, 6), (2, 2), ((0, 0), (0, 0)), 2)]


@pytest.mark.parametrize("x_shape,w_shape,strides,padding,calls", CASES)
def test_values_and_gradients_match_xla(x_shape, w_shape, strides, padding, calls):
    x, w = _pair(x_shape, w_shape)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, strides, padding, dimension_numbers=NHWC)))

    mine, ref = loss(ops.conv_general_dilated), loss(lax.conv_general_dilated)
    np.testing.assert_allclose(jax.jit(mine)(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.jit(jax.grad(mine, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert _onednn_calls(jax.grad(mine, (0, 1)), x, w) == calls
    with ops.enabled(False):  # the switch turns it off
        assert _onednn_calls(jax.grad(mine, (0, 1)), x, w) == 0


def test_other_dimension_orders():
    # NCHW input and OIHW kernel: the config carries the dims, no transposes needed.
    x, w = _pair((2, 5, 9, 8), (6, 5, 3, 3))
    dn = ("NCHW", "OIHW", "NCHW")
    got = jax.jit(lambda x, w: ops.conv_general_dilated(x, w, (1, 2), ((1, 1), (0, 2)), dimension_numbers=dn))(x, w)
    np.testing.assert_allclose(got, lax.conv_general_dilated(x, w, (1, 2), ((1, 1), (0, 2)), dimension_numbers=dn),
                               rtol=1e-5, atol=1e-4)
    assert _onednn_calls(lambda x, w: ops.conv_general_dilated(x, w, (1, 2), ((1, 1), (0, 2)),
                                                               dimension_numbers=dn), x, w) == 1


@pytest.mark.parametrize("k", [3, 1])
def test_bf16_forward_and_gradient(k):
    x, w = _pair((4, 8, 8, 16), (k, k, 16, 8), jnp.bfloat16)
    f = lambda x, w: jnp.sum(ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
                             .astype(jnp.float32) ** 2)
    r = lambda x, w: jnp.sum(lax.conv_general_dilated(x.astype(jnp.float32), w.astype(jnp.float32), (1, 1),
                                                      "SAME", dimension_numbers=NHWC) ** 2)
    assert _onednn_calls(jax.grad(f, (0, 1)), x, w) == 2
    np.testing.assert_allclose(jax.jit(f)(x, w), r(x, w), rtol=2e-2)
    for a, b in zip(jax.jit(jax.grad(f, (0, 1)))(x, w), jax.grad(r, (0, 1))(x, w)):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=5e-2, atol=5e-1)


@pytest.mark.parametrize("dtype,padding", [(jnp.float32, ((0, 0), (0, 0))), (jnp.bfloat16, "VALID"),
                                           (jnp.float32, "SAME")])
def test_pointwise_weight_gradient_is_one_onednn_matmul(dtype, padding):
    x, w = _pair((4, 7, 5, 12), (1, 1, 12, 6), dtype)
    g = jnp.asarray(np.random.default_rng(1).standard_normal((4, 7, 5, 6)), dtype)
    dw = lambda conv: (lambda x, w, g: jax.vjp(lambda w: conv(x, w, (1, 1), padding, dimension_numbers=NHWC), w)[1](g)[0])
    mine = jax.jit(dw(ops.conv_general_dilated))
    assert mine.lower(x, w, g).compile().as_text().count(f'custom_call_target="{onednn.MATMUL_TARGET}"') == 1
    got = mine(x, w, g)
    assert got.dtype == dtype and got.shape == w.shape
    want = dw(lax.conv_general_dilated)(x.astype(jnp.float32), w.astype(jnp.float32), g.astype(jnp.float32))
    # bf16: the same bf16 operands, summed in f32, rounded once (a bf16 ulp: 2^-8 relative)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-5 if dtype == jnp.float32 else 8e-3,
                               atol=1e-4)
    with ops.enabled(False):
        assert jax.jit(dw(ops.conv_general_dilated)).lower(x, w, g).compile().as_text().count(onednn.MATMUL_TARGET) == 0


def test_matmul_probe_passes_here():
    assert onednn.matmul_usable()
    a = jnp.ones((3, 4, 2))
    assert onednn.matmul_tn(a, a) is None  # not 2-D: XLA's


@pytest.mark.parametrize("kw", [dict(feature_group_count=2), dict(rhs_dilation=(2, 2))])
def test_unsupported_convolutions_stay_on_xla(kw):
    x, w = _pair((2, 8, 8, 4), (3, 3, 2 if kw.get("feature_group_count") else 4, 6))
    f = lambda x, w: ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC, **kw)
    assert _onednn_calls(f, x, w) == 0
    np.testing.assert_allclose(jax.jit(f)(x, w), lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=NHWC, **kw), rtol=1e-5, atol=1e-4)


def test_vmap_falls_back_to_xla():
    x, w = _pair((3, 2, 8, 8, 4), (3, 3, 4, 5))
    conv = lambda x: onednn.conv(x, w, (1, 1), ((1, 1), (1, 1)), lax.conv_dimension_numbers(x.shape, w.shape, NHWC))
    ref = lambda x: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=NHWC)
    np.testing.assert_allclose(jax.jit(jax.vmap(conv))(x), jax.vmap(ref)(x), rtol=1e-5, atol=1e-4)


def test_model_logits_match_with_and_without(make_variables):
    model = jaxcnn.create_model("resnet18_cifar", num_classes=10)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = make_variables(model, x.shape)
    fwd = lambda v, x: model.apply(v, x, train=False)
    assert _onednn_calls(fwd, v, x) > 0
    with ops.enabled(False):
        ref = jax.jit(fwd)(v, x)
    np.testing.assert_allclose(jax.jit(fwd)(v, x), ref, rtol=1e-4, atol=1e-4)


def test_off_when_switched_off():
    code = "import jaxcnn, jax; from jaxcnn import onednn; print(onednn.usable())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAXCNN_ONEDNN": "0"})
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-2000:]


SHARDED = """
import jaxcnn, jax, jax.numpy as jnp, numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxcnn import onednn, ops
assert jax.device_count() == 4 and onednn.usable()
mesh = Mesh(np.array(jax.devices()), ("data",))
rng = np.random.default_rng(0)
x = jax.device_put(jnp.asarray(rng.standard_normal((8, 6, 6, 3)), jnp.float32), NamedSharding(mesh, P("data")))
w = jax.device_put(jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32), NamedSharding(mesh, P()))
dn = ("NHWC", "HWIO", "NHWC")
loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), "SAME", dimension_numbers=dn))))
grad = jax.jit(jax.grad(loss(ops.conv_general_dilated), (0, 1)))
hlo = grad.lower(x, w).compile().as_text()
calls = [l for l in hlo.splitlines() if 'custom_call_target="__onednn$convolution"' in l]
# forward and input gradient, each on its device's 2 images, nothing gathered for them
assert len(calls) == 2 and all("f32[2,6,6," in l for l in calls), calls
for a, b in zip(grad(x, w), jax.grad(loss(lax.conv_general_dilated), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
# vmap inside the jit: XLA's convolution (custom_partitioning has no batching rule)
xs = jnp.stack([x, x])
vf = jax.jit(jax.vmap(lambda x: ops.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)))
np.testing.assert_allclose(vf(xs)[1], lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn),
                           rtol=1e-5, atol=1e-4)
# a strided convolution (input gradient: one oneDNN call per phase) into an overlapping max-pool
# (its gradient fenced on the cotangent's first element): the same gradients as on one device
import flax.linen as nn
pad = ((1, 1), (1, 1))
mine = lambda x, w: jnp.sum(jnp.sin(ops.max_pool(ops.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=dn), 3, 2, 1)))
ref = lambda x, w: jnp.sum(jnp.sin(nn.max_pool(lax.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=dn),
                                               (3, 3), (2, 2), pad)))
for a, b in zip(jax.jit(jax.grad(mine, (0, 1)))(x, w), jax.grad(ref, (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
# a 1x1 convolution's weight gradient: one oneDNN matmul per device over its own rows, summed
w1 = jax.device_put(jnp.asarray(rng.standard_normal((1, 1, 3, 5)), jnp.float32), NamedSharding(mesh, P()))
g1 = jax.jit(jax.grad(loss(ops.conv_general_dilated), 1))
hlo = g1.lower(x, w1).compile().as_text()
mm = [l for l in hlo.splitlines() if 'custom_call_target="__onednn$matmul"' in l]
assert len(mm) == 1 and "f32[72,3]" in hlo and "f32[288,3]" not in hlo and "all-reduce" in hlo, mm
np.testing.assert_allclose(g1(x, w1), jax.grad(loss(lax.conv_general_dilated), 1)(x, w1), rtol=1e-4, atol=1e-4)
# a 3x3 convolution's weight gradient by oneDNN's library (jaxcnn.dnnl): one call per device on
# its own 2 images, then summed
from jaxcnn import dnnl
if dnnl.usable():
    hlo = grad.lower(x, w).compile().as_text()
    wg = [l for l in hlo.splitlines() if f'custom_call_target="{dnnl.TARGET}"' in l]
    assert len(wg) == 1 and f"all-reduce({wg[0].split('=')[0].strip()})" in hlo, wg
    assert "f32[2,6,6,3]" in hlo and "f32[8,6,6,3]" not in hlo
print("sharded ok")
"""


def test_batch_sharded_over_four_devices():
    out = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "sharded ok" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.parametrize("name,fused,adds", [("resnet18_cifar", 17, 8), ("densenet_bc_small", 6, 0)])
def test_inference_folds_batchnorm_into_fused_convolutions(name, fused, adds, make_variables):
    kw = dict(stage_sizes=(2, 2, 2, 2), width=8) if name == "resnet18_cifar" else dict(growth_rate=4, block_config=(2, 2, 2))
    model = jaxcnn.create_model(name, num_classes=10, **kw)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = make_variables(model, x.shape)
    fwd = lambda v, x: model.apply(v, x)
    hlo = jax.jit(lambda v, x: fwd(v, x)).lower(v, x).as_text()
    # conv-BN-ReLU units: stem + both convs of 8 blocks; densenet: each layer's 1x1 + norm2
    assert hlo.count("RELU") == fused and hlo.count("BINARY_ADD") == adds
    saliency = jax.jit(jax.grad(lambda x: fwd(v, x).max(-1).sum()))  # gradients still work
    got, got_g = jax.jit(fwd)(v, x), saliency(x)
    with ops.switched(FOLD_BN=False):
        assert "RELU" not in jax.jit(lambda v, x: fwd(v, x)).lower(v, x).as_text()
        want = jax.jit(lambda v, x: fwd(v, x))(v, x)
        want_g = jax.jit(jax.grad(lambda x: fwd(v, x).max(-1).sum()))(x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got_g, want_g, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fold_batchnorm_once_for_many_batches(dtype, make_variables):
    """layers.fold_batchnorm: one folded kernel and bias per fused conv-BN unit, the same logits
    as folding in every call, and the step with them does no folding (it uses the stored kernels:
    changing them changes the output)."""
    from jaxcnn.layers import FOLDED, fold_batchnorm
    model = jaxcnn.create_model("resnet18_cifar", num_classes=10, stage_sizes=(1, 1, 1, 1), width=8, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 32, 32, 3)), dtype)
    v = make_variables(model, x.shape)
    folded = jax.jit(lambda v: fold_batchnorm(model.apply, v, x.shape[1:], dtype))(v)
    assert set(folded) == {"params", "batch_stats", FOLDED}
    # the stem, 2 convs per block, and the 3 projection shortcuts
    kernels = [k for k in jax.tree_util.tree_leaves_with_path(folded[FOLDED]) if "kernel" in str(k[0])]
    assert len(kernels) == 1 + 2 * 4 + 3 and all(a.dtype == dtype for _, a in kernels)
    fwd = jax.jit(lambda v, x: model.apply(v, x))
    np.testing.assert_array_equal(np.asarray(fwd(folded, x), np.float32), np.asarray(fwd(v, x), np.float32))
    plain_ops = fwd.lower(v, x).compile().cost_analysis()
    folded_ops = fwd.lower(folded, x).compile().cost_analysis()
    plain_ops, folded_ops = (c[0] if isinstance(c, list) else c for c in (plain_ops, folded_ops))
    assert folded_ops["bytes accessed"] < plain_ops["bytes accessed"]  # no kernel re-read and re-written
    zeroed = {**folded, FOLDED: jax.tree.map(jnp.zeros_like, folded[FOLDED])}
    assert not np.allclose(np.asarray(fwd(zeroed, x), np.float32), np.asarray(fwd(v, x), np.float32))
    with ops.switched(FOLD_BN=False):  # nothing folds: nothing stored
        assert jax.tree.leaves(fold_batchnorm(model.apply, v, x.shape[1:], dtype)[FOLDED]) == []


@pytest.mark.parametrize("dtype,hw,channels,on_onednn", [(jnp.float32, 4, 256, False), (jnp.float32, 8, 256, True),
                                                          (jnp.float32, 4, 128, True), (jnp.bfloat16, 4, 256, True)])
def test_inference_small_f32_images_take_xla_convolution(dtype, hw, channels, on_onednn):
    """onednn._xla_faster: an f32 conv-BN-ReLU unit with a 3-5 px output and >= 256 channels
    is XLA's convolution in inference (faster there on this CPU), with the same values as the
    unfolded unit; larger images, fewer channels and bf16 stay one fused oneDNN call."""
    from jaxcnn.layers import ConvBNAct
    unit = ConvBNAct(channels, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, hw, hw, channels)), dtype)
    v = unit.init(jax.random.PRNGKey(0), x)
    stats = jax.tree_util.tree_map(lambda a: a + 0.5, v["batch_stats"])  # not the identity BN
    v = {**v, "batch_stats": stats}
    fwd = jax.jit(lambda v, x: unit.apply(v, x))
    assert ("RELU" in fwd.lower(v, x).as_text()) == on_onednn  # the fused call's post-op
    assert _onednn_calls(lambda v, x: unit.apply(v, x), v, x) == int(on_onednn)
    got = fwd(v, x)
    with ops.switched(FOLD_BN=False):
        want = jax.jit(lambda v, x: unit.apply(v, x))(v, x)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,hw,channels,calls", [(jnp.float32, 4, 256, 0), (jnp.float32, 6, 256, 2),
                                                     (jnp.float32, 4, 128, 2), (jnp.bfloat16, 4, 256, 2)])
def test_training_small_f32_images_take_xla_convolution(dtype, hw, channels, calls):
    """onednn.xla_faster in training: an f32 3x3 convolution with a 3-5 px output and >= 256
    channels runs forward and input gradient as XLA's (faster there on this CPU), with the same
    values; larger images, fewer channels and bf16 stay oneDNN's (forward + input gradient)."""
    x, w = _pair((2, hw, hw, channels), (3, 3, channels, channels), dtype)
    w = w * 0.1
    loss = lambda conv: (lambda x, w: jnp.sum(jnp.sin(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)
                                                      .astype(jnp.float32))))
    grad = jax.value_and_grad(loss(ops.conv_general_dilated), (0, 1))
    assert _onednn_calls(grad, x, w) == calls
    got = jax.jit(grad)(x, w)
    want = jax.value_and_grad(loss(lax.conv_general_dilated), (0, 1))(x.astype(jnp.float32), w.astype(jnp.float32))
    tol = 3e-2 if dtype == jnp.bfloat16 else 1e-4
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(np.float32(a), b, rtol=tol, atol=tol * np.abs(b).max())
