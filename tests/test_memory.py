import math

import pytest
import torch
from torch import nn

from fwdgrad.analysis.memory import (
    FORMATS,
    RNG_STATE_BYTES,
    format_table,
    memory_breakdown,
    trace_model,
    trainable_for,
    vit_paper_comparison,
)
from fwdgrad.measure import measure_peak_memory
from fwdgrad.models import build_model

N = 4  # batch
SIZES = (10, 20, 30, 5)
N_PARAMS = sum(a * b + b for a, b in zip(SIZES, SIZES[1:]))
LARGEST_LAYER = 20 * 30 + 30


def stack(relu: bool = False) -> nn.Sequential:
    layers = []
    for a, b in zip(SIZES, SIZES[1:]):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if relu else [])
    return nn.Sequential(*layers[: -1 if relu else None])


# BP scratch = the peak of the forward in which every Linear's input stays live for the backward. Without
# ReLU: the three inputs + the logits at the end. With ReLU (outputs saved: they are the next Linear's
# inputs): the second ReLU, where x, a1, its input z2 and its output a2 are live.
@pytest.mark.parametrize("relu, peak", [(False, 10 + 20 + 30 + 5), (True, 10 + 20 + 30 + 30)])
def test_bp_scratch_is_forward_peak_with_saved_inputs(relu, peak):
    b = memory_breakdown(stack(relu), (N, 10), "bp", "ft", "fp32")
    assert b.scratch == N * peak * 4
    assert b.weights == b.gradients == N_PARAMS * 4
    assert b.perturbation == b.masks == b.optimizer_state == 0


def test_ff_scratch_is_largest_live_input_output_pair():
    b = memory_breakdown(stack(), (N, 10), "ff", "ft", "fp32")
    assert b.scratch == N * (20 + 30) * 4
    assert b.perturbation == LARGEST_LAYER * 4 + RNG_STATE_BYTES
    assert b.gradients == 0
    assert b.total < memory_breakdown(stack(), (N, 10), "bp", "ft", "fp32").total


def test_lp_keeps_only_activations_from_first_trainable_layer():
    ft = memory_breakdown(stack(), (N, 10), "bp", "ft", "fp32")
    lp1 = memory_breakdown(stack(), (N, 10), "bp", "lp", "fp32")
    lp2 = memory_breakdown(stack(), (N, 10), "bp", "lp", "fp32", lp_layers=2)
    # lp1: the frozen forward's largest input+output pair outweighs the saved 30-wide input + logits
    assert lp1.scratch == N * (20 + 30) * 4 < lp2.scratch == N * (20 + 30 + 5) * 4 < ft.scratch
    assert lp1.scratch >= memory_breakdown(stack(), (N, 10), "ff", "lp", "fp32").scratch
    assert lp1.gradients == (30 * 5 + 5) * 4


def test_lower_bit_formats_shrink_bytes():
    base = {f: memory_breakdown(stack(), (N, 10), "bp", "ft", f) for f in FORMATS}
    assert base["fp16"].scratch * 2 == base["fp32"].scratch
    assert base["w16a8"].scratch * 4 == base["fp32"].scratch
    assert base["w8a8"].weights * 4 == base["fp32"].weights
    ff = memory_breakdown(stack(), (N, 10), "ff", "ft", "w16a8")
    assert ff.perturbation == LARGEST_LAYER * 1 + RNG_STATE_BYTES  # 8-bit z for fixed point


def test_sparse_update_shrinks_state():
    ft = memory_breakdown(stack(), (N, 10), "ff", "ft", "w16a8", optimizer="momentum")
    sp = memory_breakdown(stack(), (N, 10), "ff", "sparse", "w16a8", density=0.1, optimizer="momentum")
    assert sp.n_updated == math.ceil(0.1 * N_PARAMS)
    assert sp.trainable_weights == sp.optimizer_state == sp.n_updated * 2
    assert sp.masks == math.ceil(N_PARAMS / 8)
    assert sp.perturbation == math.ceil(0.1 * LARGEST_LAYER) + RNG_STATE_BYTES
    assert sp.scratch == ft.scratch and sp.paper_scratch < ft.paper_scratch
    seeded = memory_breakdown(stack(), (N, 10), "ff", "sparse", "w16a8", mask_storage="seeded")
    assert seeded.masks == 0


def test_optimizer_m_and_full_z_storage():
    adam = memory_breakdown(stack(), (N, 10), "bp", "ft", "fp32", optimizer="adam")
    assert adam.optimizer_state == 2 * N_PARAMS * 4
    ff3 = memory_breakdown(stack(), (N, 10), "ff", "ft", "w16a8", m=3)
    assert ff3.gradients == LARGEST_LAYER * 2  # int16 sum of 3 int8 z
    full = memory_breakdown(stack(), (N, 10), "ff", "ft", "fp16", z_storage="full")
    assert full.perturbation == N_PARAMS * 2 + RNG_STATE_BYTES


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"method": "sgd"}, "method 'sgd'"),
        ({"mode": "vpt"}, "mode 'vpt'"),
        ({"fmt": "int4"}, "number format 'int4'"),
        ({"optimizer": "lion"}, "optimizer 'lion'"),
        ({"mode": "sparse", "density": 0.0}, "density"),
    ],
)
def test_bad_arguments_name_value_and_allowed(kw, match):
    with pytest.raises(ValueError, match=match):
        memory_breakdown(stack(), (N, 10), **kw)


def test_trace_does_not_touch_the_model():
    model = build_model("small_cnn", 10, 1).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    memory_breakdown(model, (2, 1, 8, 8), "bp")
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_model_matches_measured_cpu_peak():
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 8))
    shape = (64, 256)
    keep = []

    def infer():
        with torch.no_grad():
            model(torch.zeros(shape))

    def forward_with_grad():
        keep.append(model(torch.zeros(shape)))

    input_bytes = 64 * 256 * 4  # held by the caller for the whole call; the model frees it after use
    ff = memory_breakdown(model, shape, "ff").scratch
    assert measure_peak_memory(infer) == pytest.approx(ff + input_bytes, rel=0.05)
    bp_peak = trace_model(model, shape, trainable_for(model, "ft"), backward=True).peak_live_bytes(4, True)
    assert measure_peak_memory(forward_with_grad) == pytest.approx(bp_peak, rel=0.05)


def test_vit_bp_keeps_attention_and_lp_is_cheaper():
    vit = build_model("vit_tiny", 10, 3, depth=2, hidden_dim=48)
    ft = memory_breakdown(vit, (2, 3, 32, 32), "bp", "ft", "fp32")
    lp = memory_breakdown(vit, (2, 3, 32, 32), "bp", "lp", "fp32", lp_layers=3)
    ff = memory_breakdown(vit, (2, 3, 32, 32), "ff", "ft", "fp32")
    scores = 2 * 3 * 65 * 65 * 4  # batch x heads x tokens^2 x fp32, one softmax output per block
    assert ft.scratch > 2 * scores and lp.scratch < ft.scratch and ff.scratch < ft.scratch


def test_paper_vit_comparison_reproduces_bp_within_five_percent():
    table = vit_paper_comparison()
    bp_row = next(line for line in table.splitlines() if line.startswith("| BP"))
    ours = float(bp_row.split("|")[6].split()[0])
    assert ours == pytest.approx(31.64, rel=0.05)


def test_format_table_rows():
    table = format_table(build_model("small_cnn", 10, 1), (1, 1, 8, 8), formats=("fp32", "w16a8"))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| fp32") and lines[3].startswith("| w16a8")
