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

import ctypes
import functools
import math
import warnings
import weakref

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
    w: torch.Tensor,
    x_bound: int,
    groups: int,
    bits: int,
    limit_bits: int = 24,
    columns: bool = False,
    ones: bool = True,
):
    """`kernels.digit_planes` of `w` in int8 digits of `bits` bits, (planes, count, bits, bound, offset), or
    None. Where w - 2^(bits-1) takes fewer planes (16-bit weights up to 32767 in two 8-bit digits, groups
    1) those planes come with a ones output channel appended (offset 2^(bits-1), see `ExactWeights`; not
    with `ones` False: the caller appends it). With
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
    if offset and ones:
        stacked = _with_ones(stacked)
    return stacked, planes, bits, bound, offset


def _with_ones(planes: torch.Tensor) -> torch.Tensor:
    """The planes of an offset split with their ones output channel appended."""
    return torch.cat([planes, torch.ones((1, *planes.shape[1:]), dtype=planes.dtype)])


def _planes(w: torch.Tensor, groups: int, bits: int | None = None):
    """(int8 planes without the ones channel, offset, ExactWeights from the packed planes), or None."""
    from .intops import ExactWeights

    split = planes_with_offset(w, X_MAX, groups, bits or digit_bits(), ones=False)
    if split is None:
        return None
    planes, p, bits, bound, offset = split
    return (
        planes,
        offset,
        lambda packed: ExactWeights(
            packed, p, bits, groups, w.shape[0], bound, kind="onednn", conv_groups=groups, offset=offset
        ),
    )


def _unit(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(n, dtype=torch.float32), torch.zeros(n, dtype=torch.int64)


def _pack(planes: torch.Tensor, zp: int, conv: tuple | None, x_shape: tuple | None, ones: bool = False):
    """oneDNN's packing of int8 `planes` (with the ones output channel of an offset split appended where
    `ones`) for a conv (`conv` = (stride, padding, dilation, groups)) or, with conv None, a linear layer,
    for inputs of `x_shape` where given."""
    planes = _with_ones(planes) if ones else planes
    shape = None if x_shape is None else list(x_shape)
    if conv is None:
        return _ops().qlinear_prepack(planes, shape)
    stride, padding, dilation, groups = conv
    scales, _ = _unit(planes.shape[0])
    return _ops().qconv_prepack(
        planes, scales, 1.0, zp, list(stride), list(padding), list(dilation), groups, shape
    )


#: Per-call weights (a QZO-FF pass's) of at most this many int8 digits are packed by writing them into
#: oneDNN's layout (`packed_layout`): about 2x faster than packing (5x for the smallest layers), whose cost
#: at these sizes is mostly setup; the learnt layouts (a packed tensor and 4 bytes per weight) stay small.
LAYOUT_ELEMENTS = 2**20


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """A copy of a packed tensor's buffer, as int8."""
    n, ptr = torch.ops.mkldnn._nbytes(packed), torch.ops.mkldnn.data_ptr(packed)
    return torch.frombuffer((ctypes.c_int8 * n).from_address(ptr), dtype=torch.int8).clone()


@functools.lru_cache(maxsize=64)
def packed_layout(shape: tuple, ones: bool, zp: int, conv: tuple | None, x_shape: tuple):
    """Where oneDNN's packing (`_pack`) puts each int8 weight of planes of `shape`, with a ones output channel
    appended if `ones`: (the packing of zero planes with that ones channel, the int32 byte position of each
    plane weight in row-major order, the byte offset of the int32 zero-point compensation -Σ_k w[c, k] per
    output channel c, or -1 where the packing has none), or None where the buffer is anything else (other
    weight-derived bytes) or cannot be read. Learnt by packing one-weight tensors (where the compensation
    lies) and probes that hold 6-bit digits of each weight's index, plus 1 (padding reads 0), and confirmed
    by packing random planes with both extremes both ways: byte for byte equal buffers run the same
    integers."""
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is None or not hasattr(mkldnn, "data_ptr") or not hasattr(mkldnn, "_nbytes"):
        return None
    full = (shape[0] + ones, *shape[1:])
    n = math.prod(full)
    base = torch.zeros(shape, dtype=torch.int8)
    template = _pack(base, zp, conv, x_shape, ones)
    empty = _packed_bytes(template)
    comp = []
    for row in (0, shape[0] - 1):  # a 1 in a row: its byte, and -1 as int32 where the packing compensates
        unit = base.clone()
        unit[row].view(-1)[0] = 1
        changed = _packed_bytes(_pack(unit, zp, conv, x_shape, ones)) != empty
        changed = changed.nonzero().flatten()
        if len(changed) == 5:  # the weight and 4 bytes of -1 (the weight's byte may come first or last)
            runs = [changed[1:], changed[:4]]
            run = next((r for r in runs if torch.equal(r, torch.arange(int(r[0]), int(r[0]) + 4))), None)
            comp.append(None if run is None else int(run[0]) - 4 * row)
        else:
            comp.append(-1 if len(changed) == 1 else None)
    if comp[0] is None or comp[0] != comp[1]:
        return None
    comp = comp[0]
    index = torch.arange(n, dtype=torch.int64)
    source, filled = None, None
    for d in range(max(1, math.ceil(math.log2(max(n, 2)) / 6))):
        probe = (((index >> (6 * d)) & 63) + 1).to(torch.int8).reshape(full)
        got = _packed_bytes(_pack(probe, zp, conv, x_shape)).to(torch.int64)
        if comp >= 0:
            got[comp : comp + 4 * full[0]] = 0
        if filled is None:
            filled, source = got != 0, torch.zeros_like(got)
        elif not torch.equal(got != 0, filled):
            return None
        source += (got - 1).clamp_min(0) << (6 * d)
    source = source[filled]
    if source.numel() != n or not torch.equal(torch.sort(source).values, index):
        return None
    at = torch.empty(n, dtype=torch.int32)
    at[source] = filled.nonzero().flatten().to(torch.int32)
    at = at[: math.prod(shape)].clone()  # the planes' weights; the ones channel is in the template
    w = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    w.view(-1)[:2] = torch.tensor([-128, 127], dtype=torch.int8)
    official = _pack(w, zp, conv, x_shape, ones)
    if not torch.equal(_packed_bytes(_repack(w, template, at, comp)), _packed_bytes(official)):
        return None
    return template, at, comp


def _repack(planes: torch.Tensor, template: torch.Tensor, at: torch.Tensor, comp: int) -> torch.Tensor:
    packed = template.clone()
    kernels.scatter_i8(planes, at, torch.ops.mkldnn.data_ptr(packed), comp)
    return packed


def pack(planes: torch.Tensor, offset: int, zp: int, conv: tuple | None, x_shape, per_call: bool):
    """`_pack` of the planes of a split (with its ones channel where `offset`); for weights prepared per
    call (`per_call`, at most LAYOUT_ELEMENTS digits, for a known input shape) by writing them into the
    layout `packed_layout` learnt once for these arguments."""
    if per_call and x_shape is not None and planes.numel() <= LAYOUT_ELEMENTS:
        layout = packed_layout(tuple(planes.shape), offset != 0, zp, conv, tuple(x_shape))
        if layout is not None:
            return _repack(planes, *layout)
    return _pack(planes, zp, conv, x_shape, offset != 0)


#: Buffers a pool keeps (`buffers`) beyond those still held.
POOL_MAX = 64


def buffers(template: torch.Tensor, n: int, pools: dict | None) -> list[list]:
    """n buffers like `template` (a layout's zero weights) for splits written whole into it (each rewrites
    every byte a split writes; the rest stays the template's), as [buffer, holder] slots (`held` records
    the holder: a weak reference to the ExactWeights made of the buffer). With `pools` (id(template) ->
    (template, its slots), owned by the caller) the buffers whose holder is gone are reused, the rest are
    new copies added to the pool; without, all are new."""
    if pools is None:
        return [[template.clone(), None] for _ in range(n)]
    entry = pools.get(id(template))
    if entry is None or entry[0] is not template:
        entry = pools[id(template)] = (template, [])
    pool = entry[1]
    free = [slot for slot in pool if slot[1] is None or slot[1]() is None][:n]
    for slot in free:
        slot[1] = None
    new = [[template.clone(), None] for _ in range(n - len(free))]
    pool.extend(new)
    if len(pool) > POOL_MAX:  # the buffers still held are left to their holders
        pool[:] = free + new
    return free + new


def held(slots: list[list], done: list, make) -> list:
    """`make(buffer, split)` for each split written into a slot's buffer that certified (None for the
    others, whose buffers stay free), each recorded as its buffer's holder (`buffers`)."""
    made = []
    for slot, split in zip(slots, done):
        ew = None if split is None else make(slot[0], split)
        if ew is not None:
            slot[1] = weakref.ref(ew)
        made.append(ew)
    return made


def write_split(
    ws: list[torch.Tensor],
    like: tuple[int, int, int],
    zp: int,
    conv: tuple | None,
    x_shape,
    bits: int | None,
    pools: dict | None = None,
):
    """Per-call weights `ws` (one shape) split as an earlier call's were (`like` = (planes, digit bits,
    offset), one or two planes) and written straight into copies of the packed layout learnt for that split
    (`packed_layout`, `kernels.split_into`: one pass, no planes in between), each an ExactWeights, or None
    where that layout is unknown or the split does not certify for that tensor (the caller then splits and
    packs it as usual). The buffers come from `pools` where given (`buffers`)."""
    from .intops import ExactWeights

    planes, digit, offset = like
    groups = 1 if conv is None else conv[3]
    shape = (planes * ws[0].shape[0], *ws[0].shape[1:])
    layout = None
    if x_shape is not None and planes in (1, 2) and math.prod(shape) <= LAYOUT_ELEMENTS:
        layout = packed_layout(shape, offset != 0, zp, conv, tuple(x_shape))
    if layout is None:
        return [None] * len(ws)
    template, at, comp = layout
    slots = buffers(template, len(ws), pools)
    done = kernels.split_into(
        ws, planes, digit, bits or digit_bits(), offset, X_MAX, 24, at,
        [torch.ops.mkldnn.data_ptr(s[0]) for s in slots], comp, groups,
    )  # fmt: skip
    channels = ws[0].shape[0]
    return held(
        slots,
        done,
        lambda buf, d: ExactWeights(
            buf, planes, digit, groups, channels, d[0], "onednn", groups, offset=offset
        ),
    )


def prepare_conv(
    w: torch.Tensor,
    zp: int,
    groups: int,
    stride,
    padding,
    dilation,
    bits: int | None = None,
    x_shape=None,
    per_call: bool = False,
):
    """Weights certified and packed for `conv` (digits of `bits` bits, default `digit_bits()`), or None when
    no split into at most MAX_PLANES planes certifies. Packed for inputs of `x_shape` where given (half the
    packing time; inputs of any shape run on them alike); weights prepared per call (`per_call`) by copy
    into the packed layout (`pack`)."""
    split = _planes(w, groups, bits)
    if split is None:
        return None
    planes, offset, make = split
    conv = (tuple(stride), tuple(padding), tuple(dilation), groups)
    return make(pack(planes, offset, zp, conv, x_shape, per_call))


def conv(x: torch.Tensor, ew, zp: int, stride, padding, dilation) -> torch.Tensor:
    """Σ (x - zp)·d over the planes of `ew` for float32 codes `x` in [0, 255]: float32, channels-last,
    planes stacked as output channels (see `intops.combine`)."""
    xu8 = kernels.codes_u8(x).contiguous(memory_format=torch.channels_last)
    scales, zps = _unit(ew.outputs)
    return _ops().qconv_pointwise(
        xu8, 1.0, zp, ew.weight, scales, zps, None, list(stride), list(padding), list(dilation), ew.groups,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def prepare_linear(w: torch.Tensor, zp: int, bits: int | None = None, x_shape=None, per_call: bool = False):
    """`prepare_conv` for `linear` (`x_shape`: the rows it runs, [N, K])."""
    split = _planes(w, 1, bits)
    if split is None:
        return None
    planes, offset, make = split
    return make(pack(planes, offset, zp, None, x_shape, per_call))


def linear(x: torch.Tensor, ew, zp: int) -> torch.Tensor:
    """(x - zp) @ planesᵀ for float32 codes `x` in [0, 255] (any leading dims): float32, planes stacked."""
    rows = kernels.codes_u8(x.reshape(-1, x.shape[-1]))
    scales, zps = _unit(ew.outputs)
    out = _ops().qlinear_pointwise(
        rows, 1.0, zp, ew.weight, scales, zps, None, 1.0, 0, torch.float32, "none", [], "none"
    )
    return out.reshape(*x.shape[:-1], out.shape[-1])
