"""Integer kernels of the numpy runtime, bit-exact with the integer mode of `fwdgrad.engine`.

Operands are integer numpy arrays; every accumulation is exact:

* conv2d / linear: acc = Σ_k (x_k − zp_x)·w[c, k] via im2col + matmul. The matmul runs in float64 (BLAS)
  when every partial sum is certified exact, X · max_c Σ_k |w[c, k]| < 2^53 with X = max |x − zp_x| of the
  batch; otherwise in int64. Padding pads the zero-point-subtracted input with 0.
* requantization of an int64 accumulator by M·2^-(31+shift) (`quantize_multiplier`):
  ``single``: (acc·M + 2^(n−1)) >> n, n = 31 + shift; ``gemmlowp``: SaturatingRoundingDoublingHighMul then
  RoundingDivideByPOT (both half away from zero).
* accumulator width A: results outside [−2^(A−1), 2^(A−1)) saturate or wrap (two's complement).
* transformer ops (`fwdgrad.engine.transformer`): `normalized` (LayerNorm's x̂ from integer statistics, an
  exact integer square root), `softmax` (exp table, rounded division), `matmul` of two activations (exact as
  conv/linear). Rounded division: ⌊(2·num + den) / 2·den⌋ (num/den half up, den > 0).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

F64_EXACT = 2**53
PATCH_ELEMS = 1 << 20  # im2col elements per chunk (8 MiB of float64): bounds a layer's scratch memory


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """r > 0 → (M, shift) int64 with r ≈ M·2^-(31+shift), M in [2^30, 2^31): frexp r = mant·2^e,
    M = round_half_even(mant·2^31) (carry: M = 2^31 → 2^30, e + 1), shift = −e. Same as `fwdgrad.quant`."""
    r = np.asarray(real, dtype=np.float64)
    if np.any(r <= 0) or not np.all(np.isfinite(r)):
        raise ValueError(f"requantization factor must be positive and finite, got {r.ravel()[:4].tolist()}")
    mant, exp = np.frexp(r)
    m = np.rint(mant * 2.0**31).astype(np.int64)
    carry = m == 2**31
    return np.where(carry, m // 2, m), -(exp.astype(np.int64) + carry)


def requantize(acc: np.ndarray, mult, shift, mode: str, acc_bits: int = 48) -> np.ndarray:
    """round(acc · M·2^-(31+shift)) in int64 (before the output zero point); M/shift broadcast.

    `acc_bits` bounds |acc| < 2^(acc_bits-1): up to 32 bits acc·M fits int64 directly; wider accumulators
    take M split into 15 + 16 bits (exact for |acc| < 2^47, about 3 ns per element more).
    """
    mult, shift = np.asarray(mult, np.int64), np.asarray(shift, np.int64)
    if mode == "single":
        n = 31 + shift
        left, n = np.maximum(-n, 0), np.maximum(n, 0)
        half = np.where(n > 0, np.left_shift(np.int64(1), np.maximum(n - 1, 0)), 0)
        a = acc << left
        if acc_bits + int(np.max(left)) > 32 and np.all(n >= 16):
            return (a * (mult >> 16) + ((a * (mult & 0xFFFF) + half) >> 16)) >> (n - 16)
        return (a * mult + half) >> n
    if mode == "gemmlowp":
        a = np.clip(acc << np.maximum(-shift, 0), -(2**31), 2**31 - 1)
        prod = a * mult  # M > 0, so gemmlowp's (INT32_MIN · INT32_MIN) overflow case cannot occur
        v = prod + np.where(prod >= 0, 1 << 30, 1 - (1 << 30))
        high = np.where(v >= 0, v >> 31, -((-v) >> 31))  # division by 2^31 truncating toward zero
        right = np.maximum(shift, 0)
        mask = np.left_shift(np.int64(1), right) - 1
        thr = (mask >> 1) + (high < 0)
        return (high >> right) + ((high & mask) > thr)
    raise ValueError(
        f"requantization mode {mode!r} is not supported by the edge runtime; allowed: 'single', 'gemmlowp'"
    )


def accumulate(acc: np.ndarray, bits: int, overflow: str) -> np.ndarray:
    """Fit an exact int64 accumulator into `bits`: saturate, or wrap as two's complement."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if acc.size == 0 or (acc.min() >= lo and acc.max() <= hi):
        return acc
    if overflow == "wrap":
        return (acc - lo) % (1 << bits) + lo
    return np.clip(acc, lo, hi)


def _matmul_dtype(xz: np.ndarray, w: np.ndarray) -> type:
    """float64 when every partial sum of x·w is certified below 2^53, else int64."""
    x_max = int(np.abs(xz).max()) if xz.size else 0
    w_sum = int(np.abs(w.reshape(w.shape[0], -1).astype(np.int64)).sum(1).max())
    return np.float64 if x_max * w_sum < F64_EXACT else np.int64


def conv2d(xz: np.ndarray, w: np.ndarray, stride, padding, dilation, groups: int) -> np.ndarray:
    """Exact grouped 2-D convolution of zero-point-free integers `xz` (N, C, H, W) with `w` → int64.

    im2col per chunk of samples, Cg = C/groups input channels per group:
        cols[n, g, (c, kh, kw), (oh, ow)] = x_pad[n, g·Cg + c, oh·s + kh·d, ow·s + kw·d]
        acc[n, g, o] = w[g, o, :] @ cols[n, g]       (output channel g·Cout/groups + o)
    """
    n, c, h, wd = xz.shape
    cout, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    ow = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dtype = _matmul_dtype(xz, w)
    wm = w.reshape(groups, cout // groups, cg * kh * kw).astype(dtype)
    xp = np.pad(xz.astype(dtype, copy=False), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    out = np.empty((n, cout, oh * ow), dtype=np.int64)
    chunk = max(1, PATCH_ELEMS // max(1, c * kh * kw * oh * ow))
    for i in range(0, n, chunk):
        win = sliding_window_view(xp[i : i + chunk], (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
        win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # (b, C, OH, OW, KH, KW)
        b = win.shape[0]
        cols = win.reshape(b, groups, cg, oh, ow, kh, kw).transpose(0, 1, 2, 5, 6, 3, 4)
        cols = cols.reshape(b, groups, cg * kh * kw, oh * ow)
        out[i : i + b] = np.matmul(wm, cols).reshape(b, cout, oh * ow)
    return out.reshape(n, cout, oh, ow)


def linear(xz: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact xz @ w.T → int64."""
    dtype = _matmul_dtype(xz, w)
    return (xz.astype(dtype, copy=False) @ w.astype(dtype).T).astype(np.int64)


def matmul(az: np.ndarray, bz: np.ndarray) -> np.ndarray:
    """Exact az @ bz of two zero-point-free integer activations (batched over leading axes) → int64: float64
    when K·max|a|·max|b| < 2^53 certifies every partial sum, else int64."""
    amax = int(np.abs(az).max()) if az.size else 0
    bmax = int(np.abs(bz).max()) if bz.size else 0
    dtype = np.float64 if az.shape[-1] * amax * bmax < F64_EXACT else np.int64
    return np.matmul(az.astype(dtype, copy=False), bz.astype(dtype, copy=False)).astype(np.int64)


def isqrt(n: np.ndarray) -> np.ndarray:
    """⌊√n⌋ of non-negative int64 integers below 2^52, exactly: the float64 root corrected by ±1."""
    r = np.floor(np.sqrt(n.astype(np.float64))).astype(np.int64)
    r -= r * r > n
    return r + ((r + 1) * (r + 1) <= n)


def round_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """⌊(2·num + den) / 2·den⌋: num/den rounded half up (den > 0), int64."""
    return (2 * num + den) // (2 * den)


def normalized(x: np.ndarray, zp_in: int, dim: int, frac: int, v_eps: int) -> np.ndarray:
    """LayerNorm's x̂ ≈ 2^F·(x − μ)/σ over the last axis (int64), q = x − zp_in:
    μ_q = ⌊(2·Σq + D) / 2D⌋,  c = q − μ_q,  r = ⌊√((Σc² + V_ε)·D)⌋,  x̂ = ⌊(2·c·D·2^F + r) / 2r⌋."""
    q = x.astype(np.int64) - zp_in
    c = q - round_div(q.sum(-1, keepdims=True), np.int64(dim))
    r = isqrt(((c * c).sum(-1, keepdims=True) + v_eps) * dim)
    return round_div(c * (dim << frac), r)


def softmax(q: np.ndarray, table: np.ndarray, levels: int) -> np.ndarray:
    """Integer softmax over the last axis: d = min(max(q) − q, L), e = T[d],
    p = ⌊(2·e·levels + Σe) / 2Σe⌋ (int64 probabilities on the scale 1/levels)."""
    q = q.astype(np.int64)
    d = np.minimum(q.max(-1, keepdims=True) - q, len(table) - 1)
    e = table.astype(np.int64)[d]
    return round_div(e * levels, e.sum(-1, keepdims=True))


def window_sum(xz: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Exact sums over pooling windows of zero-point-free integers (zero padding counted, as
    count_include_pad) → int64."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    xp = np.pad(xz.astype(np.int64, copy=False), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    return sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw].sum(axis=(-2, -1))


def max_pool(x: np.ndarray, kernel, stride, padding, dilation) -> np.ndarray:
    """Window maxima (padding never wins: it is below every code)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    xp = np.pad(
        x.astype(np.int32), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=np.iinfo(np.int32).min
    )
    win = sliding_window_view(xp, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    return win[:, :, ::sh, ::sw, ::dh, ::dw].max(axis=(-2, -1)).astype(x.dtype)


def storage(lo: int, hi: int) -> type:
    """Smallest integer dtype holding [lo, hi] (how activations are stored between ops)."""
    for dt in (np.uint8, np.int8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    return np.int64
