"""Bring your own model: `model._target_=<any importable callable>` from the command line and in presets,
with the data's class count (and input channels) passed when the callable takes them, the head found by the
zoo's rule, and a model the integer engine cannot trace a one-line error naming the module."""

import json
import textwrap

import pytest
import torch
from pipeline_runs import TINY
from torch import nn

from fwdgrad import config as fc
from fwdgrad.cli import main
from fwdgrad.export import load_model
from fwdgrad.statefile import load_state

MODULE = '''
"""Test-only callables: a 3-channel variant of the digits, models of one's own, untraceable models."""
import torch
from torch import nn
from torch.utils.data import TensorDataset

from fwdgrad.data import DataSplits, build_dataset


def rgb_digits(name="digits", root=None, seed=0, **options):
    """The 8x8 digits as 3-channel images (x, 1 - x, x^2), marked synthetic."""
    splits = build_dataset(name, root, seed, **options)

    def rgb(ds):
        x, y = ds.tensors
        return TensorDataset(torch.cat([x, 1 - x, x * x], 1), y)

    return DataSplits("rgb_digits", rgb(splits.train), rgb(splits.test), splits.classes, synthetic=True)


def thousand_way():
    """Takes neither num_classes nor in_channels: an RGB stem and a 1000-way head."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000)
    )


class Rows(nn.Module):
    def forward(self, x):
        return torch.stack([x[:, :, i] for i in range(x.shape[2])], 2)  # range() over a traced size


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # Python control flow on a tensor value


class Net(nn.Module):
    def __init__(self, num_classes, in_channels, inner):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.inner = inner
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.inner(self.conv(x))), 1))


def loop_net(num_classes: int, in_channels: int = 1):
    return Net(num_classes, in_channels, Rows())


def gate_net(num_classes: int, in_channels: int = 1):
    return Net(num_classes, in_channels, Gate())
'''

PRESET = """\
# @package _global_
model:
  _target_: torchvision.models.resnet18
data:
  source: {_target_: byo_zoo.rgb_digits}
  target: {_target_: byo_zoo.rgb_digits}
"""


@pytest.fixture
def byo(tmp_path, monkeypatch):
    """byo_zoo importable; fwdgrad's one-line error mode for in-process runs (environment restored)."""
    (tmp_path / "byo_zoo.py").write_text(textwrap.dedent(MODULE))
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "byo_rgb.yaml").write_text(PRESET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("_FWDGRAD_QUIET", "1")
    return tmp_path


def run(tmp_path, *overrides) -> int:
    out = [f"out_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    try:
        return main(["run", *TINY, *out, *overrides])
    except SystemExit as e:  # a single run's bad input: one line on stderr, exit status 2
        return e.code


def test_torchvision_resnet18_from_a_preset_on_rgb_data(byo, capsys):
    """ResNet-18 straight from torchvision on 3-channel data: it gets the class count, keeps its RGB stem,
    and linear probing trains exactly its head (the last layer in forward order, `fc`)."""
    searchpath = f"hydra.searchpath=[file://{byo / 'conf'}]"
    small = [
        "method.m=1",
        "train.batch_size=16",
        "pretrain.batch_size=16",
        "data.max_train=16",
        "data.max_test=8",
    ]
    assert run(byo, searchpath, "experiment=byo_rgb", "method=sign_spsa_fp32", "method.eps=1e-2", *small) == 0
    m = json.loads((byo / "run" / "metrics.json").read_text())
    assert m["model"] == "resnet18" and m["synthetic"] and 0 <= m["test_acc"] <= 1
    assert m["config"]["model"]["_target_"] == "torchvision.models.resnet18"
    model, _ = load_model(byo / "run" / "model.pt")
    assert type(model).__name__ == "ResNet" and model.conv1.in_channels == 3 and model.fc.out_features == 5
    (source,) = (byo / "cache" / "models").glob("*.pt")
    before = load_state(source, "source-model")["model"]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= {"fc.weight", "fc.bias"}
    assert "digits resnet18 lp sign_spsa_fp32 fp32 seed=0: zero-shot" in capsys.readouterr().out


def test_command_line_target_replaces_the_default_model():
    """`model._target_=...` on the command line leaves small_cnn's `name`/`width` in the node: they are not
    passed to the callable, and the label is the callable's name (or model.name when it is a label)."""
    from hydra import compose, initialize_config_dir

    from fwdgrad.conf import CONF_DIR
    from fwdgrad.models import build_from_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["model._target_=torchvision.models.resnet18"])
    c = fc.validate(cfg)
    assert c.model["name"] == "small_cnn" and c.model["width"] == 32  # left by the model group's default
    assert fc.model_label(c.model) == "resnet18" and fc.model_options(c.model) == {}
    model = build_from_config(c.model, 5, 1)  # 1-channel digits: the RGB stem is replaced
    assert model.conv1.in_channels == 1 and model.fc.out_features == 5
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 5)
    assert fc.model_label(c.model | {"name": "my_resnet"}) == "my_resnet"
    assert fc.model_label({"_target_": fc.BUILD_MODEL, "name": "resnet8"}) == "resnet8"
    assert fc.model_options({"_target_": "m.f", "name": "x", "width": 16, "depth": 3}) == {
        "width": 16,
        "depth": 3,
    }


def test_callables_get_only_what_they_take(byo):
    from fwdgrad.models import build_from_config

    m = build_from_config({"_target_": "byo_zoo.thousand_way"}, 5, 1)  # neither num_classes nor in_channels
    assert m[0].in_channels == 1 and m[-1].out_features == 5
    m = build_from_config({"_target_": "torchvision.models.mobilenet_v3_small"}, 7, 3)
    assert m.classifier[-1].out_features == 7 and m.features[0][0].in_channels == 3
    m = build_from_config({"_target_": "byo_zoo.loop_net"}, 3, 2)  # names both
    assert m.conv.in_channels == 2 and m.fc.out_features == 3
    with pytest.raises(
        ValueError, match=r"model._target_='torchvision.models.resnet18' failed with .*width=7"
    ):
        build_from_config({"_target_": "torchvision.models.resnet18", "width": 7}, 5, 3)
    with pytest.raises(ValueError, match=r"model._target_='torchvision.models.resnet99' is invalid; allowed"):
        fc.check_model({"_target_": "torchvision.models.resnet99"})


def test_untraceable_model_is_one_line_naming_the_module(byo, capsys):
    assert run(byo, "model._target_=byo_zoo.loop_net", "method=qzo_ff") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: the integer engine cannot trace Net")
    assert "module 'inner' (Rows)" in err and "quant=fp32" in err
    assert run(byo, "model._target_=byo_zoo.gate_net", "method=qzo_ff") == 2  # fails in the memory model
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "model 'gate_net' cannot run on meta tensors" in err
    assert run(byo, "model._target_=nowhere.net") == 2
    assert "error: model._target_='nowhere.net' is invalid; allowed: an importable" in capsys.readouterr().err


def test_untraceable_model_trains_with_a_float_method(byo):
    assert run(byo, "model._target_=byo_zoo.loop_net", "method=bp") == 0
    assert json.loads((byo / "run" / "metrics.json").read_text())["model"] == "loop_net"


@pytest.mark.slow
def test_torchvision_resnet18_qzo_ff_w16a8(byo):
    """The same through the integer engine (slow: ResNet-18's integer forward takes seconds on a CPU)."""
    searchpath = f"hydra.searchpath=[file://{byo / 'conf'}]"
    assert run(byo, searchpath, "experiment=byo_rgb", "method=qzo_ff", "method.eps=1e-2") == 0
    m = json.loads((byo / "run" / "metrics.json").read_text())
    assert m["model"] == "resnet18" and m["quant"] == "w16a8" and m["tie_fraction"] is not None


def test_head_rule_is_the_zoos():
    from fwdgrad.models import head_params
    from fwdgrad.pipeline.steps import fit_head

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Conv2d(2, 3, 1))
    with pytest.raises(
        ValueError, match=r"the head '2' \(Conv2d\) has 3 outputs, not 5, and is no nn.Linear"
    ):
        fit_head(model, 5, seed=0)
    assert fit_head(model, 3, seed=0) is model and head_params(model, 1) == ["2.weight", "2.bias"]
