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

from . import kernels

F32_EXACT = 2**24
F64_EXACT = 2**53
MAX_PLANES = 4
FEW_PLANES = 2  # beyond this many planes of the whole fan-in, try fan-in chunks (`_chunked`)


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


@dataclass(frozen=True)
class ExactWeights:
    """Integer weights prepared once for a certified float kernel (per weight version, see
    `QWeighted.exact_weights`).

    `weight` holds the digit planes stacked as extra output channels, [groups][planes][C/groups] along
    dim 0 (`groups` is the layout of the stacked kernel output the epilogue reads), or the float64
    weights when more than MAX_PLANES planes would be needed (`planes == 0`). The float32 path stacks
    planes first (`groups` 1) and runs a grouped conv (`conv_groups` > 1) once per plane: a depthwise conv
    with a channel multiplier of 2 is 6x slower in oneDNN than two plain ones. `bound` is the certified max
    |Σ x·w| of any output: x_bound · max_c Σ_k |w[c, k]|. With a nonzero `offset` the planes hold w - offset
    and one more output channel of ones follows them (groups 1), Σ_k (x_k - zp), which the epilogue adds
    `offset` times; `shift` is a per-channel int64 term of the accumulator a kernel leaves out (`intmm`).
    """

    weight: torch.Tensor
    planes: int
    digit_bits: int
    groups: int
    channels: int
    bound: int
    kind: str = "float"  # "float": float32 planes / float64; "onednn": packed int8 planes (`onednn`);
    # "int16": int16 weights packed for the int32 GEMM (`kernels.gemm_s16`); "int_mm": int8 planes
    # [K, outputs] for `torch._int_mm` (`intmm`)
    conv_groups: int = 1  # the layer's own groups
    chunks: int = 1  # fan-in chunks, each certified and summed on its own (see `prepare`)
    offset: int = 0
    shift: torch.Tensor | None = None

    @property
    def outputs(self) -> int:
        """Output channels of the stacked kernel: the planes' and the ones channel."""
        return self.planes * self.channels + (self.offset != 0)

    @property
    def kernel(self) -> str:
        """The kernel's name as `QModel.describe()` shows it."""
        if self.kind == "int16":
            return "int16 x int16 GEMM, int32 accumulators"
        if self.planes == 0:
            return "float64"
        names = {"onednn": "oneDNN u8 x s8", "int_mm": "int8 x int8 GEMM (_int_mm, im2col)"}
        name = names.get(self.kind, "float32")
        name = name if self.planes == 1 else f"{name} x{self.planes} planes of {self.digit_bits} bits"
        name = name if not self.offset else f"{name} + ones channel"
        return name if self.chunks == 1 else f"{name}, fan-in in {self.chunks} chunks"


def digit_planes(w: torch.Tensor, x_bound: int) -> tuple[list[torch.Tensor], int] | None:
    """Split integer weights (any int dtype) into certified signed digit planes.

    Returns (planes as int64 tensors, digit bits b) with w = Σ_p planes[p] · 2^(b·p), every plane
    satisfying x_bound · max_c Σ|plane[c]| < 2^24; or None if more than MAX_PLANES would be needed.
    """
    w64 = w.to(torch.int64)
    flat = w64.reshape(w64.shape[0], -1).abs()
    if x_bound * int(flat.sum(1).max()) < F32_EXACT:
        return [w64], 0
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
            return planes, b
    return None


def prepare(w: torch.Tensor, x_bound: int, groups: int = 1, chunk: bool = True) -> ExactWeights:
    """Certify integer weights `w` (out channels first) for inputs with |x| <= x_bound: float32 digit
    planes where each plane's sums stay below 2^24 (with `chunk`, of fan-in chunks when the whole fan-in
    needs more than FEW_PLANES planes), else float64 (exact below 2^53, else OverflowError)."""
    cout = w.shape[0]
    native = kernels.digit_planes(w, x_bound, 1, MAX_PLANES) if kernels.library() and w.numel() else None
    if native is not None:
        stacked, planes, bits, bound = native
        if chunk and (planes == 0 or planes > FEW_PLANES) and groups == 1:
            chunked = _chunked(w, x_bound)
            if chunked is not None:
                return chunked
    else:
        bound = x_bound * int(w.to(torch.int64).reshape(cout, -1).abs().sum(1).max()) if w.numel() else 0
        split = digit_planes(w, x_bound)
        planes, bits = (len(split[0]), split[1]) if split is not None else (0, 0)
        stacked = torch.cat(split[0], 0).to(torch.float32).contiguous() if split is not None else None
    if planes == 0:
        if bound >= F64_EXACT:
            raise OverflowError(f"dot products up to {bound} exceed exact float64 range 2^53")
        return ExactWeights(w.to(torch.float64), 0, 0, 1, cout, bound, conv_groups=groups)
    return ExactWeights(stacked, planes, bits, 1, cout, bound, conv_groups=groups)


def _chunked(w: torch.Tensor, x_bound: int) -> ExactWeights | None:
    """Long fan-ins (ResNet-18's 3x3x512) need 3-4 planes of the whole sum, but only 1-2 of a part of it:
    cut the input channels into 2^i chunks, each certified on its own (the kernel runs them as a conv
    grouped by chunk, the same multiply-adds as one plane), the epilogue sums them. The fewest chunks that
    get to FEW_PLANES planes, or None."""
    cin = w.shape[1] if w.dim() > 1 else 1
    for chunks in (2, 4, 8, 16):
        if cin % chunks:
            break
        stacked, planes, bits, bound = kernels.digit_planes(w, x_bound, 1, FEW_PLANES, chunks=chunks)
        if planes:
            return ExactWeights(stacked, planes, bits, 1, w.shape[0], bound, chunks=chunks)
    return None


def combine(out: torch.Tensor, ew: ExactWeights, dim: int) -> torch.Tensor:
    """Recombine a kernel output with the planes of `ew` stacked along `dim` into one exact float64
    accumulator (the torch path; the C epilogue does the same in its single pass)."""
    if ew.planes <= 1 and ew.chunks == 1:
        return out.double()
    dim = dim % out.dim()
    g, p, cg = ew.groups * ew.chunks, max(ew.planes, 1), ew.channels // ew.groups
    parts = out.unflatten(dim, (g, p, cg)).double()
    acc = parts.select(dim + 1, 0).clone()
    for i in range(1, p):
        acc.add_(parts.select(dim + 1, i), alpha=float(1 << (ew.digit_bits * i)))
    if ew.chunks > 1:  # [chunks][C]: sum the chunks
        return acc.sum(dim)
    return acc.flatten(dim, dim + 1)


def exact_conv2d(x: torch.Tensor, ew: ExactWeights, stride, padding, dilation) -> torch.Tensor:
    """Σ x·w of integer-valued float32 `x` (zero point removed) with the prepared weights: the raw kernel
    output (planes stacked, see `combine`), float32 or float64 holding exact integers. The input goes
    channels-last (NHWC), the layout in which oneDNN's float convolutions run fastest here (0.6-0.85x the
    time of NCHW at ResNet-8's shapes); the output keeps it."""
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if ew.planes == 0:
        return F.conv2d(x.double(), ew.weight, None, stride, padding, dilation, ew.conv_groups)
    if ew.chunks > 1:  # a conv grouped by fan-in chunk
        return F.conv2d(x, ew.weight, None, stride, padding, dilation, ew.chunks)
    if ew.planes > 1 and ew.conv_groups > 1:  # one grouped conv per plane (see ExactWeights)
        conv = [
            F.conv2d(x, w, None, stride, padding, dilation, ew.conv_groups)
            for w in ew.weight.chunk(ew.planes)
        ]
        return torch.cat(conv, 1)
    return F.conv2d(x, ew.weight, None, stride, padding, dilation, ew.conv_groups)


def exact_linear(x: torch.Tensor, ew: ExactWeights) -> torch.Tensor:
    """x @ w.T of integer-valued float32 `x` (zero point removed) with the prepared weights (raw, as
    `exact_conv2d`)."""
    if ew.chunks > 1:  # the fan-in chunks as a grouped 1x1 conv over rows
        rows = x.reshape(-1, x.shape[-1], 1, 1)
        out = F.conv2d(rows, ew.weight.reshape(*ew.weight.shape, 1, 1), groups=ew.chunks)
        return out.reshape(*x.shape[:-1], out.shape[1])
    return F.linear(x.double() if ew.planes == 0 else x, ew.weight)


def accumulate(
    acc: torch.Tensor, spec: AccumulatorSpec, bound: int | None = None
) -> tuple[torch.Tensor, int, int]:
    """Fit an exact accumulator (float64 or int64 integers) into spec.bits. `bound`, when given, is a
    certified bound on |acc|: if it fits, nothing is scanned (no host synchronization).

    Returns (values, number of overflowing entries, largest |value| after fitting)."""
    lo, hi = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
    if bound is not None and bound <= hi:
        return acc, 0, bound
    mn, mx = (int(v) for v in torch.aminmax(acc))
    if mn >= lo and mx <= hi:
        return acc, 0, max(-mn, mx)
    bad = int(((acc < lo) | (acc > hi)).sum())
    if spec.overflow == "wrap":
        wrapped = torch.remainder(acc.to(torch.int64) - lo, 1 << spec.bits) + lo
        return wrapped.to(acc.dtype), bad, max(-lo, hi)
    return acc.clamp(lo, hi), bad, max(-lo, hi)
