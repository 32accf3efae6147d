"""Exact u8 × s8 convolutions and GEMMs through oneDNN's int8 kernels (``torch.ops.onednn``).

With u8 activations (zero point zp), s8 weights, unit scales, weight zero point 0 and float32 output, the
kernels return Σ_k (x_k - zp)·w[c, k] exactly when the certificate holds:

* every int32 partial sum and the float32 result stay below 2^24: 255·Σ_k |w[c, k]| < 2^24 per plane;
* on CPUs without VNNI/AMX, pairs of u8·s8 products are summed in saturating int16 (``vpmaddubsw``), so
  255·(|w_k| + |w_k+1|) <= 32767 must hold for every pair: |w| <= 64 guarantees it whatever the pairing.

Weights therefore run as int8 digit planes of 7 bits (digits in [-64, 64): 8-bit weights take 2 planes,
16-bit ones 3), stacked as extra output channels of one call and recombined by the epilogue. CPUs with VNNI
(``vpdpbusd``) or AMX accumulate u8·s8 products in int32 without the int16 stage, so there full 8-bit digits
([-128, 128): 8-bit weights in 1 plane, 16-bit ones in 2, as w - 128 plus a ones channel where a weight is
above 32639: `planes_with_offset`) are exact under the 2^24 bound alone (`digit_bits`). A self-test at first
use runs the limits (all-255 inputs against weights at the digit extremes side by side, zero points 0 and
255, fan-ins whose sums reach 2^24 - 1) against float64: the 7-bit one decides whether the ops are usable at
all, the 8-bit one (also through 3x3, strided, padded, grouped, depthwise and dilated convolutions and batch
sizes 1 and 8, where oneDNN may dispatch other kernels) whether the wide digits are. If torch lacks the ops,
the C kernels are unavailable (they split the planes) or the 7-bit self-test fails, layers keep the float32
path. Which path a layer takes is decided per input shape by timing both (`QWeighted.kernel_for`): they give
the same integers.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from . import kernels

DIGIT_BITS = 7  # |d| <= 64: no int16 pair saturation on any x86 int8 path
WIDE_DIGIT_BITS = 8  # |d| <= 128: exact where products accumulate in int32 directly (VNNI, AMX)
MAX_PLANES = 4
X_MAX = 255  # u8 inputs, whatever the zero point


def _ops():
    return getattr(torch.ops, "onednn", None)


def supports(in_fmt) -> bool:
    """Inputs in an unsigned format of at most 8 bits (u8 codes) are what the kernels take."""
    return not in_fmt.signed and in_fmt.bits <= 8


@functools.cache
def available() -> bool:
    """oneDNN's int8 ops are present, the C kernels are built and the self-test passes on this CPU."""
    ops = _ops()
    if ops is None or not hasattr(ops, "qconv_pointwise") or not torch.backends.mkldnn.is_available():
        return False
    if kernels.library() is None:
        return False
    try:
        ok = self_test()
    except RuntimeError as e:  # an op missing from this build
        warnings.warn(
            f"fwdgrad: oneDNN int8 kernels unusable ({e}); layers use the float32 path", stacklevel=2
        )
        return False
    if not ok:
        warnings.warn("fwdgrad: oneDNN int8 kernels failed the exactness self-test on this CPU; layers use "
                      "the float32 path", stacklevel=2)  # fmt: skip
    return ok


@functools.cache
def digit_bits() -> int:
    """The digit width of the planes on this CPU: WIDE_DIGIT_BITS where its self-test passes, else
    DIGIT_BITS."""
    try:
        return WIDE_DIGIT_BITS if available() and self_test(WIDE_DIGIT_BITS) else DIGIT_BITS
    except RuntimeError:  # an op variant missing from this build: keep the narrow digits
        return DIGIT_BITS


def _weights(shape, hi: int, g: torch.Generator) -> torch.Tensor:
    """Test weights at the digit extremes: all +hi, all -(hi + 1) (the most negative digit), alternating,
    and random in the digit range, as the first four output channels (repeated)."""
    w = torch.empty(shape, dtype=torch.int8)
    flat = w.view(shape[0], -1)
    for c in range(shape[0]):
        row = flat[c]
        if c % 4 == 0:
            row.fill_(hi)
        elif c % 4 == 1:
            row.fill_(-hi - 1)
        elif c % 4 == 2:
            row[::2], row[1::2] = hi, -hi - 1
        else:
            row.random_(-hi - 1, hi + 1, generator=g)
    return w


def self_test(bits: int = DIGIT_BITS) -> bool:
    """The certificate's limits for digits of `bits` bits, against float64: all-255 inputs (and random
    ones), weights at the digit extremes with equal signs side by side (the saturating pair sums of CPUs
    without VNNI) and a fan-in that brings 255·2^(bits-1)·n to 2^24 - 256, through a 1x1 conv and a GEMM;
    for wide digits also through 3x3 / strided / padded / dilated / grouped / depthwise convs at batch 1
    and 8, where oneDNN may pick other kernels."""
    g = torch.Generator().manual_seed(0)
    hi = 2 ** (bits - 1) - 1
    n = (2**24 - 256) // (X_MAX * (hi + 1))
    # (batch, in channels, H, W), weight (out, in/groups, kh, kw), groups, stride, padding, dilation
    cases = [((2, n, 3, 3), (4, n, 1, 1), 1, (1, 1), (0, 0), (1, 1))]
    if bits > DIGIT_BITS:
        c3 = n // 9
        cases += [
            ((8, c3, 9, 9), (8, c3, 3, 3), 1, (2, 2), (1, 1), (1, 1)),
            ((1, c3, 7, 7), (8, c3, 3, 3), 1, (1, 1), (1, 1), (1, 1)),
            ((8, 16, 8, 8), (16, 1, 3, 3), 16, (1, 1), (1, 1), (1, 1)),
            ((8, 32, 8, 8), (32, 8, 3, 3), 4, (2, 2), (1, 1), (1, 1)),
            ((1, 24, 9, 9), (8, 24, 3, 3), 1, (1, 1), (2, 2), (2, 2)),
        ]
    for zp in (0, 255):
        for xs, ws, groups, stride, padding, dilation in cases:
            x = torch.full(xs, 255.0)
            x[: xs[0] // 2].random_(0, 256, generator=g)
            w = _weights(ws, hi, g)
            ref = F.conv2d(x.double() - zp, w.double(), None, stride, padding, dilation, groups)
            ew = prepare_conv(w, zp, groups, stride, padding, dilation, bits, x_shape=xs)
            if ew is None or not torch.equal(conv(x, ew, zp, stride, padding, dilation).double(), ref):
                return False
        rows = torch.full((8, n), 255.0)
        rows[:4].random_(0, 256, generator=g)
        w = _weights((4, n), hi, g)
        lw = prepare_linear(w, zp, bits, x_shape=rows.shape)
        if lw is None or not torch.equal(linear(rows, lw, zp).double(), (rows.double() - zp) @ w.double().T):
            return False
    return True


def planes_with_offset(
    w: torch.Tensor, x_bound: int, groups: int, bits: int, limit_bits: int = 24, columns: bool = False
):
    """`kernels.digit_planes` of `w` in int8 digits of `bits` bits, (planes, count, bits, bound, offset), or
    None. Where w - 2^(bits-1) takes fewer planes (16-bit weights up to 32767 in two 8-bit digits, groups
    1) those planes come with a ones output channel appended (offset 2^(bits-1), see `ExactWeights`). With
    `columns` (groups 1), the planes as a GEMM's columns (`kernels.digit_columns`). Both splits are planned,
    only the one taken is made."""
    fan_in = w[0].numel() if w.dim() > 1 else 1
    alt, offset = None, 1 << (bits - 1)
    if groups == 1 and w.dtype == torch.int16 and x_bound * fan_in < 2**limit_bits:
        # 16-bit weights: the offset split first, the plain one only where it needs no more planes
        alt = kernels.plan_planes(w, x_bound, MAX_PLANES, bits, offset=offset, limit_bits=limit_bits)
    most = alt[0] if alt and alt[0] else MAX_PLANES
    plan = kernels.plan_planes(w, x_bound, most, bits, limit_bits=limit_bits)
    if plan is not None and plan[0]:
        offset = 0
    elif alt and alt[0]:
        plan = alt
    else:
        return None
    planes, bits, bound = plan
    if columns:
        return kernels.digit_columns(w, planes, bits, offset), planes, bits, bound, offset
    stacked = kernels.fill_planes(w, planes, bits, torch.int8, groups, offset=offset)
    if offset:
        stacked = torch.cat([stacked, torch.ones((1, *stacked.shape[1:]), dtype=stacked.dtype)])
    return stacked, planes, bits, bound, offset


def _planes(w: torch.Tensor, groups: int, bits: int | None = None):
    from .intops import ExactWeights

    split = planes_with_offset(w, X_MAX, groups, bits or digit_bits())
    if split is None:
        return None
    planes, p, bits, bound, offset = split
    return planes, lambda packed: ExactWeights(
        packed, p, bits, groups, w.shape[0], bound, kind="onednn", conv_groups=groups, offset=offset
    )


def _unit(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64)


def prepare_conv(
    w: torch.Tensor, zp: int, groups: int, stride, padding, dilation, bits: int | None = None, x_shape=None
):
    """Weights certified and packed for `conv` (digits of `bits` bits, default `digit_bits()`), or None when
    no split into at most MAX_PLANES planes certifies. Packed for inputs of `x_shape` where given (half the
    packing time; inputs of any shape run on them alike)."""
    split = _planes(w, groups, bits)
    if split is None:
        return None
    planes, make = split
    scales, _ = _unit(planes.shape[0])
    shape = None if x_shape is None else list(x_shape)
    packed = _ops().qconv_prepack(
        planes, scales, 1.0, zp, list(stride), list(padding), list(dilation), groups, shape
    )
    return make(packed)


def conv(x: torch.Tensor, ew, zp: int, stride, padding, dilation) -> torch.Tensor:
    """Σ (x - zp)·d over the planes of `ew` for float32 codes `x` in [0, 255]: float32, channels-last,
    planes stacked as output channels (see `intops.combine`)."""
    xu8 = kernels.codes_u8(x).contiguous(memory_format=torch.channels_last)
    scales, zps = _unit(ew.outputs)
    return _ops().qconv_pointwise(
        xu8, 1.0, zp, ew.weight, scales, zps, None, list(stride), list(padding), list(dilation), ew.groups,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def prepare_linear(w: torch.Tensor, zp: int, bits: int | None = None, x_shape=None):
    """`prepare_conv` for `linear` (`x_shape`: the rows it runs, [N, K])."""
    split = _planes(w, 1, bits)
    if split is None:
        return None
    planes, make = split
    return make(_ops().qlinear_prepack(planes, None if x_shape is None else list(x_shape)))


def linear(x: torch.Tensor, ew, zp: int) -> torch.Tensor:
    """(x - zp) @ planesᵀ for float32 codes `x` in [0, 255] (any leading dims): float32, planes stacked."""
    rows = kernels.codes_u8(x.reshape(-1, x.shape[-1]))
    scales, zps = _unit(ew.outputs)
    out = _ops().qlinear_pointwise(
        rows, 1.0, zp, ew.weight, scales, zps, None, 1.0, 0, torch.float32, "none", [], "none"
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])
