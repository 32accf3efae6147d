"""Layer-wise forward gradients (`layerwise` cycle | sample): one trained tensor per step, its passes
resuming from the prefix before it; the float and fixed-point spaces and the training loop (tests/test_edge.py
checks the edge runtime bit for bit)."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from fwdgrad.engine import convert
from fwdgrad.ff import qzo_ff, zo_sgd
from fwdgrad.models import build_model
from fwdgrad.rng import active_tensor
from fwdgrad.train import TrainConfig, train


def _qmodel(seed=0):
    torch.manual_seed(seed)
    m = build_model("small_cnn", 10, 1)
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    return convert(m, "w16a8", x), x, y


def test_active_tensor_cycle_and_sample():
    assert [active_tensor("cycle", 3, k, 4) for k in range(6)] == [0, 1, 2, 3, 0, 1]
    draws = [active_tensor("sample", 3, k, 4) for k in range(400)]
    assert draws == [active_tensor("sample", 3, k, 4) for k in range(400)]  # reproducible
    assert set(Counter(draws)) == {0, 1, 2, 3} and max(Counter(draws).values()) < 140  # about uniform
    assert draws != [active_tensor("sample", 4, k, 4) for k in range(400)]  # the seed matters
    assert active_tensor("off", 3, 5, 4) is None
    with pytest.raises(ValueError, match="layerwise='blocks' is invalid; allowed: off, cycle, sample"):
        active_tensor("blocks", 0, 0, 4)


@pytest.mark.parametrize("layerwise", ["cycle", "sample"])
def test_fixed_point_step_updates_only_the_active_tensor(layerwise):
    q, x, y = _qmodel()
    opt = qzo_ff(q, 0.05, 1e-2, 3, seed=1, layerwise=layerwise)
    names = opt.space.names
    for k in range(len(names) + 2):
        before = {n: q.weight_nodes()[n].weight_q.clone() for n in names}
        opt.step(lambda: F.cross_entropy(q(x), y))
        changed = {n for n in names if not torch.equal(before[n], q.weight_nodes()[n].weight_q)}
        assert changed <= {names[active_tensor(layerwise, 1, k, len(names))]}
    assert opt.step_count == len(names) + 2


def test_float_space_updates_only_the_active_tensor():
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    params = [(n, p) for n, p in model.named_parameters() if p.dim() > 1]
    opt = zo_sgd(params, 0.01, 1e-3, "sign_spsa", seed=0, layerwise="cycle")
    for k in range(3):
        before = [p.detach().clone() for _, p in params]
        opt.step(lambda: F.cross_entropy(model(x), y))
        moved = [i for i, (_, p) in enumerate(params) if not torch.equal(before[i], p.detach())]
        assert moved == [k % len(params)]


def test_training_loop_with_prefix_reuse_is_bit_identical():
    """`train` resumes each step's passes from the prefix before the active layer; the same steps run on
    full forward passes give the same integer weights."""
    q1, x, y = _qmodel()
    q2, _, _ = _qmodel()
    cfg = TrainConfig(
        method="qzo_ff", scope="ft", lr=0.05, eps=1e-2, m=2, steps=6, batch_size=64, eval_every=100,
        ff={"layerwise": "sample"},
    )  # fmt: skip
    train(q1, cfg, (x, y), (x[:8], y[:8]))
    opt = qzo_ff(q2, 0.05, 1e-2, 2, seed=0, layerwise="sample")
    for _ in range(6):
        opt.step(lambda: F.cross_entropy(q2(x), y))
    for n, node in q1.weight_nodes().items():
        assert torch.equal(node.weight_q, q2.weight_nodes()[n].weight_q), n
