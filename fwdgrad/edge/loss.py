"""Integer cross-entropy of integer logit codes: the loss as an integer on the fixed scale 2^-Q nats, so the
sign of L+ − L− is decided identically by the engine (`fwdgrad.ff.intloss`, torch), this numpy runtime and
the C runtime, without a libm. Per sample, with codes q (C classes), label y, output scale s:

    d_c = max(q) − q_c                                        (the zero point cancels)
    S   = Σ_c T[min(d_c, L)],   T[k] = round(2^P · exp(−k·s)), T[L] = 0      (T[0] = 2^P, so S ≥ 2^P)
    λ   = log2(S) − P on 2^-K                 (`log2_fixed`: bit length, then K squarings; integers only)
    L   = ⌊(λ·LN2 + 2^(R−1)) / 2^R⌋ + ⌊(d_y·M_s + 2^(n_s−1)) / 2^n_s⌋     on 2^-Q nats,
          LN2 = round(ln 2 · 2^31), R = 31 + K − Q;  M_s·2^-n_s ≈ s·2^Q (`quantize_multiplier`)

The tables and constants come from `loss_spec(scale, span)` (float64 math once, at export); everything
after that is int64 arithmetic. `mean_loss` turns the per-sample integers into a float: Σ L / (N·2^Q), a
strictly increasing function of Σ L while Σ L < 2^52, so comparing two means compares the integer sums.
Error against the float64 cross-entropy of the dequantized logits: a few 2^-Q (tests/test_intloss.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .ops import quantize_multiplier
from .train import Trainer

EXP_BITS = 30  # P: T[0] = 2^P; Σ T < C·2^P stays far below 2^63
LOG_BITS = 20  # K: fraction bits of log2(S)
LOSS_BITS = 16  # Q: the loss is an integer on 2^-Q nats
MANT_BITS = 30  # F: the mantissa of S normalized to [2^F, 2^(F+1)) before squaring (m² < 2^62)
LN2_MULT = round(math.log(2) * 2**31)
MAX_TABLE = 1 << 20  # longest exp table (scales below ~2e-5 would need more)


@dataclass(frozen=True)
class LossSpec:
    """The integer cross-entropy's constants for one output format: the exp table (int64, T[-1] = 0) and
    s·2^Q as a multiplier M_s·2^-n_s."""

    table: np.ndarray
    scale_mult: int
    scale_n: int
    exp_bits: int = EXP_BITS
    log_bits: int = LOG_BITS
    loss_bits: int = LOSS_BITS


def loss_spec(scale: float, span: int | None = None) -> LossSpec:
    """The constants for logits on scale `scale` whose codes span at most `span` (qmax − qmin; the table
    stops there). The table ends with its first zero entry: d beyond it is clamped onto that 0."""
    s = float(scale)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"logit scale {scale!r} is invalid; allowed: a finite number > 0")
    zero_at = math.ceil((EXP_BITS + 1) * math.log(2) / s) + 1  # 2^P·exp(−k·s) < 1/2 from here on
    length = zero_at if span is None else min(zero_at, int(span) + 1)
    if length > MAX_TABLE:
        raise ValueError(
            f"logit scale {s:g} over a span of {span} codes needs an exp table of {length} entries; "
            f"allowed: at most {MAX_TABLE} (a coarser output scale or a narrower output format)"
        )
    k = np.arange(length, dtype=np.float64)
    table = np.rint(np.exp(-k * s) * 2.0**EXP_BITS).astype(np.int64)
    table = np.concatenate([table[table > 0], np.zeros(1, np.int64)])
    mult, shift = quantize_multiplier(s * 2.0**LOSS_BITS)
    n = 31 + int(shift)
    if n < 1:
        raise ValueError(
            f"logit scale {s:g} is too large for the integer loss; allowed: below 2^{30 - LOSS_BITS}"
        )
    return LossSpec(table, int(mult), n)


def bit_length(x: np.ndarray) -> np.ndarray:
    """⌊log2 x⌋ of positive int64 integers (binary search over shifts 32, 16, ..., 1)."""
    x, e = x.copy(), np.zeros_like(x)
    for sh in (32, 16, 8, 4, 2, 1):
        big = (x >> sh) > 0
        e += np.where(big, sh, 0)
        x = np.where(big, x >> sh, x)
    return e


def log2_fixed(x: np.ndarray, frac: int = LOG_BITS) -> np.ndarray:
    """log2(x) on 2^-frac for positive int64 x, truncated: e = ⌊log2 x⌋, m = x on [2^F, 2^(F+1)) (the
    bits below F dropped), then `frac` times m ← ⌊m²/2^F⌋, a bit of 1 (and m halved) when m ≥ 2^(F+1)."""
    e = bit_length(x)
    m = np.where(e >= MANT_BITS, x >> np.maximum(e - MANT_BITS, 0), x << np.maximum(MANT_BITS - e, 0))
    out = e << frac
    for i in range(frac - 1, -1, -1):
        m = (m * m) >> MANT_BITS
        bit = m >> (MANT_BITS + 1)  # 0 or 1: m < 2^(F+2)
        m = m >> bit
        out += bit << i
    return out


def cross_entropy_q(codes: np.ndarray, y: np.ndarray, spec: LossSpec) -> np.ndarray:
    """Per-sample integer cross-entropy (int64, on 2^-Q nats) of logit codes (N, C) and labels (N,)."""
    q = np.asarray(codes).astype(np.int64)
    y = np.asarray(y, dtype=np.int64)
    if q.ndim != 2 or y.shape != q.shape[:1]:
        raise ValueError(
            f"codes must be (N, classes) and labels (N,), got {list(q.shape)} and {list(y.shape)}"
        )
    if y.size and (y.min() < 0 or y.max() >= q.shape[1]):
        raise ValueError(
            f"labels must be in [0, {q.shape[1]}) (the model's classes), got {y.min()}..{y.max()}"
        )
    d = q.max(axis=1, keepdims=True) - q
    total = spec.table[np.minimum(d, len(spec.table) - 1)].sum(axis=1)
    lam = log2_fixed(total, spec.log_bits) - (spec.exp_bits << spec.log_bits)
    r = 31 + spec.log_bits - spec.loss_bits
    lse = (lam * LN2_MULT + (1 << (r - 1))) >> r
    dy = d[np.arange(len(d)), y]
    return lse + ((dy * spec.scale_mult + (1 << (spec.scale_n - 1))) >> spec.scale_n)


def mean_loss(per_sample: np.ndarray, spec: LossSpec) -> float:
    """Σ L / (N·2^Q) as a float64 (strictly increasing in Σ L while Σ L < 2^52)."""
    return float(int(np.sum(per_sample, dtype=np.int64))) / (len(per_sample) * 2.0**spec.loss_bits)


def output_spec(header: dict, ops: list[dict]) -> LossSpec:
    """The LossSpec of a bundle's output: its scale, and its code range from the output op's clamp."""
    out = header["output"]
    op = next(o for o in ops if o["name"] == out["name"])
    a = op.get("attrs", {})
    span = a["hi"] - a["lo"] if "lo" in a and "hi" in a else None
    return loss_spec(out["scale"], span)


class IntegerLossTrainer(Trainer):
    """`Trainer` deciding each sign from the integer cross-entropy (`cross_entropy_q`) of the output codes
    instead of the float64 loss; `step` returns the mean of the 2m integer losses (as `mean_loss`)."""

    def __init__(self, bundle, runtime=None):
        super().__init__(bundle, runtime)
        self.spec = output_spec(bundle.header, bundle.ops)

    def loss(self, x, y, step: int, sample: int, sign: int, prefix=None) -> float:
        codes = self.runtime.run(x, self.weights_at(step, sample, sign), prefix)
        return mean_loss(cross_entropy_q(codes, y, self.spec), self.spec)

    def example_losses(self, codes: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each example's integer cross-entropy (int64, on 2^-Q nats)."""
        return cross_entropy_q(codes, y, self.spec)
