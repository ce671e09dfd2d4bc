"""Data pipeline: every source, the bad-input errors, jitted augmentation, Loader, sharding."""
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcnn.data import (ArrayDataset, AugmentConfig, KNOWN_TFDS_DATASETS, Loader, channel_stats,
                         load_data, pipeline_throughput, prefetch, preprocess)
from _realdata import REPO, cifar_jpeg_subset

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="session")
def real_dir(tmp_path_factory):
    """20 train + 10 test real CIFAR-10 JPEGs per class; read-only by convention (copy to mutate)."""
    return cifar_jpeg_subset(tmp_path_factory.mktemp("cifar_jpeg"), 20, 10)


@pytest.fixture
def cache(tmp_path):
    return str(tmp_path / "cache")


def write_image(path: Path, size=(8, 8), mode="RGB", value=100, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path, format=fmt)


def small_folder(root: Path, classes=("a", "b"), n=5, size=(8, 8)):
    for c in classes:
        for i in range(n):
            write_image(root / c / f"{i:03d}.png", size, value=(i * 20, 50, 100))
    return root


# ---------------------------------------------------------------- image folders


def test_image_folder_real_jpegs(real_dir, cache):
    s = load_data("cifar10", str(real_dir), cache_dir=cache)
    assert s.class_names == CIFAR10 and s.num_classes == 10
    assert s.train.images.shape == (200, 32, 32, 3) and s.train.images.dtype == np.uint8
    assert s.test.images.shape == (100, 32, 32, 3) and s.train.labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(s.train.labels), [20] * 10)
    assert s.val is None and s.skipped == 0 and "train/test" in s.source
    # Pixels are exactly PIL's decode of the file; label 3 starts at index 60 (sorted classes).
    cats = real_dir / "train" / "cat"
    ref = np.asarray(Image.open(cats / sorted(os.listdir(cats))[0]))
    np.testing.assert_array_equal(s.train.images[60], ref)
    assert all(100 < m < 140 for m in s.mean) and all(50 < d < 75 for d in s.std)
    # Statistics from the cached histograms match a direct computation.
    np.testing.assert_allclose(s.mean + s.std, np.concatenate(channel_stats(s.train.images)))

    assert len(list(Path(cache).glob("*.npz"))) == 2
    again = load_data("cifar10", str(real_dir), cache_dir=cache, val_fraction=0.1)
    assert len(again.train) == 180 and len(again.val) == 20
    np.testing.assert_allclose(again.mean, channel_stats(again.train.images)[0])
    small = load_data("cifar10", str(real_dir), cache_dir=cache, limit_per_class=3, image_size=16)
    assert small.train.images.shape == (30, 16, 16, 3) and len(small.test) == 30


def test_bad_files_are_skipped_and_counted(real_dir, tmp_path, cache):
    d = shutil.copytree(real_dir, tmp_path / "data")
    good = sorted((d / "train" / "cat").iterdir())[0].read_bytes()
    (d / "train" / "cat" / "zzz_truncated.jpg").write_bytes(good[: len(good) // 3])
    (d / "train" / "dog" / "notes.txt").write_text("not an image")
    (d / "train" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    for _ in range(2):  # the second load comes from the cache and must report the same
        with pytest.warns(UserWarning, match="skipped 3 unreadable") as rec:
            s = load_data("x", str(d), cache_dir=cache)
        assert len([w for w in rec if "skipped" in str(w.message)]) == 1
        assert s.skipped == 3 and len(s.train) == 200
        assert "zzz_truncated.jpg" in str(rec[0].message) and "np.str_" not in str(rec[0].message)


def _mismatch(root):
    small_folder(root / "train", ("a", "b"))
    small_folder(root / "test", ("a", "c"))


def _unreadable(root):
    small_folder(root)
    shutil.rmtree(root / "b")
    (root / "b").mkdir()
    (root / "b" / "x.jpg").write_bytes(b"garbage")


@pytest.mark.parametrize("make, match", [
    (lambda r: None, "does not exist"),
    (lambda r: r.mkdir(), "no class sub-folders"),
    (lambda r: (small_folder(r), (r / "empty").mkdir()), r"class folder .*empty contains no files"),
    (_unreadable, r"class folder .*b has no readable images"),
    (_mismatch, r"only in train \['b'\], only in test \['c'\]"),
    (lambda r: small_folder(r / "train"), "not the matching test/"),
    (lambda r: (small_folder(r, ("a",)), write_image(r / "b" / "big.png", (9, 7))), "pass --image-size"),
    (lambda r: r.write_text("x"), "is a file"),
])
def test_bad_input_errors_name_the_path_and_fix(tmp_path, cache, make, match):
    root = tmp_path / "d"
    make(root)
    with pytest.raises(ValueError, match=match) as e:
        load_data("x", str(root), cache_dir=cache)
    assert str(tmp_path) in str(e.value)


def test_single_folder_split_and_modes(tmp_path, cache):
    root = small_folder(tmp_path / "d", ("a", "b"), n=10)
    s = load_data("x", str(root), cache_dir=cache, test_fraction=0.2, seed=4)
    assert (len(s.train), len(s.test)) == (16, 4) and "20% test" in s.source
    np.testing.assert_array_equal(np.bincount(s.test.labels), [2, 2])  # stratified
    same = load_data("x", str(root), cache_dir=cache, test_fraction=0.2, seed=4)
    other = load_data("x", str(root), cache_dir=cache, test_fraction=0.2, seed=5)
    np.testing.assert_array_equal(s.test.images, same.test.images)
    assert not np.array_equal(s.test.images, other.test.images)
    with pytest.raises(ValueError, match="test_fraction"):
        load_data("x", str(root), cache_dir=cache, test_fraction=0.0)

    # Every PIL mode and size ends up as RGB at image_size; 16-bit is rescaled, not clipped.
    m = tmp_path / "modes"
    write_image(m / "a" / "l.png", (10, 6), "L", 200)
    write_image(m / "a" / "rgba.png", (5, 5), "RGBA", (10, 20, 30, 0))
    Image.new("RGB", (7, 7), (1, 2, 3)).convert("P").save(m / "a" / "p.png")
    write_image(m / "b" / "cmyk.jpg", (12, 12), "CMYK", (0, 0, 0, 0))
    Image.fromarray(np.full((6, 6), 32896, np.uint16)).save(m / "b" / "i16.png")
    s = load_data("x", str(m), cache_dir=cache, image_size=4, test_fraction=0.5)
    imgs = np.concatenate([s.train.images, s.test.images])
    assert imgs.shape == (5, 4, 4, 3)
    all_px = {tuple(i[0, 0]) for i in imgs}
    assert (128, 128, 128) in all_px and (200, 200, 200) in all_px and (255, 255, 255) in all_px


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar_python_batches(tmp_path):
    rng = np.random.default_rng(0)
    d10 = tmp_path / "cifar-10-batches-py"
    d10.mkdir()
    rows = {}
    for i in range(1, 6):
        rows[i] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        _pickle(d10 / f"data_batch_{i}", {b"data": rows[i], b"labels": [i, i, 0, 1]})
    _pickle(d10 / "test_batch", {b"data": rows[1][:3], b"labels": [9, 8, 7]})
    _pickle(d10 / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10]})
    for where in (tmp_path, d10):  # the folder itself or its parent
        s = load_data("cifar10", str(where))
        assert s.class_names == CIFAR10 and len(s.train) == 20 and len(s.test) == 3
        # Rows are CHW planes: pixel (y, x) channel c is byte c*1024 + y*32 + x.
        assert s.train.images[0, 2, 5, 1] == rows[1][0, 1024 + 2 * 32 + 5]
    assert len(load_data("cifar10", str(tmp_path), limit_per_class=1).train) == 6

    d100 = tmp_path / "c100" / "cifar-100-python"
    d100.mkdir(parents=True)
    _pickle(d100 / "train", {b"data": rows[2], b"fine_labels": [0, 1, 2, 99], b"coarse_labels": [0] * 4})
    _pickle(d100 / "test", {b"data": rows[3][:2], b"fine_labels": [5, 6], b"coarse_labels": [0] * 2})
    _pickle(d100 / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)]})
    s = load_data("cifar100", str(tmp_path / "c100"))
    assert s.num_classes == 100 and list(s.train.labels) == [0, 1, 2, 99] and "cifar-100" in s.source


def test_tfds_data_source_mocked_and_offline_error(monkeypatch, tmp_path):
    import tensorflow_datasets as tfds

    prepared = tmp_path / "tfds" / "cifar10" / "3.0.2"  # a data_dir holding a prepared TFDS set
    prepared.mkdir(parents=True)
    (prepared / "dataset_info.json").write_text("{}")

    assert {"cifar10", "cifar100", "mnist"} <= set(KNOWN_TFDS_DATASETS)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        s = load_data("cifar10", val_fraction=0.0)
        assert s.train.images.shape == (6, 32, 32, 3) and len(s.test) == 6 and s.num_classes == 10
        assert "data_source" in s.source
        m = load_data("mnist", image_size=16)
        assert m.train.images.shape == (6, 16, 16, 3)  # greyscale repeated to RGB, then resized
        assert "data_dir=" in load_data("cifar10", str(tmp_path / "tfds")).source

    def offline(*a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(tfds, "data_source", offline)
    with pytest.raises(RuntimeError, match=r"cifar10.*no route to host.*--data-dir.*cifar-10-batches-py"):
        load_data("cifar10")


# ---------------------------------------------------------------- augmentation


def _batch(b=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, b).astype(np.int32)


MEAN, STD = (125.0, 123.0, 114.0), (63.0, 62.0, 66.0)
FULL = AugmentConfig(brightness=0.2, contrast=0.2, saturation=0.2, rotation=15, shift=0.1, zoom=0.1,
                     cutout=8, mixup_alpha=0.2, cutmix_alpha=1.0)


def _pre(aug, dtype=jnp.float32):
    return jax.jit(lambda r, x, y: preprocess(r, x, y, num_classes=10, mean=MEAN, std=STD,
                                              augment=aug, dtype=dtype))


def test_eval_path_only_normalises():
    x, y = _batch()
    out, soft = _pre(None)(jax.random.key(0), x, y)
    np.testing.assert_allclose(out, (x - np.array(MEAN)) / np.array(STD), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(soft, np.eye(10)[y])


@pytest.mark.parametrize("aug, dtype", [(AugmentConfig(), jnp.float32), (FULL, jnp.bfloat16)])
def test_augment_shapes_ranges_determinism(aug, dtype):
    x, y = _batch(32)
    f = _pre(aug, dtype)
    a, la = f(jax.random.key(1), x, y)
    b, lb = f(jax.random.key(1), x, y)
    c, _ = f(jax.random.key(2), x, y)
    assert a.shape == x.shape and a.dtype == dtype and la.shape == (32, 10) and la.dtype == jnp.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    lo, hi = (0 - np.array(MEAN)) / np.array(STD), (255 - np.array(MEAN)) / np.array(STD)
    a32 = np.asarray(a, np.float32)
    assert np.all(a32 >= lo - 0.02) and np.all(a32 <= hi + 0.02)
    np.testing.assert_allclose(la.sum(1), 1.0, rtol=1e-6)
    if aug is FULL:  # labels really are mixtures for some examples
        assert np.sum(la.max(1) < 0.999) > 0


def test_flip_and_crop_move_pixels_correctly():
    x, y = _batch(64)
    x[:] = x[0]  # one image everywhere: every output must be it or its mirror
    out, _ = _pre(AugmentConfig(crop_padding=0, flip=True))(jax.random.key(3), x, y)
    raw = np.asarray(out) * np.array(STD) + np.array(MEAN)
    same = np.all(np.isclose(raw, x[0], atol=1e-3), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(raw, x[0][:, ::-1], atol=1e-3), axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < same.sum() < 54

    out, _ = _pre(AugmentConfig(crop_padding=4, flip=False, pad_mode="constant"))(jax.random.key(4), x, y)
    raw = np.rint(np.asarray(out) * np.array(STD) + np.array(MEAN)).astype(np.int64)
    padded = np.pad(x[0], ((4, 4), (4, 4), (0, 0))).astype(np.int64)
    windows = {(i, j) for i in range(9) for j in range(9)}
    for img in raw[:8]:  # each output is exactly one 32x32 window of the zero-padded image
        assert any(np.array_equal(img, padded[i:i + 32, j:j + 32]) for i, j in windows)


def test_mix_labels_match_pixels_and_affine_identity():
    from jaxcnn.data.augment import mix, random_affine

    x = jnp.asarray(_batch(16)[0], jnp.float32)
    y = jnp.eye(16)  # example i has its own class, so label weights reveal who was mixed with whom

    @jax.jit
    def both(key):
        return mix(key, x, y, 0.4, 0.0), mix(key, x, y, 0.0, 1.0)

    (mx, my), (cx, cy) = both(jax.random.key(5))
    for i in range(16):
        np.testing.assert_allclose(my[i].sum(), 1.0, rtol=1e-6)
        others = np.where(np.arange(16) == i, -1.0, np.asarray(my[i]))
        lam, j = float(my[i, i]), (int(others.argmax()) if my[i, i] < 1 else i)
        np.testing.assert_allclose(mx[i], lam * x[i] + (1 - lam) * x[j], rtol=1e-4, atol=1e-3)
        # cutmix: the label share of the partner is exactly the share of pasted pixels
        from_self = np.all(np.asarray(cx[i]) == np.asarray(x[i]), axis=-1).mean()
        np.testing.assert_allclose(cy[i, i], from_self, atol=1e-6) if cy[i, i] < 1 else None
        np.testing.assert_allclose(cy[i].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(random_affine(jax.random.key(6), x, 0.0, 0.0, 0.0), x, atol=1e-4)


def test_flip_inside_the_warp_equals_flipping_first():
    """preprocess folds the flip into the affine warp (one pass, see its comment): the result must
    be the warp of the mirrored images, and with a zero-strength warp exactly the mirror."""
    from jaxcnn.data.augment import flip_where, random_affine

    x = jnp.asarray(_batch(16)[0], jnp.float32)
    flips = jnp.arange(16) % 3 == 0
    key = jax.random.key(7)
    inside = random_affine(key, x, 15.0, 0.1, 0.1, flip=flips)
    first = random_affine(key, flip_where(flips, x), 15.0, 0.1, 0.1)
    np.testing.assert_allclose(inside, first, rtol=1e-5, atol=1e-3)
    assert not np.allclose(inside, random_affine(key, x, 15.0, 0.1, 0.1), atol=1.0)
    np.testing.assert_allclose(random_affine(key, x, 0.0, 0.0, 0.0, flip=flips),
                               np.where(np.asarray(flips)[:, None, None, None], x[:, :, ::-1], x), atol=1e-4)

    # and through preprocess: a warp of strength ~0 with flip on mirrors some images, not others
    imgs, y = _batch(64)
    imgs[:] = imgs[0]
    out, _ = _pre(AugmentConfig(crop_padding=0, flip=True, rotation=1e-6))(jax.random.key(8), imgs, y)
    raw = np.asarray(out) * np.array(STD) + np.array(MEAN)
    same = np.all(np.isclose(raw, imgs[0], atol=1e-2), axis=(1, 2, 3))
    mirrored = np.all(np.isclose(raw, imgs[0][:, ::-1], atol=1e-2), axis=(1, 2, 3))
    assert np.all(same | mirrored) and 10 < same.sum() < 54


def test_choices_from_one_draw_cover_their_ranges_independently():
    """preprocess takes every per-example choice from one block of uniforms (one column each):
    each crop offset and both flip outcomes occur, and the flip does not follow the offset."""
    x, y = _batch(512)
    x[:] = x[0]
    out, _ = _pre(AugmentConfig(crop_padding=2, flip=True, pad_mode="constant"))(jax.random.key(9), x, y)
    raw = np.rint(np.asarray(out) * np.array(STD) + np.array(MEAN)).astype(np.int64)
    padded = np.pad(x[0], ((2, 2), (2, 2), (0, 0))).astype(np.int64)
    seen = {}
    for img in raw:
        for flip in (False, True):
            src = padded[:, ::-1] if flip else padded
            hits = [(i, j) for i in range(5) for j in range(5) if np.array_equal(img, src[i:i + 32, j:j + 32])]
            if hits:  # keyed by the row offset, which mirroring keeps
                seen.setdefault(hits[0][0], []).append(flip)
                break
        else:
            raise AssertionError("an output is no window of the padded image or its mirror")
    assert sorted(seen) == list(range(5))  # every row offset occurs
    for flips in seen.values():  # and each row offset comes both plain and mirrored
        assert 0 < sum(flips) < len(flips)


def test_colour_jitter_matches_a_numpy_reference():
    """jitter_at against torchvision's order (brightness, contrast with the mean grey of the
    pixels, saturation), each clamped to 0..255; jaxcnn takes the mean grey as the grey of the
    mean colour, the same sum in another order."""
    from jaxcnn.data.augment import jitter_at

    x = _batch(8)[0].astype(np.float32)
    u = np.random.default_rng(3).random((8, 3)).astype(np.float32)
    b, c, s = 0.3, 0.4, 0.5
    grey = lambda im: im[..., 0] * 0.299 + im[..., 1] * 0.587 + im[..., 2] * 0.114
    f = lambda col, m: (1.0 + m * (2 * u[:, col] - 1))[:, None, None, None]
    want = np.clip(x + 255 * (b * (2 * u[:, 0] - 1))[:, None, None, None], 0, 255)
    m = grey(want).mean(axis=(1, 2))[:, None, None, None]
    want = np.clip(m + f(1, c) * (want - m), 0, 255)
    g = grey(want)[..., None]
    want = np.clip(g + f(2, s) * (want - g), 0, 255)
    got = jax.jit(lambda u, x: jitter_at(u, x, b, c, s))(u, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-3)


# ---------------------------------------------------------------- batching


def _ds(n=10):
    return ArrayDataset(np.arange(n, dtype=np.uint8)[:, None, None, None].repeat(3, -1), np.arange(n))


def test_loader_deterministic_padded_and_resumable():
    ds = _ds(10)
    ld = Loader(ds, 4, shuffle=True, drop_last=False, seed=7)
    assert ld.steps_per_epoch == 3
    e0 = list(ld.epoch(0))
    assert all(b["image"].shape == (4, 1, 1, 3) and b["label"].dtype == np.int32 for b in e0)
    np.testing.assert_array_equal(e0[-1]["mask"], [True, True, False, False])
    seen = np.concatenate([b["label"][b["mask"]] for b in e0])
    assert sorted(seen) == list(range(10))
    again = list(Loader(ds, 4, shuffle=True, drop_last=False, seed=7).epoch(0))
    assert all(np.array_equal(a["label"], b["label"]) for a, b in zip(e0, again))
    e1 = np.concatenate([b["label"] for b in ld.epoch(1)])
    assert not np.array_equal(e1, np.concatenate([b["label"] for b in e0]))
    resumed = list(ld.epoch(0, start_step=1))
    assert len(resumed) == 2 and np.array_equal(resumed[0]["label"], e0[1]["label"])

    ordered = Loader(ds, 4, shuffle=False, drop_last=True)
    assert ordered.steps_per_epoch == 2
    assert list(next(ordered.epoch(0))["label"]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="drop_last"):
        Loader(ds, 11, shuffle=False, drop_last=True)


def test_alternate_flip_mirrors_each_image_in_every_other_epoch():
    rng = np.random.default_rng(0)
    n = 64
    ds = ArrayDataset(rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8), np.arange(n, dtype=np.int32))
    ld = Loader(ds, 16, shuffle=True, drop_last=True, seed=3, alternate_flip=True)

    def mirrored(epoch):  # per image (label = index): was it served mirrored?
        out = np.zeros(n, bool)
        for b in ld.epoch(epoch):
            for img, i in zip(b["image"], b["label"]):
                same, flip = np.array_equal(img, ds.images[i]), np.array_equal(img, ds.images[i][:, ::-1])
                assert same or flip
                out[i] = flip
        return out

    e0, e1, e2 = mirrored(0), mirrored(1), mirrored(2)
    np.testing.assert_array_equal(e1, ~e0)  # each image both ways over two epochs
    np.testing.assert_array_equal(e2, e0)
    assert 16 <= e0.sum() <= 48  # a random half, not all or none
    resumed = next(ld.epoch(1, start_step=2))  # a resumed epoch serves the same views
    np.testing.assert_array_equal(resumed["image"], list(ld.epoch(1))[2]["image"])
    plain = Loader(ds, 16, shuffle=True, drop_last=True, seed=3)
    np.testing.assert_array_equal(next(plain.epoch(0))["image"], ds.images[next(plain.epoch(0))["label"]])
    from jaxcnn.train import TrainConfig
    assert not TrainConfig(alternate_flip=True).augment_config().flip  # the step flips nothing more
    with pytest.raises(ValueError, match="alternate_flip .* needs flip"):
        TrainConfig(alternate_flip=True, flip=False).validate()


def test_prefetch_order_errors_and_early_stop():
    assert list(prefetch(iter(range(5)), 2)) == list(range(5))

    def boom():
        yield 1
        raise KeyError("producer failed")

    with pytest.raises(KeyError, match="producer failed"):
        list(prefetch(boom()))
    it = prefetch(iter(range(1000)), 1)
    assert next(it) == 0
    it.close()  # must not hang


def test_pipeline_throughput_smoke():
    x, y = _batch(64)
    assert pipeline_throughput(ArrayDataset(x, y), 16, AugmentConfig(), steps=2) > 0


def test_shard_batch_on_four_cpu_devices():
    # A fresh process: XLA's device count is fixed once jax initialises in this one.
    code = textwrap.dedent("""
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
        from jaxcnn.data import ArrayDataset, AugmentConfig, Loader, pipeline_throughput, shard_batch
        assert jax.device_count() == 4, jax.devices()
        sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), P("data"))
        ds = ArrayDataset(np.zeros((40, 8, 8, 3), np.uint8), np.arange(40) % 10)
        b = shard_batch(next(Loader(ds, 8, shuffle=True, drop_last=True).epoch(0)), sh)
        assert b["image"].shape == (8, 8, 8, 3) and len(b["image"].addressable_shards) == 4
        assert b["image"].addressable_shards[0].data.shape == (2, 8, 8, 3) and b["mask"].sharding == sh
        try:
            shard_batch({"image": np.zeros((6, 2))}, sh)
            raise SystemExit("no error for 6 rows on 4 devices")
        except ValueError as e:
            assert "multiple of the device count" in str(e)
        assert pipeline_throughput(ds, 8, AugmentConfig(), steps=2, sharding=sh) > 0
        print("OK")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]
