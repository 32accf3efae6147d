"""Transformer bundles on the numpy edge runtime: a small ViT (and AST) exported from the PyTorch engine runs
bit-identically (every op's output, the logits), and QZO-FF steps in the lp, dvpt and ln scopes update the
same integers (head, deep prompt tokens, LayerNorm γ) on both sides."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.edge import Runtime, Trainer, load_bundle
from fwdgrad.engine import convert
from fwdgrad.engine.transformer import QLayerNorm, QTokens
from fwdgrad.export import export_bundle
from fwdgrad.ff import qzo_ff
from fwdgrad.models import add_prompts, ast_tiny, vit_tiny
from fwdgrad.train import TrainConfig, trainable_names

TRANSFORMER_KINDS = {"layernorm", "softmax", "matmul", "tokens", "unflatten", "getitem", "const", "add"}


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _vit(scheme: str = "w16a8", prompts: int = 0, seed: int = 0, **convert_kw):
    """A converted 2-layer ViT on 28x28 inputs (random init, a head scaled up so that the logits spread),
    its calibration batch and labels."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    m = vit_tiny(10, in_channels=1, image_size=28, patch_size=7, hidden_dim=32, depth=2, heads=2)
    if prompts:
        add_prompts(m, prompts, seed=seed)
    with torch.no_grad():
        m.head.weight.normal_(0.0, 1.0, generator=g)
        m.head.bias.uniform_(-0.5, 0.5, generator=g)
        m.cls.tokens.normal_(0.0, 0.5, generator=g)
    x = torch.randn(40, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)
    return convert(m, scheme, x, **convert_kw), x, y


def _export(q, path, trainable=None, **kw):
    return export_bundle(q, path, trainable, **(dict(eps=1e-3, lr=1e-3, m=2, seed=7) | kw))


def _codes(t: torch.Tensor) -> np.ndarray:
    return t.numpy().astype(np.int64)


# ------------------------------------------------------------------------------------------ inference
@pytest.mark.parametrize(
    "scheme, kw",
    [
        ("w16a8", {}),
        ("w8a8", {}),
        ("w16a8", dict(residual_bits=16)),
        ("w16a8", dict(per_channel=True, requant="gemmlowp", acc_bits=26, overflow="wrap")),
    ],
    ids=["w16a8", "w8a8", "residual16", "perchannel-gemmlowp-wrap26"],
)
def test_vit_inference_bit_exact(tmp_path, scheme, kw):
    """Every op's output, not only the logits: an op that is off by one somewhere cannot hide."""
    q, x, _ = _vit(scheme, prompts=2, **kw)
    bundle = _export(q, tmp_path / "b.npz")
    assert TRANSFORMER_KINDS <= {op["kind"] for op in bundle.ops}
    rt = Runtime(load_bundle(tmp_path / "b.npz"))
    rt.last_use = dict.fromkeys(rt.last_use, -1)  # free nothing: keep every op's output
    edge = rt.run_prefix(x.numpy(), len(rt.ops))[0]
    ref = q.run(x, mode="integer", keep=True)
    for op in rt.ops:
        assert np.array_equal(edge[op["name"]].astype(np.int64), _codes(ref[op["name"]])), op["name"]
    out = _codes(ref[q.output])
    assert len(np.unique(out)) > 20 and np.ptp(out, axis=0).min() > 3  # logits that depend on the input
    if "acc_bits" in kw:
        assert q.stats.total > 0  # the LayerNorms' 26-bit accumulators really wrapped


def test_ast_inference_bit_exact(tmp_path):
    torch.manual_seed(1)
    m = ast_tiny(10)
    with torch.no_grad():
        m.head.weight.normal_(0.0, 1.0)
    x = torch.randn(8, 1, 40, 101)
    q = convert(m, "w16a8", x, residual_bits=16)
    _export(q, tmp_path / "a.npz", input_preprocessing={"shape": [1, 40, 101]})
    codes = Runtime(load_bundle(tmp_path / "a.npz")).run(x.numpy())
    ref = _codes(q.run(x, mode="integer"))
    assert np.array_equal(codes, ref) and len(np.unique(ref)) > 20 and np.ptp(ref, axis=0).min() > 3


# ------------------------------------------------------------------------------------------- training
def _f64_closure(q, xb, yb):
    """Float64 cross-entropy of the dequantized integer logits (what the runtime computes)."""
    oq = q.output_qparams()
    s, zp = float(oq.scale.reshape(-1)[0]), int(oq.zero_point.reshape(-1)[0])
    return lambda: F.cross_entropy((q.run(xb, mode="integer").double() - zp) * s, yb)


@pytest.mark.parametrize(
    "scope, prompts, kw, ff",
    [
        ("lp", 0, {}, {}),
        ("dvpt", 2, {}, {}),
        ("ln", 0, {}, {}),
        ("dvpt", 2, dict(residual_bits=16), dict(rounding="stochastic", distribution="qrademacher")),
        ("ln", 0, dict(per_channel=True), dict(rounding="stochastic")),
    ],
    ids=["lp", "dvpt", "ln", "dvpt-residual16-stochastic", "ln-perchannel-stochastic"],
)
def test_vit_training_bit_exact(tmp_path, scope, prompts, kw, ff, steps=5, batch=8):
    q, x, y = _vit("w16a8", prompts=prompts, **kw)
    names = trainable_names(q, TrainConfig(scope=scope))
    nodes = q.weight_nodes()
    kind = {"dvpt": QTokens, "ln": QLayerNorm}.get(scope)
    assert names[-1] == "head" and all(isinstance(nodes[n], kind) for n in names[:-1])
    assert len(names) == {"lp": 1, "dvpt": 3, "ln": 6}[scope]
    if kw.get("per_channel"):
        assert all(nodes[n].w_qp.scale.numel() > 1 for n in names)  # per-channel γ scales (and head)
    _export(q, tmp_path / "t.npz", names, **ff)
    bundle = load_bundle(tmp_path / "t.npz")
    trainer = Trainer(bundle)
    opt = qzo_ff(q, 1e-3, 1e-3, 2, 7, trainable=names, **ff)
    start = {n: node.weight_q.clone() for n, node in nodes.items()}
    for k in range(steps):
        xb, yb = x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        ref_loss = opt.step(_f64_closure(q, xb, yb))
        loss = trainer.step(xb.numpy(), yb.numpy())
        assert loss == pytest.approx(ref_loss, rel=1e-12), k  # same logits; numpy vs torch float64 CE
        for n, node in nodes.items():
            assert np.array_equal(bundle.arrays[f"{n}.weight"], node.weight_q.numpy()), (k, n)
        assert np.array_equal(trainer.runtime.run(xb.numpy()), _codes(q.run(xb, mode="integer"))), k
    assert bundle.training["step"] == steps == opt.step_count
    for n, node in nodes.items():
        moved = not torch.equal(node.weight_q, start[n])
        assert moved == (n in names), n  # every trained tensor moved, nothing else did


# ------------------------------------------------------------------------------------------- refusals
class _Unsqueezed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(6, 6), nn.LayerNorm(6)

    def forward(self, x):
        return self.norm(self.fc(x)).unsqueeze(1)


class _Gathered(_Unsqueezed):
    def forward(self, x):
        return self.norm(self.fc(x))[:, [0, 2, 4]]


@pytest.mark.parametrize(
    "model, match",
    [
        (_Unsqueezed, "node 'unsqueeze': layout op 'unsqueeze' is not supported by the edge runtime"),
        (_Gathered, r"node 'getitem': index .* is not supported by the edge runtime; allowed: integers"),
    ],
    ids=["unsqueeze", "list-index"],
)
def test_unsupported_layout_is_one_line(tmp_path, model, match):
    x = torch.randn(8, 6)
    q = convert(model(), "w16a8", x)
    with pytest.raises(ValueError, match=match) as err:
        _export(q, tmp_path / "b.npz")
    assert "\n" not in str(err.value) and not (tmp_path / "b.npz").exists()
