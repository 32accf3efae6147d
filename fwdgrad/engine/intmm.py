"""Exact int8 × int8 GEMMs with int32 accumulators (``torch._int_mm``, oneDNN on CPU); convolutions as
im2col GEMMs.

u8 activation codes x (zero point zp) enter as u = x - 128, an int8 (the code with its top bit flipped), and
the weights as int8 digit planes d_p of w - offset (`onednn.planes_with_offset`: offset 128 where 16-bit
weights then fit two 8-bit digits, else 0) followed by a ones column. Then

    Σ_k (x_k - zp)·w_k = Σ_p 2^(b·p)·Σ_k u_k·d_p,k + offset·Σ_k u_k + (128 - zp)·Σ_k w_k

The ones column gives Σ_k u_k; the last term is a per-channel constant (`ExactWeights.shift`); a conv's
zero padding is padding with the code zp (u = zp - 128), so every window has all K terms, as the formula
needs. Exact while every partial sum stays below 2^31: 128·Σ_k |d_p,k| < 2^31 per plane, which the planner
certifies (`limit_bits` 31). CPUs without VNNI/AMX may form pairs of products in saturating int16 inside
oneDNN; a self-test at first use (`digit_bits`) runs the extremes (u of ±128/127 against digits at their
extremes side by side, and random) against int64 and picks 8-bit digits where they pass, 7-bit ones where
those do, else the kernel is unavailable. Grouped convolutions keep the other kernels.
"""

from __future__ import annotations

import functools
import math

import torch

from . import kernels
from .onednn import buffers, held, planes_with_offset

U_BOUND = 128  # |x - 128| for u8 codes
LIMIT_BITS = 31  # int32 accumulators
SELF_TEST_K = 4611  # a deep fan-in (ResNet-18's 3x3x512 and then some), odd


def _gemm(u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(u, w)


def self_test(bits: int) -> bool:
    """int8 rows of u ∈ {127, -128, alternating, random} against digit columns of `bits` bits ∈ {all
    2^(bits-1) - 1, all -2^(bits-1), alternating, random}, through `torch._int_mm`, equal to int64."""
    g = torch.Generator().manual_seed(0)
    hi, k = 2 ** (bits - 1) - 1, SELF_TEST_K
    u = torch.empty(8, k, dtype=torch.int8)
    u[0::4], u[1::4] = 127, -128
    u[2::4, ::2], u[2::4, 1::2] = 127, -128
    u[3::4].random_(-128, 128, generator=g)
    w = torch.empty(k, 8, dtype=torch.int8)
    w[:, 0::4], w[:, 1::4] = hi, -hi - 1
    w[::2, 2::4], w[1::2, 2::4] = hi, -hi - 1
    w[:, 3::4].random_(-hi - 1, hi + 1, generator=g)
    for rows in (u, u[:1]):  # batch 1 may take another kernel
        if not torch.equal(_gemm(rows, w).long(), rows.long() @ w.long()):
            return False
    return True


@functools.cache
def digit_bits() -> int:
    """The widest digits (8 or 7 bits) `torch._int_mm` sums exactly on this CPU, or 0: unavailable (no such
    op in this torch, no C kernels, or neither width passes)."""
    if not hasattr(torch, "_int_mm") or kernels.library() is None:
        return 0
    try:
        return next((bits for bits in (8, 7) if self_test(bits)), 0)
    except RuntimeError:  # the op is missing for this CPU build
        return 0


def available() -> bool:
    return digit_bits() > 0


@functools.lru_cache(maxsize=64)
def columns_layout(shape: tuple, planes: int, ones: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `kernels.digit_columns` puts each digit of `planes` planes of weights of `shape` [C, C_in, ...]:
    (the columns of zero planes, with their ones column where `ones`; the int32 byte position of each digit of
    the planes stacked [planes][C][K] as `kernels.fill_planes` stacks them, K in the weights' order)."""
    c, cin, khw = shape[0], shape[1] if len(shape) > 1 else 1, math.prod(shape[2:])
    ld = planes * c + ones
    template = torch.zeros((cin * khw, ld), dtype=torch.int8)
    if ones:
        template[:, -1] = 1
    q, ch, ci, sp = torch.meshgrid(*(torch.arange(n) for n in (planes, c, cin, khw)), indexing="ij")
    at = (sp * cin + ci) * ld + q * c + ch  # im2col's fan-in order: k = (kh, kw, C_in)
    return template, at.reshape(-1).to(torch.int32)


def write_split(ws: list[torch.Tensor], like: tuple[int, int, int], zp: int, pools: dict | None = None):
    """`onednn.write_split` for these columns: per-call weights (one shape) split as an earlier call's were
    (`like` = (planes, digit bits, offset)) straight into copies of their columns' template, each an
    ExactWeights, or None where the split does not certify for that tensor. The buffers come from `pools`
    where given (`onednn.buffers`, `onednn.held`)."""
    from .intops import ExactWeights

    planes, bits, offset = like
    template, at = columns_layout(tuple(ws[0].shape), planes, offset != 0)
    slots = buffers(template, len(ws), pools)
    ptrs = [s[0].data_ptr() for s in slots]
    done = kernels.split_into(
        ws, planes, bits, digit_bits(), offset, U_BOUND, LIMIT_BITS, at, ptrs, rowsum=True
    )
    return held(
        slots,
        done,
        lambda buf, d: ExactWeights(
            buf, planes, bits, 1, len(d[1]), d[0], "int_mm", offset=offset, shift=(128 - zp) * d[1]
        ),
    )


def prepare(w: torch.Tensor, zp: int):
    """Weights [C, ...] (fan-in flattened in the order of `columns`: kh, kw, C_in) as int8 planes
    [K, outputs], certified for int32 accumulation, in an ExactWeights of kind "int_mm"; None where no split
    certifies."""
    from .intops import ExactWeights

    split = planes_with_offset(w, U_BOUND, 1, digit_bits(), LIMIT_BITS, columns=True)
    if split is None:
        return None
    columns, p, bits, bound, offset = split
    shift = (128 - zp) * w.reshape(w.shape[0], -1).to(torch.int64).sum(1)
    return ExactWeights(columns, p, bits, 1, w.shape[0], bound, kind="int_mm", offset=offset, shift=shift)


def _signed(x: torch.Tensor) -> torch.Tensor:
    """Float32 u8 codes as int8 u = x - 128."""
    return kernels.codes_u8(x, 128).view(torch.int8)


def columns(x: torch.Tensor, kernel_size, zp: int, stride, padding, dilation) -> tuple[torch.Tensor, tuple]:
    """im2col of float32 u8 codes [B, C, H, W] as int8 u = x - 128: rows (b, oh, ow), columns (kh, kw, c),
    the padding filled with zp's u; with the output size (oh, ow)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    b, c, h, w = x.shape
    u = _signed(x.permute(0, 2, 3, 1))  # NHWC: a view where `x` is channels-last
    if ph or pw:
        padded = torch.full((b, h + 2 * ph, w + 2 * pw, c), zp - 128, dtype=torch.int8)
        padded[:, ph : ph + h, pw : pw + w] = u
        u = padded
    oh = (u.shape[1] - dh * (kh - 1) - 1) // sh + 1
    ow = (u.shape[2] - dw * (kw - 1) - 1) // sw + 1
    s = u.stride()
    windows = u.as_strided((b, oh, ow, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]))
    return windows.reshape(b * oh * ow, kh * kw * c), (oh, ow)


def conv(x: torch.Tensor, ew, zp: int, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """The int32 kernel output of a conv (groups 1): [B, outputs, OH, OW], channels-last."""
    cols, (oh, ow) = columns(x, kernel_size, zp, stride, padding, dilation)
    return _gemm(cols, ew.weight).reshape(x.shape[0], oh, ow, -1).permute(0, 3, 1, 2)


def linear(x: torch.Tensor, ew) -> torch.Tensor:
    """The int32 kernel output of a linear layer: [..., outputs]."""
    rows = _signed(x.reshape(-1, x.shape[-1]))
    return _gemm(rows.contiguous(), ew.weight).reshape(*x.shape[:-1], -1)
