"""Fixed-point primitives: quantization formats as data, rounding, observers and requantization.

A `QFormat` says how real numbers become integers (bits, signedness, symmetry, granularity, power-of-two
scales, rounding, saturation). `QParams` is a format plus its calibrated scale and zero point:

    q = sat(round(x / scale) + zero_point)          x ≈ (q - zero_point) * scale

Requantization of a wide integer accumulator to a narrower format follows gemmlowp / TFLite: the real
factor r = s_in * s_w / s_out is represented as an integer multiplier M (31 fractional bits, M in
[2^30, 2^31)) and a shift, r ≈ M * 2^(-31 - shift). Two integer roundings are available:

* ``"gemmlowp"`` — SaturatingRoundingDoublingHighMul followed by RoundingDivideByPOT (double rounding,
  both half away from zero), bit-exact with gemmlowp, TFLite and CMSIS-NN's default build;
* ``"single"`` — one rounding, (acc * M + 2^(n-1)) >> n with n = 31 + shift (round half up), as
  CMSIS-NN's ``CMSIS_NN_USE_SINGLE_ROUNDING``; cheaper and never more than 1/2 LSB from exact. Computed
  with M split into 15 + 16 bits so that it stays exact in int64 for accumulators up to 48 bits.

and ``"float"``: float32(acc) * float32(r), rounded half to even — the arithmetic of PyTorch's x86
(fbgemm) quantized kernels.

Error bound of (M, shift) from `quantize_multiplier`: M = round(r * 2^(31+shift)) with M in [2^30, 2^31),
so |M * 2^-(31+shift) - r| <= 2^-(32+shift) <= r * 2^-31 (relative error at most 2^-31). The scaled
accumulator is therefore off by at most |acc * r| * 2^-31 output units — under 1/2 LSB for any result that
fits in 30 bits — and the final rounding adds at most 1/2 LSB (double rounding: 1/2 + 2^-31), so the
requantized value is within 1 LSB of round(acc * r) (tested over randomized ranges and saturation edges).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

ROUNDING_MODES = ("nearest_even", "half_away", "half_up", "floor", "stochastic")
REQUANT_MODES = ("gemmlowp", "single", "float")


# --------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True)
class QFormat:
    """How real values map to integers. Pure data; see module docstring for the formulas."""

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None  # None: per-tensor; otherwise the per-channel axis
    pow2_scale: bool = False
    rounding: str = "nearest_even"
    saturate: bool = True  # False: wrap around (two's complement), as unchecked hardware would

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 32:
            raise ValueError(f"QFormat.bits={self.bits!r} is invalid; allowed: integers 2..32")
        if self.rounding not in ROUNDING_MODES:
            raise ValueError(f"QFormat.rounding={self.rounding!r} is invalid; allowed: {ROUNDING_MODES}")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        # symmetric signed formats use the restricted range [-(2^(b-1)-1), 2^(b-1)-1]
        return -(2 ** (self.bits - 1)) + (1 if self.symmetric else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def dtype(self) -> torch.dtype:
        """Smallest torch integer dtype that stores the format."""
        if self.signed:
            return torch.int8 if self.bits <= 8 else torch.int16 if self.bits <= 16 else torch.int32
        return torch.uint8 if self.bits <= 8 else torch.int32 if self.bits <= 31 else torch.int64


def weight_format(bits: int, per_channel: bool = False, **kw) -> QFormat:
    """Signed symmetric weight format (restricted range, zero point 0)."""
    return QFormat(bits=bits, signed=True, symmetric=True, axis=0 if per_channel else None, **kw)


def activation_format(bits: int, **kw) -> QFormat:
    """Default activation format: 8-bit unsigned affine (like torch quint8), wider ones signed symmetric
    (like TFLite's 16x8 scheme)."""
    if bits <= 8:
        return QFormat(bits=bits, signed=False, symmetric=False, **kw)
    return QFormat(bits=bits, signed=True, symmetric=True, **kw)


@dataclass
class QParams:
    """A format plus calibrated scale (tensor, one entry per channel or a scalar) and zero point."""

    fmt: QFormat
    scale: torch.Tensor
    zero_point: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        self.scale = torch.as_tensor(self.scale, dtype=torch.float64)
        zp = torch.zeros_like(self.scale) if self.zero_point is None else self.zero_point
        self.zero_point = torch.as_tensor(zp, dtype=torch.int64)
        if (self.scale <= 0).any() or not torch.isfinite(self.scale).all():
            raise ValueError(f"QParams scale must be positive and finite, got {self.scale.tolist()}")

    def view_for(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero point shaped to broadcast against `x` (per-channel along fmt.axis)."""
        if self.fmt.axis is None or self.scale.numel() == 1:
            return self.scale.reshape(()), self.zero_point.reshape(())
        shape = [1] * x.dim()
        shape[self.fmt.axis] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    @property
    def is_scalar(self) -> bool:
        return self.scale.numel() == 1


# ------------------------------------------------------------------------------------------ rounding
def round_tensor(x: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round a float tensor to integral values (same dtype) with the named rounding mode."""
    if mode == "nearest_even":
        return torch.round(x)
    if mode == "half_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    if mode == "half_up":
        return torch.floor(x + 0.5)
    if mode == "floor":
        return torch.floor(x)
    if mode == "stochastic":
        if generator is None:
            raise ValueError("rounding='stochastic' needs an explicit torch.Generator")
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        return torch.floor(x + u)
    raise ValueError(f"rounding mode {mode!r} is invalid; allowed: {ROUNDING_MODES}")


def saturate(q: torch.Tensor, qmin: int, qmax: int, wrap: bool = False) -> tuple[torch.Tensor, int]:
    """Clamp (or wrap, two's complement) integer values into [qmin, qmax]; returns (values, #out-of-range)."""
    out = (q < qmin) | (q > qmax)
    n = int(out.sum())
    if n == 0:
        return q, 0
    if wrap:
        span = qmax - qmin + 1
        return torch.remainder(q - qmin, span) + qmin, n
    return q.clamp(qmin, qmax), n


# -------------------------------------------------------------------------------- quantize/dequantize
def compute_qparams(lo: torch.Tensor, hi: torch.Tensor, fmt: QFormat) -> QParams:
    """Scale/zero point covering [lo, hi] (per channel when lo/hi are vectors)."""
    lo = torch.minimum(torch.as_tensor(lo, dtype=torch.float64), torch.zeros(()))
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.float64), torch.zeros(()))
    eps = torch.finfo(torch.float32).tiny * 2**20
    if fmt.symmetric:
        amax = torch.maximum(-lo, hi).clamp_min(eps)
        scale = amax / fmt.qmax
        zp = torch.zeros_like(scale, dtype=torch.int64)
    else:
        scale = ((hi - lo) / (fmt.qmax - fmt.qmin)).clamp_min(eps)
        zp = (fmt.qmin - torch.round(lo / scale)).clamp(fmt.qmin, fmt.qmax).to(torch.int64)
    if fmt.pow2_scale:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return QParams(fmt, scale, zp)


def quantize(x: torch.Tensor, qp: QParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Real → integer values (returned as int64): sat(round(x/scale) + zp)."""
    scale, zp = qp.view_for(x)
    q = round_tensor(x.double() / scale, qp.fmt.rounding, generator).to(torch.int64) + zp
    q, _ = saturate(q, qp.fmt.qmin, qp.fmt.qmax, wrap=not qp.fmt.saturate)
    return q


def dequantize(q: torch.Tensor, qp: QParams, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Integer → real: (q - zp) * scale."""
    scale, zp = qp.view_for(q)
    return ((q.to(torch.int64) - zp).double() * scale).to(dtype)


def fake_quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """Quantize-dequantize in float32 (the `fake` execution mode); per-tensor fast path."""
    if qp.is_scalar and qp.fmt.rounding == "nearest_even" and qp.fmt.saturate:
        s, z = float(qp.scale), float(qp.zero_point)
        return (torch.round(x / s) + z).clamp_(qp.fmt.qmin, qp.fmt.qmax).sub_(z).mul_(s)
    return dequantize(quantize(x, qp), qp, x.dtype)


# -------------------------------------------------------------------------------------------- observers
class Observer:
    """Collects statistics of the tensors it sees and turns them into QParams for a format.

    `batch_invariant`: observing a batch in pieces gives the same QParams as observing it whole.
    """

    batch_invariant = False

    def __init__(self, fmt: QFormat):
        self.fmt = fmt

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x reshaped to (channels, -1) for per-channel formats, (1, -1) otherwise."""
        x = x.detach().double()
        if self.fmt.axis is None:
            return x.reshape(1, -1)
        return x.movedim(self.fmt.axis, 0).reshape(x.shape[self.fmt.axis], -1)

    def observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def qparams(self) -> QParams:
        raise NotImplementedError


class MinMaxObserver(Observer):
    """Running min/max over all batches."""

    batch_invariant = True

    def __init__(self, fmt: QFormat):
        super().__init__(fmt)
        self.lo = self.hi = None

    def observe(self, x):
        r = self._reduce(x)
        lo, hi = r.min(1).values, r.max(1).values
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def qparams(self):
        if self.lo is None:
            raise RuntimeError("observer saw no data; calibrate with at least one batch")
        return compute_qparams(self.lo, self.hi, self.fmt)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of per-batch min/max (torch's default for QAT)."""

    batch_invariant = False

    def __init__(self, fmt: QFormat, momentum: float = 0.01):
        super().__init__(fmt)
        self.momentum = momentum

    def observe(self, x):
        r = self._reduce(x)
        lo, hi = r.min(1).values, r.max(1).values
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            self.lo = self.lo + self.momentum * (lo - self.lo)
            self.hi = self.hi + self.momentum * (hi - self.hi)


class _SampleObserver(Observer):
    """Keeps a bounded random subsample of values (seeded) for quantile/MSE searches."""

    def __init__(self, fmt: QFormat, max_samples: int = 1 << 18, seed: int = 0):
        super().__init__(fmt)
        self.max_samples = max_samples
        self.gen = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []

    def observe(self, x):
        r = self._reduce(x)
        if r.shape[1] > self.max_samples:
            idx = torch.randint(r.shape[1], (self.max_samples,), generator=self.gen)
            r = r[:, idx]
        self.samples.append(r)

    def _data(self) -> torch.Tensor:
        if not self.samples:
            raise RuntimeError("observer saw no data; calibrate with at least one batch")
        return torch.cat(self.samples, 1)


class PercentileObserver(_SampleObserver):
    """Clips the range to the given percentiles (e.g. 99.99) to ignore outliers."""

    def __init__(self, fmt: QFormat, percentile: float = 99.99, **kw):
        super().__init__(fmt, **kw)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile={percentile} is invalid; allowed: (50, 100]")
        self.percentile = percentile

    def qparams(self):
        d = self._data()
        q = self.percentile / 100.0
        return compute_qparams(torch.quantile(d, 1 - q, dim=1), torch.quantile(d, q, dim=1), self.fmt)


class MSEObserver(_SampleObserver):
    """Searches a shrink factor of the min/max range minimizing the quantization MSE."""

    def __init__(self, fmt: QFormat, grid: int = 50, **kw):
        super().__init__(fmt, **kw)
        self.grid = grid

    def qparams(self):
        d = self._data()
        lo, hi = d.min(1).values, d.max(1).values
        best, best_err = None, None
        for i in range(self.grid):
            a = 1.0 - i / (self.grid * 1.25)
            qp = compute_qparams(
                lo * a, hi * a, replace(self.fmt, axis=0 if self.fmt.axis is not None else None)
            )
            scale, zp = (qp.scale.reshape(-1, 1), qp.zero_point.reshape(-1, 1))
            q = (torch.round(d / scale) + zp).clamp(self.fmt.qmin, self.fmt.qmax)
            err = ((q - zp) * scale - d).pow(2).mean(1)
            if best is None:
                best, best_err = qp, err
            else:
                better = err < best_err
                best = QParams(
                    self.fmt,
                    torch.where(better, qp.scale, best.scale),
                    torch.where(better, qp.zero_point, best.zero_point),
                )
                best_err = torch.minimum(err, best_err)
        return QParams(self.fmt, best.scale, best.zero_point)


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, fmt: QFormat) -> Observer:
    if name not in OBSERVERS:
        raise ValueError(f"observer {name!r} is invalid; allowed: {sorted(OBSERVERS)}")
    return OBSERVERS[name](fmt)


# ------------------------------------------------------------------------------------- requantization
def quantize_multiplier(real: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Real factor r > 0 → (M, shift) with r ≈ M * 2^-(31 + shift), M in [2^30, 2^31) (int64 tensors).

    `shift` may be negative (r >= 1: a left shift). Relative error of the representation <= 2^-31.
    """
    r = torch.as_tensor(real, dtype=torch.float64)
    if (r <= 0).any() or not torch.isfinite(r).all():
        raise ValueError(f"requantization factor must be positive and finite, got {r.flatten()[:4].tolist()}")
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    m = torch.round(mant * 2.0**31).to(torch.int64)
    carry = m == 2**31
    m = torch.where(carry, m // 2, m)
    exp = exp.to(torch.int64) + carry.to(torch.int64)
    return m, -exp


def _rounding_shift_right(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """gemmlowp RoundingDivideByPOT: x / 2^n rounded half away from zero (n >= 0)."""
    mask = (torch.ones_like(n) << n) - 1
    rem = x & mask
    thr = (mask >> 1) + (x < 0).to(torch.int64)
    return (x >> n) + (rem > thr).to(torch.int64)


def requantize(
    acc: torch.Tensor,
    multiplier: torch.Tensor,
    shift: torch.Tensor,
    mode: str = "single",
    real: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scale an int64 accumulator by M * 2^-(31+shift) (before adding the output zero point).

    `multiplier`/`shift` broadcast against `acc`. mode: see module docstring. For ``"float"`` pass the
    real factor `real` (float32 arithmetic, round half to even, as PyTorch's x86 engine).
    """
    if mode == "float":
        r = (
            real.to(torch.float32)
            if real is not None
            else (multiplier.double() * torch.exp2(-(31 + shift).double())).float()
        )
        return torch.round(acc.to(torch.float32) * r).to(torch.int64)
    if mode == "single":
        n = 31 + shift
        left = (-n).clamp_min(0)
        n = n.clamp_min(0)
        a = acc << left
        half = torch.where(n > 0, torch.ones_like(n) << (n - 1).clamp_min(0), torch.zeros_like(n))
        if bool((n >= 16).all()):
            # a·M passes int64 for |a| >= 2^32 (accumulators wider than 32 bits); with M = M_hi·2^16 + M_lo,
            # floor((a·M + half) / 2^n) = floor((a·M_hi + floor((a·M_lo + half) / 2^16)) / 2^(n-16)),
            # exact for |a| < 2^47
            lo = (a * (multiplier & 0xFFFF) + half) >> 16
            return (a * (multiplier >> 16) + lo) >> (n - 16)
        return (a * multiplier + half) >> n
    if mode == "gemmlowp":
        left = (-shift).clamp_min(0)
        right = shift.clamp_min(0)
        a = (acc << left).clamp(-(2**31), 2**31 - 1)
        prod = a * multiplier
        nudge = torch.where(prod >= 0, torch.full_like(prod, 1 << 30), torch.full_like(prod, 1 - (1 << 30)))
        high = torch.div(prod + nudge, 2**31, rounding_mode="trunc")
        both_min = (a == -(2**31)) & (multiplier == -(2**31))
        high = torch.where(both_min, torch.full_like(high, 2**31 - 1), high)
        return _rounding_shift_right(high, right)
    raise ValueError(f"requantization mode {mode!r} is invalid; allowed: {REQUANT_MODES}")
