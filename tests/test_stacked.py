"""Stacked perturbed passes: a step's 2m passes through one trained linear layer run as one forward
(`FixedPointSpace.stacked`, `QLinear.stacked`) and equal the sequential passes bit for bit."""

import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import native
from fwdgrad.engine import convert
from fwdgrad.engine.nodes import KERNELS, ExecContext
from fwdgrad.ff import PassLoss, Term, qzo_ff, spaces
from fwdgrad.ff.intloss import integer_closure
from fwdgrad.models import build_model
from fwdgrad.train import _forward_only_closure


class _MLP(nn.Module):
    """Two linear layers: the first trained, the second frozen after it (a stacked pass runs through it)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(1, 4, 3), nn.Linear(4 * 6 * 6, 12), nn.Linear(12, 5)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(torch.flatten(F.relu(self.conv(x)), 1))))


class _Skip(nn.Module):
    """A value from before the linear layer meets its output: its passes cannot be stacked."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(h)) + h)


def _model(name, scheme="w16a8", per_channel=False):
    torch.manual_seed(0)
    x = torch.randn(96, 1, 8, 8)
    y = torch.randint(0, 5, (96,))
    if name == "vit":  # an integer-only transformer: the head reads the class token
        model = build_model("vit_tiny", 5, 1, image_size=8, patch_size=4, hidden_dim=16, depth=1, heads=2)
    else:
        model = build_model("small_cnn", num_classes=5, in_channels=1) if name == "small_cnn" else _MLP()
    return convert(model.eval(), scheme, x[:64], per_channel=per_channel), x, y


CASES = {  # id: (model, scheme, train, mode, loss, difference, extra)
    "lp-integer": ("small_cnn", "w16a8", "last", "integer", "float", "sign", {}),
    "lp-fake": ("small_cnn", "w16a8", "last", "fake", "float", "sign", {}),
    "lp-w8-median": ("small_cnn", "w8a8", "last", "integer", "float", "median", {"m": 4}),
    "lp-integer-loss": ("small_cnn", "w16a8", "last", "integer", "integer", "sign", {}),
    "lp-sharpness": ("small_cnn", "w16a8", "last", "integer", "float", "sign", {"sharpness_rho": 2e-3}),
    "lp-stochastic": ("small_cnn", "w8a8", "last", "integer", "float", "sign", {"rounding": "stochastic"}),
    "mlp-first-linear": ("mlp", "w16a8", "fc1", "integer", "float", "sign", {}),
    "vit-head": ("vit", "w16a8", "last", "integer", "float", "sign", {}),
}


def _train(case, stacked, steps=6, kernel="auto"):
    name, scheme, train, mode, loss, difference, extra = CASES[case]
    q, x, y = _model(name, scheme)
    q.mode, q.kernel = mode, kernel
    head = list(q.weight_nodes())[-1] if train == "last" else train
    kw = {"m": 3, **extra}
    opt = qzo_ff(q, 0.05, 2e-3, seed=4, trainable=[head], difference=difference, **kw)
    make = integer_closure(q, lambda: head) if loss == "integer" else _forward_only_closure(q, lambda: head)
    assert opt.space.can_stack(0)
    losses = []
    for k in range(steps):
        c = make(x[16 * k : 16 * k + 16], y[16 * k : 16 * k + 16])
        assert isinstance(c, PassLoss)
        losses.append(opt.step(c if stacked else (lambda c=c: c())))  # a plain closure runs pass by pass
    state = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    return losses, state, opt


@pytest.mark.parametrize("perturb", ["torch", "c"])
@pytest.mark.parametrize("case", list(CASES))
def test_stacked_steps_equal_sequential_steps(case, perturb, monkeypatch):
    if perturb == "torch":  # the passes' weights all at once in torch, as without the C kernels
        monkeypatch.setattr(spaces.kernels, "library", lambda: None)
    ref_losses, ref_state, ref_opt = _train(case, stacked=False)
    losses, state, opt = _train(case, stacked=True)
    assert losses == ref_losses
    assert all(torch.equal(state[n], ref_state[n]) for n in state)
    assert opt.forward_passes == ref_opt.forward_passes
    assert opt.space.saturations == ref_opt.space.saturations
    assert opt.space.weights_seen == ref_opt.space.weights_seen
    assert any(not torch.equal(state[n], _model(CASES[case][0], CASES[case][1])[0].weight_nodes()[n].weight_q)
               for n in state)  # fmt: skip


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "auto"])
def test_stacked_steps_on_every_kernel_and_the_torch_path(kernel):
    ref_losses, ref_state, _ = _train("lp-integer", stacked=False, steps=3, kernel=kernel)
    for path in (contextlib.nullcontext, native.disabled):
        with path():
            losses, state, _ = _train("lp-integer", stacked=True, steps=3, kernel=kernel)
        assert losses == ref_losses and all(torch.equal(state[n], ref_state[n]) for n in state), path


def test_stackable_names_linear_layers_whose_output_alone_feeds_the_rest():
    q, _, _ = _model("small_cnn")
    names = list(q.weight_nodes())
    assert q.stackable(names[-1]) and not q.stackable(names[0])  # a conv
    assert not q.stackable("no_such_node")
    mlp, _, _ = _model("mlp")
    assert mlp.stackable("fc1") and mlp.stackable("fc2")
    skip = convert(_Skip().eval(), "w16a8", torch.randn(32, 1, 4, 4))
    assert not skip.stackable("fc1") and skip.stackable("fc2")
    # a step whose active tensor cannot stack runs pass by pass, with the same result
    opt = qzo_ff(skip, 0.05, 2e-3, m=2, seed=1, trainable=["fc1"])
    assert not opt.space.can_stack(0)


@pytest.mark.parametrize("scheme,per_channel", [("w16a8", False), ("w8a8", True)])
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "auto"] + ["auto"])
def test_stacked_linear_is_exact_at_the_extremes(scheme, per_channel, kernel):
    """Full-range inputs, weights at ±qmax, P = 5 copies: each block of rows equals its own pass."""
    q, _, _ = _model("small_cnn", scheme, per_channel)
    node = list(q.weight_nodes().values())[-1]
    assert node.w_qp.scale.numel() == (5 if per_channel else 1)
    fmt = node.w_qp.fmt
    g = torch.Generator().manual_seed(2)
    w = torch.randint(fmt.qmin, fmt.qmax + 1, (5, *node.weight_q.shape), generator=g)
    w[0].fill_(fmt.qmax)
    w[1].fill_(fmt.qmin)
    w = w.to(node.weight_q.dtype)
    lo, hi = node.in_qp.fmt.qmin, node.in_qp.fmt.qmax
    h = torch.randint(lo, hi + 1, (16, node.weight_q.shape[1]), generator=g).float()
    h[0].fill_(hi)
    h[1].fill_(lo)
    for mode in ("integer", "fake"):
        hx = h if mode == "integer" else (h - float(node.in_qp.zero_point)) * float(node.in_qp.scale)
        ctx = ExecContext(mode=mode, weight_fn=lambda n, _: w, stack=5, kernel=kernel)
        got = node(hx, ctx=ctx)
        for p in range(5):
            one = node(hx, ctx=ExecContext(mode=mode, weight_fn=lambda n, _, p=p: w[p], kernel=kernel))
            assert torch.equal(got[16 * p : 16 * p + 16], one), (mode, p)


def test_a_pass_loss_whose_forward_does_not_run_the_batch_once_is_an_error():
    q, x, y = _model("small_cnn")
    head = list(q.weight_nodes())[-1]
    opt = qzo_ff(q, 0.05, 2e-3, m=2, seed=1, trainable=[head])
    with pytest.raises(ValueError, match="returned 15 rows for 8 labels"):
        PassLoss(lambda: q(x[:15]), y[:8], F.cross_entropy).losses()
    twice = PassLoss(lambda: torch.cat([q(x[:8]), q(x[:8])]), y[:8], F.cross_entropy)  # 2 passes' rows each
    with pytest.raises(ValueError, match="gave 8 losses for 4 passes"):
        opt.step(twice)


def test_stacked_context_leaves_the_stored_weights_and_other_layers_alone():
    q, x, y = _model("small_cnn")
    head = list(q.weight_nodes())[-1]
    before = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    opt = qzo_ff(q, 0.05, 2e-3, m=2, seed=1, trainable=[head])
    passes = [[Term(i, 2e-3, s)] for i in range(2) for s in (1, -1)]
    with opt.space.stacked(0, passes), torch.no_grad():
        out = q(x[:8])
    assert out.shape == (4 * 8, 5)
    assert all(torch.equal(node.weight_q, before[n]) for n, node in q.weight_nodes().items())
    with torch.no_grad():
        plain = q(x[:8])
    assert plain.shape == (8, 5)  # the stack ends with the block
    copy.deepcopy(q)  # the stacked layer cache does not travel with copies
    node = q.weight_nodes()[head]
    first = node.stacked(4)
    assert node.stacked(4) is first and node.stacked(2) is not first and node.stacked(4) is first
    node.bias_q.add_(1)  # a changed bias builds the copy again, with the new bias repeated
    again = node.stacked(4)
    assert again is not first and torch.equal(again.bias_q, node.bias_q.repeat(4))
