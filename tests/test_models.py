"""Every registered model: shapes, dtypes, finiteness, exact parameter counts, BatchNorm modes,
mixed precision, gradients, and the registry's error messages."""
import functools
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jax import lax

from jaxcnn import layers, ops
from conftest import random_variables


def n_params(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def param_count(name, **kw):
    m = jaxcnn.create_model(name, **kw)
    s = jaxcnn.model_info(name).image_size
    v = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3))))
    return n_params(v["params"])


# Trainable parameters (BN scale+bias included, running statistics not), pinned to the reference
# implementations: torchvision for densenet121/resnet18/34/50, the DenseNet-BC paper's CIFAR
# models (L=100,k=12: 0.8M; L=250,k=24: 15.3M; L=190,k=40: 25.6M), seed 001's Keras ResNet-18
# without conv biases (kuangliu's CIFAR ResNet18, 11,173,962), and seed 004's torchsummary.
EXACT = {
    ("densenet_bc_100_12", 10): 769_162,
    ("densenet_bc_250_24", 10): 15_324_406,
    ("densenet_bc_190_40", 10): 25_624_430,
    ("densenet121", 1000): 7_978_856,
    ("resnet18", 1000): 11_689_512,
    ("resnet34", 1000): 21_797_672,
    ("resnet50", 1000): 25_557_032,
    ("resnet18_cifar", 10): 11_173_962,
    ("resdensenet", 3): 1_986_691,
    # Stated, derived here rather than from a reference:
    # simple_cnn: conv 896+18,496+73,856, BN 64+128+256, FC 16,512, logits 1,290.
    ("simple_cnn", 10): 111_498,
    # seed 000's k=12 [3,3,3] DenseNet-BC is 71,686 parameters, not the "0.8M" its table claims.
    ("densenet_bc_small", 10): 71_686,
}


@pytest.mark.parametrize("name,classes", sorted(EXACT))
def test_exact_parameter_counts(name, classes):
    assert param_count(name, num_classes=classes) == EXACT[(name, classes)]


# The large variants (deep DenseNet-BCs, DenseNet-169/201) compile for a minute each on 2 cores;
# their structure is the same code as densenet_bc_100_12/densenet121 and their counts are pinned above.
HEAVY = {"densenet_bc_250_24", "densenet_bc_190_40", "densenet169", "densenet201"}


@pytest.mark.parametrize("name", [n for n in jaxcnn.list_models()])
def test_forward_native_resolution(name):
    if name in HEAVY:
        pytest.skip("same code path as a smaller registered variant; compile takes minutes on 2 cores")
    info = jaxcnn.model_info(name)
    s = info.image_size
    model = jaxcnn.create_model(name)
    v = random_variables(model, (2, s, s, 3))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, s, s, 3)), jnp.float32)
    y = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
    chex.assert_shape(y, (2, info.num_classes))
    chex.assert_type(y, jnp.float32)
    chex.assert_tree_all_finite(y)
    assert float(jnp.std(y)) > 0  # not a constant output


def test_unknown_model_lists_known_names():
    with pytest.raises(ValueError) as e:
        jaxcnn.create_model("resnet19")
    msg = str(e.value)
    assert "resnet19" in msg and "resnet18" in msg and "densenet121" in msg


def test_list_models_covers_the_issue():
    want = {"simple_cnn", "densenet_bc_100_12", "densenet_bc_250_24", "densenet_bc_190_40",
            "densenet_bc_small", "densenet121", "densenet169", "densenet201", "resnet18", "resnet34",
            "resnet50", "resnet18_cifar", "preact_resnet18_cifar", "resnet50v2", "resdensenet",
            "resdensenet_cifar", "vgg16_bn_cifar", "mobilenet_v1_cifar"}
    assert want <= set(jaxcnn.list_models())


# Tiny variants of each family for the behavioural tests below (fast on 2 cores).
TINY = {
    "simple_cnn": dict(widths=(8, 8, 8), hidden=8),
    "densenet_bc_small": dict(growth_rate=4, block_config=(2, 2, 2)),
    "resnet18_cifar": dict(stage_sizes=(1, 1, 1, 1), width=8),
    "preact_resnet18_cifar": dict(stage_sizes=(1, 1), width=8),
    "resnet50": dict(stage_sizes=(1, 1), width=8),
    "resdensenet_cifar": dict(block_config=(2, 2), growth_rate=4, num_init_features=8),
    "mobilenet_v1_cifar": dict(width=0.25, cfg=((16, 1), (32, 2))),
    "vgg16_bn_cifar": dict(cfg=(8, "M", 16, "M")),
}


def tiny(name, **kw):
    return jaxcnn.create_model(name, num_classes=5, **{**TINY[name], **kw})


@pytest.mark.parametrize("name", sorted(TINY))
def test_every_parameter_gets_a_finite_gradient(name):
    model = tiny(name)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    v = random_variables(model, x.shape)

    def loss(p):
        y, _ = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.PRNGKey(1)})
        return jnp.sum(y ** 2)

    g = jax.jit(jax.grad(loss))(v["params"])
    leaves = jax.tree_util.tree_leaves(g)
    assert len(leaves) == len(jax.tree_util.tree_leaves(v["params"]))
    chex.assert_tree_all_finite(g)
    nonzero = sum(bool(jnp.any(l != 0)) for l in leaves)
    assert nonzero == len(leaves), f"{len(leaves) - nonzero} parameters get no gradient"


@pytest.mark.parametrize("name", ["resnet18_cifar", "densenet_bc_small", "resdensenet_cifar"])
def test_batchnorm_train_vs_eval(name):
    model = tiny(name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, size=(8, 32, 32, 3)), jnp.float32)
    v = random_variables(model, x.shape)
    # Train mode normalises with batch statistics and updates the running averages.
    y_train, upd = model.apply(v, x, train=True, mutable=["batch_stats"])
    before = jax.tree_util.tree_leaves(v["batch_stats"])
    after = jax.tree_util.tree_leaves(upd["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # ... so an example's train-mode output depends on the rest of the batch ...
    y_half, _ = model.apply(v, x[:4], train=True, mutable=["batch_stats"])
    assert not np.allclose(y_train[:4], y_half, atol=1e-4)
    # ... while eval mode uses the running statistics: per-example and state-free.
    y_eval = model.apply(v, x, train=False)
    np.testing.assert_allclose(model.apply(v, x[:4], train=False), y_eval[:4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y_eval, y_train, atol=1e-3)


def test_momentum_matches_pytorch_default():
    # PyTorch: running = 0.9 * running + 0.1 * batch. One step from zeros gives 0.1 * batch mean.
    bn = layers.norm(train=True)
    x = jnp.arange(24.0).reshape(2, 3, 4)
    v = bn.init(jax.random.PRNGKey(0), x)
    _, upd = bn.apply(v, x, mutable=["batch_stats"])
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * x.mean((0, 1)), rtol=1e-6)


@pytest.mark.parametrize("name", ["resnet18_cifar", "densenet_bc_small", "simple_cnn"])
def test_bf16_compute_close_to_fp32(name):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    m32 = tiny(name)
    m16 = tiny(name, dtype=jnp.bfloat16)
    v = random_variables(m32, x.shape)
    y32 = m32.apply(v, x, train=False)
    y16 = m16.apply(v, x, train=False)  # same f32 parameters, bf16 compute
    assert y16.dtype == jnp.bfloat16
    chex.assert_tree_all_finite(y16)
    err = float(jnp.max(jnp.abs(y16.astype(jnp.float32) - y32)))
    assert err < 0.05 * float(jnp.max(jnp.abs(y32))) + 0.05, err
    # Running statistics stay float32 whatever the compute dtype.
    _, upd = m16.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(0)})
    assert all(l.dtype == jnp.float32 for l in jax.tree_util.tree_leaves(upd["batch_stats"]))


def test_squeeze_excite_option():
    base = param_count("resnet18_cifar")
    se = param_count("resnet18_cifar", se=True)
    # Per block: FC C->C/16 and C/16->C with biases. Widths 64,64,128,128,256,256,512,512.
    extra = sum(2 * c * (c // 16) + c // 16 + c for c in (64, 64, 128, 128, 256, 256, 512, 512))
    assert se - base == extra
    for name in ["resdensenet_cifar", "resnet50"]:
        m = tiny(name, se=True)
        x = jnp.ones((2, 32, 32, 3))
        v = random_variables(m, x.shape)
        assert any("se" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(v["params"]))
        chex.assert_tree_all_finite(m.apply(v, x))


@pytest.mark.parametrize("name,kw", [("resdensenet_cifar", {}), ("densenet_bc_small", {"drop_rate": 0.2})])
def test_remat_gives_the_same_gradients_and_statistics(name, kw, monkeypatch):
    # remat=True recomputes (on the CPU: layers._recomputed_new_features); remat=False (the
    # default) stores. Same gradients and BatchNorm statistics either way.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    models = {r: tiny(name, remat=r, **kw) for r in (False, True)}
    v = random_variables(models[False], x.shape)
    for m in models.values():
        assert jax.tree_util.tree_structure(v) == jax.tree_util.tree_structure(
            jax.eval_shape(m.init, jax.random.PRNGKey(0), x))

    def grads(m):
        def f(p):
            y, upd = m.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(3)})
            return jnp.sum(y ** 2), upd
        return jax.jit(jax.grad(f, has_aux=True))(v["params"])

    ref = grads(models[False])
    chex.assert_trees_all_close(grads(models[True]), ref, rtol=1e-5, atol=1e-5)
    # Off the CPU remat=True is nn.remat (jax.checkpoint); run that path here too.
    monkeypatch.setattr(ops, "on_cpu", lambda: False)
    chex.assert_trees_all_close(grads(models[True]), ref, rtol=1e-5, atol=1e-5)


def test_remat_lowers_the_compiled_memory_of_a_train_step():
    # XLA:CPU removes jax.checkpoint's optimization barriers and CSE undid nn.remat (same bytes
    # with and without); the fenced recomputation in layers.DenseBlock must really store less.
    x = jnp.zeros((16, 32, 32, 3))

    def temp_bytes(**kw):
        m = jaxcnn.create_model("densenet_bc_small", num_classes=10, **kw)
        v = jax.eval_shape(m.init, jax.random.PRNGKey(0), x)
        f = lambda p, s: m.apply({"params": p, "batch_stats": s}, x, train=True,
                                 mutable=["batch_stats"])[0].sum()
        compiled = jax.jit(jax.grad(f)).lower(v["params"], v["batch_stats"]).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(remat=False), temp_bytes(remat=True)
    assert remat < 0.75 * plain, (remat, plain)
    assert temp_bytes() == plain  # the default stores


def test_recomputes_names_the_models_whose_dense_blocks_recompute(monkeypatch):
    assert not layers.recomputes(jaxcnn.create_model("densenet_bc_small"))  # stores by default
    assert layers.recomputes(jaxcnn.create_model("resdensenet_cifar", remat=True))
    assert layers.recomputes(jaxcnn.create_model("densenet_bc_small", remat=True))
    assert not layers.recomputes(jaxcnn.create_model("densenet_bc_small", remat=False))
    assert not layers.recomputes(jaxcnn.create_model("resnet18_cifar"))
    monkeypatch.setattr(ops, "on_cpu", lambda: False)  # off the CPU remat is jax.checkpoint
    assert not layers.recomputes(jaxcnn.create_model("densenet_bc_small", remat=True))


def test_features_and_intermediates():
    m = tiny("resnet18_cifar")
    x = jnp.ones((2, 32, 32, 3))
    v = random_variables(m, x.shape)
    feats = m.apply(v, x, features_only=True)
    chex.assert_shape(feats, (2, 64))  # width 8 * 2**3
    _, inter = m.apply(v, x, mutable=["intermediates"])
    stages = inter["intermediates"]
    assert {"stem", "stage1", "stage4"} <= set(stages)
    chex.assert_shape(stages["stage4"][0], (2, 4, 4, 64))


@pytest.mark.parametrize("name", jaxcnn.list_models())
def test_every_model_returns_its_intermediates(name):
    # Shapes only (eval_shape). A sown name that is also a submodule's name raises in Flax, so this
    # fails for any model whose stem or blocks are named like its intermediates.
    m = jaxcnn.create_model(name)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    v = jax.eval_shape(lambda x: m.init(jax.random.PRNGKey(0), x), x)
    feats = jax.eval_shape(lambda v, x: m.apply(v, x, features_only=True), v, x)
    _, inter = jax.eval_shape(lambda v, x: m.apply(v, x, mutable=["intermediates"]), v, x)
    names = set(inter["intermediates"])
    n = len([k for k in names if k.startswith("stage")])
    assert n >= 2 and names - {"stem"} == {f"stage{i + 1}" for i in range(n)}, names
    assert ("stem" in names) == (name not in ("simple_cnn", "vgg16_bn_cifar")), names
    sides = [inter["intermediates"][f"stage{i + 1}"][0].shape[1] for i in range(n)]
    assert all(a > b for a, b in zip(sides, sides[1:])), sides  # one per resolution, in order


def test_torch_style_padding_on_strided_convs():
    # PyTorch pads a 3x3 stride-2 conv by 1 on every side; 'SAME' would pad (0, 1) on even inputs.
    c = layers.conv(1, 3, 2)
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    v = {"params": {"kernel": jnp.ones((3, 3, 1, 1))}}
    y = c.apply(v, x)
    # Top-left output sees rows/cols -1..1 -> only x[0:2, 0:2] = 0+1+4+5.
    assert float(y[0, 0, 0, 0]) == 10.0


def test_library_sets_the_cpu_convolution_flag_once(monkeypatch):
    from jaxcnn import _xla
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    monkeypatch.delenv("JAXCNN_KEEP_XLA_FLAGS", raising=False)
    assert _xla.configure_xla_cpu()
    assert _xla.NO_YNN_CONV in __import__("os").environ["XLA_FLAGS"]
    assert "device_count=2" in __import__("os").environ["XLA_FLAGS"]
    assert not _xla.configure_xla_cpu()  # already there: not added twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert not _xla.configure_xla_cpu()  # the user's own setting wins
    monkeypatch.setenv("JAXCNN_KEEP_XLA_FLAGS", "1")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not _xla.configure_xla_cpu()
    monkeypatch.delenv("JAXCNN_KEEP_XLA_FLAGS")
    for version, known in (((0, 9), False), ((0, 10), True), ((0, 11), False)):  # XLA aborts on unknown flags
        monkeypatch.setattr(_xla, "_jaxlib_version", lambda: version)
        monkeypatch.setenv("XLA_FLAGS", "")
        assert _xla.configure_xla_cpu() == known, version


def _ynn_convolutions(hlo: str) -> int:
    """Convolutions inside computations called by YNNPACK fusions in compiled HLO text."""
    import re
    bodies = dict(re.findall(r"^%?([\w.\-]+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", hlo, re.S | re.M))
    called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo)
    return sum(bodies.get(c, "").count("convolution(") for c in called)


def test_eval_compiles_with_matmul_only_ynn_fusions(monkeypatch):
    from jaxcnn import _xla, ops
    monkeypatch.delenv("JAXCNN_KEEP_XLA_FLAGS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", _xla.NO_YNN_CONV)  # what jaxcnn itself sets
    monkeypatch.setattr(ops, "ONEDNN", False)  # XLA's own convolutions, which YNNPACK can fuse
    opts = _xla.eval_compiler_options()
    assert opts == {_xla.YNN_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    # XLA accepts it, and the compiled forward of a CNN no longer runs convolutions in YNNPACK
    # fusions (which the training options do, pulled in by the pooling reductions).
    model = jaxcnn.create_model("simple_cnn")  # tiny widths are too small for YNNPACK fusions
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
    v = model.init(jax.random.PRNGKey(0), x[:1])
    fwd = jax.jit(lambda v, x: model.apply(v, x), compiler_options=opts).lower(v, x).compile()
    default = jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).compile()
    assert _ynn_convolutions(default.as_text()) > 0
    assert _ynn_convolutions(fwd.as_text()) == 0
    np.testing.assert_allclose(fwd(v, x), default(v, x), rtol=1e-5, atol=1e-6)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
    assert _xla.eval_compiler_options() == {}  # the user's own setting wins


@pytest.mark.parametrize("name,kw", [("resnet18_cifar", {}), ("densenet_bc_small", {}),
                                     ("densenet_bc_small", {"remat": True}), ("simple_cnn", {}),
                                     ("resnet50", {})])
def test_cpu_ops_give_the_plain_flax_gradients(name, kw):
    # jaxcnn.ops (fenced convs, 1x1 matmuls, max-pool and BatchNorm gradients, dense blocks'
    # shared BatchNorm statistics, with and without recomputation) must change speed only:
    # same loss, parameter gradients and BatchNorm updates as plain Flax/XLA layers.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    y = jnp.arange(4) % 5

    def run(on):
        with ops.enabled(on):
            model = tiny(name, **kw)
            v = random_variables(model, x.shape)

            def loss(p):
                out, upd = model.apply({**v, "params": p}, x, train=True, mutable=["batch_stats"],
                                       rngs={"dropout": jax.random.PRNGKey(1)})
                ce = -jnp.take_along_axis(jax.nn.log_softmax(out), y[:, None], 1).mean()
                return ce, upd

            return jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])

    (l1, u1), g1 = run(True)
    (l0, u0), g0 = run(False)
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    # float32 sums in another order: deep nets (resnet18) differ by ~1e-4 relative.
    chex.assert_trees_all_close(g1, g0, rtol=2e-3, atol=1e-4)
    chex.assert_trees_all_close(u1, u0, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,dtype", [("densenet_bc_small", jnp.float32), ("resdensenet_cifar", jnp.float32),
                                        ("densenet_bc_small", jnp.bfloat16)])
def test_dense_blocks_grow_one_buffer_in_inference(name, dtype):
    model = tiny(name, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    v = random_variables(model, x.shape)
    hlo = lambda: jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).as_text()
    text = hlo()
    assert "concatenate" not in text and "dynamic_update_slice" in text
    # bf16 updates as uint16 bits: XLA:CPU would upcast a bf16 update of the whole buffer to f32
    compiled = jax.jit(lambda v, x: model.apply(v, x)).lower(v, x).compile().as_text()
    assert dtype == jnp.float32 or not re.search(r"f32\[[0-9,]+\]\{[0-9,]+\} dynamic-update-slice", compiled)
    got = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    with ops.switched(DENSE_BUFFER=False):  # the concatenating path (training's): same logits
        assert "concatenate" in hlo()
        want = jax.jit(lambda v, x: model.apply(v, x))(v, x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_avg_pool_2x2_matches_flax_pool_and_its_gradient(size, dtype):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size + 2, 5)), dtype)
    ref = lambda x: nn.avg_pool(x.astype(jnp.float32), (2, 2), (2, 2)).astype(x.dtype)
    got = layers.avg_pool_2x2(x)
    assert got.shape == ref(x).shape and got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref(x), np.float32), rtol=1e-6, atol=1e-6)
    g = jnp.asarray(np.random.default_rng(2).normal(size=got.shape), jnp.float32)
    grad = lambda f: jax.grad(lambda x: jnp.sum(f(x).astype(jnp.float32) * g))(x)
    np.testing.assert_allclose(np.asarray(grad(layers.avg_pool_2x2), np.float32),
                               np.asarray(grad(ref), np.float32), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [8, 9])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_transition_pools_before_its_conv(size, dtype):
    t = layers.Transition(6, dtype=dtype)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, 10)), jnp.float32)
    v = random_variables(t, x.shape)

    def conv_then_pool(v, x):  # the definition (torchvision's order)
        p, s = v["params"], v["batch_stats"]
        y = nn.relu(layers.BatchNorm(use_running_average=True, dtype=dtype).apply(
            {"params": p["norm"], "batch_stats": s["norm"]}, x))
        y = lax.conv_general_dilated(y, p["conv"]["kernel"].astype(dtype), (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return nn.avg_pool(y.astype(jnp.float32), (2, 2), (2, 2))

    got = t.apply(v, x)
    assert got.shape == (2, size // 2, size // 2, 6) and got.dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), conv_then_pool(v, x), rtol=tol, atol=tol)


def test_fastnet_2x2_stem_is_unpadded_and_whitens_every_patch_direction():
    # airbench's layer: a 2x2 unpadded stem (32 -> 31 px, then 15, 7, 3), whose 24 filters are
    # +/- all 12 directions of a 2x2x3 patch, so whitening keeps every direction.
    from jaxcnn.train.whiten import whitening_kernel
    m = jaxcnn.create_model("fastnet", stem_kernel=2)
    x = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    v = random_variables(m, x.shape)
    assert v["params"]["stem_conv"]["kernel"].shape == (2, 2, 3, 24)
    _, inter = m.apply(v, jnp.asarray(x, jnp.float32), mutable=["intermediates"])
    assert [inter["intermediates"][k][0].shape[1] for k in ("stem", "stage1", "stage2", "stage3")] == [31, 15, 7, 3]
    w = whitening_kernel(x, (128.0,) * 3, (64.0,) * 3, (2, 2, 3, 24))
    z = (x.astype(np.float32) - 128.0) / 64.0
    p = np.lib.stride_tricks.sliding_window_view(z, (2, 2), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    out = p.reshape(-1, 12) @ w.reshape(12, 24)
    cov = out.T @ out / len(out)
    np.testing.assert_allclose(cov[:12, :12], np.eye(12), atol=3e-3)  # uniform noise: eigenvalues ~0.33
    np.testing.assert_allclose(cov[12:, 12:], np.eye(12), atol=3e-3)


def test_fastnet_airbench_stem_has_a_bias_and_no_batchnorm_and_bn_momentum_is_flax_s():
    # stem_norm=False is airbench's stem: act(whitening conv + bias), no BatchNorm after it
    m = jaxcnn.create_model("fastnet", widths=(8, 16, 16), stem_norm=False, bn_momentum=0.6)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
    v = random_variables(m, x.shape)
    p = v["params"]["stem_conv"]
    assert "stem_bn" not in v["params"] and p["bias"].shape == (24,)
    _, inter = m.apply(v, x, mutable=["intermediates"])
    want = nn.relu(lax.conv_general_dilated(x, p["kernel"], (1, 1), "VALID",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"])
    np.testing.assert_allclose(inter["intermediates"]["stem"][0], want, rtol=1e-5, atol=1e-5)
    # the running mean moves by (1 - momentum) of the batch's: compare momentum 0.6 with 0.9
    m9 = jaxcnn.create_model("fastnet", widths=(8, 16, 16), stem_norm=False, bn_momentum=0.9)
    before = np.asarray(v["batch_stats"]["block1"]["bn1"]["mean"])
    got = {mom: np.asarray(mod.apply(v, x, train=True, mutable=["batch_stats"])[1]
                           ["batch_stats"]["block1"]["bn1"]["mean"]) for mom, mod in ((0.6, m), (0.9, m9))}
    batch_mean = (got[0.9] - 0.9 * before) / 0.1
    assert np.abs(batch_mean).max() > 1e-3
    np.testing.assert_allclose(got[0.6], 0.6 * before + 0.4 * batch_mean, rtol=1e-4, atol=1e-5)
