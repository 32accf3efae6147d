"""The forward-only optimizers speak torch.optim: param_groups with lr, every lr_scheduler, state_dict round
trips, and a float model given to qzo_ff is a one-line error saying how to convert it."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR, StepLR

from fwdgrad.engine import convert
from fwdgrad.ff import JVPForwardGradient, closure_for, qzo_ff, zo_sgd
from fwdgrad.models import build_model

LR = 0.05
STEPS = 6
SCHEDULES = {
    "step": (lambda opt: StepLR(opt, step_size=2, gamma=0.5), lambda t: LR * 0.5 ** (t // 2)),
    "cosine": (
        lambda opt: CosineAnnealingLR(opt, T_max=STEPS),
        lambda t: LR * (1 + math.cos(math.pi * t / STEPS)) / 2,
    ),
    "lambda": (lambda opt: LambdaLR(opt, lambda t: 1 / (t + 1)), lambda t: LR / (t + 1)),
}


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def make(kind: str, **kw):
    """(model, optimizer, closure) for a small CNN: fp32 zo_sgd (sign-SPSA) or qzo_ff on w16a8 integers."""
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=5, in_channels=1, width=4).eval()
    x, y = data()
    if kind == "qzo_ff":
        model = convert(model, "w16a8", x)
        opt = qzo_ff(model, lr=LR, eps=1e-2, m=2, seed=0, trainable=list(model.weight_nodes())[-1:], **kw)
    else:
        opt = zo_sgd(model, lr=LR, eps=1e-2, estimator="sign_spsa", m=2, seed=0, **kw)
    return model, opt, lambda: F.cross_entropy(model(x), y)


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_forward_optimizers_are_torch_optimizers():
    for kind in ("zo_sgd", "qzo_ff"):
        model, opt, closure = make(kind)
        assert isinstance(opt, torch.optim.Optimizer)
        assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == LR == opt.lr
        assert opt.param_groups[0]["eps"] == 1e-2
        opt.zero_grad()  # the torch loop idiom works (there are no gradients)
        assert isinstance(opt.step(closure), float)
    assert opt.param_groups[0]["param_names"] == list(model.weight_nodes())[-1:]  # qzo_ff: the trained node
    with pytest.raises(ValueError, match="trains one parameter group"):
        opt.add_param_group({"params": [torch.zeros(1)]})
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=5, in_channels=1, width=4).eval()
    jvp = JVPForwardGradient(model, lr=LR)
    assert isinstance(jvp, torch.optim.Optimizer) and jvp.param_groups[0]["lr"] == LR


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("kind", ["zo_sgd", "qzo_ff"])
def test_lr_schedulers_drive_the_update(kind, schedule):
    model, opt, closure = make(kind)
    used = []
    update = opt.space.update
    opt.space.update = lambda step, coeffs, lr: (used.append(lr), update(step, coeffs, lr))
    build, expected = SCHEDULES[schedule]
    sched = build(opt)
    for _ in range(STEPS):
        opt.step(closure)
        sched.step()
    assert used == pytest.approx([expected(t) for t in range(STEPS)], rel=1e-12, abs=1e-15)


def test_scheduled_qzo_ff_equals_setting_the_group_lr_by_hand():
    """The integer update takes the group's lr through its multiplier: a scheduler and a hand-set lr give
    bit-identical integer weights."""
    a, opt_a, closure_a = make("qzo_ff")
    sched = LambdaLR(opt_a, lambda t: 1 / (t + 1))
    b, opt_b, closure_b = make("qzo_ff")
    for t in range(4):
        opt_a.step(closure_a)
        sched.step()
        opt_b.param_groups[0]["lr"] = LR / (t + 1)
        opt_b.step(closure_b)
    for k, v in weights(a).items():
        assert torch.equal(v, weights(b)[k]), k
    first = weights(make("qzo_ff")[0])
    assert any(not torch.equal(v, first[k]) for k, v in weights(a).items())  # it did train


def test_jvp_follows_a_scheduler():
    torch.manual_seed(0)
    model = build_model("small_cnn", num_classes=5, in_channels=1, width=4).eval()
    x, y = data()
    opt = JVPForwardGradient(model, lr=LR)
    sched = LambdaLR(opt, lambda t: 1.0 if t == 0 else 0.0)  # lr 0 from the second step on
    closure = closure_for(model, lambda f: F.cross_entropy(f(x), y))
    start = weights(model)
    opt.step(closure)
    sched.step()
    after_one = weights(model)
    opt.step(closure)
    assert any(not torch.equal(after_one[k], start[k]) for k in start)
    assert all(torch.equal(v, after_one[k]) for k, v in weights(model).items())


@pytest.mark.parametrize("kind", ["zo_sgd", "qzo_ff"])
def test_state_dict_round_trip_resumes_bit_identically(kind):
    kw = {"momentum": {"alpha": 0.5, "beta": 0.5, "warmup": 1}}  # the space carries state too
    model, opt, closure = make(kind, **kw)
    sched = StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(3):
        opt.step(closure)
        sched.step()
    saved = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    for _ in range(3):
        opt.step(closure)
        sched.step()

    model2, opt2, closure2 = make(kind, **kw)
    sched2 = StepLR(opt2, step_size=2, gamma=0.5)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert opt2.step_count == 3 and opt2.param_groups[0]["lr"] == saved["opt"]["param_groups"][0]["lr"]
    for _ in range(3):
        opt2.step(closure2)
        sched2.step()
    for k, v in weights(model).items():
        assert torch.equal(v, weights(model2)[k]), k
    assert (opt2.step_count, opt2.forward_passes, opt2.lr) == (opt.step_count, opt.forward_passes, opt.lr)


def test_float_model_to_qzo_ff_says_how_to_convert():
    model = build_model("small_cnn", num_classes=5, in_channels=1, width=4)
    with pytest.raises(ValueError) as e:
        qzo_ff(model, lr=LR)
    msg = str(e.value)
    assert "\n" not in msg and "Sequential" in msg
    assert 'fwdgrad.engine.convert(model, "w16a8", calib)' in msg
