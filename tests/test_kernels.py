"""Every exact-kernel path against the int64 reference, bit for bit: the fused C epilogue and the torch
fallback, NCHW and channels-last layouts, digit planes on both sides of the float32 certificate, full-range
u8 inputs, ±127 / ±32767 weights, groups / depthwise / dilation / stride, every requantization mode,
accumulator overflow (saturate, wrap); and the C sampler, digit-plane split and perturbation against their
numpy / torch references."""

import os
import re
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import native
from fwdgrad.engine import QConv2d, QLinear, convert, intmm, kernels, onednn
from fwdgrad.engine.intops import F32_EXACT, AccumulatorSpec, ExactWeights, prepare
from fwdgrad.engine.nodes import ExecContext
from fwdgrad.ff import qzo_ff
from fwdgrad.ff.spaces import Term
from fwdgrad.models import build_model
from fwdgrad.quant import QFormat, QParams, activation_format, dequantize, requantize
from fwdgrad.rng import reference, torch_port

#: float32 planes (fan-in chunks where they save planes) + C epilogue; the same without chunks; oneDNN int8
#: planes + C; the int16 GEMM (linear layers, patchify convs) + C; the torch path
#: onednn: the CPU's digit width (8 bits where its self-test passes: VNNI/AMX); onednn7: forced to 7 bits;
#: int_mm: int8 planes through torch._int_mm (im2col) + C, at the CPU's digit width; int_mm7: 7 bits
PATHS = ("c", "c_whole", "onednn", "onednn7", "int16", "int_mm", "int_mm7", "torch")
KERNEL = {
    "c": "float",
    "c_whole": "float_whole",
    "onednn": "onednn",
    "onednn7": "onednn",
    "int16": "int16",
    "int_mm": "int_mm",
    "int_mm7": "int_mm",
    "torch": "float",
}


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    """Run the test on each exact path: float32 kernels with the C epilogue, oneDNN's int8 kernels with
    the C epilogue, and the torch fallback (FWDGRAD_KERNELS=0)."""
    monkeypatch.setenv(native.ENV, "0" if request.param == "torch" else "1")
    native.reset()
    if request.param != "torch" and kernels.library() is None:
        pytest.skip("no C compiler on this machine: only the torch path runs")
    if request.param.startswith("onednn") and not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable on this CPU / torch build")
    if request.param == "onednn7":
        monkeypatch.setattr(onednn, "digit_bits", lambda: onednn.DIGIT_BITS)
    if request.param.startswith("int_mm") and not intmm.available():
        pytest.skip("torch._int_mm is not exact (or missing) on this CPU / torch build")
    if request.param == "int_mm7":
        monkeypatch.setattr(intmm, "digit_bits", lambda: 7)
    yield request.param
    native.reset()


def _qp(scale, zp, fmt):
    return QParams(fmt, torch.tensor(scale, dtype=torch.float64), torch.tensor(zp))


def _reference(node, x, requant: str, spec: AccumulatorSpec, conv: dict | None):
    """The int64 reference: float64 conv/linear (exact below 2^53), int64 bias add, fit, requantize."""
    w = node.weight_q.double()
    xz = x.double() - node.zp_in
    acc = F.conv2d(xz, w, None, **conv) if conv is not None else F.linear(xz, w)
    acc = acc.to(torch.int64)
    shape = [1] * acc.dim()
    shape[node.channel_dim] = -1
    lo, hi = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    if requant != "float" and node.bias_q is not None:
        acc = acc + node.bias_q.to(torch.int64).reshape(shape)
    bad = int(((acc < lo) | (acc > hi)).sum())
    if spec.overflow == "wrap":
        acc = torch.remainder(acc - lo, 1 << spec.bits) + lo
    else:
        acc = acc.clamp(lo, hi)
    rq = node.requant
    if requant == "float":
        scale = node.acc_scale.float()
        y = acc.to(torch.float32) * scale.reshape(shape if scale.numel() > 1 else ())
        if node.bias_q is not None:
            y = y + node.float_bias().reshape(shape)
        y = torch.round(y / torch.tensor(float(node.out_qp.scale), dtype=torch.float32)) + rq.zp
        return y.clamp(node.lo, node.hi), bad
    m, s = (t.reshape(shape) if t.numel() > 1 else t.reshape(()) for t in (rq.mult, rq.shift))
    y = requantize(acc, m, s, requant) + rq.zp
    return y.clamp(node.lo, node.hi).to(torch.float32), bad


CONVS = {  # name: (cin, cout, kernel, stride, padding, dilation, groups, size)
    "3x3": (16, 24, 3, 1, 1, 1, 1, 9),
    "stride2_1x1": (16, 32, 1, 2, 0, 1, 1, 8),
    "depthwise": (24, 24, 3, 1, 1, 1, 24, 7),
    "grouped_dilated": (12, 18, 3, 2, 2, 2, 3, 11),
    "dilated": (12, 18, 3, 2, 2, 2, 1, 11),  # groups 1: also on _int_mm's im2col
    "stem": (3, 8, 3, 1, 1, 1, 1, 10),
    "long_fanin": (256, 8, 3, 1, 1, 1, 1, 5),  # 16-bit weights: certified in fan-in chunks
    "patchify": (3, 16, 4, 4, 0, 1, 1, 10),  # a ViT's patch embedding (the int16 GEMM), a remainder dropped
    "one_patch": (3, 16, 5, 5, 0, 1, 1, 5),  # 1x1 outputs: NCHW and channels-last are the same layout
}
LINEAR_FANIN = {"linear": 300, "linear_3d": 300, "linear_long": 2048}


def _node(kind, wbits, zp_in, per_channel, g, act=None, bias=True, cfg=None, fanin=300):
    in_fmt = activation_format(8)
    w_fmt = QFormat(bits=wbits, signed=True, symmetric=True, axis=0 if per_channel else None)
    wmax = w_fmt.qmax
    if kind == "linear":
        cin, cout = fanin, 20
        weight = torch.randint(-wmax, wmax + 1, (cout, cin), generator=g)
    else:
        cin, cout, k, _, _, _, groups, _ = cfg
        weight = torch.randint(-wmax, wmax + 1, (cout, cin // groups, k, k), generator=g)
    weight[0].fill_(wmax)  # one channel at the format's edge: the largest accumulators
    s_w = torch.empty(cout if per_channel else 1, dtype=torch.float64).uniform_(1e-4, 1e-3, generator=g)
    bias_q = torch.randint(-(2**20), 2**20, (cout,), generator=g).to(torch.int32) if bias else None
    kw = dict(
        in_qp=_qp(0.02, zp_in, in_fmt),
        w_qp=QParams(w_fmt, s_w if per_channel else s_w.reshape(()), None),
        out_qp=_qp(float(torch.empty(()).uniform_(0.5, 4.0, generator=g)), 17, in_fmt),
        weight_q=weight.to(w_fmt.dtype),
        bias_q=bias_q,
        act=act,
    )
    if kind == "linear":
        return QLinear("fc", ["x"], **kw), None
    cin, cout, k, stride, pad, dil, groups, _ = cfg
    conv = nn.Conv2d(cin, cout, k, stride, pad, dil, groups)
    return QConv2d("conv", ["x"], conv, **kw), dict(stride=stride, padding=pad, dilation=dil, groups=groups)


@pytest.mark.parametrize("layer", [*CONVS, *LINEAR_FANIN])
@pytest.mark.parametrize("wbits", [8, 16])
@pytest.mark.parametrize("requant", ["single", "gemmlowp", "float"])
def test_every_kernel_path_equals_the_int64_reference(path, layer, wbits, requant):
    g = torch.Generator().manual_seed(hash((layer, wbits, requant)) % 2**31)
    kind = "linear" if layer.startswith("linear") else "conv"
    for zp_in, per_channel, act in ((0, True, "relu"), (128, False, None)):
        fanin = LINEAR_FANIN.get(layer, 300)
        node, conv = _node(kind, wbits, zp_in, per_channel, g, act=act, cfg=CONVS.get(layer), fanin=fanin)
        if kind == "linear":
            shape = (4, 5, fanin) if layer == "linear_3d" else (16, fanin)
        else:
            shape = (4, CONVS[layer][0], CONVS[layer][7], CONVS[layer][7])
        x = torch.randint(0, 256, shape, generator=g).float()
        x.view(-1)[: x.numel() // 4] = 255.0  # full-range u8 inputs, the extremes included
        for spec in (AccumulatorSpec(32), AccumulatorSpec(20, "saturate"), AccumulatorSpec(20, "wrap")):
            ctx = ExecContext(requant=requant, acc=spec, kernel=KERNEL[path])
            ours = node.int_forward(x, ctx)
            ref, bad = _reference(node, x, requant, spec, conv)
            assert torch.equal(ours, ref), (path, layer, wbits, requant, zp_in, spec)
            ew = node.exact_weights(node.weight_q, node._last["kind"])
            if path in ("onednn", "c_whole"):
                assert (
                    node._last["kind"] == KERNEL[path] or ew is None or layer in ("long_fanin", "linear_long")
                )
            if path.startswith("int_mm"):  # grouped convs keep the other kernels
                assert node._last["kind"] == "int_mm" or conv["groups"] > 1
            if path in ("onednn", "int_mm") and wbits == 16 and layer == "3x3" and ew.digit_bits == 8:
                assert ew.planes == 2 and ew.offset == 128  # 32767 in two 8-bit digits: the ones channel
            if path == "c" and wbits == 16 and layer in ("long_fanin", "linear_long"):
                assert ew.chunks > 1 and ew.planes <= 2  # the fan-in chunks are exercised
            assert ctx.stats.overflow.get(node.name, 0) == bad
            if spec.bits == 20 and wbits == 16:
                assert bad > 0  # the narrow accumulator really overflows in this case
            # codes stored as bytes in (channels-last where oneDNN reads them so) and out: the same integers
            xb = x.to(torch.uint8)
            xb = xb.contiguous(memory_format=torch.channels_last) if xb.dim() == 4 else xb
            stored = node.int_forward(xb, replace(ctx, u8=frozenset({node.name})))
            assert stored.dtype == (torch.float32 if path == "torch" else torch.uint8)
            assert torch.equal(stored.float(), ref) and torch.equal(xb.float(), x), (path, layer, requant)


@pytest.mark.parametrize("excess", [-1, 0, 1])
def test_the_float32_certificate_boundary(path, excess):
    """x_bound·Σ|w| = 2^24 - 1 certifies one float32 plane (the largest exact sum); one more needs
    planes. Both sides stay exact with all-255 inputs."""
    cin = 8
    target = (F32_EXACT - 1) // 255 + 1 + excess  # 255·65793 = 2^24 - 1, so excess -1 is the last 1-plane sum
    w = torch.full((4, cin, 3, 3), target // (cin * 9), dtype=torch.int64)
    w[:, 0, 0, 0] += target - int(w[0].sum())
    assert int(w[0].abs().sum()) == target
    ew = prepare(w.to(torch.int16), 255)
    assert (ew.planes == 1) == (255 * target < F32_EXACT)
    node, conv = _node("conv", 16, 0, False, torch.Generator().manual_seed(0), bias=False,
                       cfg=(cin, 4, 3, 1, 0, 1, 1, 6))  # fmt: skip
    node.weight_q.copy_(w.to(torch.int16))
    x = torch.full((2, cin, 6, 6), 255.0)
    ctx = ExecContext(acc=AccumulatorSpec(32), kernel=KERNEL[path])
    ref, _ = _reference(node, x, "single", ctx.acc, conv)
    assert torch.equal(node.int_forward(x, ctx), ref)


@pytest.mark.parametrize("excess", [-1, 0])
def test_the_int16_gemm_certificate_boundary(excess):
    """x_bound·Σ|w| = 255·8421504 is the largest such sum below 2^31: the int16 GEMM takes it and stays exact
    with all-255 inputs (int32 partial sums at their extremes, both signs); one more falls back to float."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    cin, target = 300, (2**31 - 1) // 255 + 1 + excess
    w = torch.full((4, cin), target // cin, dtype=torch.int64)
    w[:, 0] += target - int(w[0].sum())
    w[1::2] *= -1
    node, _ = _node("linear", 16, 0, False, torch.Generator().manual_seed(0), bias=False, fanin=cin)
    node.weight_q = w.to(torch.int16)
    assert (node.exact_weights(node.weight_q, "int16") is None) == (255 * target >= 2**31)
    x = torch.full((3, cin), 255.0)
    ctx = ExecContext(acc=AccumulatorSpec(32), kernel="int16")
    assert torch.equal(node.int_forward(x, ctx), _reference(node, x, "single", ctx.acc, None)[0])
    assert node._last["kind"] == ("int16" if excess < 0 else "float")


def test_stored_weights_are_prepared_once_per_version(path):
    g = torch.Generator().manual_seed(3)
    node, conv = _node("conv", 16, 0, True, g, cfg=CONVS["3x3"])
    first = node.exact_weights(node.weight_q)
    assert node.exact_weights(node.weight_q) is first  # cached: no per-call weight work
    node.weight_q.add_(1)  # an in-place update (as QZO-FF's) bumps the version
    second = node.exact_weights(node.weight_q)
    assert second is not first
    x = torch.randint(0, 256, (2, 16, 9, 9), generator=g).float()
    ctx = ExecContext(kernel=KERNEL[path])
    assert torch.equal(node.int_forward(x, ctx), _reference(node, x, "single", ctx.acc, conv)[0])


@pytest.mark.parametrize("mode", ["single", "gemmlowp"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_c_epilogue_rounds_like_the_reference_on_every_tie(mode, layout):
    """Every accumulator in [-2^13, 2^13] through factors with few significant bits (ties every 2^k-th
    value: half up vs half away from zero) and an odd 31-bit multiplier; no clamping in the way."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    from fwdgrad.engine.nodes import Requantizer

    real = torch.tensor([2.0**-6, 0.75 * 2**-7, 0.625 * 2**-5, 1503238529 / 2**37], dtype=torch.float64)
    rq = Requantizer(real, _qp(0.1, 3, activation_format(8)), lo=-(2**20), hi=2**20, channels=4)
    acc = torch.arange(-(2**13), 2**13 + 1, dtype=torch.int64).unsqueeze(1).expand(-1, 4).contiguous()
    width = acc.shape[0]
    if layout == "rows":
        raw, dim = acc.float(), -1
    else:
        raw, dim = acc.float().reshape(width, 1, 1, 4).permute(0, 3, 1, 2), 1
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        raw = raw.contiguous(memory_format=fmt)
    out, bad = kernels.epilogue(raw, dim, (1, 1, 4, 0, 1), rq, None, 32, False, mode)
    ref = (requantize(acc, rq.mult, rq.shift, mode) + rq.zp).float()
    got = out.reshape(width, 4) if layout == "rows" else out.permute(0, 2, 3, 1).reshape(width, 4)
    assert bad == 0 and torch.equal(got, ref)


@pytest.mark.parametrize("n,offset", [(1, 0), (3, 1), (255, 2), (257, 3), (4099, 4097), (10_000, 2**33 - 7)])
def test_c_sampler_equals_the_reference(n, offset):
    if native.load(torch_port.SOURCE, torch_port.SIGNATURES) is None:
        pytest.skip("no C compiler on this machine")
    key = (2**40 + 9, 3, 5, 7)
    words = torch.from_numpy(reference.hash_words(*key, n, offset).astype("int64"))
    assert torch.equal(torch_port.hash_words(*key, n, offset), words)
    for z_max in (3.5, 2.0):
        assert torch.equal(
            torch_port.gaussian_q(*key, (n,), z_max, offset),
            torch.from_numpy(reference.gaussian_q(*key, (n,), z_max, offset)),
        )
        assert torch.equal(
            torch_port.rademacher_q(*key, (n,), z_max, offset),
            torch.from_numpy(reference.rademacher_q(*key, (n,), z_max, offset)),
        )
    assert torch.equal(
        torch_port.uniform_q(*key, (n,), offset), torch.from_numpy(reference.uniform_q(*key, (n,), offset))
    )


@pytest.mark.parametrize("mode", ["single", "gemmlowp", "float"])
@pytest.mark.parametrize("channels", [16, 1500])  # whole rows per segment, and rows split into segments
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows"])
def test_c_epilogue_writes_bytes_equal_to_the_reference_codes(mode, channels, layout):
    """Output codes of an unsigned 8-bit format written as bytes (`out_u8`) are the float32 codes, which
    are the reference requantization's; clamping at both ends of the byte range included."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    from fwdgrad.engine.nodes import Requantizer

    g = torch.Generator().manual_seed(channels)
    real = torch.empty(channels, dtype=torch.float64).uniform_(2e-5, 2e-3, generator=g)
    rq = Requantizer(real, _qp(0.1, 17, activation_format(8)), lo=0, hi=255, channels=channels)
    acc = torch.randint(-(2**19), 2**19, (6, channels), generator=g)
    if mode == "float":
        bias = torch.empty(channels).uniform_(-40.0, 40.0, generator=g)
        y = torch.round((acc.float() * rq.c_fscale + bias) / torch.tensor(rq.c_fout)) + rq.zp
    else:
        bias = torch.randint(-(2**12), 2**12, (channels,), generator=g)
        y = (requantize(acc + bias, rq.mult, rq.shift, mode) + rq.zp).float()
    ref = y.clamp(0, 255)
    assert (ref == 0).any() and (ref == 255).any()
    if layout == "rows":
        raw, dim = acc.float(), -1
    else:
        raw, dim = acc.float().reshape(2, 3, 1, channels).permute(0, 3, 1, 2), 1  # (2, C, 3, 1)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        raw = raw.contiguous(memory_format=fmt)
    args = (raw, dim, (1, 1, channels, 0, 1), rq, bias, 32, False, mode)
    codes, _ = kernels.epilogue(*args)
    stored, _ = kernels.epilogue(*args, out_u8=True)
    assert stored.dtype == torch.uint8 and stored.stride() == codes.stride()
    assert torch.equal(stored.float(), codes)
    for out_u8 in (False, True):  # accumulators known to fit: requant "float" finished in float32 directly
        direct, bad = kernels.epilogue(*args, out_u8=out_u8, fits=True)
        assert bad == 0 and direct.stride() == codes.stride() and torch.equal(direct.float(), codes)
    got = codes if layout == "rows" else codes.permute(0, 2, 3, 1).reshape(6, channels)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("inputs", [1, 2, 3])
@pytest.mark.parametrize("exact_f64", [True, False])
def test_c_rescaled_sum_reads_and_writes_bytes_as_float32_codes(inputs, exact_f64):
    """A residual add / concat input on codes stored as bytes, out as bytes or float32 codes, equals the
    float32-codes call (one, two and more inputs; the float64 and the int64 forms)."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(inputs)
    xs = [torch.randint(0, 256, (3, 8, 5, 5), generator=g).float() for _ in range(inputs)]
    xs[0].view(-1)[:2] = torch.tensor([0.0, 255.0])
    zps, mults = [3, 250, 128][:inputs], [3 << 29, 3 << 28, 5 << 27][:inputs]
    bound = 255 if exact_f64 else 2**23  # an operand bound past float64's exact range: the int64 form
    args = (zps, mults, bound, 30, 0, 0, 255)
    codes = kernels.rescale_sum(xs, *args)
    stored = [x.to(torch.uint8) for x in xs]
    for out_u8 in (False, True):
        for ins in (stored, [stored[0], *xs[1:]]):  # all bytes, or mixed storage
            got = kernels.rescale_sum(ins, *args, out_u8=out_u8)
            assert got.dtype == (torch.uint8 if out_u8 else torch.float32)
            assert torch.equal(got.float(), codes)
    assert codes.min() == 0 and codes.max() == 255  # the clamp is exercised at both ends


def test_stored_bytes_are_never_flipped_in_place():
    x = torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8)
    flipped = kernels.codes_u8(x, 128)
    assert torch.equal(x, torch.tensor([0, 1, 127, 128, 255], dtype=torch.uint8))
    assert torch.equal(flipped, torch.tensor([128, 129, 255, 0, 127], dtype=torch.uint8))
    assert kernels.codes_u8(x) is x


@pytest.mark.parametrize("flip", [0, 128])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "rows", "strided"])
def test_codes_as_bytes_equal_torchs_conversion_in_every_layout(layout, flip):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 5, 7, 9), generator=g).float()
    x.view(-1)[:2] = torch.tensor([0.0, 255.0])  # both ends of the range
    x = {
        "nchw": x,
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "rows": x.reshape(-1, 9),
        "strided": x.permute(0, 2, 3, 1),
    }[layout]
    got = kernels.codes_u8(x, flip)
    want = x.to(torch.uint8).bitwise_xor_(flip)
    assert got.dtype == torch.uint8 and torch.equal(got, want)
    if layout == "channels_last":  # the layout oneDNN reads stays as it is
        assert got.is_contiguous(memory_format=torch.channels_last)
    with native.disabled():
        assert torch.equal(kernels.codes_u8(x, flip), want)


@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_c_perturbation_equals_the_torch_path(monkeypatch, rounding, per_channel):
    """QZO-FF's perturbed weights (two terms, per-channel ε) and the updates of a step and of a huge η that
    saturates weights: same integers and same saturation counts in C and in torch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=g)
    model = build_model("small_cnn", num_classes=4, in_channels=3).eval()
    results, in_c = [], []
    c_update = kernels.update
    monkeypatch.setattr(kernels, "update", lambda *a: in_c.append(c_update(*a)) or in_c[-1])
    for enabled in ("1", "0"):
        monkeypatch.setenv(native.ENV, enabled)
        native.reset()
        q = convert(model, "w16a8", x, per_channel=per_channel)
        opt = qzo_ff(q, lr=0.5, eps=0.05, m=3, rounding=rounding)
        space = opt.space
        weights = [
            space.perturbed_weights(3, t, [[Term(0, 0.05, +1), Term(1, 0.02, -1)]])[0] for t in range(3)
        ]
        with torch.no_grad():
            opt.step(lambda: q(x).sum())
            q(x)  # the stored weights prepared for their kernels
            space.update(7, [1.0, -1.0, 0.0], 1e4)  # far past the weight range: saturates
            out = q(x)  # the forward after the update reads the new integers (prepared copies are stale)
        nodes = q.weight_nodes().values()
        results.append((weights, space.saturations, [n.weight_q.clone() for n in nodes], out))
    native.reset()
    (wc, sc, uc, oc), (wt, st, ut, ot) = results
    assert all(torch.equal(a, b) for a, b in zip(wc, wt)) and sc == st and sum(sc["update"].values()) > 0
    assert all(torch.equal(a, b) for a, b in zip(uc, ut)) and torch.equal(oc, ot)
    assert len(in_c) == 2 * 3 and None not in in_c  # both updates of the 3 layers ran in C


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("m", [1, 2, 3, 7])
def test_c_update_equals_its_formula(dtype, rounding, m):
    """`kernels.update` (the vectorized loop for nearest and floor, the general one for stochastic): w <-
    sat(w - round(g·M_c / 2^n_c)), g = sign(s)·min(floor((2|s| + m) / 2m), 127), s = Σ_j c_j z_j, on z at
    both extremes (|s| = 127·m: g clamps) and random, every sample or one left out, weights at both ends."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(m)
    info = torch.iinfo(dtype)
    shape = (5, 3, 3, 3)
    w = torch.randint(info.min, info.max + 1, shape, dtype=dtype, generator=g)
    w.view(-1)[:2] = torch.tensor([info.min, info.max], dtype=dtype)
    zs = [torch.randint(-127, 128, shape, dtype=torch.int8, generator=g) for _ in range(m)]
    for z in zs:
        z[0], z[1] = 127, -127  # channel 0: s = +127·nz, channel 1: alternating signs below
    signs = [1 if j % 2 == 0 else -1 for j in range(m)]
    for z, sign in zip(zs, signs):
        z[1] = -127 * sign  # s = -127·nz: g clamps at -127 where nz > 1
    mult = torch.randint(1 << 20, 1 << 31, (shape[0],), dtype=torch.int64, generator=g)
    n = torch.randint(24, 40, (shape[0],), dtype=torch.int64, generator=g)
    words = (
        torch.randint(0, 2**32, shape, dtype=torch.int64, generator=g) if rounding == "stochastic" else None
    )
    for used in (m, m - 1):  # every sample's coefficient ±1, or the last one 0
        got = w.clone()
        sat = kernels.update(got, zs[:used], signs[:used], m, mult, n, rounding, words, info.min, info.max)
        s = (
            sum(sign * z.to(torch.int64) for z, sign in zip(zs[:used], signs[:used]))
            if used
            else torch.zeros(shape, dtype=torch.int64)
        )
        grad = torch.sign(s) * ((2 * s.abs() + m) // (2 * m)).clamp(max=127)
        prod, nn = grad * mult.view(-1, 1, 1, 1), n.view(-1, 1, 1, 1)
        if rounding == "nearest":
            r = (prod + (1 << (nn - 1))) >> nn
        elif rounding == "floor":
            r = prod >> nn
        else:
            r = (prod + torch.where(nn <= 32, words >> (32 - nn), words << (nn - 32))) >> nn
        new = w.to(torch.int64) - r
        assert torch.equal(got, new.clamp(info.min, info.max).to(dtype))
        assert sat == int(((new < info.min) | (new > info.max)).sum())


@pytest.mark.parametrize("scheme", ["w8a8", "w16a8"])
@pytest.mark.parametrize("rounding", ["nearest", "floor", "stochastic"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_c_one_term_perturbation_equals_the_torch_path(monkeypatch, scheme, rounding, per_channel):
    """The passes of a step (one term, either sign; nearest and floor take the vectorized C loop) at a
    small ε and at one that saturates weights: same integers and saturation counts in C and in torch."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 12, 12, generator=g)
    model = build_model("small_cnn", num_classes=4, in_channels=3).eval()
    results = []
    for enabled in ("1", "0"):
        monkeypatch.setenv(native.ENV, enabled)
        native.reset()
        q = convert(model, scheme, x, per_channel=per_channel)
        space = qzo_ff(q, lr=0.5, eps=0.05, m=2, rounding=rounding).space
        weights = [
            space.perturbed_weights(5, t, [[Term(i, eps, sign)]])[0]
            for eps in (1e-3, 0.3)
            for i in (0, 1)
            for sign in (+1, -1)
            for t in range(3)
        ]
        results.append((weights, space.saturations))
    native.reset()
    (wc, sc), (wt, st) = results
    assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(wc, wt))
    assert sc == st and sum(sc["perturb"].values()) > 0


def _digit_planes_reference(w, x_bound, max_planes, fixed_bits, chunks, offset, limit_bits):
    """`kernels.digit_planes` in int64 torch (the planner of `fw_plan_planes`, groups 1): planes stacked
    [chunks][planes][C][K/chunks] (None when none certifies), digit bits, bound."""
    c = w.shape[0]
    w64 = w.reshape(c, -1).to(torch.int64)
    v, limit = w64 - offset, 1 << limit_bits
    bound = x_bound * int(w64.abs().sum(1).max())
    lo, hi = (-(1 << (fixed_bits - 1)), min(1 << (fixed_bits - 1), 127)) if fixed_bits else (-(2**62), 2**62)

    def certified(d):  # every chunk's x_bound·Σ|d| below the limit, every digit in range
        sums = d.reshape(c, chunks, -1).abs().sum(2)
        return bool((x_bound * sums < limit).all()) and int(d.min()) >= lo and int(d.max()) <= hi

    def stacked(planes):
        return torch.stack([p.reshape(c, chunks, -1) for p in planes]).permute(2, 0, 1, 3)

    if certified(v):
        return stacked([v]), 0, bound
    nbits = int(v.abs().max()).bit_length() + 1
    for p in range(2, max_planes + 1):
        b = fixed_bits or -(-nbits // p) + 1
        planes, rest = [], v
        for _ in range(p - 1):
            d = torch.remainder(rest + (1 << (b - 1)), 1 << b) - (1 << (b - 1))
            planes.append(d)
            rest = (rest - d) >> b
        planes.append(rest)
        if all(certified(d) for d in planes):
            return stacked(planes), b, bound
    return None, 0, bound


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("fixed_bits", [0, 7, 8])
@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize("chunks", [1, 2])
def test_c_digit_planes_equal_the_reference_around_each_certificate(dtype, fixed_bits, offset, chunks):
    """The C digit-plane split (its vectorized 1- and 2-plane paths and the general one) against the int64
    reference: full-range and small weights, x_bound set just below and just above the bound of each
    plane count, so every certificate is met on one side and fails on the other."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(fixed_bits + offset + chunks)
    info = torch.iinfo(dtype)
    cases = [
        torch.randint(info.min, info.max + 1, (6, 8, 3, 3), generator=g, dtype=torch.int64),
        torch.randint(-40, 41, (5, 24), generator=g, dtype=torch.int64),
    ]
    cases[0][0].fill_(info.max)
    cases[0][1, :, 0].fill_(info.min)
    seen = set()
    for w in cases:
        w = w.to(dtype)
        for planes in (1, 2, 3):  # x_bound at each plan's edge: the largest digit-sum of that many planes
            ref, *_ = _digit_planes_reference(w, 1, planes, fixed_bits, chunks, offset, 62)
            if ref is None:
                continue
            edge = int(ref.reshape(*ref.shape[:2], w.shape[0], -1).abs().sum(-1).max())
            for x_bound in ((1 << 24) // edge - 1, (1 << 24) // edge, (1 << 24) // edge + 1):
                if x_bound < 1:
                    continue
                args = (x_bound, 4, fixed_bits, chunks, offset, 24)
                want, bits, bound = _digit_planes_reference(w, *args)
                got = kernels.digit_planes(w, x_bound, 1, 4, fixed_bits, chunks, offset, 24)
                n = 0 if want is None else want.shape[1]
                assert got[1:] == (n, bits, bound), (w.shape, args)
                if n:
                    assert torch.equal(got[0].reshape(-1).double(), want.reshape(-1).double())
                seen.add(n)
    assert len(seen) >= 2  # the x_bounds crossed a certificate boundary


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16])
@pytest.mark.parametrize("offset", [0, 128])
@pytest.mark.parametrize("shape", [(6, 5, 3, 3), (7, 4, 1, 1), (5, 11)])
def test_c_digit_columns_are_the_planes_in_im2col_order(dtype, offset, shape):
    """`_int_mm`'s weights straight from C (1-2 planes vectorized, 3 the general way): the planes of the
    fan-in taken in (kh, kw, C_in) order, transposed, with a ones column where there is an offset."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    info = torch.iinfo(dtype)
    w = torch.randint(info.min, info.max + 1, shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    flat = (w.permute(0, 2, 3, 1) if w.dim() == 4 else w).reshape(shape[0], -1)
    made = set()
    for digit_bits in (8, 7):  # 7-bit digits of 16-bit weights take 3 planes
        ref, bits, _ = _digit_planes_reference(flat, 1, 3, digit_bits, 1, offset, 62)
        planes = ref.shape[1]
        want = ref.reshape(planes * shape[0], -1).t()
        if offset:
            want = torch.cat([want, torch.ones(want.shape[0], 1, dtype=want.dtype)], 1)
        got = kernels.digit_columns(w, planes, bits, offset)
        assert got.dtype == torch.int8 and torch.equal(got.long(), want)
        made.add(planes)
    assert made == ({1, 2} if dtype == torch.int8 and not offset else {2, 3} if dtype == torch.int16 else {2})


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("per_channel", [False, True])
def test_c_dequantized_weights_equal_the_torch_expression(dtype, per_channel):
    """Fake mode's float weights from C: the float64 product rounded once to float32, as
    `fwdgrad.quant.dequantize`, on extreme codes and awkward scales."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(0)
    info = torch.iinfo(dtype)
    w = torch.randint(info.min, info.max, (7, 5, 3, 3), generator=g, dtype=torch.int64).to(dtype)
    w[0], w[1] = info.max, info.min
    scale = torch.rand(7 if per_channel else 1, generator=g, dtype=torch.float64) * 1e-3 + 1e-9
    fmt = QFormat(bits=info.bits, signed=True, symmetric=True, axis=0 if per_channel else None)
    qp = QParams(fmt, scale if per_channel else scale.reshape(()), None)
    got = kernels.dequantize(w, qp)
    assert got.dtype == torch.float32 and torch.equal(got, dequantize(w, qp))
    assert kernels.dequantize(w, QParams(fmt, qp.scale, torch.ones_like(qp.scale, dtype=torch.int64))) is None


@pytest.mark.parametrize("mode", ["integer", "fake"])
def test_a_steps_perturbed_weights_are_prepared_before_its_forwards(monkeypatch, mode):
    """Each pass prepares every perturbed layer once, for the kernel it ran on, before the forward (none
    inside it), and the step's integers are those of preparing them inside the forward."""
    from fwdgrad.engine.nodes import QTrainable, QWeighted

    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 12, 12, generator=g)
    model = build_model("small_cnn", num_classes=4, in_channels=3).eval()
    calls, inside = [], [False]
    prepare = QWeighted._prepare_per_call

    def counted(self, ws, kind, shape):
        calls.extend((self.name, kind, inside[0]) for _ in ws)
        return prepare(self, ws, kind, shape)

    def closure():
        inside[0] = True
        try:
            return F.cross_entropy(q(x), torch.arange(8) % 4)
        finally:
            inside[0] = False

    weights = []
    for ahead in (True, False):
        if not ahead:
            monkeypatch.setattr(QWeighted, "prepare_ahead", QTrainable.prepare_ahead)
        q = convert(model, "w16a8", x)
        q.mode = mode
        opt = qzo_ff(q, lr=0.5, eps=0.05, m=2)
        with torch.no_grad():
            opt.step(closure)  # the first pass of a layer picks its kernel inside the forward
            monkeypatch.setattr(QWeighted, "_prepare_per_call", counted)
            calls.clear()
            opt.step(closure)
            monkeypatch.setattr(QWeighted, "_prepare_per_call", prepare)
        if ahead:
            layers = len(q.weight_nodes())
            assert len(calls) == 4 * layers and not any(c[2] for c in calls)  # 2m passes, all ahead
        else:
            assert len(calls) == 4 * layers and all(c[2] for c in calls)
        weights.append([n.weight_q.clone() for n in q.weight_nodes().values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_without_a_compiler_the_torch_path_runs_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))  # nothing built before
    native.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.library() is None
    native.reset()
    assert any("kernels.c unavailable" in str(w.message) for w in caught)


def test_describe_names_each_layers_kernel(path):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    q = convert(build_model("resnet8", num_classes=10, in_channels=3).eval(), "w16a8", x)
    q.kernel = KERNEL[path]
    q(x)
    table = q.describe()
    assert list(table) == list(q.weight_nodes())
    epilogue = "torch epilogue" if path == "torch" else "C epilogue"
    if path == "c_whole":
        pytest.skip("ResNet-8's fan-ins are short: nothing to chunk")
    if path.startswith("onednn"):
        name = rf"oneDNN u8 x s8 x\d planes of {onednn.digit_bits()} bits"
    elif path.startswith("int_mm"):
        name = rf"int8 x int8 GEMM \(_int_mm, im2col\)( x\d planes of {intmm.digit_bits()} bits)?"
    else:
        name = "float32"
    assert all(v.endswith(epilogue) for v in table.values())
    assert sum(bool(re.match(name, v)) for v in table.values()) >= len(table) - 1  # the stem may stay float
    assert any("planes" in v for v in table.values())  # 16-bit weights need digit planes somewhere


def test_auto_picks_a_certified_kernel_per_shape_with_the_same_integers():
    if kernels.library() is None or not onednn.available():
        pytest.skip("needs the C kernels and oneDNN's int8 kernels")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 16, 16, generator=g)
    q = convert(build_model("resnet8", num_classes=10, in_channels=3).eval(), "w8a8", x)
    outs = {}
    for kernel in ("float", "onednn", "auto"):
        q.kernel = kernel
        outs[kernel] = q.run(x)
    assert torch.equal(outs["float"], outs["onednn"]) and torch.equal(outs["float"], outs["auto"])
    node = next(iter(q.weight_nodes().values()))
    assert set(node._timed.values()) <= {"float", "onednn", "int_mm"} and node._timed
    q.kernel = "vnni"
    with pytest.raises(ValueError, match="kernel 'vnni' is invalid"):
        q(x)


def test_a_used_model_copies_and_pickles_without_its_caches():
    """Packed oneDNN weights are opaque tensors: deepcopy / torch.save of a model that ran must not carry
    them, and the copy computes the same integers."""
    import copy
    import io

    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 3, 16, 16, generator=g)
    q = convert(build_model("resnet8", num_classes=10, in_channels=3).eval(), "w8a8", x)
    q.kernel = "onednn" if onednn.available() else "float"
    out = q.run(x)
    twin = copy.deepcopy(q)
    assert torch.equal(twin.run(x), out)
    buffer = io.BytesIO()
    torch.save(q, buffer)  # pickling itself must not fail (loading pickles is never done by fwdgrad)
    assert buffer.tell() > 0


def test_a_failing_compiler_gives_one_warning_with_its_error_and_leaves_nothing(monkeypatch, tmp_path):
    cc = tmp_path / "cc"
    cc.write_text(
        '#!/bin/sh\ncase "$1" in --version) echo fake-cc 1.0;; *) echo "cc: error: boom" >&2; exit 1;; esac\n'
    )
    cc.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(native.CACHE_ENV, str(cache))
    native.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert kernels.library() is None
    native.reset()
    messages = [str(w.message) for w in caught if "kernels.c" in str(w.message)]
    assert len(messages) == 1 and "cc: error: boom" in messages[0]
    assert list(cache.iterdir()) == []  # no half-built library, no temp file


def test_wide_digits_only_where_the_self_test_proves_them():
    """8-bit digit planes need int32 accumulation of u8·s8 products (VNNI/AMX): the self-test decides. With
    oneDNN held to AVX2 (ONEDNN_MAX_CPU_ISA, which pairs products in saturating int16) the 8-bit self-test
    fails and the planes stay at 7 bits, while the 7-bit one still passes."""
    import subprocess
    import sys

    if kernels.library() is None or not onednn.available():
        pytest.skip("needs the C kernels and oneDNN's int8 kernels")
    assert onednn.digit_bits() == (onednn.WIDE_DIGIT_BITS if onednn.self_test(8) else onednn.DIGIT_BITS)
    code = "from fwdgrad.engine import onednn as o; print(o.available(), o.self_test(8), o.digit_bits())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "7"], out.stdout + out.stderr


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [((2, 5, 9, 7), (3, 2), (2, 1), (1, 2), (1, 2)), ((1, 3, 6, 11), (1, 1), (1, 3), (0, 0), (1, 1))],
)
@pytest.mark.parametrize("zp", [0, 77, 255])
def test_int_mm_columns_are_the_padded_windows(shape, kernel, stride, padding, dilation, zp):
    """im2col of _int_mm: each row is one output position's window, (kh, kw, c) order, u = x - 128, the
    padding the code zp; non-square inputs and kernels, asymmetric stride / padding / dilation, NCHW and
    channels-last inputs alike."""
    g = torch.Generator().manual_seed(zp)
    x = torch.randint(0, 256, shape, generator=g).float()
    padded = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), value=float(zp))
    ref = F.unfold(padded, kernel, dilation=dilation, stride=stride)  # [B, C*kh*kw, L], (c, kh, kw) order
    b, c = shape[:2]
    ref = (
        ref.reshape(b, c, kernel[0] * kernel[1], -1)
        .permute(0, 3, 2, 1)
        .reshape(-1, c * kernel[0] * kernel[1])
    )
    for layout in (torch.contiguous_format, torch.channels_last):
        cols, size = intmm.columns(x.contiguous(memory_format=layout), kernel, zp, stride, padding, dilation)
        assert cols.shape[0] == b * size[0] * size[1]
        assert cols.dtype == torch.int8 and torch.equal(cols.long(), ref.long() - 128)
    if not intmm.available():
        pytest.skip("torch._int_mm is not usable here")
    w = torch.randint(-64, 64, (4, shape[1], *kernel), generator=g, dtype=torch.int8)
    ew = intmm.prepare(w, zp)  # one plane at either digit width, no ones channel; the epilogue adds `shift`
    raw = intmm.conv(x, ew, zp, kernel, stride, padding, dilation)
    acc = raw.long() + ew.shift.reshape(1, -1, 1, 1)
    ref = F.conv2d(x.double() - zp, w.double(), None, stride, padding, dilation).long()
    assert ew.planes == 1 and not ew.offset and torch.equal(acc, ref)


def test_int_mm_digits_only_where_its_self_test_proves_them():
    """torch._int_mm sums int8 x int8 exactly in int32 on VNNI/AMX; held to AVX2, oneDNN's s8 x s8 path
    saturates pairs of products: the 8-bit self-test catches it and 7-bit digits remain."""
    import subprocess
    import sys

    if not intmm.available():
        pytest.skip("torch._int_mm is not usable here")
    assert intmm.digit_bits() == (8 if intmm.self_test(8) else 7)
    code = "from fwdgrad.engine import intmm as m; print(m.self_test(8), m.self_test(7), m.digit_bits())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "7"], out.stdout + out.stderr


class _Mixed(nn.Module):
    """Readers of every kind: convs, a residual add, a LUT (hardswish), a max-pool, an average pool."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.c, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        a = F.relu(self.a(x))
        c = self.c(F.hardswish(self.b(a))) + a
        p = F.max_pool2d(c, 2)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(p, 1), 1))


@pytest.mark.parametrize("scheme", ["w8a8", "w16a8", "w8a16"])
@pytest.mark.parametrize("requant", ["single", "float"])
def test_values_stored_as_bytes_give_the_same_integers(scheme, requant):
    """`QModel.byte_values`: 8-bit unsigned outputs whose every reader takes bytes are stored as bytes
    in a pass (not: a LUT's or a max-pool's input, the output, 16-bit activations), bit-identical to
    float32 codes throughout."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = torch.randn(4, 3, 12, 12, generator=g)
    q = convert(model, scheme, x, requant=requant)
    if scheme == "w8a16":
        assert q.byte_values == frozenset()
    else:  # b: read by the LUT; add: by the max-pool (whose output then stays float32 codes); fc: the output
        assert q.byte_values == {"a", "c", "adaptive_avg_pool2d", "flatten"}
        prefix = q.run_prefix(x, upto="fc")
        assert prefix.values["flatten"].dtype == torch.uint8  # bytes really flow
    stored = q.run(x)
    codes = q.run(x, keep=True)  # every value in float32 codes
    assert all(v.dtype == torch.float32 for v in codes.values() if torch.is_tensor(v))
    assert torch.equal(stored, codes[q.output])
    with native.disabled():
        assert torch.equal(q.run(x), stored)  # the torch path stores no bytes and agrees


def test_resnets_store_bytes_around_the_max_pool_only_where_it_pays():
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    model = build_model("resnet18", num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    q = convert(model, "w8a8", x)
    assert "conv1" not in q.byte_values and "maxpool" not in q.byte_values  # torch's u8 max-pool is slow
    assert {"layer1_0_conv1", "add", "layer4_1_conv2", "avgpool", "flatten"} <= q.byte_values
    assert torch.equal(q.run(x), q.run(x, keep=True)[q.output])


# (weight shape, groups, stride, padding, dilation, input shape); None: a linear layer
PACKED = [
    ((33, 16, 3, 3), 1, 1, 1, 1, (8, 16, 12, 12)),
    ((65, 32, 1, 1), 1, 2, 0, 1, (8, 32, 9, 9)),
    ((24, 4, 3, 3), 6, 1, 1, 1, (2, 24, 7, 7)),  # grouped: planes per group
    ((16, 1, 3, 3), 16, 2, 1, 1, (2, 16, 8, 8)),  # depthwise
    ((8, 5, 3, 3), 1, 1, 2, 2, (1, 5, 9, 9)),  # dilated
    ((21, 40), None, None, None, None, (10, 40)),
]


@pytest.mark.parametrize("case", range(len(PACKED)))
@pytest.mark.parametrize("ones", [False, True])
def test_per_call_weights_written_into_the_learnt_layout_equal_onednns_packing(case, ones):
    """`onednn.pack(per_call=True)`: planes written into the layout learnt from index probes give the
    packed buffer of oneDNN's own packing byte for byte (random planes with both extremes, the ones
    channel of an offset split), and the kernel the same integers."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    shape, groups, stride, padding, dilation, x_shape = PACKED[case]
    conv = None if groups is None else ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    if ones and groups not in (None, 1):
        pytest.skip("the ones channel goes with groups 1")
    g = torch.Generator().manual_seed(case)
    planes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    planes.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)
    offset = 128 if ones else 0
    assert onednn.packed_layout(shape, ones, 7, conv, x_shape) is not None  # a permutation on this CPU
    written = onednn.pack(planes, offset, 7, conv, x_shape, per_call=True)
    packed = onednn.pack(planes, offset, 7, conv, x_shape, per_call=False)
    assert torch.equal(onednn._packed_bytes(written), onednn._packed_bytes(packed))
    x = torch.randint(0, 256, x_shape, generator=g).float()
    outputs = shape[0] + ones
    ews = [
        ExactWeights(p, 1, 8, groups or 1, outputs, 0, kind="onednn", conv_groups=groups or 1)
        for p in (written, packed)
    ]
    if conv is None:
        ys = [onednn.linear(x, ew, 7) for ew in ews]
    else:
        ys = [onednn.conv(x, ew, 7, *(a for a in conv[:3])) for ew in ews]
    assert torch.equal(ys[0], ys[1])


def _split_weights(split: str, shape, g) -> torch.Tensor:
    """Weights that take each split: int8 (one plane), int16 within the plain split's range (two planes),
    int16 up to 32767 (two planes of w - 128, with the ones channel); both extremes present."""
    if split == "int8":
        w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
        w.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)
        return w
    hi = 32767 if split == "int16_offset" else 30000
    w = torch.randint(-hi, hi + 1, shape, dtype=torch.int16, generator=g)
    w.view(-1)[:2] = torch.tensor([-hi, hi], dtype=torch.int16)
    return w


@pytest.mark.parametrize("case", range(len(PACKED)))
@pytest.mark.parametrize("split", ["int8", "int16", "int16_offset"])
def test_weights_split_straight_into_the_layout_equal_split_then_packed(case, split):
    """`onednn.write_split`: weights split as an earlier call's split and written into the learnt layout in
    one pass give oneDNN's packing of the planes byte for byte, with the same bound, and the kernel the same
    integers; a split that does not certify for the weights gives None."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    shape, groups, stride, padding, dilation, x_shape = PACKED[case]
    conv = None if groups is None else ((stride,) * 2, (padding,) * 2, (dilation,) * 2, groups)
    if split == "int16_offset" and groups not in (None, 1):
        pytest.skip("the offset split goes with groups 1")
    w = _split_weights(split, shape, torch.Generator().manual_seed(case))
    planes, offset, make = onednn._planes(w, groups or 1)
    packed = make(onednn._pack(planes, 7, conv, x_shape, offset != 0))
    like = (packed.planes, packed.digit_bits, packed.offset)
    assert like[0] == (1 if split == "int8" else 2) and (like[2] != 0) == (split == "int16_offset")
    written = onednn.write_split([w], like, 7, conv, x_shape, None)[0]
    if onednn.packed_layout(tuple(planes.shape), offset != 0, 7, conv, x_shape) is None:
        assert written is None  # no layout learnt (a depthwise conv's two planes per group): packed as usual
        return
    assert written is not None
    assert torch.equal(onednn._packed_bytes(written.weight), onednn._packed_bytes(packed.weight))
    fields = ("planes", "digit_bits", "groups", "channels", "bound", "kind", "conv_groups", "offset")
    assert all(getattr(written, f) == getattr(packed, f) for f in fields)
    x = torch.randint(0, 256, x_shape, generator=torch.Generator().manual_seed(1)).float()
    if conv is None:
        ys = [onednn.linear(x, ew, 7) for ew in (written, packed)]
    else:
        ys = [onednn.conv(x, ew, 7, *conv[:3]) for ew in (written, packed)]
    assert torch.equal(ys[0], ys[1])
    if split != "int8":  # one plane cannot hold 16-bit weights: refused, and prepare_conv splits anew
        assert onednn.write_split([w], (1, 0, 0), 7, conv, x_shape, None)[0] is None


def test_a_split_over_the_float32_limit_is_not_written():
    """Digits whose x_bound·Σ|d| reaches 2^24 in one channel (here 515 digits of -128 at x_bound 255): the
    written split is refused, as the planner refuses it."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    shape, conv, x_shape = (4, 515), None, (3, 515)
    w = torch.full(shape, -128, dtype=torch.int8)
    w[1:] = 3
    assert kernels.plan_planes(w, 255, 1, 8) == (0, 0, 255 * 128 * 515)  # one plane does not certify
    assert onednn.write_split([w], (1, 0, 0), 0, conv, x_shape, None)[0] is None
    w[0, 0] = 0  # one digit less: certified
    assert kernels.plan_planes(w, 255, 1, 8)[0] == 1
    assert onednn.write_split([w], (1, 0, 0), 0, conv, x_shape, None)[0] is not None


@pytest.mark.parametrize("shape", [(33, 16, 3, 3), (65, 32, 1, 1), (21, 40), (3, 70000)])
@pytest.mark.parametrize("split", ["int8", "int16", "int16_offset"])
def test_weights_split_straight_into_gemm_columns_equal_the_columns(shape, split):
    """`intmm.write_split`: the columns, bound and per-channel shift of `intmm.prepare` (fan-ins below and
    above 2^16, where the C loop sums in int64), and the same GEMM."""
    if kernels.library() is None or not intmm.available():
        pytest.skip("torch._int_mm is not exact here")
    w = _split_weights(split, shape, torch.Generator().manual_seed(len(shape)))
    if shape[-1] > 1 << 16:  # a fan-in this deep certifies with small weights only
        w = (w // 1024 if w.dtype == torch.int16 else w // 64).to(w.dtype)
        w[0, :40000] = torch.iinfo(w.dtype).max // (1024 if w.dtype == torch.int16 else 64)
    made = intmm.prepare(w, 9)
    like = (made.planes, made.digit_bits, made.offset)
    written = intmm.write_split([w], like, 9)[0]
    assert torch.equal(written.weight, made.weight) and torch.equal(written.shift, made.shift)
    fields = ("planes", "digit_bits", "groups", "channels", "bound", "kind", "offset")
    assert all(getattr(written, f) == getattr(made, f) for f in fields)
    if int(w.abs().max()) > 128:  # one int8 plane cannot hold these weights
        assert intmm.write_split([w], (1, 0, 0), 9)[0] is None


def test_written_weights_reuse_only_buffers_whose_holder_is_gone():
    """`onednn.buffers`: a buffer comes back once the ExactWeights it was written for is gone, never while it
    lives: per-call weights kept by a caller keep their bytes while later splits are written."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    shape, conv, x_shape = (8, 4, 3, 3), ((1, 1), (1, 1), (1, 1), 1), (2, 4, 6, 6)
    g = torch.Generator().manual_seed(0)
    pools = {}

    def written(n):
        ws = [torch.randint(-128, 128, shape, dtype=torch.int8, generator=g) for _ in range(n)]
        return ws, onednn.write_split(ws, (1, 0, 0), 0, conv, x_shape, None, pools)

    ws, kept = written(2)
    buffers = [ew.weight for ew in kept]
    before = onednn._packed_bytes(kept[0].weight)
    del kept[1]  # its buffer is free again; kept[0]'s is not
    ws2, again = written(3)
    assert again[0].weight is buffers[1] and all(ew.weight is not buffers[0] for ew in again)
    assert torch.equal(onednn._packed_bytes(kept[0].weight), before)  # untouched
    ref = onednn._pack(ws2[0], 0, conv, x_shape)
    assert torch.equal(onednn._packed_bytes(again[0].weight), onednn._packed_bytes(ref))  # rewritten whole
    (pool,) = pools.values()
    assert len(pool[1]) == 4  # two from the first call, two new


def test_a_reused_buffer_runs_its_new_weights_at_any_batch():
    """One buffer rewritten with new weights step after step (the same address each time) runs exactly the
    new weights, at the batch it was packed for and at others (nothing oneDNN derives from the buffer, such
    as a reorder for another input shape, outlives its contents)."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    g = torch.Generator().manual_seed(0)
    shape, conv, x_shape = (16, 8, 3, 3), ((1, 1), (1, 1), (1, 1), 1), (4, 8, 10, 10)
    pools, addresses = {}, set()
    for _ in range(4):
        w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
        (ew,) = onednn.write_split([w], (1, 0, 0), 3, conv, x_shape, None, pools)
        addresses.add(torch.ops.mkldnn.data_ptr(ew.weight))
        for batch in (4, 1, 7):
            x = torch.randint(0, 256, (batch, 8, 10, 10), generator=g).float()
            exact = F.conv2d(x.double() - 3, w.double(), padding=1)
            assert torch.equal(onednn.conv(x, ew, 3, *conv[:3]).double(), exact)
        del ew  # its buffer is free for the next step
    assert len(addresses) == 1


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
def test_steps_on_weights_written_into_layouts_equal_steps_on_packed_ones(monkeypatch, kernel):
    """QZO-FF steps whose passes write their weights straight into the learnt layouts (all passes after a
    layer's first) reach the same integers as steps that split and pack every pass."""
    if kernels.library() is None or not (onednn.available() if kernel == "onednn" else intmm.available()):
        pytest.skip(f"{kernel} is not usable here")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.arange(8) % 10
    model = build_model("resnet8", num_classes=10, in_channels=3).eval()
    module = onednn if kernel == "onednn" else intmm
    real, written = module.write_split, []
    monkeypatch.setattr(module, "write_split", lambda *a: written.extend(real(*a)) or written[-len(a[0]) :])
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(module, "write_split", lambda ws, *a: [None] * len(ws))
        q = convert(model, "w16a8", x)
        q.kernel = kernel
        opt = qzo_ff(q, lr=0.05, eps=0.01, m=2)
        with torch.no_grad():
            losses = [float(opt.step(lambda: F.cross_entropy(q(x), y))) for _ in range(3)]
        results.append((losses, [n.weight_q.clone() for n in q.weight_nodes().values()]))
    (la, wa), (lb, wb) = results
    assert la == lb and all(torch.equal(a, b) for a, b in zip(wa, wb))
    before = [n.weight_q for n in convert(model, "w16a8", x).weight_nodes().values()]
    assert sum(not torch.equal(a, b) for a, b in zip(wa, before)) > 5  # the steps moved the weights
    assert len(written) > 10 and all(ew is not None for ew in written)


def test_a_layout_with_weight_derived_bytes_is_not_learnt(monkeypatch):
    """Where packed buffers held more than the weights' permutation (here: an emulated checksum byte),
    no layout is learnt and per-call weights are packed by oneDNN."""
    if kernels.library() is None or not onednn.available():
        pytest.skip("oneDNN's int8 kernels are not usable here")
    real = onednn._packed_bytes

    def with_checksum(packed):
        b = real(packed)
        return torch.cat([b, (b.to(torch.int64).sum() % 251 + 1).to(torch.int8).reshape(1)])

    monkeypatch.setattr(onednn, "_packed_bytes", with_checksum)
    onednn.packed_layout.cache_clear()
    try:
        shape, x_shape, conv = (9, 4, 3, 3), (2, 4, 6, 6), ((1, 1), (1, 1), (1, 1), 1)
        assert onednn.packed_layout(shape, False, 0, conv, x_shape) is None
        planes = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
        monkeypatch.setattr(onednn, "_packed_bytes", real)
        got = onednn.pack(planes, 0, 0, conv, x_shape, per_call=True)  # the cached None: oneDNN packs
        assert torch.equal(real(got), real(onednn._pack(planes, 0, conv, x_shape)))
    finally:
        onednn.packed_layout.cache_clear()


def test_fake_quantization_is_in_place_only_on_fresh_outputs():
    """`kernels.fake_quant(inplace=True)` writes into a dense x (the values of the copy); strided inputs and
    the nodes' inputs are never changed: every kept value of a fake pass equals its node run again on the
    kept inputs."""
    if kernels.library() is None:
        pytest.skip("no C compiler on this machine")
    g = torch.Generator().manual_seed(0)
    y = torch.randn(6, 40, generator=g) * 10
    before = y.clone()
    ref = kernels.fake_quant(y, 0.1, 3.0, 0.0, 255.0)
    assert torch.equal(y, before)
    strided = y.t()
    assert torch.equal(kernels.fake_quant(strided, 0.1, 3.0, 0.0, 255.0, inplace=True), ref.t())
    assert torch.equal(y, before)  # a strided x is copied, not written
    out = kernels.fake_quant(y, 0.1, 3.0, 0.0, 255.0, inplace=True)
    assert out is y and torch.equal(out, ref)
    model = _Mixed().eval()
    x = torch.randn(4, 3, 12, 12, generator=g)
    q = convert(model, "w8a8", x)
    env = q.run(x, mode="fake", keep=True)
    for node in list(q.nodes)[1:]:
        again = node(*[env[i] for i in node.inputs], ctx=ExecContext(mode="fake"))
        assert torch.equal(again, env[node.name]), node.name
