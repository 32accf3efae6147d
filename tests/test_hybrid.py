"""The hybrid method: backprop for the top trained layers, QZO-FF below, in one step."""

import pytest
import torch

from fwdgrad.engine import convert
from fwdgrad.methods import spec
from fwdgrad.models import build_model
from fwdgrad.quant import quantize
from fwdgrad.train import Method, TrainConfig, train


def _setup(seed=0):
    torch.manual_seed(seed)
    m = build_model("small_cnn", 10, 1)
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,))
    return convert(m, "w16a8", x), x, y


def _cfg(**kw):
    base = dict(method="hybrid", scope="lp", lp_layers=2, lr=0.05, eps=1e-2, m=2, steps=8, batch_size=32)
    base["ff"] = {"bp_layers": 1, "bp_lr": 0.5}
    return TrainConfig(**{**base, "eval_every": 100, **kw})


def test_hybrid_trains_both_parts_and_keeps_the_head_integer():
    q, x, y = _setup()
    names = list(q.weight_nodes())
    zo_layer, head = names[-2], names[-1]
    start = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    r = train(q, _cfg(), (x, y), (x, y))
    nodes = q.weight_nodes()
    assert not torch.equal(nodes[zo_layer].weight_q, start[zo_layer])  # QZO-FF moved the lower layer
    assert not torch.equal(nodes[head].weight_q, start[head])  # BP moved the head
    for n in names[:-2]:
        assert torch.equal(nodes[n].weight_q, start[n])  # outside the scope: untouched
    assert r.forward_passes == 8 * (2 * 2 + 3) == 8 * spec("hybrid").forwards_per_step(2)


def test_hybrid_head_equals_its_quantized_master_weights():
    q, x, y = _setup()
    method = Method(q, _cfg())
    for i in range(3):
        method.step(x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)])
    (n, w), node = next(iter(method.master.items())), q.weight_nodes()[list(q.weight_nodes())[-1]]
    assert n == node.name
    assert torch.equal(node.weight_q, quantize(w.detach(), node.w_qp).to(node.weight_q.dtype))


@pytest.mark.parametrize("k", [0, 2, True])
def test_hybrid_rejects_bp_layers_outside_the_scope(k):
    q, _, _ = _setup()
    with pytest.raises(ValueError, match=rf"method.ff.bp_layers={k!r} is invalid for 2 trained layers"):
        Method(q, _cfg(ff={"bp_layers": k}))
