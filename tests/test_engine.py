"""Integer-simulated engine: bit-exactness against PyTorch's x86 kernels, modes, overflow, accuracy."""

import warnings

import pytest
import torch
import torch.ao.nn.quantized as nnq
import torch.nn as nn

from fwdgrad.engine import QConv2d, QLinear, Scheme, convert
from fwdgrad.engine.intops import AccumulatorSpec, combine, exact_conv2d, prepare
from fwdgrad.engine.nodes import ExecContext, Requantizer
from fwdgrad.quant import QFormat, QParams, activation_format, dequantize, requantize

torch.backends.quantized.engine = "x86" if "x86" in torch.backends.quantized.supported_engines else "fbgemm"


def _qp(scale, zp, fmt):
    return QParams(fmt, torch.tensor(scale), torch.tensor(zp))


# PyTorch's x86/fbgemm kernels on CPUs without VNNI sum u8·s8 pairs in saturating int16 (vpmaddubsw), so
# torch's own observers use `reduce_range=True` (7-bit activations) for this engine; inputs here follow it.
X_HI = 128


def _identical_qparams(seed):
    g = torch.Generator().manual_seed(seed)
    s_in = float(torch.empty(()).uniform_(0.01, 0.05, generator=g))
    zp_in = int(torch.randint(0, X_HI, (), generator=g))
    s_w = float(torch.empty(()).uniform_(0.002, 0.01, generator=g))
    s_out = float(torch.empty(()).uniform_(0.02, 0.2, generator=g))
    zp_out = int(torch.randint(0, 256, (), generator=g))
    return g, s_in, zp_in, s_w, s_out, zp_out


def _agreement(ours, ref):
    diff = (ours.to(torch.int64) - ref.to(torch.int64)).abs()
    return float((diff == 0).double().mean()), int(diff.max())


@pytest.mark.parametrize("seed", range(3))
def test_w8a8_linear_matches_torch_x86(seed):
    g, s_in, zp_in, s_w, s_out, zp_out = _identical_qparams(seed)
    x_q = torch.randint(0, X_HI, (64, 300), generator=g)
    w_q = torch.randint(-127, 128, (50, 300), generator=g)
    bias = torch.randn(50, generator=g) * 0.5
    ref_mod = nnq.Linear(300, 50)
    ref_mod.set_weight_bias(torch._make_per_tensor_quantized_tensor(w_q.to(torch.int8), s_w, 0), bias)
    ref_mod.scale, ref_mod.zero_point = s_out, zp_out
    x_ref = torch._make_per_tensor_quantized_tensor(x_q.to(torch.uint8), s_in, zp_in)
    ref = ref_mod(x_ref).int_repr()
    a8 = activation_format(8)
    bias_q = torch.round(bias.double() / (s_in * s_w)).to(torch.int32)
    for requant in ("float", "single", "gemmlowp"):
        node = QLinear(
            "fc",
            ["x"],
            in_qp=_qp(s_in, zp_in, a8),
            w_qp=_qp(s_w, 0, QFormat(8)),
            out_qp=_qp(s_out, zp_out, a8),
            weight_q=w_q.to(torch.int8),
            bias_q=bias_q,
            act=None,
            bias_float=bias,
        )
        ours = node(x_q.float(), ctx=ExecContext(requant=requant))
        same, worst = _agreement(ours, ref)
        assert same >= 0.999 and worst <= 1, (requant, same, worst)


@pytest.mark.parametrize("groups", [1, 8], ids=["dense", "depthwise"])
@pytest.mark.parametrize("stride,padding,dilation", [(1, 1, 1), (2, 0, 1), (1, 2, 2)])
def test_w8a8_conv_matches_torch_x86(groups, stride, padding, dilation):
    g, s_in, zp_in, s_w, s_out, zp_out = _identical_qparams(groups * 10 + stride)
    cin, cout = 8, 8 if groups > 1 else 16
    x_q = torch.randint(0, X_HI, (4, cin, 15, 15), generator=g)
    w_q = torch.randint(-127, 128, (cout, cin // groups, 3, 3), generator=g)
    bias = torch.randn(cout, generator=g) * 0.5
    ref_mod = nnq.Conv2d(cin, cout, 3, stride, padding, dilation, groups)
    ref_mod.set_weight_bias(torch._make_per_tensor_quantized_tensor(w_q.to(torch.int8), s_w, 0), bias)
    ref_mod.scale, ref_mod.zero_point = s_out, zp_out
    ref = ref_mod(torch._make_per_tensor_quantized_tensor(x_q.to(torch.uint8), s_in, zp_in)).int_repr()
    a8 = activation_format(8)
    conv = nn.Conv2d(cin, cout, 3, stride, padding, dilation, groups)
    node = QConv2d(
        "conv",
        ["x"],
        conv,
        in_qp=_qp(s_in, zp_in, a8),
        w_qp=_qp(s_w, 0, QFormat(8)),
        out_qp=_qp(s_out, zp_out, a8),
        weight_q=w_q.to(torch.int8),
        bias_q=torch.round(bias.double() / (s_in * s_w)).to(torch.int32),
        act=None,
        bias_float=bias,
    )
    ours = node(x_q.float(), ctx=ExecContext(requant="float"))
    assert ours.shape == ref.shape
    same, worst = _agreement(ours, ref)
    assert same >= 0.999 and worst <= 1, (same, worst)


def _exact_single(rq: Requantizer, acc: torch.Tensor) -> torch.Tensor:
    """floor((acc·M + 2^(n-1)) / 2^n) in Python integers, M and n per channel (dim 1)."""
    mult, n = rq.mult.expand(acc.shape[1]).tolist(), (31 + rq.shift).expand(acc.shape[1]).tolist()
    out = [
        [(a * mult[c] + (1 << (n[c] - 1))) >> n[c] for a in acc[:, c].reshape(-1).tolist()]
        for c in range(acc.shape[1])
    ]
    return torch.tensor(out).reshape(acc.shape[1], acc.shape[0], *acc.shape[2:]).transpose(0, 1)


@pytest.mark.parametrize("log2_amax", [10, 22, 31, 35])
@pytest.mark.parametrize("per_channel", [False, True])
def test_float64_requantization_matches_int64_path(log2_amax, per_channel):
    """The float64 epilogue (direct, or with the multiplier split 15 + 16 bits) gives the int64 integers."""
    g = torch.Generator().manual_seed(log2_amax)
    real = torch.empty(4 if per_channel else 1, dtype=torch.float64).uniform_(1e-6, 0.99, generator=g)
    rq = Requantizer(real, _qp(0.1, 0, QFormat(bits=8, signed=False)), lo=0, hi=255)
    amax = 2**log2_amax
    acc = torch.randint(-amax, amax + 1, (3, 4, 5, 6), generator=g, dtype=torch.int64)
    acc[0, :, 0, 0], acc[0, :, 0, 1] = amax, -amax
    fast = rq.single_float64(acc.double(), amax)
    assert fast is not None and torch.equal(fast.to(torch.int64), _exact_single(rq, acc))
    if log2_amax <= 31:  # 32-bit accumulators: the int64 path agrees too
        m, s = (t.reshape(1, -1, 1, 1) if t.numel() > 1 else t.reshape(()) for t in (rq.mult, rq.shift))
        assert torch.equal(requantize(acc, m, s, "single"), _exact_single(rq, acc))


def test_float64_requantization_is_exact_one_below_a_rounding_boundary():
    """acc·M + 2^(n-1) = k·2^n - 1 with |acc| ~ 2^35: the split path must floor to k - 1 (an inexact
    float64 sum would round up to k); a bound of 2^37 falls back to int64 (None)."""
    real = 1503238529 / 2**31  # M = 1503238529 (odd), n = 31
    u8 = _qp(0.1, 0, QFormat(bits=8, signed=False))
    rq = Requantizer(torch.tensor([real], dtype=torch.float64), u8, lo=0, hi=255)
    m, n = int(rq.mult), 31 + int(rq.shift)
    assert m % 2 == 1 and n == 31
    base = (-1 - 2 ** (n - 1)) * pow(m, -1, 2**n) % 2**n
    accs = [base + j * 2**n for j in (2**4, 2**4 + 1, -(2**4))]
    acc = torch.tensor(accs, dtype=torch.int64).reshape(1, -1, 1, 1)
    assert all((a * m + 2 ** (n - 1)) % 2**n == 2**n - 1 for a in accs)
    fast = rq.single_float64(acc.double(), 3 * 2**34)
    assert torch.equal(fast.to(torch.int64), _exact_single(rq, acc))
    assert rq.single_float64(acc.double(), 2**37) is None


def test_exact_conv_splits_wide_weights_into_certified_planes():
    """16-bit weights with a large fan-in: a plain float32 conv is wrong, ours equals int64 arithmetic."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-255, 256, (2, 64, 6, 6), generator=g)
    w = torch.randint(-32767, 32768, (8, 64, 3, 3), generator=g)
    ew = prepare(w.to(torch.int16), 255)
    assert ew.planes >= 2
    ours = combine(exact_conv2d(x.float(), ew, 1, 1, 1), ew, 1).to(torch.int64)
    ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1).to(torch.int64)  # exact: < 2^53
    assert torch.equal(ours, ref)
    naive = torch.nn.functional.conv2d(x.float(), w.float(), padding=1).to(torch.int64)
    assert not torch.equal(naive, ref)  # the failure mode the planes avoid


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.c2(self.c1(x)) + x)
        x = self.down(x)
        x = torch.cat([x, self.dw(x)], 1)
        x = nn.functional.max_pool2d(x, 2)
        return self.fc(torch.flatten(self.pool(x), 1))


def _randomized(model):
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


@pytest.mark.parametrize("scheme", ["w8a8", "w16a8", "w8a16"])
def test_integer_and_fake_agree_within_one_lsb_per_layer(scheme):
    torch.manual_seed(0)
    model = _randomized(SmallResNet())
    x = torch.randn(8, 3, 16, 16)
    q = convert(model, scheme, x)
    outs = q.run(x, mode="integer", keep=True)
    checked = 0
    for node in q.nodes:
        if node.out_qp is None or node.kind == "input":
            continue
        ins = [outs[i] for i in node.inputs]
        q_int = node(*ins, ctx=ExecContext("integer"))
        fake_in = [
            dequantize(v, q.nodes[[n.name for n in q.nodes].index(i)].out_qp)
            for v, i in zip(ins, node.inputs)
        ]
        f = node(*fake_in, ctx=ExecContext("fake"))
        q_fake = torch.round(f / node.out_qp.scale.float()) + node.out_qp.zero_point.float()
        assert (q_int - q_fake).abs().max() <= 1, node.name
        checked += 1
    assert checked >= 8
    # end to end the two modes stay close too
    yi, yf = q(x), q(x, mode="fake")
    assert (yi - yf).abs().max() <= 4 * float(q.output_qparams().scale)


def test_resnet_graph_is_fully_integer_and_accurate():
    torch.manual_seed(0)
    model = _randomized(SmallResNet())
    x = torch.randn(16, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: every op has an integer kernel
        q = convert(model, "w16a8", x)
    kinds = {type(n).__name__ for n in q.nodes}
    assert {"QConv2d", "QLinear", "QRescaleSum", "QAvgPool", "QLayout"} <= kinds
    assert len(q.weight_nodes()) == 6  # BN folded: conv/linear only
    with torch.no_grad():
        ref = model(x)
    assert (q(x) - ref).abs().max() < 0.05 * ref.abs().max()


def test_unsupported_op_falls_back_with_warning_naming_it():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 6, 6]), nn.Flatten(), nn.Linear(144, 3)).eval()
    x = torch.randn(4, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"1 \(LayerNorm\)"):
        q = convert(model, "w8a8", x)
    assert (q(x) - model(x)).abs().max() < 0.1


def test_accumulator_overflow_is_detected_and_reported():
    model = nn.Sequential(nn.Linear(256, 8)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.rand(4, 256) * 4
    q = convert(model, "w8a8", x, acc_bits=32)  # 256 * 127 * 255 < 2^31
    q(x)
    assert q.stats.total == 0
    narrow = convert(model, "w8a8", x, acc_bits=16, overflow="saturate")
    narrow(x)
    assert narrow.stats.total > 0 and narrow.stats.overflow["_0"] == narrow.stats.total
    wrapped = convert(model, "w8a8", x, acc_bits=16, overflow="wrap")
    assert not torch.equal(wrapped(x), narrow(x))
    # w16a16 dot products of length 256 need more than 32 bits: detected, and fine at 48 bits
    wide = convert(model, "w16a16", x, acc_bits=32)
    wide(x)
    assert wide.stats.total > 0
    wider = convert(model, "w16a16", x, acc_bits=48)
    wider(x)
    assert wider.stats.total == 0


def test_bad_scheme_and_mode_are_clear_errors():
    with pytest.raises(ValueError, match="'w0a8'"):
        Scheme.parse("w0a8")
    with pytest.raises(ValueError, match="'fp32'"):
        Scheme.parse("fp32")
    with pytest.raises(ValueError, match="accumulator bits"):
        AccumulatorSpec(bits=8)
    q = convert(nn.Sequential(nn.Linear(4, 2)), "w8a8", torch.randn(3, 4))
    with pytest.raises(ValueError, match="'float'"):
        q(torch.randn(2, 4), mode="float")


def test_small_cnn_on_digits_keeps_float_agreement_at_w8a8():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    torch.manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(1400, generator=g).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test = slice(1400, None)
    with torch.no_grad():
        ref = model(x[test]).argmax(1)
    assert (ref == y[test]).float().mean() > 0.85  # the float model is real
    q = convert(model, "w8a8", x[:512])
    agree = (q(x[test]).argmax(1) == ref).float().mean()
    assert agree > 0.98, float(agree)
