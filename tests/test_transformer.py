"""Integer transformer ops (fwdgrad.engine.transformer): exact against Python-integer references, C kernels
against the torch path, error against float, ViTs converted without fallbacks, the dvpt / ln scopes."""

import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn as nn
import torchvision

from fwdgrad import native
from fwdgrad.engine import AccumulatorSpec, convert, qmodel_state, rebuild_qmodel
from fwdgrad.engine.blocks import Attention, Tokens, decompose_attention
from fwdgrad.engine.nodes import ExecContext
from fwdgrad.engine.transformer import QLayerNorm, QMatmul, QSoftmax, QTokens, isqrt, probability_qparams
from fwdgrad.ff.optim import qzo_ff
from fwdgrad.models import add_prompts, build_model, scope_params
from fwdgrad.quant import QFormat, QParams, activation_format, dequantize, weight_format
from fwdgrad.train import TrainConfig, trainable_names


def small_vit(prompts: int = 0, **kw):
    torch.manual_seed(0)
    opts = dict(image_size=28, patch_size=7, hidden_dim=32, depth=2, heads=2) | kw
    m = build_model("vit_tiny", 10, 1, **opts).eval()
    nn.init.normal_(m.head.weight, std=0.5)  # non-trivial logits
    if prompts:
        add_prompts(m, prompts)
    return m


def test_isqrt_is_floor_sqrt():
    rng = random.Random(0)
    values = [0, 1, 2, 3, 4, 2**52 - 1] + [rng.randrange(2**52) for _ in range(2000)]
    values += [k * k + d for k in (1, 7, 2**20, 2**26 - 1) for d in (-1, 0, 1) if k * k + d >= 0]
    got = isqrt(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [math.isqrt(v) for v in values]


def _ln_reference(codes: list[int], node: QLayerNorm) -> list[int]:
    """The documented formulas in Python integers, requantized by the node's own (tested) requantizer."""
    d, zp = node.dim, node.zp_in
    q = [c - zp for c in codes]
    mu = (2 * sum(q) + d) // (2 * d)
    c = [v - mu for v in q]
    r = math.isqrt((sum(v * v for v in c) + node.v_eps) * d)
    xhat = [(2 * v * (d << node.frac) + r) // (2 * r) for v in c]
    gamma = node.weight_q.to(torch.int64).expand(d).tolist()
    beta = node.bias_q.to(torch.int64).expand(d).tolist()
    acc = torch.tensor([[g * x + b for g, x, b in zip(gamma, xhat, beta)]], dtype=torch.int64)
    return node.requant(acc, "single").reshape(-1).int().tolist()


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
def test_layernorm_matches_integer_reference_and_float(bits, per_channel):
    torch.manual_seed(1)
    d = 48
    ln = nn.LayerNorm(d, eps=1e-6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-0.3, 0.3)
    in_qp = QParams(activation_format(bits), 0.02 if bits == 8 else 0.02 / 256, 128 if bits == 8 else 0)
    out_qp = QParams(activation_format(8), 12.0 / 255, 128)  # ±6: nothing clamps
    node = QLayerNorm("ln", ["x"], in_qp, out_qp, ln, weight_format(16, per_channel=per_channel))
    fmt = in_qp.fmt
    x = torch.randint(fmt.qmin, fmt.qmax + 1, (6, d)).float()
    x[0] = fmt.qmin  # a constant row: variance 0, only ε
    x[1, ::2], x[1, 1::2] = fmt.qmin, fmt.qmax  # the widest spread
    ctx = ExecContext()
    with native.disabled():
        torch_path = node(x, ctx=ctx)
    c_path = node(x, ctx=ctx)
    assert torch.equal(c_path, torch_path)
    for row in range(len(x)):
        assert torch_path[row].int().tolist() == _ln_reference(x[row].int().tolist(), node)
    y = dequantize(torch_path, out_qp)
    ref = ln(dequantize(x, in_qp).float())
    assert (y - ref).abs().max() <= 1.5 * float(out_qp.scale)  # rounding of x and y, not of the statistics


def _softmax_reference(codes: list[int], node: QSoftmax) -> list[int]:
    table = node.table.tolist()
    e = [table[min(max(codes) - c, len(table) - 1)] for c in codes]
    return [(2 * v * node.levels + sum(e)) // (2 * sum(e)) for v in e]


@pytest.mark.parametrize("bits", [8, 16])
def test_softmax_matches_integer_reference_and_float(bits):
    torch.manual_seed(2)
    in_qp = QParams(activation_format(bits), 0.05 if bits == 8 else 0.05 / 256, 100 if bits == 8 else 0)
    node = QSoftmax("sm", ["x"], in_qp, bits)
    fmt = in_qp.fmt
    x = torch.randint(fmt.qmin, fmt.qmax + 1, (3, 5, 17)).float()
    x[0, 0] = fmt.qmin  # all equal: uniform
    x[0, 1, 3] = fmt.qmax  # one dominant entry
    ctx = ExecContext()
    with native.disabled():
        torch_path = node(x, ctx=ctx)
    assert torch.equal(node(x, ctx=ctx), torch_path)
    for got, codes in zip(torch_path.reshape(-1, 17).int().tolist(), x.reshape(-1, 17).int().tolist()):
        assert got == _softmax_reference(codes, node)
    p = dequantize(torch_path, node.out_qp)
    ref = torch.softmax(dequantize(x, in_qp).float(), -1)
    assert (p - ref).abs().max() <= 0.6 * float(node.out_qp.scale)
    assert node.out_qp.scale.item() == pytest.approx(1 / (2**bits - 1))


@pytest.mark.parametrize("k,bits", [(16, 8), (64, 16), (4096, 16)])  # float32, float64 and int64 sums
def test_matmul_exact_on_every_accumulation_path(k, bits):
    torch.manual_seed(3)
    fmt = activation_format(bits)
    qps = [QParams(fmt, 0.1, 3 if bits == 8 else 0), QParams(fmt, 0.2, 250 if bits == 8 else 0)]
    out = QParams(QFormat(bits=16, signed=True, symmetric=True), 10.0 * k)
    node = QMatmul("mm", ["a", "b"], qps, out)
    a = torch.full((2, 3, k), float(fmt.qmax))
    b = torch.full((2, k, 4), float(fmt.qmin))
    a[0, 0, : k // 2] = fmt.qmin  # extremes of both signs
    ctx = ExecContext(acc=AccumulatorSpec(48))
    got = node(a, b, ctx=ctx)
    acc = torch.matmul(a.long() - int(qps[0].zero_point), b.long() - int(qps[1].zero_point))
    assert torch.equal(got, node.requant(acc, "single"))


def test_tokens_splice_on_the_output_scale():
    tok = Tokens(2, 4, at=1, drop=2, init="uniform", prompt=True)
    fmt = activation_format(8)
    in_qp, out_qp = QParams(fmt, 0.04, 128), QParams(fmt, 0.05, 120)  # the input fits the output range
    node = QTokens("t", ["x"], in_qp, out_qp, tok, weight_format(16))
    x = torch.randint(0, 256, (3, 5, 4)).float()
    y = node(x, ctx=ExecContext())
    assert y.shape == (3, 5, 4)  # 1 + 2 prompts + the 2 tokens after the 2 dropped ones
    real = dequantize(y, out_qp)
    torch.testing.assert_close(real[:, 1:3], tok.tokens.detach().expand(3, -1, -1), atol=0.026, rtol=0)
    torch.testing.assert_close(real[:, 3:], dequantize(x, in_qp)[:, 3:].float(), atol=0.026, rtol=0)
    assert node.w_qp.scale.item() == pytest.approx(0.05 / 256)  # 8 more bits than the activation


def test_torchvision_vit_converts_without_fallback_after_decomposition():
    torch.manual_seed(0)
    tv = torchvision.models.VisionTransformer(28, 7, 2, 2, 32, 64, num_classes=10).eval()
    nn.init.normal_(tv.heads.head.weight, std=0.5)
    x = torch.randn(16, 3, 28, 28)
    torch.testing.assert_close(decompose_attention(copy.deepcopy(tv))(x), tv(x), atol=1e-5, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback op would warn
        q = convert(tv, "w16a8", x, residual_bits=16)
    assert any(isinstance(n, QSoftmax) for n in q.nodes) and any(isinstance(n, QLayerNorm) for n in q.nodes)


@pytest.mark.parametrize("name,shape", [("vit_tiny", (1, 28, 28)), ("ast_tiny", (1, 40, 101))])
def test_zoo_transformers_run_in_integers(name, shape):
    torch.manual_seed(0)
    opts = (
        {"image_size": 28, "patch_size": 7, "hidden_dim": 32, "depth": 2, "heads": 2}
        if name == "vit_tiny"
        else {}
    )
    m = build_model(name, 5, 1, **opts).eval()
    nn.init.normal_(m.head.weight, std=0.5)
    x = torch.randn(32, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q = convert(m, "w16a8", x, residual_bits=16)
    y = q(x)
    assert y.shape == (32, 5)
    with native.disabled():
        assert torch.equal(q(x), y)
    assert (q(x).argmax(1) == m(x).argmax(1)).float().mean() >= 0.8  # random weights: close logits


def test_attention_block_is_multihead_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(Attention.from_multihead(mha)(x), mha(x, x, x, need_weights=False)[0])


def test_residual_bits_widen_the_residual_stream():
    m = small_vit()
    x = torch.randn(16, 1, 28, 28)
    q = convert(m, "w16a8", x, residual_bits=16)
    sums = [n for n in q.nodes if type(n).__name__ == "QRescaleSum" and n.cat_dim is None]
    assert sums and all(n.out_qp.fmt.bits == 16 for n in sums)
    lns = [n for n in q.nodes if isinstance(n, QLayerNorm)]
    assert all(n.in_qp.fmt.bits == 16 and n.out_qp.fmt.bits == 8 for n in lns)
    with pytest.raises(ValueError, match="residual_bits=32.*allowed"):
        convert(m, "w16a8", x, residual_bits=32)
    assert probability_qparams(8).fmt.qmax == 255


def test_scopes_choose_prompts_or_layernorms_and_the_head():
    m = small_vit(prompts=3)
    assert scope_params(m, "dvpt") == [
        "layers.0.prompts.tokens",
        "layers.1.prompts.tokens",
        "head.weight",
        "head.bias",
    ]
    ln = scope_params(m, "ln")
    assert ln[-2:] == ["head.weight", "head.bias"] and all(".ln" in n or n.startswith("ln.") for n in ln[:-2])
    q = convert(m, "w16a8", torch.randn(8, 1, 28, 28))
    names = trainable_names(q, TrainConfig(scope="dvpt"))
    assert names == ["layers_0_prompts", "layers_1_prompts", "head"]
    assert trainable_names(q, TrainConfig(scope="ln"))[:5] == [
        "layers_0_ln_1",
        "layers_0_ln_2",
        "layers_1_ln_1",
        "layers_1_ln_2",
        "ln",
    ]
    with pytest.raises(ValueError, match="dvpt.*deep prompt tokens"):
        scope_params(build_model("small_cnn", 10, 1), "dvpt")
    with pytest.raises(ValueError, match="deep prompts need a fwdgrad ViT"):
        add_prompts(build_model("small_cnn", 10, 1), 2)


@pytest.mark.parametrize("scope", ["dvpt", "ln"])
def test_qzo_ff_trains_only_the_scope(scope):
    m = small_vit(prompts=2)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    q = convert(m, "w16a8", x, residual_bits=16)
    names = trainable_names(q, TrainConfig(scope=scope))
    before = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    opt = qzo_ff(q, lr=0.05, eps=0.05, m=2, seed=0, trainable=names)
    for _ in range(3):
        opt.step(lambda: nn.functional.cross_entropy(q(x), y))
    changed = {n for n, node in q.weight_nodes().items() if not torch.equal(node.weight_q, before[n])}
    assert changed and changed <= set(names)
    assert any(n != "head" for n in changed)  # the prompts / LayerNorms themselves move


def test_prompted_vit_state_round_trip():
    m = small_vit(prompts=2)
    x = torch.randn(8, 1, 28, 28)
    q = convert(m, "w16a8", x, residual_bits=16)
    q.weight_nodes()["layers_1_prompts"].weight_q.add_(5)
    again = rebuild_qmodel(build_model("vit_tiny", 10, 1, image_size=28, patch_size=7, hidden_dim=32, depth=2,
                                       heads=2, prompts=2), qmodel_state(q))  # fmt: skip
    assert torch.equal(again(x), q(x))


@pytest.mark.parametrize("method", ["bp", "bp_qat", "zo_fp32"])
@pytest.mark.parametrize("scope", ["dvpt", "ln"])
def test_every_method_trains_the_transformer_scopes(method, scope):
    from fwdgrad.train import train

    m = small_vit(prompts=2)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = convert(m, "w16a8", x) if method == "bp_qat" else m
    cfg = TrainConfig(method=method, scope=scope, steps=2, batch_size=16, eval_every=2, lr=0.05, eps=0.05)

    def tensors(mod):  # by parameter name, or by node name for a QModel
        if method == "bp_qat":
            return {n: node.weight_q.clone() for n, node in mod.weight_nodes().items()}
        return {k: v.clone() for k, v in mod.state_dict().items()}

    before = tensors(model)
    r = train(model, cfg, (x, y), (x[:16], y[:16]))
    changed = {k for k, v in tensors(r.model).items() if not torch.equal(v, before[k])}
    part = "prompts" if scope == "dvpt" else "ln"
    assert any(part in k for k in changed) and all(part in k or "head" in k for k in changed), changed
