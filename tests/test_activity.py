"""Activity-perturbed forward gradients (`fwdgrad.ff.activity`, `method.ff.perturb=outputs`): the estimate
points along the true gradient, the fixed-point update is the stated rounding of G·r, steps are
reproducible, median coefficients equal the edge runtime's, and what it cannot train is refused."""

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.edge.train import median_signs, output_coefficients
from fwdgrad.engine import convert
from fwdgrad.ff.activity import ActivityGradient, example_closure
from fwdgrad.fixed_point import FixedPointSettings
from fwdgrad.models import build_model
from fwdgrad.quant import dequantize
from tests.pipeline_runs import run


class _MLP(nn.Module):
    """fc1 is trained with fc2 (and a ReLU) after it: the perturbed outputs run through a suffix."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def _model(name="small_cnn", scheme="w16a8"):
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 5, (64,))
    model = build_model("small_cnn", num_classes=5, in_channels=1) if name == "small_cnn" else _MLP()
    return convert(model.eval(), scheme, x), x, y


def _true_gradient(q, name, x, y):
    """dL/dW of the mean float cross-entropy, W the layer's dequantized weights (the model's other layers
    in fake mode, the layer's own input as the engine computes it)."""
    node = q.weight_nodes()[name]
    w = dequantize(node.weight_q, node.w_qp).double().requires_grad_(True)
    with torch.no_grad():
        prefix = q.run_prefix(x, name, "integer")
        h = dequantize(prefix.values[node.inputs[0]], node.in_qp).double()
    out = h @ w.T + node.float_bias().double()
    if name != list(q.weight_nodes())[-1]:  # the MLP's fc2 after a ReLU
        fc2 = q.weight_nodes()["fc2"]
        out = F.relu(out) @ dequantize(fc2.weight_q, fc2.w_qp).double().T + fc2.float_bias().double()
    F.cross_entropy(out, y).backward()
    return w.grad


@pytest.mark.parametrize("model, layer, mode", [
    ("small_cnn", "last", "integer"), ("small_cnn", "last", "fake"), ("mlp", "fc1", "integer"),
])  # fmt: skip
def test_central_estimate_follows_the_gradient(model, layer, mode):
    """One step at m = 32: the weight change points against the true gradient (a random direction gives a
    cosine of ~0), and the step ran 2m perturbed passes."""
    q, x, y = _model(model)
    q.mode = mode
    name = list(q.weight_nodes())[-1] if layer == "last" else layer
    settings = FixedPointSettings(difference="central", distribution="qrademacher")
    opt = ActivityGradient(q, name, lr=20.0, eps=1e-3, m=32, seed=3, settings=settings)
    before = q.weight_nodes()[name].weight_q.clone().double()
    grad = _true_gradient(q, name, x, y)
    opt.step(example_closure(q)(x, y))
    delta = q.weight_nodes()[name].weight_q.double() - before
    assert delta.abs().sum() > 0
    cosine = F.cosine_similarity(delta.flatten(), -grad.flatten(), dim=0)
    # through fc2, whose output is requantized again, 1-LSB changes of fc1 are partly rounded away
    assert cosine > (0.5 if model == "mlp" else 0.8), float(cosine)
    assert opt.forward_passes == 64 and opt.forwards_per_step == 64


@pytest.mark.parametrize("difference", ["central", "sign", "median"])
@pytest.mark.parametrize("loss", ["float", "integer"])
def test_steps_reduce_the_loss_and_repeat_bit_for_bit(difference, loss):
    """20 steps lower the training loss; the same seed gives the same integers; only the layer changes."""
    results = []
    for _ in range(2):
        q, x, y = _model()
        head = list(q.weight_nodes())[-1]
        others = {
            n: v.clone() for n, v in q.state_dict().items() if not n.startswith(f"nodes.{len(q.nodes) - 1}")
        }
        settings = FixedPointSettings(difference=difference, distribution="qrademacher")
        lr = 2.0 if difference == "central" else 0.05
        opt = ActivityGradient(q, head, lr=lr, eps=1e-3, m=4, seed=1, settings=settings)
        closure = example_closure(q, loss)
        start = float(F.cross_entropy(q(x), y))
        for _ in range(20):
            opt.step(closure(x, y))
        assert float(F.cross_entropy(q(x), y)) < start
        for n, v in q.state_dict().items():
            if n in others:
                assert torch.equal(v, others[n]), n
        results.append(q.weight_nodes()[head].weight_q.clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("scale", [1, 1 << 10])  # the second: G shifted right before the multiplier
def test_update_is_the_stated_rounding_of_G_times_r(rounding, scale):
    """Δw_q = −round(G·r), r = η·2^-Q·Δ_x/(2·ε_q·Δ_y·1_q·m·B·Δ_w), with G computed here in float64."""
    q, x, y = _model()
    node = q.weight_nodes()[list(q.weight_nodes())[-1]]
    settings = FixedPointSettings(difference="central", distribution="qrademacher", rounding=rounding)
    opt = ActivityGradient(q, node.name, lr=1.0, eps=1e-3, m=2, seed=0, settings=settings)
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randint(-3000, 3000, (2, 16), generator=g) * scale
    u = torch.randint(-1, 2, (2, 16, 5), generator=g) * opt.dist.one_q
    x_q = torch.randint(0, 256, (16, node.weight_q.shape[1]), generator=g)
    G = sum(
        coeffs[i, b].double() * u[i, b].double()[:, None] * (x_q[b].double() - node.zp_in)[None, :]
        for i in range(2)
        for b in range(16)
    )
    dx, dy = float(node.in_qp.scale), float(node.out_qp.scale)
    per_lr = 2.0**-16 * dx / (2 * dy * opt.dist.one_q * 2 * 16 * node.w_qp.scale.double().reshape(-1, 1))
    lr = 40.0 / float((G * per_lr).abs().max())  # the largest change: 40 LSBs
    w0 = node.weight_q.to(torch.int64).clone()
    assert (float(G.abs().max()) > 2**32) == (scale > 1)
    opt.update(coeffs, u, x_q, 16, lr=lr, eps_q=1)
    want = G * per_lr * lr
    fmt = node.w_qp.fmt
    inside = (w0 - want > fmt.qmin + 1) & (w0 - want < fmt.qmax - 1)  # not saturated
    assert inside.float().mean() > 0.9
    err = ((w0 - node.weight_q.to(torch.int64)).double() - want)[inside]
    lo, hi = {"nearest": (-0.5, 0.5), "floor": (-1.0, 0.0), "stochastic": (-1.0, 1.0)}[rounding]
    slack = 1.0 if scale > 1 else 1e-6  # dropping G's low bits first moves the result by at most one LSB
    assert float(err.min()) >= lo - slack and float(err.max()) <= hi + slack
    assert (w0 != node.weight_q).float().mean() > 0.5


def test_coefficients_per_sample_and_example():
    """Rows are the passes (+, − per sample; + only for the median), columns the examples: the median
    signs each column as the weight path's `median_signs` does, sign and central pair rows 2i and 2i+1,
    and a float loss is rounded onto the integer loss's 2^-16 grid."""
    rng = random.Random(0)
    for m in (2, 3, 4, 7, 8):
        losses = np.array([[rng.randint(0, 5) for _ in range(9)] for _ in range(m)])  # many ties
        got = output_coefficients(losses, "median")
        assert got.shape == (m, 9)
        for b in range(9):
            assert got[:, b].tolist() == median_signs(losses[:, b].tolist())
    pairs = np.array([[3, 1, 2], [1, 1, 5], [0, 9, 9], [4, 2, 9]])  # samples 0 and 1, three examples
    assert output_coefficients(pairs, "sign").tolist() == [[1, 0, -1], [-1, 1, 0]]
    assert output_coefficients(pairs, "central").tolist() == [[2, 0, -3], [-4, 7, 0]]
    floats = np.array([[1.0, 0.5], [1.0 - 2**-17, 0.5 - 3 * 2**-16]])
    assert output_coefficients(floats, "central").tolist() == [[0, 3]]  # 2^-17 rounds to an even 0


def test_refusals():
    q, x, y = _model("mlp")
    settings = FixedPointSettings(difference="central")
    with pytest.raises(ValueError, match="one linear layer whose output alone feeds"):
        ActivityGradient(q, "nope", 1.0, 1e-3, settings=settings)
    opt = ActivityGradient(q, "fc2", 1.0, 1e-3, settings=settings)
    with pytest.raises(ValueError, match="beyond the 255-code output range"):
        opt.step(example_closure(q)(x, y)) if opt.eps_q(1e6) else None
    with pytest.raises(ValueError, match="ExampleLoss"):
        opt.step(lambda: 0.0)
    with pytest.raises(ValueError, match="median difference"):
        ActivityGradient(q, "fc2", 1.0, 1e-3, m=1, settings=FixedPointSettings(difference="median"))
    from fwdgrad.ff import qzo_ff

    with pytest.raises(ValueError, match="central.*perturb=outputs"):
        qzo_ff(copy.deepcopy(q), 0.1, 1e-3, difference="central")


def _cfg_error(tmp_path, *overrides):
    with pytest.raises(ValueError) as e:
        run(tmp_path, "method=qzo_ff", "data=digits", "model=small_cnn", *overrides)
    return str(e.value)


def test_pipeline_runs_and_refuses_what_it_cannot_train(tmp_path):
    m = run(
        tmp_path, "method=qzo_ff", "data=digits", "model=small_cnn", "mode=lp", "method.ff.perturb=outputs",
        "method.ff.difference=central", "method.m=2",
    )  # fmt: skip
    assert m["forward_passes"] == 2 * 2 * 2  # 2 steps of 2m passes
    assert "perturb=weights" not in str(m["config"]["method"]["ff"])
    assert "not 2 layers" in _cfg_error(
        tmp_path, "mode=lp", "mode.lp_layers=2", "method.ff.perturb=outputs", "method.ff.difference=central"
    )
    assert "method.ff.momentum" in _cfg_error(
        tmp_path, "mode=lp", "method.ff.perturb=outputs", "+method.ff.momentum=true"
    )
    assert "method.ff.perturb" in _cfg_error(tmp_path, "method.ff.perturb=inputs")


def test_memory_model_counts_the_outputs_perturbation():
    """Perturbed outputs keep one pass's u over the head's outputs, a ± pair's per-example losses and the
    int64 sum G; the activations and weights are the weight perturbation's."""
    from fwdgrad.analysis.memory import memory_breakdown

    model = build_model("small_cnn", num_classes=5, in_channels=1)
    kw = dict(method="ff", mode="lp", fmt="w16a8", m=6)
    weights = memory_breakdown(model, (32, 1, 8, 8), **kw)
    outputs = memory_breakdown(model, (32, 1, 8, 8), **kw, perturb="outputs")
    assert outputs.perturbation == 32 * 5 * 1 + 2 * 32 * 8 + 16
    assert outputs.gradients == weights.n_updated * 8 and weights.gradients == weights.n_updated * 2
    assert (outputs.scratch, outputs.weights) == (weights.scratch, weights.weights)
    with pytest.raises(ValueError, match="perturb"):
        memory_breakdown(model, (32, 1, 8, 8), **kw, perturb="inputs")


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_tiny_updates_stay_unbiased(rounding):
    """An update far below one LSB (a shift past 62 bits) changes nothing rounded to nearest and almost
    nothing stochastically: no overflow turns it into ±1 steps (8-bit weights, where it happened)."""
    q, x, y = _model(scheme="w8a8")
    node = q.weight_nodes()[list(q.weight_nodes())[-1]]
    settings = FixedPointSettings(difference="central", distribution="qrademacher", rounding=rounding)
    opt = ActivityGradient(q, node.name, lr=1e-9, eps=1e-3, m=2, seed=0, settings=settings)
    g = torch.Generator().manual_seed(0)
    coeffs = torch.randint(-3000, 3000, (2, 16), generator=g)
    u = torch.randint(-1, 2, (2, 16, 5), generator=g) * opt.dist.one_q
    x_q = torch.randint(0, 256, (16, node.weight_q.shape[1]), generator=g)
    w0 = node.weight_q.clone()
    opt.update(coeffs, u, x_q, 16, lr=1e-9, eps_q=1)
    assert (node.weight_q != w0).float().mean() <= 0.01


def test_state_dict_resumes_bit_for_bit():
    """4 steps in one go equal 2 steps, the state (weights and optimizer) carried to a fresh model and
    optimizer, and 2 more."""
    settings = FixedPointSettings(difference="central", distribution="qrademacher", rounding="stochastic")

    def build():
        q, x, y = _model()
        head = list(q.weight_nodes())[-1]
        return q, x, y, ActivityGradient(q, head, lr=2.0, eps=1e-3, m=3, seed=5, settings=settings)

    q, x, y, opt = build()
    for k in range(4):
        opt.step(example_closure(q)(x[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16]))
    q2, _, _, opt2 = build()
    for k in range(2):
        opt2.step(example_closure(q2)(x[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16]))
    state, weights = copy.deepcopy(opt2.state_dict()), copy.deepcopy(q2.state_dict())
    q3, _, _, opt3 = build()
    q3.load_state_dict(weights)
    opt3.load_state_dict(state)
    for k in range(2, 4):
        opt3.step(example_closure(q3)(x[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16]))
    assert opt3.step_count == 4 and opt3.forward_passes == opt.forward_passes == 24
    head = opt.names[0]
    assert torch.equal(q3.weight_nodes()[head].weight_q, q.weight_nodes()[head].weight_q)


def test_the_documented_python_loop_runs():
    """docs/training.md's snippet, as written, on a small model."""
    from fwdgrad.ff import example_closure, qzo_ff

    q, x, y = _model()
    batches = [(x[:32], y[:32]), (x[32:], y[32:])]
    head = list(q.weight_nodes())[-1]
    opt = qzo_ff(q, lr=1.0, eps=1e-3, m=6, trainable=[head], perturb="outputs",
                 difference="central", distribution="qrademacher", weight_headroom=4)  # fmt: skip
    before = q.weight_nodes()[head].weight_q.clone()  # after the headroom rescaled it
    closure = example_closure(q)
    for x, y in batches:
        opt.step(closure(x, y))
    assert isinstance(opt, ActivityGradient) and opt.forward_passes == 24
    assert not torch.equal(q.weight_nodes()[head].weight_q, before)
