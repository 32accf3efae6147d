import copy
import math

import pytest
import torch
from torch import nn

from fwdgrad.analysis.memory import (
    FORMATS,
    FWDGRAD_VIT,
    PAPER_SCOPES,
    REFERENCE_VIT,
    RNG_STATE_BYTES,
    format_table,
    memory_breakdown,
    trace_model,
    trainable_for,
    vit_paper_comparison,
    vit_paper_rows,
    vit_scope_rows,
    vit_scope_traces,
)
from fwdgrad.measure import measure_peak_memory
from fwdgrad.models import add_prompts, build_model

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


@pytest.fixture(scope="module")
def deit_traces():
    """fwdgrad's DeiT-tiny at the paper's setting, traced once for every scope (about 4 s)."""
    return vit_scope_traces(batch_size=1)


def test_paper_vit_comparison_reproduces_bp_within_five_percent(deit_traces):
    rows = vit_paper_rows(1, deit_traces)
    bp = next(r for r in rows if r.label.startswith("BP"))
    ref, ours = bp.breakdowns[REFERENCE_VIT], bp.breakdowns[FWDGRAD_VIT]
    assert ref.n_params == ours.n_params == 5_717_416
    assert bp.scratch(REFERENCE_VIT) / 1e6 == pytest.approx(31.64, rel=0.05)  # the paper's anchor
    # fwdgrad's Attention folds 1/sqrt(d) into the q projection; the reference's scaled_dot_product_attention
    # (math path) multiplies q and k by d^-1/4 and keeps both products: 12 blocks x 2 x (197 x 192) x fp16
    assert bp.scratch(REFERENCE_VIT) - bp.scratch(FWDGRAD_VIT) == 12 * 2 * 197 * 192 * 2
    for r in rows:  # what depends only on the parameters is the same for both models
        a, b = r.breakdowns[REFERENCE_VIT], r.breakdowns[FWDGRAD_VIT]
        assert (a.gradients, a.perturbation, a.masks) == (b.gradients, b.perturbation, b.masks)


def test_dvpt_ff_scratch_below_bp_at_paper_setting(deit_traces):
    rows = vit_scope_rows(traces=deit_traces)
    assert tuple(rows) == PAPER_SCOPES
    bp, ff = rows["dvpt"]
    assert ff.paper_scratch < bp.paper_scratch and ff.scratch < bp.scratch
    assert bp.n_updated == 12 * 10 * 192 + 192 * 1000 + 1000  # 10 prompts per layer + the head
    # prompts are spliced in at every layer: BP keeps activations of every block (unlike lp) but no
    # weight inputs of frozen layers (unlike ft)
    assert rows["lp"][0].scratch < bp.scratch < rows["ft"][0].scratch
    assert ff.scratch > rows["ft"][1].scratch  # 207 tokens instead of 197


def test_dvpt_counts_the_prompt_tokens():
    vit = build_model("vit_tiny", 10, 3, depth=2, hidden_dim=48)
    shape = (2, 3, 32, 32)
    prompted = copy.deepcopy(vit)
    add_prompts(prompted, 8)
    for method in ("bp", "ff"):
        b = memory_breakdown(vit, shape, method, "dvpt", "fp32", prompts=8)
        # the same as on a model that carries the prompts: traced with 65 + 8 tokens in every layer
        assert b == memory_breakdown(prompted, shape, method, "dvpt", "fp32")
        assert b.n_updated == 2 * 8 * 48 + 48 * 10 + 10
        # the same scope with fewer prompt tokens, and the same forward without them, need less
        assert b.scratch > memory_breakdown(vit, shape, method, "dvpt", "fp32", prompts=1).scratch
    ff = memory_breakdown(vit, shape, "ff", "dvpt", "fp32", prompts=8)
    assert (
        ff.scratch > memory_breakdown(vit, shape, "ff", "ft", "fp32").scratch
    )  # the forward without prompts
    scores = 2 * 3 * 73 * 73 * 4  # batch x heads x tokens^2 x fp32: one softmax output kept per block
    assert memory_breakdown(vit, shape, "bp", "dvpt", "fp32", prompts=8).scratch > 2 * scores
    assert not any(".prompts." in n for n, _ in vit.named_parameters())  # only the copy got them
    with pytest.raises(ValueError, match="deep prompts need a fwdgrad ViT"):
        memory_breakdown(stack(), (N, 10), "ff", "dvpt")


def test_ln_trains_only_layernorms_and_head():
    vit = build_model("vit_tiny", 10, 3, depth=2, hidden_dim=48)
    names = trainable_for(vit, "ln")
    modules = dict(vit.named_modules())
    owners = {n.rpartition(".")[0] for n in names}
    assert owners == {n for n, m in modules.items() if isinstance(m, nn.LayerNorm)} | {"head"}
    assert sorted(names) == sorted(n for n, _ in vit.named_parameters() if n.rpartition(".")[0] in owners)
    b = memory_breakdown(vit, (2, 3, 32, 32), "bp", "ln", "fp32")
    assert b.n_updated == (2 * 2 + 1) * 2 * 48 + 48 * 10 + 10 == b.gradients // 4
    ft = memory_breakdown(vit, (2, 3, 32, 32), "bp", "ft", "fp32")
    assert b.scratch < ft.scratch


def test_paper_vit_comparison_table(deit_traces):
    table = vit_paper_comparison(traces=deit_traces)
    assert "| BP, fp16, ft | 19.61 MB | 17.79 MB |" in table and "| dvpt |" in table and "207 tokens" in table


def test_format_table_rows():
    table = format_table(build_model("small_cnn", 10, 1), (1, 1, 8, 8), formats=("fp32", "w16a8"))
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| fp32") and lines[3].startswith("| w16a8")
