"""`jaxcnn.summary`: totals pinned to seed 004's torchsummary output and MACs to hand counts."""
import flax.linen as nn

import jaxcnn
from jaxcnn.summary import summary


def test_resdensenet_matches_seed_torchsummary():
    lines = []
    r = summary(jaxcnn.create_model("resdensenet", num_classes=3), (1, 224, 224, 3), print_fn=lines.append)
    # Seed 004's `torchsummary.summary(model, (3, 224, 224))` prints "Total params: 1,986,691".
    assert r["total_params"] == r["trainable_params"] == 1_986_691
    assert "Total params: 1,986,691" in lines
    assert r["macs"] > 0 and r["output_shape"] == (1, 3)
    # BN running mean + var: 2 x the BN channels (the seed's BN scale+bias are 19,904 params too).
    assert r["non_trainable_params"] == 19_904
    assert sum(row["params"] for row in r["rows"]) == r["total_params"]
    rows = {row["path"]: row for row in r["rows"]}
    # Rows the seed's table shows: Conv2d-1, Conv2d-116, Linear-119.
    assert rows["stem_conv"]["params"] == 9_408 and rows["stem_conv"]["output_shape"] == (1, 112, 112, 64)
    assert rows["block4/compress_conv"]["params"] == 327_680
    assert rows["classifier"]["params"] == 1_539 and rows["classifier"]["type"] == "Dense"
    assert abs(r["input_size_mb"] - 0.57) < 0.005 and abs(r["params_size_mb"] - 7.58) < 0.005


def test_simple_cnn_macs_by_hand():
    r = summary("simple_cnn", (32, 32, 3), print_fn=None)
    # conv 32x32x32 outputs x 3x3x3 + conv 16x16x64 x 3x3x32 + conv 8x8x128 x 3x3x64 (max-pools
    # between) + FC 128->128 + FC 128->10.
    assert r["macs"] == 32 * 32 * 32 * 27 + 16 * 16 * 64 * 288 + 8 * 8 * 128 * 576 + 128 * 128 + 128 * 10
    assert r["macs"] == 10_339_584
    # convs with bias 896 + 18,496 + 73,856, BN 2*(32+64+128), FC 16,512 + 1,290.
    assert r["total_params"] == 111_498
    r4 = summary("simple_cnn", (32, 32, 3), batch_size=4, print_fn=None)
    assert r4["macs"] == 4 * r["macs"] and r4["total_params"] == r["total_params"]


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3), padding=1, use_bias=False)(x)             # 8x8x16 x 3x3x4
        x = nn.Conv(16, (3, 3), (2, 2), padding=1, feature_group_count=16)(x)  # 4x4x16 x 3x3x1
        return nn.Dense(5)(x.mean((1, 2)))                                 # 16 x 5


def test_grouped_conv_macs_and_xla():
    r = summary(_Tiny(), (1, 8, 8, 4), print_fn=None, xla_flops=True)
    assert r["macs"] == 8 * 8 * 16 * 36 + 4 * 4 * 16 * 9 + 16 * 5
    assert r["total_params"] == 3 * 3 * 4 * 16 + (3 * 3 * 1 * 16 + 16) + (16 * 5 + 5)
    assert r["non_trainable_params"] == 0
    # XLA counts 2 flops per multiply-add but skips kernel taps that fall on the zero padding
    # (3x3 'same' on 8x8: 22^2 of 24^2 taps), then adds bias, pooling and the mean.
    assert r["macs"] < r["xla_flops"] < 2 * r["macs"]


def test_package_exports():
    import jaxcnn.summary as mod
    assert jaxcnn.summary is summary
    r = mod.summary(jaxcnn.create_model("simple_cnn", num_classes=10), (1, 32, 32, 3), print_fn=None)
    assert r["output_shape"] == (1, 10)
    # The call `python -m jaxcnn summary` makes.
    assert jaxcnn.summary.summary is summary and "summary" in jaxcnn.__all__


def test_resnet50_macs_match_published():
    # torchvision ResNet-50 at 224: 4.09 GMACs (fvcore/ptflops convention, convs + FC).
    r = summary("resnet50", (224, 224, 3), print_fn=None)
    assert r["total_params"] == 25_557_032
    assert round(r["macs"] / 1e9, 2) == 4.09
