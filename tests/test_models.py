import urllib.error

import pytest
import torch
import torchvision.models._api as tv_api
from torch import nn

from fwdgrad.models import (
    MODELS,
    PretrainedWeightsUnavailable,
    build_model,
    head_layers,
    head_params,
    mobilenet_v2,
    resnet18,
)

CASES = {
    "resnet8": ({}, (2, 3, 32, 32)),
    "resnet18": ({"small_input": True}, (2, 3, 32, 32)),
    "mobilenet_v2": ({"small_input": True, "width_mult": 0.35}, (2, 3, 32, 32)),
    "vit_tiny": ({"depth": 2, "hidden_dim": 48}, (2, 3, 32, 32)),
    "ast_tiny": ({"depth": 2}, (2, 1, 40, 101)),
    "ds_cnn": ({}, (2, 1, 40, 49)),
    "crnn": ({}, (2, 1, 40, 64)),
    "small_cnn": ({}, (2, 1, 8, 8)),
}


def test_cases_cover_every_model():
    assert set(CASES) == set(MODELS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape_and_fx_trace(name):
    kw, shape = CASES[name]
    model = build_model(name, num_classes=7, in_channels=shape[1], **kw).eval()
    x = torch.randn(shape)
    traced = torch.fx.symbolic_trace(model)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 7)
        torch.testing.assert_close(traced(x), y)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vit_tiny", "resnet8", "small_cnn"])
def test_in_channels(name):
    kw, shape = CASES[name]
    model = build_model(name, num_classes=3, in_channels=1, **kw).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 1, *shape[2:])).shape == (2, 3)


def test_unknown_model_names_value_and_allowed():
    with pytest.raises(ValueError, match=r"'nope'.*resnet8"):
        build_model("nope", 10, 3)


def test_small_input_stems():
    r = resnet18(10, small_input=True)
    assert r.conv1.stride == (1, 1) and r.conv1.kernel_size == (3, 3) and isinstance(r.maxpool, nn.Identity)
    assert mobilenet_v2(10, small_input=True).features[0][0].stride == (1, 1)


def test_parameter_counts():
    def count(m):
        return sum(p.numel() for p in m.parameters())

    assert count(build_model("resnet8", 10, 3)) == 78042
    assert abs(count(build_model("crnn", 10, 1)) - 250_000) < 2_500
    deit_tiny = build_model("vit_tiny", 1000, 3, image_size=224, patch_size=16)
    assert count(deit_tiny) == 5_717_416


def test_head_layers_in_forward_order():
    vit = build_model("vit_tiny", 10, 3, depth=2, hidden_dim=48)
    assert head_layers(vit, 3) == [
        "layers.1.mlp.0",
        "layers.1.mlp.2",
        "head",
    ]
    assert head_layers(build_model("crnn", 10, 1), 2) == ["gru", "fc"]
    assert head_params(build_model("small_cnn", 10, 1), 1) == ["8.weight", "8.bias"]
    with pytest.raises(ValueError, match="only"):
        head_layers(build_model("small_cnn", 10, 1), 5)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_pretrained_offline_error_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", _offline)
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        resnet18(10, pretrained="IMAGENET1K_V1")
    msg = str(err.value)
    assert "ResNet18_Weights.IMAGENET1K_V1" in msg and "cannot be downloaded" in msg and "\n" not in msg


def test_pretrained_weights_are_loaded_and_adapted(monkeypatch):
    source = resnet18(1000)
    monkeypatch.setattr(tv_api, "load_state_dict_from_url", lambda *a, **k: source.state_dict())
    model = resnet18(5, in_channels=1, pretrained="IMAGENET1K_V1")
    assert model.fc.out_features == 5
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)
    torch.testing.assert_close(model.conv1.weight[:, 0], source.conv1.weight.mean(1))


def test_bad_pretrained_names():
    with pytest.raises(ValueError, match=r"'IMAGENET9'.*IMAGENET1K_V1"):
        resnet18(10, pretrained="IMAGENET9")
    with pytest.raises(ValueError, match="no ViT-tiny weights"):
        build_model("vit_tiny", 10, 3, pretrained="IMAGENET1K_V1")
