"""MAC-weighted compute per step (fwdgrad.train module docstring): what a linear probe's samples cost."""

import pytest
import torch

from fwdgrad.engine import convert
from fwdgrad.models import build_model
from fwdgrad.train import TrainConfig, mac_suffix, train


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    return x, y


def _run(method, x, y, scope="lp", m=3, **kw):
    model = build_model("resnet8", 10, 1)
    if method in ("qzo_ff", "bp_qat"):
        model = convert(model, "w16a8", x)
    cfg = TrainConfig(method=method, scope=scope, lr=0.01, eps=1e-2, m=m, steps=2, batch_size=16, **kw)
    return model, train(model, cfg, (x, y), (x[:4], y[:4]))


def test_mac_suffix_of_the_head_is_its_share(setup):
    x, _ = setup
    q = convert(build_model("resnet8", 10, 1), "w16a8", x)
    macs = q.macs(x)
    assert macs["fc"] == 64 * 10 and sum(macs.values()) == 9_345_920  # the figures of docs/training.md
    S = mac_suffix(q, x)
    assert S("fc") == pytest.approx(640 / sum(macs.values()))
    assert S(next(iter(q.weight_nodes()))) == 1.0
    float_S = mac_suffix(build_model("resnet8", 10, 1), x)  # the float model, traced
    assert float_S("fc.weight") == pytest.approx(S("fc"))


def test_compute_counts_the_suffix_a_step_runs(setup):
    x, y = setup
    q, r = _run("qzo_ff", x, y, m=6)
    share = mac_suffix(q, x)("fc")
    assert r.forward_passes == 2 * 12
    assert r.compute == pytest.approx(2 * (1 + 11 * share))  # one pass to the head, 12 of the head
    _, ft = _run("qzo_ff", x, y, scope="ft", m=2)
    assert ft.compute == pytest.approx(2 * 4)  # every pass is a whole forward
    _, bp = _run("bp", x, y)
    assert bp.forward_passes == 6 and bp.compute == pytest.approx(2 * (1 + 2 * share))
    assert r.log[-1]["compute"] == pytest.approx(r.compute, abs=1e-4)
