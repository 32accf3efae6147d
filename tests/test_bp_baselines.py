"""Memory-matched backprop baselines: BP with activation checkpointing (bp_ckpt) and bias-only training
(mode=bias, TinyTL), through the trainer, the memory model, the device check and the pipeline."""

import copy

import pytest
import torch
from pipeline_runs import run
from torch import nn

from fwdgrad.analysis.devices import DeviceDoesNotFit, UnsupportedFormat, check_fit
from fwdgrad.analysis.memory import (
    breakdown_from_trace,
    ckpt_groups,
    fmt_bytes,
    memory_breakdown,
    trace_model,
)
from fwdgrad.engine import convert
from fwdgrad.methods import METHODS, spec
from fwdgrad.models import MODELS, build_model, checkpoint_segments, model_blocks, scope_params
from fwdgrad.train import TrainConfig, train

FLOAT_METHODS = [n for n, s in METHODS.items() if s.trains == "float"]
#: every zoo model, small, with an input it takes
ZOO = {
    "resnet8": ({"width": 0.25}, (2, 1, 12, 12)),
    "resnet18": ({"small_input": True}, (2, 3, 16, 16)),
    "mobilenet_v2": ({"width_mult": 0.25}, (2, 3, 32, 32)),
    "vit_tiny": ({"depth": 2, "hidden_dim": 16, "heads": 2, "image_size": 8}, (2, 3, 8, 8)),
    "ast_tiny": ({"depth": 2, "hidden_dim": 16, "heads": 2}, (2, 1, 40, 101)),
    "ds_cnn": ({"channels": 8, "blocks": 2}, (2, 1, 49, 10)),
    "crnn": ({"channels": (4, 8), "hidden": 8}, (2, 1, 16, 16)),
    "small_cnn": ({"width": 4}, (2, 1, 8, 8)),
}


def _data(shape, n=48, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape[1:], generator=g)
    return x, torch.randint(0, classes, (n,), generator=g)


def test_every_zoo_model_segments():
    assert set(ZOO) == set(MODELS)


@pytest.mark.parametrize("name", list(ZOO))
def test_bp_ckpt_gradients_are_bps_bit_for_bit(name):
    kw, shape = ZOO[name]
    torch.manual_seed(0)
    model = build_model(name, 5, shape[1], **kw).eval()
    ckpt = copy.deepcopy(model)
    x, y = _data(shape, n=shape[0])
    nn.functional.cross_entropy(model(x), y).backward()
    parts = checkpoint_segments(ckpt)
    h = x
    for part in parts[:-1]:
        h = torch.utils.checkpoint.checkpoint(part, h, use_reentrant=False)
    nn.functional.cross_entropy(parts[-1](h), y).backward()
    assert len(parts) >= 2
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), n


@pytest.mark.parametrize("scope", ["ft", "bias"])
def test_bp_ckpt_trains_the_same_trajectory_as_bp(scope):
    torch.manual_seed(0)
    model = build_model("resnet8", 5, 1, width=0.25).eval()
    data = _data((1, 1, 12, 12))
    runs = {}
    for method, segments in (("bp", None), ("bp_ckpt", None), ("bp_ckpt", 7)):
        m = copy.deepcopy(model)
        cfg = TrainConfig(method=method, scope=scope, lr=0.1, steps=4, batch_size=16, segments=segments)
        runs[method, segments] = r = train(m, cfg, data, data)
        assert r.forward_passes == 4 * spec(method).forwards_per_step()
    bp = runs["bp", None].model.state_dict()
    assert any(not torch.equal(bp[k], v) for k, v in model.state_dict().items())  # it trained
    for key in (("bp_ckpt", None), ("bp_ckpt", 7)):
        assert all(torch.equal(bp[k], v) for k, v in runs[key].model.state_dict().items())
        assert [r["loss"] for r in runs[key].log] == [r["loss"] for r in runs["bp", None].log]
    assert spec("bp_ckpt").forwards_per_step() == 4 and spec("bp").forwards_per_step() == 3


def test_segment_counts_and_unsegmentable_models():
    model = build_model("resnet8", 5, 1)
    blocks = model_blocks(model)
    assert [b[0].target for b in blocks] == ["stem.0", "stem.1", "layer1", "layer2", "layer3", "pool", "fc"]
    assert [b.target for b in blocks[1]] == ["stem.1", "stem.2"]  # the in-place ReLU stays with its input
    assert [len(s.modules) for s in checkpoint_segments(model, 3)] == [4, 2, 2]  # flatten joins pool's block
    assert len(checkpoint_segments(model)) == 3  # round(sqrt(7))
    for bad in (0, 1, 8, 2.5):
        with pytest.raises(
            ValueError, match=rf"method.segments={bad!r} is invalid for ResNet8; allowed: integers 2..7 "
        ):
            checkpoint_segments(model, bad)

    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(x) + x)

    with pytest.raises(
        ValueError, match=r"^Skip cannot be segmented: its forward is no chain of blocks \(add reads"
    ):
        model_blocks(Skip())


def test_bias_scope_trains_only_biases_and_the_head():
    torch.manual_seed(0)
    model = build_model("resnet8", 5, 1, width=0.25).eval()
    names = scope_params(model, "bias")
    assert names[-2:] == ["fc.bias", "fc.weight"] and all(n.endswith("bias") for n in names[:-1])
    assert "stem.1.bias" in names and len(names) == 11  # 9 BatchNorm biases, the head's bias and weight
    vit = build_model("vit_tiny", 5, 3, depth=1, hidden_dim=8, heads=2, image_size=8)
    assert {"ln.bias", "layers.0.ln_1.bias", "patch.bias", "head.weight"} <= set(scope_params(vit, "bias"))
    data = _data((1, 1, 12, 12))
    for method in FLOAT_METHODS:
        m = copy.deepcopy(model)
        train(
            m,
            TrainConfig(method=method, scope="bias", lr=0.05, eps=1e-2, m=2, steps=2, batch_size=16),
            data,
            data,
        )
        moved = {k for k, v in m.named_parameters() if not torch.equal(v, model.get_parameter(k))}
        assert moved and moved <= set(names), (method, moved - set(names))


def test_bias_scope_is_rejected_for_qmodel_methods():
    qmodels = [n for n, s in METHODS.items() if s.trains == "qmodel"]
    assert {"bp_qat", "qzo_ff"} <= set(qmodels)
    for method in qmodels:
        allowed = "allowed: ft, lp, sparse, dvpt, ln, or a float method for 'bias': bp, "
        message = rf"^training scope 'bias' is invalid for method '{method}' \(a QModel\); {allowed}"
        with pytest.raises(ValueError, match=message):
            TrainConfig(method=method, scope="bias")
    model = build_model("small_cnn", 5, 1, width=4).eval()
    q = convert(model, "w16a8", torch.randn(8, 1, 8, 8))
    with pytest.raises(ValueError, match="invalid for method 'qzo_ff'"):
        train(
            q, TrainConfig(method="qzo_ff", scope="bias", steps=1), _data((1, 1, 8, 8)), _data((1, 1, 8, 8))
        )


def _chain():
    return nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8))


def test_checkpointed_memory_by_hand():
    """Batch 64, fp32: x 65,536 B, hidden 131,072 B (512) and 262,144 B (1024), logits 2,048 B. BP keeps x
    and both ReLU outputs: 720,896 B peak (during the second ReLU). Two segments [L1 R1 L2] [R2 L3]: the
    forward keeps only x (the first segment's input) and the second segment's saved R2 output: peak during
    R2 = x + h2 + r2 = 589,824 B; recomputing the first segment keeps x and r1: x + r1 + h2 = 458,752 B."""
    model = _chain()
    names = [n for n, _ in model.named_parameters()]
    trace = trace_model(model, (64, 256), names, backward=True)
    groups = ckpt_groups(model, 2)
    assert groups == [["0", "1", "2"], ["3", "4"]]
    bp = breakdown_from_trace(trace, "bp", "fp32")
    ckpt = breakdown_from_trace(trace, "bp_ckpt", "fp32", segments=groups)
    assert (bp.scratch, ckpt.scratch, ckpt.segments, bp.segments) == (720_896, 589_824, 2, 1)
    assert ckpt.gradients == bp.gradients == sum(p.numel() for p in model.parameters()) * 4
    assert memory_breakdown(model, (64, 256), "bp_ckpt", segments=2).scratch == 589_824
    # bias-only: the frozen linears keep nothing, the ReLU outputs stay (their masks): r1 + h2 + r2
    bias = memory_breakdown(model, (64, 256), "bp", "bias")
    assert bias.scratch == 655_360 and bias.n_updated == 512 + 1024 + 8 + 8 * 1024
    with pytest.raises(ValueError, match="allowed: segments for bp_ckpt only"):
        breakdown_from_trace(trace, "bp", "fp32", segments=groups)


def test_a_module_shared_by_two_segments_is_a_one_line_error():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 2), nn.Tanh()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    model = Shared()
    trace = trace_model(model, (2, 4), ["a.weight"], backward=True)
    groups = ckpt_groups(model, 2)
    assert groups == [["a", "act"], ["b", "act"]]
    with pytest.raises(ValueError, match=r"^module 'act' runs in more than one segment"):
        breakdown_from_trace(trace, "bp_ckpt", "fp32", segments=groups)


def test_frozen_conv_and_batchnorm_keep_no_input():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(16, 2)
    )
    ft = trace_model(model, (1, 1, 6, 6), [n for n, _ in model.named_parameters()], backward=True)
    bias = trace_model(model, (1, 1, 6, 6), scope_params(model, "bias"), backward=True)
    assert [bias.storages[s].nbytes for s in bias.saved] == [16 * 4]  # only the head's input
    kept = sorted(ft.storages[s].nbytes for s in ft.saved if ft.storages[s].nbytes > 16)
    assert kept == [16 * 4, 36 * 4, 64 * 4, 64 * 4]  # ft: the head's, x, the BatchNorm's and conv 2's inputs


def test_memory_rows_and_device_fit_at_the_ood_setting():
    model = build_model("resnet8", 10, 1)
    shape = (128, 1, 28, 28)
    b = {
        (meth, mode): memory_breakdown(model, shape, meth, mode, "fp32")
        for meth, mode in (("bp", "ft"), ("bp_ckpt", "ft"), ("bp", "bias"), ("ff", "ft"))
    }
    ff, bp, ckpt, bias = b["ff", "ft"], b["bp", "ft"], b["bp_ckpt", "ft"], b["bp", "bias"]
    assert ff.scratch < bias.scratch < ckpt.scratch < bp.scratch
    assert ckpt.gradients == bp.gradients and bias.gradients < bp.gradients / 50
    shown = [fmt_bytes(x.paper_scratch) for x in (bp, ckpt, bias, ff)]
    assert shown == ["64.94 MB", "39.25 MB", "32.12 MB", "19.42 MB"]  # docs/memory.md, the OOD setting
    six = memory_breakdown(model, shape, "bp_ckpt", "ft", "fp32", segments=6)
    assert (six.segments, fmt_bytes(six.paper_scratch)) == (6, "32.83 MB")
    report = check_fit("rpi4", ckpt)
    assert report.fits and report.passes_per_step == 4 and check_fit("rpi4", bp).passes_per_step == 3
    tiny = check_fit("rpi4", memory_breakdown(model, (1, 1, 28, 28), "bp_ckpt", "ft", "fp32"))
    assert tiny.sram_needed < report.sram_needed


def test_pipeline_runs_bp_ckpt_and_bias_and_checks_the_device(tmp_path):
    m = run(tmp_path, "method=bp_ckpt", "mode=bias", "method.segments=2", "device=rpi4")
    assert m["method"] == "bp_ckpt" and m["mode"] == "bias" and m["memory"]["segments"] == 2
    assert m["memory"]["method"] == "bp_ckpt" and "bp_ckpt/bias/fp32 fits on rpi4" in m["device_fit"]
    assert "(4 forward passes x" in m["device_fit"] and m["forward_passes"] == 2 * 4
    with pytest.raises(DeviceDoesNotFit, match=r"bp_ckpt/ft/fp32 does not fit on rpi4: SRAM"):
        run(tmp_path, "method=bp_ckpt", "mode=ft", "device=rpi4", "device.sram_bytes=1000", out="small")
    with pytest.raises(UnsupportedFormat, match=r"device mcu_m7 does not support format 'fp32'"):
        run(tmp_path, "method=bp_ckpt", "mode=bias", "device=mcu_m7", out="mcu")
    with pytest.raises(
        ValueError, match=r"^method.segments=99 is invalid for Sequential; allowed: integers 2..7 "
    ):
        run(tmp_path, "method=bp_ckpt", "method.segments=99", out="bad")


def test_cli_memory_table_has_the_baselines(capsys):
    from fwdgrad.cli import main

    assert main(["memory", "small_cnn", "--input-shape", "2", "1", "8", "8", "--segments", "7"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| BP (ft) | BP ckpt, 7 segments (ft) | BP (bias) | FF (ft) |" in header
    assert main(["memory", "small_cnn", "--input-shape", "2", "1", "8", "8", "--segments", "8"]) == 2
    assert (
        "error: method.segments=8 is invalid for Sequential; allowed: integers 2..7"
        in capsys.readouterr().err
    )
