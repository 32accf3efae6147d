"""The fused C epilogues (`kernels.c`), with the torch path as the fallback.

The exact integer forward is a certified float kernel (convolution / GEMM, see `intops`) followed by
elementwise integer work: recombining digit planes, adding the bias, fitting the accumulator, requantizing,
clamping. In eager torch that is five to ten passes over float64/int64 tensors, which cost more than the
convolution itself; `kernels.c` does it in one pass with exactly the integers of the int64 reference.
Built and loaded by `fwdgrad.native` (``FWDGRAD_KERNELS=0`` or no C compiler: the torch path).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("kernels.c")

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float
_EPILOGUE = (
    _I64,
    [_P, _P, _I64, _INT, _INT, _INT, _I64, _INT, _P, _P, _P, _P, _P, _F32, _I64, _I64, _I64, _INT]
    + [_INT, _INT, _INT, _INT],
)
_EPILOGUE_CL = (
    _I64,
    [_P, _P, _I64, _INT, _INT, _INT, _INT]
    + [_P] * 9
    + [_F32, _I64, _I64, _I64]
    + [_INT] * 5
    + [_I64]
    + [_INT, _INT, _INT],
)
SIGNATURES = {
    "fw_epilogue_f32": _EPILOGUE,
    "fw_epilogue_f64": _EPILOGUE,
    "fw_epilogue_i32": _EPILOGUE,
    "fw_epilogue_cl_f32": _EPILOGUE_CL,
    "fw_epilogue_cl_f64": _EPILOGUE_CL,
    "fw_epilogue_cl_i32": _EPILOGUE_CL,
    "fw_rescale_sum": (None, [_P, _INT, _P, _P, _INT, _I64, _I64, _I64, _P, _I64, _I64] + [_INT] * 4),
    "fw_quantize": (None, [_P, _P, _I64, ctypes.c_double, _I64, _I64, _I64, _INT]),
    "fw_fake_quant": (None, [_P, _P, _I64, _F32, _F32, _F32, _F32, _INT]),
    "fw_codes_u8": (None, [_P, _P, _I64, _INT, _INT]),
    "fw_update": (_I64, [_P, _INT, _I64, _I64, _INT, _P, _P, _I64, _P, _P, _INT, _P, _I64, _I64]),
    "fw_plan_planes": (_INT, [_P, _INT, _I64, _I64, _INT, _I64, _INT, _INT, _I64, _INT, _P, _P]),
    "fw_fill_planes": (None, [_P, _INT, _I64, _I64, _INT, _INT, _INT, _INT, _I64, _P, _INT]),
    "fw_fill_columns": (None, [_P, _INT, _I64, _I64, _I64, _INT, _INT, _I64, _INT, _P]),
    "fw_ln_normalize": (None, [_P, _P, _I64, _INT, _I64, _INT, _I64, _P, _INT]),
    "fw_softmax": (None, [_P, _P, _I64, _INT, _P, _I64, _I64, _INT]),
    "fw_lut": (None, [_P, _P, _I64, _P, _I64, _INT]),
    "fw_pack_s16": (None, [_P, _INT, _I64, _I64, _P]),
    "fw_gemm_s16": (None, [_P, _I64, _I64, _I64, _I64, _P, _I64, _P, _INT]),
    "fw_perturb": (
        None,
        [_P, _INT, _I64, _I64, _I64, _INT, _P, _P, _P, _I64, _INT, _INT, _P, _I64, _I64, _P, _P],
    ),
    "fw_dequantize": (None, [_P, _INT, _I64, _I64, _P, _P]),
    "fw_scatter_i8": (None, [_P, _P, _P, _I64, _I64, _I64]),
    "fw_split_into": (
        None,
        [_P, _INT, _INT, _I64, _I64, _INT, _INT, _INT, _I64, _I64, _INT, _INT, _P, _P, _I64, _P, _P],
    ),
}
_INT_BYTES = {torch.int8: 1, torch.int16: 2, torch.int32: 4}
ROUNDING_CODES = {"nearest": 0, "floor": 1, "stochastic": 2}
MAX_TERMS = 16


def library() -> ctypes.CDLL | None:
    """The loaded epilogues, or None (the torch path)."""
    return native.load(SOURCE, SIGNATURES)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _ptrs(ts: list[torch.Tensor]):
    """The data pointers of `ts` as a C array (void *[])."""
    return (ctypes.c_void_p * max(1, len(ts)))(*[t.data_ptr() for t in ts])


def epilogue(
    raw: torch.Tensor,
    channel_dim: int,
    stack: tuple[int, int, int, int, int],
    consts,
    bias: torch.Tensor | None,
    acc_bits: int,
    wrap: bool,
    mode: str,
    offset: int = 0,
    shift: torch.Tensor | None = None,
    out_u8: bool = False,
    fits: bool = False,
) -> tuple[torch.Tensor, int]:
    """One pass from a raw kernel output (float32 / float64, or an int32 GEMM's) to output codes
    (float32, or with `out_u8` torch.uint8 for an unsigned format of at most 8 bits): planes recombined,
    bias added, accumulator fitted to `acc_bits`, requantized with `mode`, zero point added, clamped.

    stack = (groups, planes, channels, digit_bits, chunks): along `channel_dim`, `raw` holds
    [groups][planes][channels/groups], or with fan-in chunks (groups 1) [chunks][planes][channels], summed
    (see `intops.prepare`). With a nonzero `offset` (channels-last, groups 1, no chunks) the planes hold
    w - offset and each row ends in one more channel, Σ_k (x_k - zp) of a ones channel, added `offset`
    times. Channels-first (NCHW) and channels-last layouts are both read in place; the output keeps the
    layout. `consts` is a `Requantizer` (its `c_*` arrays, zp, lo, hi); `bias` is per channel: int64 added
    to the accumulator, or with mode "float" float32 added after scaling; `shift` (int64 per channel, any
    mode) is a kernel's own term of the exact accumulator. `fits`: the caller has proved that no accumulator
    can misfit `acc_bits` (then, channels-last, a one-plane output with requant "float" and no integer term
    is finished straight from the kernel's values, without the float64 pass). Returns (codes, number of
    accumulator misfits)."""
    lib = library()
    ibias, fbias = (None, bias) if mode == "float" else (bias, None)
    if shift is not None:
        ibias = shift if ibias is None else ibias + shift
    groups, planes, channels, bits, chunks = stack
    planes = max(planes, 1)
    shape = list(raw.shape)
    shape[channel_dim] = channels
    last = channel_dim in (-1, raw.dim() - 1)
    if not last and raw.dim() == 4 and (chunks > 1 or offset or not raw.is_contiguous()):
        last = raw.is_contiguous(memory_format=torch.channels_last)  # chunks, offset: channels-last only
        if (chunks > 1 or offset) and not last:
            raw = raw.contiguous(memory_format=torch.channels_last)
            last = True
    threads, dtype = torch.get_num_threads(), torch.uint8 if out_u8 else torch.float32
    if last:
        rows = raw.numel() // (chunks * planes * channels + (offset != 0))
        f64_single = mode == "single" and consts.f64_exact(acc_bits)
        if channel_dim in (-1, raw.dim() - 1):
            raw, out = raw.contiguous(), torch.empty(shape, dtype=dtype)
        else:
            out = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
        fn = {torch.float64: lib.fw_epilogue_cl_f64, torch.int32: lib.fw_epilogue_cl_i32}.get(
            raw.dtype, lib.fw_epilogue_cl_f32
        )
        bad = fn(
            raw.data_ptr(), out.data_ptr(), rows, groups, planes, channels, bits,
            _ptr(ibias), consts.c_mult.data_ptr(), consts.c_n.data_ptr(), consts.c_mhi.data_ptr(),
            consts.c_mlo.data_ptr(), consts.c_half.data_ptr(), consts.c_inv.data_ptr(),
            consts.c_fscale.data_ptr(), _ptr(fbias), consts.c_fout, consts.zp, consts.lo, consts.hi,
            acc_bits, int(wrap), REQUANT_CODES[mode], int(f64_single), chunks, offset, int(out_u8), int(fits),
            threads,
        )  # fmt: skip
        return out, bad
    raw = raw.contiguous()
    out = torch.empty(shape, dtype=dtype)
    outer, inner = raw.shape[0], raw[0, 0].numel() if raw.dim() > 2 else 1
    fn = {torch.float64: lib.fw_epilogue_f64, torch.int32: lib.fw_epilogue_i32}.get(
        raw.dtype, lib.fw_epilogue_f32
    )
    bad = fn(
        raw.data_ptr(), out.data_ptr(), outer, groups, planes, channels, inner, bits,
        _ptr(ibias), consts.c_mult.data_ptr(), consts.c_n.data_ptr(), consts.c_fscale.data_ptr(),
        _ptr(fbias), consts.c_fout, consts.zp, consts.lo, consts.hi, acc_bits, int(wrap),
        REQUANT_CODES[mode], int(out_u8), threads,
    )  # fmt: skip
    return out, bad


REQUANT_CODES = {"single": 0, "gemmlowp": 1, "float": 2}


def rescale_sum(
    xs: list[torch.Tensor],
    zps,
    mults,
    x_bound: int,
    shift: int,
    zp_out: int,
    lo: int,
    hi: int,
    out_u8: bool = False,
) -> torch.Tensor:
    """sat(((Σ_i (x_i - zp_i)·M_i) + 2^(S-1)) >> S) + zp_out) over codes broadcast together, each
    |x_i - zp_i| <= x_bound: float32 codes, or all torch.uint8; the output float32 codes, or with `out_u8`
    bytes (lo >= 0, hi <= 255). Two inputs where one broadcasts over leading dims only (a ViT's position
    embedding) are read as they are, the smaller one repeating; other broadcasts are expanded first."""
    in_u8 = all(x.dtype == torch.uint8 for x in xs)
    if not in_u8:  # mixed storage: float32 codes throughout
        xs = [x.float() for x in xs]
    same = all(x.shape == xs[0].shape for x in xs)
    shape = xs[0].shape if same else torch.broadcast_shapes(*(x.shape for x in xs))
    # every partial sum an integer below 2^52: float64 is exact (in any order of the terms)
    exact_f64 = len(xs) * x_bound * max(abs(v) for v in mults) + (1 << shift) < 2**52
    period = math.prod(shape)
    if len(xs) == 2 and exact_f64 and xs[0].shape != shape and xs[1].shape == shape:
        xs, zps, mults = xs[::-1], zps[::-1], mults[::-1]  # the repeating input goes second
    if len(xs) == 2 and exact_f64 and not same and xs[0].shape == shape and _repeats(xs[1].shape, shape):
        xs, period = [xs[0].contiguous(), xs[1].contiguous()], xs[1].numel()
    else:
        xs = _same_dense_layout([x if x.shape == shape else x.expand(shape).contiguous() for x in xs])
    out = torch.empty_like(xs[0], dtype=torch.uint8 if out_u8 else torch.float32)
    ptrs = _ptrs(xs)
    z = torch.tensor(zps, dtype=torch.int64)
    m = torch.tensor(mults, dtype=torch.int64)
    library().fw_rescale_sum(
        ptrs, len(xs), z.data_ptr(), m.data_ptr(), shift, zp_out, lo, hi, out.data_ptr(), out.numel(), period,
        int(exact_f64), int(in_u8), int(out_u8), torch.get_num_threads(),
    )  # fmt: skip
    return out


def _repeats(dims, shape) -> bool:
    """A tensor of `dims` broadcast to `shape` only over leading dims: its elements repeat in order."""
    dims = (1,) * (len(shape) - len(dims)) + tuple(dims)
    first = next((i for i, d in enumerate(dims) if d != 1), len(dims))
    return dims[first:] == tuple(shape[first:])


def ln_normalize(
    x: torch.Tensor, zp: int, frac: int, v_eps: int, gamma: torch.Tensor | None = None
) -> torch.Tensor:
    """LayerNorm's integer x̂ over the last axis of float32 codes (`QLayerNorm.normalized`), float64; times
    the float64 integers `gamma` (one per channel) where given, when every γ·x̂ is below 2^53."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.float64)
    dim = x.shape[-1]
    threads = torch.get_num_threads()
    library().fw_ln_normalize(
        x.data_ptr(), out.data_ptr(), x.numel() // dim, dim, zp, frac, v_eps, _ptr(gamma), threads
    )
    return out


def softmax(x: torch.Tensor, table: torch.Tensor, levels: int) -> torch.Tensor:
    """The integer softmax over the last axis of float32 codes (`QSoftmax`)."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    library().fw_softmax(
        x.data_ptr(), out.data_ptr(), x.numel() // n, n, table.data_ptr(), len(table), levels,
        torch.get_num_threads(),
    )  # fmt: skip
    return out


def lut(x: torch.Tensor, table: torch.Tensor, qmin: int) -> torch.Tensor:
    """table[x − qmin] of float32 codes (float32 `table`)."""
    (x,) = _same_dense_layout([x])
    out = torch.empty_like(x)
    library().fw_lut(x.data_ptr(), out.data_ptr(), x.numel(), table.data_ptr(), qmin, torch.get_num_threads())
    return out


def quantize(x: torch.Tensor, scale: float, zp: int, qmin: int, qmax: int) -> torch.Tensor:
    """`fwdgrad.quant.quantize` of float32 `x` for a per-tensor format rounding half to even with
    saturation (the same float64 division and rounding), as float32 codes."""
    x = x.contiguous()
    out = torch.empty_like(x)
    library().fw_quantize(
        x.data_ptr(), out.data_ptr(), x.numel(), scale, zp, qmin, qmax, torch.get_num_threads()
    )
    return out


def codes_u8(x: torch.Tensor, flip: int = 0) -> torch.Tensor:
    """float32 u8 codes (integers in [0, 255]) as torch.uint8 in `x`'s dense layout (NCHW or channels-last),
    each XORed with `flip` (128 gives the int8 x − 128 as bytes); torch's conversion without the C kernels.
    Codes already stored as bytes come back as they are (flipped into a new tensor)."""
    if x.dtype == torch.uint8:
        return x ^ flip if flip else x
    lib = library()
    if lib is None or x.dtype != torch.float32:
        u = x.to(torch.uint8)
        return u.bitwise_xor_(flip) if flip else u
    (x,) = _same_dense_layout([x])
    out = torch.empty_like(x, dtype=torch.uint8)
    lib.fw_codes_u8(x.data_ptr(), out.data_ptr(), x.numel(), flip, torch.get_num_threads())
    return out


def fake_quant(x: torch.Tensor, scale: float, zp: float, lo: float, hi: float, inplace: bool = False):
    """(clamp(rint(x / s) + z, lo, hi) - z) · s in float32, as the torch expression; into `x` itself with
    `inplace` where its storage is dense."""
    (dense,) = _same_dense_layout([x])
    out = x if inplace and dense is x else torch.empty_like(dense)
    threads = torch.get_num_threads()
    library().fw_fake_quant(dense.data_ptr(), out.data_ptr(), dense.numel(), scale, zp, lo, hi, threads)
    return out


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _same_dense_layout(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`xs` as tensors whose storage can be walked element by element in step (same strides, dense):
    as they are when they already are (NCHW or channels-last alike), else made contiguous."""
    if all(_dense(x) and x.stride() == xs[0].stride() for x in xs):
        return xs
    return [x.contiguous() for x in xs]


def plan_planes(
    w: torch.Tensor,
    x_bound: int,
    max_planes: int,
    digit_bits: int = 0,
    chunks: int = 1,
    offset: int = 0,
    limit_bits: int = 24,
) -> tuple[int, int, int] | None:
    """The certified split `digit_planes` makes, without making it: (planes, 0 where more than `max_planes`
    would be needed; digit bits; bound), or None when `w` is not an 8/16/32-bit integer tensor."""
    if w.dtype not in _INT_BYTES:
        return None
    w = w.contiguous()
    bits, bound = ctypes.c_int(), ctypes.c_int64()
    planes = library().fw_plan_planes(
        w.data_ptr(), _INT_BYTES[w.dtype], w.shape[0], w[0].numel() if w.dim() > 1 else 1, chunks, x_bound,
        max_planes, digit_bits, offset, limit_bits, ctypes.byref(bits), ctypes.byref(bound),
    )  # fmt: skip
    return planes, bits.value, bound.value


def fill_planes(w: torch.Tensor, planes: int, bits: int, dtype, groups=1, chunks=1, offset=0) -> torch.Tensor:
    """The planes of a plan (`plan_planes`) of w - offset, stacked as `digit_planes` describes."""
    w, cout = w.contiguous(), w.shape[0]
    shape = (chunks * planes * cout, w.shape[1] // chunks, *w.shape[2:]) if w.dim() > 1 else (planes * cout,)
    out = torch.empty(shape, dtype=dtype)
    library().fw_fill_planes(
        w.data_ptr(), _INT_BYTES[w.dtype], cout, w[0].numel() if w.dim() > 1 else 1, groups, chunks, planes,
        bits, offset, out.data_ptr(), out.element_size(),
    )  # fmt: skip
    return out


def digit_planes(
    w: torch.Tensor,
    x_bound: int,
    groups: int,
    max_planes: int,
    digit_bits: int = 0,
    chunks: int = 1,
    offset: int = 0,
    limit_bits: int = 24,
) -> tuple[torch.Tensor, int, int, int] | None:
    """`intops.prepare`'s split in C: (planes stacked along dim 0, planes (0: more than `max_planes`
    needed, no tensor), digit bits, bound), or None when `w` is not an 8/16/32-bit integer tensor. Float32
    planes stacked [groups][planes][C/groups]; with `chunks` > 1 (groups 1) the fan-in is cut into that many
    input-channel chunks, each certified on its own, stacked [chunks][planes][C] as the weight
    [chunks·planes·C, C_in/chunks, ...] of a conv grouped by chunk. With `digit_bits` > 0, int8 planes of
    that digit width whose entries also stay within ±2^(digit_bits-1) (the operands of an int8 kernel).
    With `offset`, the planes split w - offset (the bound stays that of w). Each plane's x_bound·Σ|d| stays
    below 2^limit_bits (24: exact float32 sums; 31: int32 accumulators)."""
    plan = plan_planes(w, x_bound, max_planes, digit_bits, chunks, offset, limit_bits)
    if plan is None:
        return None
    planes, bits, bound = plan
    if planes == 0:
        return torch.empty(0), 0, 0, bound
    dtype = torch.int8 if digit_bits else torch.float32
    return fill_planes(w, planes, bits, dtype, groups, chunks, offset), planes, bits, bound


def digit_columns(w: torch.Tensor, planes: int, bits: int, offset: int) -> torch.Tensor:
    """The int8 planes of a plan (`plan_planes`, groups 1) of w - offset as the columns of a GEMM:
    [K, planes·C (+ 1)], the fan-in of a conv weight [C, C_in, kh, kw] in (kh, kw, C_in) order (im2col's),
    with a nonzero offset a last column of 1s."""
    w = w.contiguous()
    cout, cin = w.shape[0], w.shape[1]
    khw = w[0, 0].numel() if w.dim() > 2 else 1
    ones = int(offset != 0)
    out = torch.empty((cin * khw, planes * cout + ones), dtype=torch.int8)
    library().fw_fill_columns(
        w.data_ptr(), _INT_BYTES[w.dtype], cout, cin, khw, planes, bits, offset, ones, out.data_ptr()
    )
    return out


#: The int16 GEMM's certificate: every partial sum of x·w is an integer below 2^31 (int32 lanes).
I32_EXACT = 2**31
I16_MAX = 2**15 - 1


def pack_s16(w: torch.Tensor, x_bound: int) -> tuple[torch.Tensor, int] | None:
    """Linear weights [N, K] (int8 / int16) packed for `gemm_s16` with their bound x_bound·max_n Σ_k |w[n, k]|
    (every partial sum of Σ_k (x_k − zp)·w[n, k] is below it in magnitude), or None where the int16 GEMM is
    not exact: other dtypes or shapes, inputs |x − zp| beyond int16, or the bound at 2^31 or more (an int32
    partial sum could overflow)."""
    if w.dtype not in (torch.int8, torch.int16) or w.dim() != 2 or x_bound > I16_MAX or not w.numel():
        return None
    bound = x_bound * int(w.to(torch.int64).abs().sum(1).max())
    if bound >= I32_EXACT:
        return None
    n, k = w.shape
    w = w.contiguous()
    out = torch.empty(-(-n // 16) * -(-k // 2) * 32, dtype=torch.int16)  # [N/16][K/2][16][2] (C: GEMM_NR 16)
    library().fw_pack_s16(w.data_ptr(), _INT_BYTES[w.dtype], n, k, out.data_ptr())
    return out, bound


def gemm_s16(x: torch.Tensor, zp: int, packed: torch.Tensor, n: int) -> torch.Tensor:
    """Σ_k (x[..., k] − zp)·w[n, k] of float32 codes `x` with `pack_s16`'s weights: exact int32 [..., N]."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1 or rows.dtype != torch.float32:
        rows = rows.float().contiguous()
    out = torch.empty(rows.shape[0], n, dtype=torch.int32)
    m, k = rows.shape
    lib, threads = library(), torch.get_num_threads()
    lib.fw_gemm_s16(rows.data_ptr(), m, k, rows.stride(0), zp, packed.data_ptr(), n, out.data_ptr(), threads)
    return out.reshape(*x.shape[:-1], n)


def update(
    w: torch.Tensor,
    zs: list[torch.Tensor],
    signs: list[int],
    m: int,
    mult: torch.Tensor,
    n: torch.Tensor,
    rounding: str,
    words: torch.Tensor | None,
    qmin: int,
    qmax: int,
) -> int | None:
    """QZO-FF's fixed-point update of the integer weights `w`, in place, from the step's perturbations: s =
    Σ_j signs[j]·zs[j] over the samples whose coefficient is ±1 (int8 z; m samples in all), in one pass (see
    `fwdgrad.ff.spaces.FixedPointSpace.update`; `mult`, `n` one per output channel or one): returns the
    number of saturated weights, or None when the C path does not apply (dtypes, layout, shifts). The caller
    bumps `w`'s version (it is written through its pointer)."""
    n = n.reshape(-1).to(torch.int64)
    if (
        w.dtype not in _INT_BYTES
        or not w.is_contiguous()
        or any(z.dtype != torch.int8 or z.shape != w.shape for z in zs)
        or mult.numel() not in (1, w.shape[0])
        or n.numel() != mult.numel()
        or int(n.min()) < 1
        or int(n.max()) > 62
    ):
        return None
    zs = [z.contiguous() for z in zs]
    ptrs = _ptrs(zs)
    sign_bytes = (ctypes.c_int8 * max(1, len(signs)))(*signs)
    mult = mult.reshape(-1).to(torch.int64).contiguous()
    n = n.contiguous()
    if words is not None:
        words = words.to(torch.int64).contiguous()
    per_channel = w.numel() // w.shape[0] if mult.numel() > 1 else w.numel()
    return library().fw_update(
        w.data_ptr(), _INT_BYTES[w.dtype], w.numel(), per_channel, len(zs), ptrs, sign_bytes, m,
        mult.data_ptr(), n.data_ptr(), ROUNDING_CODES[rounding], _ptr(words), qmin, qmax,
    )  # fmt: skip


def scatter_i8(w: torch.Tensor, at: torch.Tensor, out_ptr: int, comp: int = -1) -> None:
    """int8 `w` (row-major, rows along dim 0) written into the buffer at `out_ptr`, weight i at byte
    `at[i]` (int32); with `comp` >= 0 also each row's -Σ w as int32 at byte comp + 4·row."""
    w = w.contiguous()
    library().fw_scatter_i8(w.data_ptr(), at.data_ptr(), out_ptr, w.numel(), w.shape[0], comp)


def split_into(
    ws: list[torch.Tensor],
    planes: int,
    bits: int,
    fixed_bits: int,
    offset: int,
    x_bound: int,
    limit_bits: int,
    at: torch.Tensor,
    out_ptrs: list[int],
    comp: int = -1,
    groups: int = 1,
    rowsum: bool = False,
) -> list[tuple[int, torch.Tensor | None] | None]:
    """The split `fill_planes` makes of each int8/int16 weight tensor in `ws` (one shape [C, ...]) into
    `planes` (1 or 2) int8 planes of `bits` bits minus `offset`, certified as `plan_planes` certifies it
    (digits within ±2^(fixed_bits-1), capped at 127; x_bound·Σ|d| < 2^limit_bits per plane and channel) and
    written straight into the buffer at its `out_ptrs` entry as `scatter_i8` writes the planes (digit j of
    the stack at byte `at[j]`, with `comp` >= 0 the rows' -Σ d). Returns per tensor (the bound
    x_bound·max_c Σ|w|, each channel's Σ w as int64 where `rowsum`), or None where the split does not
    certify or does not apply (that buffer then holds some of its digits: a later split rewrites them all)."""
    if not ws or ws[0].dtype not in (torch.int8, torch.int16) or planes not in (1, 2):
        return [None] * len(ws)
    ws = [w.contiguous() for w in ws]
    c, k = ws[0].shape[0], ws[0][0].numel() if ws[0].dim() > 1 else 1
    sums = torch.empty((len(ws), c), dtype=torch.int64) if rowsum else None
    bounds = (ctypes.c_int64 * len(ws))()
    library().fw_split_into(
        _ptrs(ws), len(ws), _INT_BYTES[ws[0].dtype], c, k, groups, planes, bits, offset, x_bound, limit_bits,
        fixed_bits, at.data_ptr(), (ctypes.c_void_p * len(ws))(*out_ptrs), comp, _ptr(sums), bounds,
    )  # fmt: skip
    return [None if b < 0 else (b, None if sums is None else sums[i]) for i, b in enumerate(bounds)]


def dequantize(w: torch.Tensor, qp) -> torch.Tensor | None:
    """Integer weights [C, ...] as float32 in one pass: `fwdgrad.quant.dequantize(w, qp)`'s values (the
    float64 product w·scale rounded once to float32), for a scale per tensor or per output channel (axis 0)
    and zero point 0; None where that does not apply."""
    scale = qp.scale
    if (
        w.dtype not in _INT_BYTES
        or w.device.type != "cpu"
        or not (scale.numel() == 1 or (qp.fmt.axis == 0 and scale.numel() == w.shape[0]))
        or bool(qp.zero_point.ne(0).any())
        or library() is None
    ):
        return None
    w, scale = w.contiguous(), scale.reshape(-1).to(torch.float64).contiguous()
    out = torch.empty(w.shape, dtype=torch.float32)
    per_channel = w.numel() // scale.numel()
    library().fw_dequantize(
        w.data_ptr(), _INT_BYTES[w.dtype], w.numel(), per_channel, scale.data_ptr(), out.data_ptr()
    )
    return out


def perturb(
    w: torch.Tensor,
    one: int,
    passes: list[tuple[list[torch.Tensor], torch.Tensor]],
    mult: int,
    n: int,
    rounding: str,
    words: torch.Tensor | None,
    qmin: int,
    qmax: int,
) -> list[tuple[torch.Tensor, int]] | None:
    """QZO-FF's perturbed weights sat(round((w·one + Σ_t sizes[t, c]·z_t) · M / 2^n)) of several passes in
    one call (see `fwdgrad.ff.spaces.FixedPointSpace.perturbed_weights`), each pass given as (its z tensors,
    its size table [terms, channels or 1]); returns each pass's (weights, saturations), or None when the C
    path does not apply (weight or z dtypes, no or too many terms)."""
    if (
        w.dtype not in _INT_BYTES
        or not 1 <= n <= 62
        or any(not 1 <= len(zs) <= MAX_TERMS for zs, _ in passes)
        or any(z.dtype != torch.int8 or z.shape != w.shape for zs, _ in passes for z in zs)
    ):
        return None
    w = w.contiguous()
    zs = [z.contiguous() for p in passes for z in p[0]]
    channels = w.shape[0] if any(t.shape[-1] > 1 for _, t in passes) else 1
    tables = [
        t if t.dtype == torch.int64 and t.shape[-1] == channels and t.is_contiguous()
        else t.to(torch.int64).expand(t.shape[0], channels).contiguous()
        for _, t in passes
    ]  # fmt: skip
    if words is not None:
        words = words.to(torch.int64).contiguous()
    out, size = torch.empty((len(passes), *w.shape), dtype=w.dtype), w.numel() * w.element_size()
    sats = (ctypes.c_int64 * len(passes))()
    library().fw_perturb(
        w.data_ptr(), _INT_BYTES[w.dtype], w.numel(), w.numel() // channels, one, len(passes),
        (ctypes.c_int * len(passes))(*[len(p[0]) for p in passes]), _ptrs(zs), _ptrs(tables), mult, n,
        ROUNDING_CODES[rounding], _ptr(words), qmin, qmax,
        (ctypes.c_void_p * len(passes))(*[out.data_ptr() + p * size for p in range(len(passes))]), sats,
    )  # fmt: skip
    return list(zip(out.unbind(0), sats))
