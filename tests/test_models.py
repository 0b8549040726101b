"""Model zoo: parameter counts to the unit, output shapes of every head, input checks,
torchvision-layout weights, initialisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vggkit.errors import CheckpointError, UsageError
from vggkit.models import (
    ARCHITECTURES,
    HEADS,
    count_parameters,
    create_model,
    format_summary,
    load_matching,
    summary_dict,
)
from vggkit.models.weights import remap_stagewise


@pytest.mark.parametrize(
    "name, kwargs, trainable, total",
    [
        ("vgg16", dict(head="classic"), 33_638_218, 33_638_218),
        ("vgg19", dict(head="bn"), 43_033_362, 43_052_770),
        ("vgg16_bn", dict(head="gap", num_classes=100), 14_774_436, 14_774_436 + 8_448),
        ("vgg16", dict(head="imagenet", input_size=224, num_classes=1000), 138_357_544, 138_357_544),
        ("vgg16_bn", dict(head="imagenet", input_size=224, num_classes=1000), 138_365_992,
         138_365_992 + 8_448),
        ("vgg_compact", dict(), 2_491_838, 2_494_982),
    ],
)
def test_reference_parameter_counts(name, kwargs, trainable, total):
    counts = count_parameters(create_model(name, **kwargs))
    assert counts["trainable"] == trainable
    assert counts["total"] == total
    assert counts["non_trainable"] == total - trainable


def test_linear_head_is_conv_stack_plus_one_dense_layer():
    conv_only = 14_714_688 + 2 * 4_224  # VGG-16 convs + BN weight/bias per channel
    counts = count_parameters(create_model("vgg16_bn", head="linear"))
    assert counts["trainable"] == conv_only + 512 * 10 + 10


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("channels, size", [(3, 32), (1, 32), (1, 64), (3, 96)])
def test_every_head_gives_logits_for_several_sizes(head, channels, size):
    model = create_model("vgg11_bn", num_classes=7, in_channels=channels, input_size=size,
                         head=head).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_compact_net_takes_small_inputs_its_three_pools_divide():
    model = create_model("vgg_compact", in_channels=1, input_size=16).eval()
    assert model(torch.randn(3, 1, 16, 16)).shape == (3, 10)


@pytest.mark.parametrize("size", [30, 16, 48])
def test_size_the_poolings_do_not_divide_is_a_clear_error(size):
    with pytest.raises(UsageError, match=rf"image size {size}: vgg16 has 5 2x2 max-pools.*multiple of 32"):
        create_model("vgg16", input_size=size)


@pytest.mark.parametrize("size", [32, 100, 150, 224])
def test_imagenet_head_takes_any_size_from_32_as_torchvision(size):
    # The 7x7 adaptive pool makes the classifier's width independent of the input side.
    model = create_model("vgg16", head="imagenet", input_size=size, num_classes=1000).eval()
    assert count_parameters(model)["trainable"] == 138_357_544
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)
    info = summary_dict(model, (3, size, size), name="vgg16")
    assert info["layers"][-1]["output_shape"] == [None, 1000]


def test_imagenet_head_below_the_pools_least_side_is_a_clear_error():
    with pytest.raises(UsageError, match=r"image size 31: vgg16 has 5 2x2 max-pools.*at least 32"):
        create_model("vgg16", head="imagenet", input_size=31)


def test_wrong_channel_count_at_run_time_is_a_clear_error():
    model = create_model("vgg11", in_channels=1)
    with pytest.raises(UsageError, match=r"takes input of shape \(N, 1, 32, 32\)"):
        model(torch.randn(1, 3, 32, 32))


def test_unknown_names_suggest_the_closest():
    with pytest.raises(UsageError, match="did you mean 'vgg16_bn'"):
        create_model("vgg16bn")
    with pytest.raises(UsageError, match="did you mean 'classic'"):
        create_model("vgg16", head="clasic")


def test_registry_lists_all_depths_with_and_without_bn():
    for depth in (11, 13, 16, 19):
        assert f"vgg{depth}" in ARCHITECTURES and f"vgg{depth}_bn" in ARCHITECTURES
    assert "vgg_compact" in ARCHITECTURES


def test_summary_ends_with_keras_totals_and_rows_add_up():
    model = create_model("vgg19", head="bn")
    info = summary_dict(model, (3, 32, 32), "vgg19")
    text = format_summary(info)
    assert text.splitlines()[-3:] == [
        "Total params: 43,052,770",
        "Trainable params: 43,033,362",
        "Non-trainable params: 19,408",
    ]
    assert sum(r["params"] for r in info["layers"]) == 43_052_770
    assert info["layers"][-1]["output_shape"] == [None, 10]
    flatten = [r for r in info["layers"] if r["type"] == "Flatten"]
    assert flatten and flatten[0]["output_shape"] == [None, 512]


def test_initialisation_follows_the_vgg_lineage():
    torch.manual_seed(0)
    model = create_model("vgg11_bn", head="classic")
    conv = model.features[0]
    assert torch.count_nonzero(conv.bias) == 0
    # Kaiming normal, fan-out, ReLU gain: std = sqrt(2 / (out_channels * 9)).
    expected = (2 / (64 * 9)) ** 0.5
    big = model.features[4]  # 64->128 conv, 73k weights: a tight estimate
    assert abs(big.weight.std().item() - (2 / (128 * 9)) ** 0.5) < 0.05 * expected
    dense = model.classifier[3]
    assert abs(dense.weight.std().item() - 0.01) < 0.0005
    bn = model.features[1]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def torchvision_layout_state(batch_norm: bool, num_classes: int = 1000) -> dict:
    """A state dict in torchvision's VGG-16 key layout, built here (no torchvision)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    state, index, channels = {}, 0, 3
    gen = torch.Generator().manual_seed(1)
    for item in cfg:
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, channels, 3, 3, generator=gen) * 0.05
        state[f"features.{index}.bias"] = torch.randn(item, generator=gen) * 0.01
        if batch_norm:
            i = index + 1
            state[f"features.{i}.weight"] = 1 + 0.1 * torch.randn(item, generator=gen)
            state[f"features.{i}.bias"] = 0.1 * torch.randn(item, generator=gen)
            state[f"features.{i}.running_mean"] = 0.1 * torch.randn(item, generator=gen)
            state[f"features.{i}.running_var"] = 1 + 0.1 * torch.rand(item, generator=gen)
            state[f"features.{i}.num_batches_tracked"] = torch.tensor(100)
            index += 3
        else:
            index += 2
        channels = item
    for i, (fan_in, fan_out) in zip((0, 3, 6), ((25088, 4096), (4096, 4096), (4096, num_classes))):
        state[f"classifier.{i}.weight"] = torch.randn(fan_out, fan_in, generator=gen) * 0.005
        state[f"classifier.{i}.bias"] = torch.randn(fan_out, generator=gen) * 0.01
    return state


class TorchvisionVGG16(nn.Module):
    """torchvision's VGG-16 forward, written out, to compare outputs against."""

    def __init__(self, state: dict, batch_norm: bool):
        super().__init__()
        self.state = state
        self.batch_norm = batch_norm

    def forward(self, x):
        s = self.state
        keys = sorted({int(k.split(".")[1]) for k in s if k.startswith("features.")})
        convs = [i for i in keys if s[f"features.{i}.weight"].dim() == 4]
        pools_after = {4, 9, 16, 23, 30} if not self.batch_norm else {6, 13, 23, 33, 43}
        for i in convs:
            x = nn.functional.conv2d(x, s[f"features.{i}.weight"], s[f"features.{i}.bias"], padding=1)
            if self.batch_norm:
                j = i + 1
                x = nn.functional.batch_norm(x, s[f"features.{j}.running_mean"],
                                             s[f"features.{j}.running_var"], s[f"features.{j}.weight"],
                                             s[f"features.{j}.bias"], training=False)
            x = torch.relu(x)
            if (i + (3 if self.batch_norm else 2)) in pools_after:
                x = nn.functional.max_pool2d(x, 2)
        x = nn.functional.adaptive_avg_pool2d(x, 7).flatten(1)
        for i in (0, 3):
            x = torch.relu(nn.functional.linear(x, s[f"classifier.{i}.weight"], s[f"classifier.{i}.bias"]))
        return nn.functional.linear(x, s["classifier.6.weight"], s["classifier.6.bias"])


@pytest.mark.parametrize("batch_norm", [False, True])
def test_torchvision_weights_load_into_imagenet_head_with_identical_outputs(batch_norm):
    state = torchvision_layout_state(batch_norm)
    model = create_model("vgg16_bn" if batch_norm else "vgg16", head="imagenet", input_size=64,
                         num_classes=1000).eval()
    report = load_matching(model, state)
    assert not report.mismatched and not report.unexpected
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), TorchvisionVGG16(state, batch_norm)(x), atol=1e-5, rtol=1e-4)


def test_torchvision_weights_into_a_cifar_head_take_convolutions_only():
    state = torchvision_layout_state(batch_norm=True)
    model = create_model("vgg16_bn", head="gap", num_classes=10)
    report = load_matching(model, state)
    assert torch.equal(model.features[0].weight, state["features.0.weight"])
    assert all(k.startswith("features.") for k in report.loaded)
    assert "classifier.0.weight" in report.unexpected  # reported, not loaded
    assert "classifier.0.weight" in report.missing  # the new head stays initialised


def test_mismatched_weights_are_an_error_unless_partial():
    state = torchvision_layout_state(batch_norm=False)
    model = create_model("vgg16", head="linear", in_channels=1)  # first conv takes 1 channel
    with pytest.raises(CheckpointError, match="features.0.weight.*--partial"):
        load_matching(model, state)
    report = load_matching(model, state, partial=True)
    assert any(m.startswith("features.0.weight") for m in report.mismatched)
    assert torch.equal(model.features[2].weight, state["features.2.weight"])


def test_stagewise_init_maps_vgg11_convs_onto_vgg16():
    small = create_model("vgg11_bn")
    big = create_model("vgg16_bn")
    state = remap_stagewise(small.state_dict(), ARCHITECTURES["vgg11_bn"], ARCHITECTURES["vgg16_bn"])
    report = load_matching(big, state, partial=True, only_features=False)
    # Stage 1: VGG-11's only conv -> VGG-16's first; stage 3: both convs -> the first two.
    assert torch.equal(big.features[0].weight, small.features[0].weight)
    assert torch.equal(big.features[14].weight, small.features[8].weight)  # stage 3, conv 1
    assert torch.equal(big.features[17].weight, small.features[11].weight)  # stage 3, conv 2
    assert torch.equal(big.classifier[0].weight, small.classifier[0].weight)
    assert len(report.loaded) > 0
