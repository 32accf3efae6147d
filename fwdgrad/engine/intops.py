"""Exact integer arithmetic on top of fast float kernels.

An integer accelerator computes acc[c] = Σ_k (x_k - zp_x) · w[c, k] in an int32 accumulator. On a CPU the
fastest exact way is a float32 convolution/GEMM over integer-valued operands, which is exact as long as
every partial sum stays below 2^24 in magnitude — whatever the summation order. We *certify* that per call:

    X · max_c Σ_k |w[c, k]| < 2^24,      X = max |x - zp_x| allowed by the input format.

When the certificate fails (e.g. 16-bit weights), the weights are split into P signed digit planes
w = Σ_p d_p · B^p (B = 2^b, |d_p| <= B/2) so that each plane is certified; the planes run as one kernel
call (stacked as extra output channels) and are recombined exactly: acc = Σ_p acc_p · B^p. Beyond
`MAX_PLANES`, the float64 path (exact below 2^53) is used. No float32 sum of integers beyond 2^24 is ever
trusted.

Accumulators are returned as float64 tensors holding exact integers (|acc| < 2^53 is guaranteed by the same
bound): float64 arithmetic is exact on such integers and about twice as fast as int64 on x86 (AVX2 has no
64-bit integer multiply), so the requantization epilogue uses it whenever its own bound allows.

The accumulator width is a setting: results outside [-2^(A-1), 2^(A-1)) are counted as overflows and
saturated or wrapped (two's complement), never silently wrong.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

F32_EXACT = 2**24
F64_EXACT = 2**53
MAX_PLANES = 4


@dataclass
class AccumulatorSpec:
    """Accumulator width and what happens when a result does not fit."""

    bits: int = 32  # 16..48: "single" requantization is exact for |acc| < 2^47 (fwdgrad.quant.requantize)
    overflow: str = "saturate"  # or "wrap"

    def __post_init__(self):
        if not 16 <= self.bits <= 48:
            raise ValueError(f"accumulator bits={self.bits} is invalid; allowed: 16..48")
        if self.overflow not in ("saturate", "wrap"):
            raise ValueError(
                f"accumulator overflow={self.overflow!r} is invalid; allowed: 'saturate', 'wrap'"
            )


@dataclass
class OverflowStats:
    """Per-node counters of accumulator overflows and output saturations."""

    overflow: dict[str, int] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if n:
            self.overflow[name] = self.overflow.get(name, 0) + n

    @property
    def total(self) -> int:
        return sum(self.overflow.values())


def digit_planes(w: torch.Tensor, x_bound: int) -> tuple[list[torch.Tensor], int] | None:
    """Split integer weights (any int dtype) into certified signed digit planes.

    Returns (planes as float32 tensors, digit bits b) with w = Σ_p planes[p] · 2^(b·p), every plane
    satisfying x_bound · max_c Σ|plane[c]| < 2^24; or None if more than MAX_PLANES would be needed.
    """
    w64 = w.to(torch.int64)
    flat = w64.reshape(w64.shape[0], -1).abs()
    if x_bound * int(flat.sum(1).max()) < F32_EXACT:
        return [w64.to(torch.float32)], 0
    nbits = int(flat.max()).bit_length() + 1  # signed
    for p in range(2, MAX_PLANES + 1):
        b = -(-nbits // p) + 1
        base, half = 1 << b, 1 << (b - 1)
        planes, rest = [], w64
        for _ in range(p - 1):
            d = torch.remainder(rest + half, base) - half
            planes.append(d)
            rest = (rest - d) >> b
        planes.append(rest)
        if all(x_bound * int(d.reshape(d.shape[0], -1).abs().sum(1).max()) < F32_EXACT for d in planes):
            return [d.to(torch.float32) for d in planes], b
    return None


def _combine(out: torch.Tensor, n_planes: int, b: int, cout: int, dim: int) -> torch.Tensor:
    """Recombine plane results stacked along `dim` into one exact (float64) accumulator."""
    acc = None
    for p, part in enumerate(out.split(cout, dim=dim)):
        part = part.double()
        acc = part if acc is None else acc.add_(part, alpha=float(1 << (b * p)))
    return acc


def exact_conv2d(
    x: torch.Tensor, w: torch.Tensor, x_bound: int, stride, padding, dilation, groups
) -> torch.Tensor:
    """Exact Σ x·w of integer-valued float32 `x` (zero point already removed) and integer `w` (float64)."""
    planes = digit_planes(w, x_bound)
    if planes is None:
        _check_f64(w, x_bound)
        out = F.conv2d(x.double(), w.double(), None, stride, padding, dilation, groups)
        return out
    ws, b = planes
    cout = w.shape[0]
    if len(ws) == 1:
        return F.conv2d(x, ws[0], None, stride, padding, dilation, groups).double()
    if groups == 1:
        out = F.conv2d(x, torch.cat(ws, 0), None, stride, padding, dilation, 1)
        return _combine(out, len(ws), b, cout, 1)
    outs = [F.conv2d(x, wp, None, stride, padding, dilation, groups) for wp in ws]
    return _combine(torch.cat(outs, 1), len(ws), b, cout, 1)


def exact_linear(x: torch.Tensor, w: torch.Tensor, x_bound: int) -> torch.Tensor:
    """Exact x @ w.T for integer-valued float32 `x` (zero point removed) and integer `w` (float64)."""
    planes = digit_planes(w, x_bound)
    if planes is None:
        _check_f64(w, x_bound)
        return F.linear(x.double(), w.double())
    ws, b = planes
    if len(ws) == 1:
        return F.linear(x, ws[0]).double()
    out = F.linear(x, torch.cat(ws, 0))
    return _combine(out, len(ws), b, w.shape[0], -1)


def _check_f64(w: torch.Tensor, x_bound: int) -> None:
    s = int(w.to(torch.int64).reshape(w.shape[0], -1).abs().sum(1).max())
    if x_bound * s >= F64_EXACT:
        raise OverflowError(f"dot products up to {x_bound * s} exceed exact float64 range 2^53")


def accumulate(acc: torch.Tensor, spec: AccumulatorSpec) -> tuple[torch.Tensor, int, int]:
    """Fit an exact accumulator (float64 or int64 integers) into spec.bits.

    Returns (values, number of overflowing entries, largest |value| after fitting)."""
    lo, hi = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    mn, mx = (int(v) for v in torch.aminmax(acc))
    if mn >= lo and mx <= hi:
        return acc, 0, max(-mn, mx)
    bad = int(((acc < lo) | (acc > hi)).sum())
    if spec.overflow == "wrap":
        wrapped = torch.remainder(acc.to(torch.int64) - lo, 1 << spec.bits) + lo
        return wrapped.to(acc.dtype), bad, max(-lo, hi)
    return acc.clamp(lo, hi), bad, max(-lo, hi)
