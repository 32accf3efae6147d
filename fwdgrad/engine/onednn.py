"""Exact u8 × s8 convolutions and GEMMs through oneDNN's int8 kernels (``torch.ops.onednn``).

With u8 activations (zero point zp), s8 weights, unit scales, weight zero point 0 and float32 output, the
kernels return Σ_k (x_k - zp)·w[c, k] exactly when the certificate holds:

* every int32 partial sum and the float32 result stay below 2^24: 255·Σ_k |w[c, k]| < 2^24 per plane;
* on CPUs without VNNI/AMX, pairs of u8·s8 products are summed in saturating int16 (``vpmaddubsw``), so
  255·(|w_k| + |w_k+1|) <= 32767 must hold for every pair: |w| <= 64 guarantees it whatever the pairing.

Weights therefore run as int8 digit planes of 7 bits (digits in [-64, 64): 8-bit weights take 2 planes,
16-bit ones 3), stacked as extra output channels of one call and recombined by the epilogue. The same bound
is used on VNNI/AMX CPUs (it is sufficient there too). A self-test at first use runs both limits (all-255
inputs against ±64 weights, zero points 0 and 255, fan-ins whose sums reach 2^24 - 1) against float64; if
torch lacks the ops, the C kernels are unavailable (they split the planes) or the self-test fails, layers
keep the float32 path. Which path a layer takes is decided per input shape by timing both
(`QWeighted.kernel_for`): they give the same integers.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from . import kernels

DIGIT_BITS = 7  # |d| <= 64: no int16 pair saturation on any x86 int8 path
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


def self_test() -> bool:
    """Both certificate limits at once, against float64: all-255 inputs, weights at ±64 in runs that put
    two equal signs side by side (the saturating pair sums) and a fan-in of 1028: 255·64·1028 = 2^24 - 256."""
    g = torch.Generator().manual_seed(0)
    for zp in (0, 255):
        x = torch.full((2, 1028, 3, 3), 255.0)
        x[1].random_(0, 256, generator=g)
        w = torch.full((4, 1028, 1, 1), 64, dtype=torch.int8)
        w[1] = -64
        w[2, ::2], w[2, 1::2] = 64, -64
        w[3].random_(-64, 65, generator=g)
        ref = F.conv2d(x.double() - zp, w.double())
        ew = prepare_conv(w, zp, 1, (1, 1), (0, 0), (1, 1))
        got = conv(x, ew, zp, (1, 1), (0, 0), (1, 1))
        if ew is None or not torch.equal(got.double(), ref):
            return False
        rows = x.permute(0, 2, 3, 1).reshape(-1, 1028)
        lw = prepare_linear(w.reshape(4, 1028), zp)
        if not torch.equal(linear(rows, lw, zp).double(), (rows.double() - zp) @ w.reshape(4, -1).double().T):
            return False
    return True


def _planes(w: torch.Tensor, groups: int):
    from .intops import ExactWeights

    split = kernels.digit_planes(w, X_MAX, groups, MAX_PLANES, DIGIT_BITS)
    if split is None or split[1] == 0:
        return None
    planes, p, bits, bound = split
    return planes, lambda packed: ExactWeights(
        packed, p, bits, groups, w.shape[0], bound, kind="onednn", conv_groups=groups
    )


def _unit(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64)


def prepare_conv(w: torch.Tensor, zp: int, groups: int, stride, padding, dilation):
    """Weights certified and packed for `conv`, or None when no split into at most MAX_PLANES planes
    certifies."""
    split = _planes(w, groups)
    if split is None:
        return None
    planes, make = split
    scales, _ = _unit(planes.shape[0])
    packed = _ops().qconv_prepack(
        planes, scales, 1.0, zp, list(stride), list(padding), list(dilation), groups
    )
    return make(packed)


def conv(x: torch.Tensor, ew, zp: int, stride, padding, dilation) -> torch.Tensor:
    """Σ (x - zp)·d over the planes of `ew` for float32 codes `x` in [0, 255]: float32, channels-last,
    planes stacked as output channels (see `intops.combine`)."""
    xu8 = x.to(torch.uint8).contiguous(memory_format=torch.channels_last)
    scales, zps = _unit(ew.planes * ew.channels)
    return _ops().qconv_pointwise(
        xu8, 1.0, zp, ew.weight, scales, zps, None, list(stride), list(padding), list(dilation), ew.groups,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def prepare_linear(w: torch.Tensor, zp: int):
    split = _planes(w, 1)
    if split is None:
        return None
    planes, make = split
    return make(_ops().qlinear_prepack(planes, None))


def linear(x: torch.Tensor, ew, zp: int) -> torch.Tensor:
    """(x - zp) @ planesᵀ for float32 codes `x` in [0, 255] (any leading dims): float32, planes stacked."""
    rows = x.reshape(-1, x.shape[-1]).to(torch.uint8)
    scales, zps = _unit(ew.planes * ew.channels)
    out = _ops().qlinear_pointwise(
        rows, 1.0, zp, ew.weight, scales, zps, None, 1.0, 0, torch.float32, "none", [], "none"
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])
