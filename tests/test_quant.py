"""Fixed-point primitives: formats, rounding, observers, requantization."""

import math

import pytest
import torch

from fwdgrad.edge.ops import requantize as edge_requantize
from fwdgrad.quant import (
    OBSERVERS,
    ROUNDING_MODES,
    QFormat,
    QParams,
    compute_qparams,
    dequantize,
    make_observer,
    quantize,
    quantize_multiplier,
    requantize,
    saturate,
)

FORMATS = [
    QFormat(bits=8, signed=True, symmetric=True),
    QFormat(bits=8, signed=False, symmetric=False),
    QFormat(bits=16, signed=True, symmetric=True),
    QFormat(bits=4, signed=True, symmetric=False),
    QFormat(bits=12, signed=True, symmetric=True, pow2_scale=True),
]


def exact_round_scale(acc: torch.Tensor, real: float) -> torch.Tensor:
    """Reference: round(acc * real) with exact rational arithmetic (Python ints), half away from zero."""
    from fractions import Fraction

    r = Fraction(real)
    out = []
    for a in acc.flatten().tolist():
        v = a * r
        f = math.floor(abs(v) + Fraction(1, 2))
        out.append(f if v >= 0 else -f)
    return torch.tensor(out, dtype=torch.int64).reshape(acc.shape)


@pytest.mark.parametrize("mode", ROUNDING_MODES)
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f"b{f.bits}{'s' if f.signed else 'u'}")
def test_quantize_dequantize_error_bound(mode, fmt):
    """In-range values come back within half a step for the nearest modes; floor and stochastic
    rounding are bounded by one step by definition (floor one-sided, stochastic unbiased)."""
    from dataclasses import replace

    fmt = replace(fmt, rounding=mode)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64) * 2
    qp = compute_qparams(x.min(), x.max(), fmt)
    q = quantize(x, qp, generator=torch.Generator().manual_seed(1))
    assert q.min() >= fmt.qmin and q.max() <= fmt.qmax
    err = (dequantize(q, qp, torch.float64) - x) / qp.scale
    in_range = (x >= dequantize(torch.tensor(fmt.qmin), qp, torch.float64)) & (
        x <= dequantize(torch.tensor(fmt.qmax), qp, torch.float64)
    )
    err = err[in_range]
    if mode in ("nearest_even", "half_away", "half_up"):
        assert err.abs().max() <= 0.5 + 1e-9
    elif mode == "floor":
        assert err.max() <= 1e-9 and err.min() > -1 - 1e-9
    else:
        assert err.abs().max() < 1 + 1e-9
        assert abs(err.mean()) < 0.02  # unbiased


def test_half_way_cases_per_mode():
    qp = QParams(QFormat(bits=8), torch.tensor(1.0))
    x = torch.tensor([0.5, 1.5, -0.5, -1.5, 2.5])
    expect = {
        "nearest_even": [0, 2, 0, -2, 2],
        "half_away": [1, 2, -1, -2, 3],
        "half_up": [1, 2, 0, -1, 3],
        "floor": [0, 1, -1, -2, 2],
    }
    from dataclasses import replace

    for mode, want in expect.items():
        q = quantize(x, QParams(replace(qp.fmt, rounding=mode), qp.scale))
        assert q.tolist() == want, mode


def test_per_channel_and_saturation_wrap():
    w = torch.tensor([[0.1, -0.2], [10.0, -5.0]])
    fmt = QFormat(bits=8, axis=0)
    qp = compute_qparams(w.min(1).values, w.max(1).values, fmt)
    assert qp.scale.shape == (2,)
    assert quantize(w, qp).abs().max(1).values.tolist() == [127, 127]
    q, n = saturate(torch.tensor([-300, 5, 300]), -128, 127, wrap=True)
    assert n == 2 and q.tolist() == [-300 + 256, 5, 300 - 256]
    q, n = saturate(torch.tensor([-300, 5, 300]), -128, 127)
    assert n == 2 and q.tolist() == [-128, 5, 127]


def test_format_validation():
    with pytest.raises(ValueError, match="bits=0"):
        QFormat(bits=0)
    with pytest.raises(ValueError, match="rounding"):
        QFormat(rounding="up")
    with pytest.raises(ValueError, match="stochastic"):
        quantize(torch.ones(3), QParams(QFormat(rounding="stochastic"), torch.tensor(0.1)))


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observers_cover_data(name):
    g = torch.Generator().manual_seed(0)
    fmt = QFormat(bits=8, signed=False, symmetric=False)
    obs = make_observer(name, fmt)
    for _ in range(3):
        obs.observe(torch.randn(4096, generator=g) + 1.0)
    qp = obs.qparams()
    lo = float(dequantize(torch.tensor(fmt.qmin), qp))
    hi = float(dequantize(torch.tensor(fmt.qmax), qp))
    assert lo < 0.0 < hi  # zero exactly representable, range covers the bulk of N(1, 1)
    assert hi > 2.5 and lo < -0.5
    if name in ("percentile", "mse"):  # outlier-robust observers clip the extreme tails
        assert hi - lo < 10


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_batch_invariant_observers_give_the_same_qparams_in_chunks(name):
    """convert() calibrates in chunks only with observers that declare it changes nothing (minmax)."""
    x = torch.randn(64, 3, 5, generator=torch.Generator().manual_seed(1)) * 3
    fmt = QFormat(bits=8, signed=False, symmetric=False)
    whole, chunked = make_observer(name, fmt), make_observer(name, fmt)
    whole.observe(x)
    for xc in x.split(5):
        chunked.observe(xc)
    a, b = whole.qparams(), chunked.qparams()
    same = torch.equal(a.scale, b.scale) and torch.equal(a.zero_point, b.zero_point)
    if whole.batch_invariant:
        assert same
    if name == "moving_average":  # per-batch statistics: chunking would change the calibration
        assert not whole.batch_invariant and not same


def test_multiplier_representation():
    for r in [1e-6, 0.0276, 0.25, 0.5, 0.999999, 1.0, 3.7, 1234.5]:
        m, s = quantize_multiplier(r)
        assert 2**30 <= int(m) < 2**31
        assert abs(int(m) * 2.0 ** (-31 - int(s)) - r) <= r * 2**-31


@pytest.mark.parametrize("mode", ["single", "gemmlowp", "float"])
def test_requantize_within_one_lsb_of_exact(mode):
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([-(2**31), -(2**31) + 1, -1, 0, 1, 2**31 - 2, 2**31 - 1])
    for trial in range(40):
        real = float(torch.exp(torch.empty(()).uniform_(-14, 0, generator=g)))
        mag = 2 ** int(torch.randint(4, 32, (), generator=g))
        acc = torch.cat([torch.randint(-mag, mag, (500,), generator=g), edges])
        m, s = quantize_multiplier(real)
        got = requantize(acc, m, s, mode, real=torch.tensor(real))
        ref = exact_round_scale(acc, real)
        tol = 1 if mode != "float" else max(1, int(acc.abs().max() * real * 2**-23) + 1)
        assert (got - ref).abs().max() <= tol, (trial, real)
        # saturation edges: clamping to an 8-bit output keeps the 1-LSB bound
        assert ((got.clamp(-128, 127) - ref.clamp(-128, 127)).abs().max()) <= tol


def test_single_rounding_is_exact_for_wide_accumulators():
    """48-bit accumulators (|acc| up to 2^47): acc·M alone would pass int64 beyond |acc| = 2^32."""
    g = torch.Generator().manual_seed(1)
    for real in (0.7, 3e-4, 1.5e-9):
        m, s = quantize_multiplier(real)
        n = 31 + int(s)
        acc = torch.cat(
            [
                torch.randint(-(2**47), 2**47, (400,), generator=g),
                torch.tensor([-(2**47), 2**47 - 1, -(2**32) - 1, 2**32 + 1]),
            ]
        )
        got = requantize(acc, m, s, "single")
        ref = [(a * int(m) + (1 << (n - 1))) >> n for a in acc.tolist()]
        assert got.tolist() == ref, real
        # the numpy runtime
        assert edge_requantize(acc.numpy(), int(m), int(s), "single", acc_bits=48).tolist() == ref
        small = acc.numpy() >> 17  # 32-bit accumulators: the direct product
        ref32 = [(a * int(m) + (1 << (n - 1))) >> n for a in small.tolist()]
        assert edge_requantize(small, int(m), int(s), "single", acc_bits=32).tolist() == ref32


def test_gemmlowp_matches_reference_formulas():
    """Spot values of SaturatingRoundingDoublingHighMul + RoundingDivideByPOT worked by hand."""
    m = torch.tensor(1 << 30)  # 0.5 in Q31
    acc = torch.tensor([3, -3, 5, -5, 7])
    # SRDHM nudges by 2^30 (positive) or 1 - 2^30 (negative) before truncating: ties go up
    assert requantize(acc, m, torch.tensor(0), "gemmlowp").tolist() == [2, -1, 3, -2, 4]
    # then RoundingDivideByPOT rounds ties away from zero: 0.25 * [2, -2, 6, -6] -> [1, -1, 2, -2]
    assert requantize(torch.tensor([2, -2, 6, -6]), m, torch.tensor(1), "gemmlowp").tolist() == [1, -1, 2, -2]
    # single rounding rounds half up
    assert requantize(acc, m, torch.tensor(0), "single").tolist() == [2, -1, 3, -2, 4]
