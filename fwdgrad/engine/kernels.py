"""The fused C epilogues (`kernels.c`), built at first use, with the torch path as the fallback.

The exact integer forward is a certified float kernel (convolution / GEMM, see `intops`) followed by
elementwise integer work: recombining digit planes, adding the bias, fitting the accumulator, requantizing,
clamping. In eager torch that is five to ten passes over float64/int64 tensors, which cost more than the
convolution itself; `kernels.c` does it in one pass with the int64 reference arithmetic.

The library is compiled with the system C compiler (``$CC``, else ``cc``/``gcc``) into
``$FWDGRAD_CACHE_DIR`` (default ``~/.cache/fwdgrad``), named by a hash of the source, the flags, the compiler
and the CPU, so it is built once per machine (about a second). Without a compiler, or with
``FWDGRAD_KERNELS=0``, every caller takes the torch path, which computes the same integers (tests run both).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from functools import cache
from pathlib import Path

import torch

from ..files import atomic_path

SOURCE = Path(__file__).with_name("kernels.c")
ENV = "FWDGRAD_KERNELS"  # "0", "off" or "false": use the torch path
CACHE_ENV = "FWDGRAD_CACHE_DIR"
# no FP contraction (a fused multiply-add would round the float-requant mode differently); no trapping math
# so floor/rint and the clamps vectorize (the kernels see finite values only)
FLAGS = ["-O3", "-fPIC", "-shared", "-std=gnu11", "-ffp-contract=off", "-fno-trapping-math"]
OPTIONAL_FLAGS = [["-march=native", "-fopenmp"], ["-march=native"], []]  # first that compiles wins

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float
_SIGNATURES = {
    "fw_epilogue_f32": (
        _I64,
        [_P, _P, _I64, _INT, _INT, _INT, _I64, _INT, _P, _P, _P, _P, _P, _F32, _I64, _I64, _I64, _INT]
        + [_INT, _INT, _INT],
    ),
    "fw_rescale_sum": (None, [_P, _INT, _P, _P, _INT, _I64, _I64, _I64, _P, _I64, _INT, _INT]),
    "fw_fake_quant": (None, [_P, _P, _I64, _F32, _F32, _F32, _F32, _INT]),
}
_SIGNATURES["fw_epilogue_f64"] = _SIGNATURES["fw_epilogue_f32"]
_SIGNATURES["fw_epilogue_cl_f32"] = _SIGNATURES["fw_epilogue_cl_f64"] = (
    _I64,
    [_P, _P, _I64, _INT, _INT, _INT, _INT] + [_P] * 9 + [_F32, _I64, _I64, _I64] + [_INT] * 5,
)


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _cpu_id() -> str:
    """What the compiled code depends on: the machine and, on Linux, the CPU's model and ISA flags."""
    text = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags", "Features")):
                text += line
                if line.startswith(("flags", "Features")):
                    break
    except OSError:
        pass
    return text


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _compile(cc: str, flags: list[str], cache_dir: Path) -> Path | str:
    """The library built with `flags` (cached), or the compiler's last error line."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + repr((flags, version, _cpu_id())).encode()).hexdigest()[:16]
    lib = cache_dir / f"kernels-{key}.so"
    if lib.exists():
        return lib
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(lib) as tmp:
        cmd = [cc, *flags, "-o", str(tmp), str(SOURCE), "-lm"]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if run.returncode:
            return (run.stderr.strip().splitlines() or [f"exit status {run.returncode}"])[-1]
    return lib


def _unavailable(why: str) -> None:
    warnings.warn(
        f"fwdgrad: C kernels unavailable ({why}); the integer engine uses its torch path", stacklevel=4
    )


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (disabled, no compiler, build failed: one warning says which)."""
    if not enabled():
        return None
    cc = _compiler()
    if cc is None:
        _unavailable("no C compiler; set CC")
        return None
    cache_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fwdgrad")
    try:
        for extra in OPTIONAL_FLAGS:
            lib = _compile(cc, FLAGS + extra, cache_dir)
            if isinstance(lib, Path):
                break
        else:
            _unavailable(f"{cc}: {lib}")
            return None
        dll = ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as e:
        _unavailable(str(e))
        return None
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(dll, name)
        fn.restype, fn.argtypes = res, args
    return dll


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def epilogue(
    raw: torch.Tensor,
    channel_dim: int,
    stack: tuple[int, int, int, int],
    consts,
    bias: torch.Tensor | None,
    acc_bits: int,
    wrap: bool,
    mode: str,
) -> tuple[torch.Tensor, int]:
    """One pass from a raw kernel output to output codes (float32): planes recombined, bias added,
    accumulator fitted to `acc_bits`, requantized with `mode`, zero point added, clamped.

    stack = (groups, planes, channels, digit_bits): along `channel_dim`, `raw` holds
    [groups][planes][channels/groups] (see `intops.prepare`). Channels-first (NCHW) and channels-last
    layouts are both read in place; the output keeps the layout. `consts` is a `Requantizer` (its `c_*`
    arrays, zp, lo, hi); `bias` is int64 per channel. Returns (codes, number of accumulator misfits)."""
    lib = library()
    groups, planes, channels, bits = stack
    planes = max(planes, 1)
    shape = list(raw.shape)
    shape[channel_dim] = channels
    f64 = raw.dtype == torch.float64
    last = channel_dim in (-1, raw.dim() - 1)
    if not last and raw.dim() == 4 and not raw.is_contiguous():
        last = raw.is_contiguous(memory_format=torch.channels_last)
    threads = torch.get_num_threads()
    if last:
        rows = raw.numel() // (planes * channels)
        f64_single = mode == "single" and consts.f64_exact(acc_bits)
        if channel_dim in (-1, raw.dim() - 1):
            raw, out = raw.contiguous(), torch.empty(shape, dtype=torch.float32)
        else:
            out = torch.empty(shape, dtype=torch.float32, memory_format=torch.channels_last)
        fn = lib.fw_epilogue_cl_f64 if f64 else lib.fw_epilogue_cl_f32
        bad = fn(
            raw.data_ptr(), out.data_ptr(), rows, groups, planes, channels, bits,
            _ptr(bias), consts.c_mult.data_ptr(), consts.c_n.data_ptr(), consts.c_mhi.data_ptr(),
            consts.c_mlo.data_ptr(), consts.c_half.data_ptr(), consts.c_inv.data_ptr(),
            consts.c_fscale.data_ptr(), _ptr(consts.c_fbias), consts.c_fout, consts.zp, consts.lo, consts.hi,
            acc_bits, int(wrap), REQUANT_CODES[mode], int(f64_single), threads,
        )  # fmt: skip
        return out, bad
    raw = raw.contiguous()
    out = torch.empty(shape, dtype=torch.float32)
    outer, inner = raw.shape[0], raw[0, 0].numel() if raw.dim() > 2 else 1
    fn = lib.fw_epilogue_f64 if f64 else lib.fw_epilogue_f32
    bad = fn(
        raw.data_ptr(), out.data_ptr(), outer, groups, planes, channels, inner, bits,
        _ptr(bias), consts.c_mult.data_ptr(), consts.c_n.data_ptr(), consts.c_fscale.data_ptr(),
        _ptr(consts.c_fbias), consts.c_fout, consts.zp, consts.lo, consts.hi, acc_bits, int(wrap),
        REQUANT_CODES[mode], threads,
    )  # fmt: skip
    return out, bad


REQUANT_CODES = {"single": 0, "gemmlowp": 1, "float": 2}


def rescale_sum(
    xs: list[torch.Tensor], zps, mults, x_bound: int, shift: int, zp_out: int, lo: int, hi: int
) -> torch.Tensor:
    """sat(((Σ_i (x_i - zp_i)·M_i) + 2^(S-1)) >> S) + zp_out) over same-shape float32 codes, each
    |x_i - zp_i| <= x_bound."""
    xs = _same_dense_layout(xs)
    out = torch.empty_like(xs[0])
    ptrs = (ctypes.c_void_p * len(xs))(*[x.data_ptr() for x in xs])
    z = torch.tensor(zps, dtype=torch.int64)
    m = torch.tensor(mults, dtype=torch.int64)
    # every partial sum an integer below 2^52: float64 is exact
    exact_f64 = len(xs) * x_bound * max(abs(v) for v in mults) + (1 << shift) < 2**52
    library().fw_rescale_sum(
        ptrs, len(xs), z.data_ptr(), m.data_ptr(), shift, zp_out, lo, hi, out.data_ptr(), out.numel(),
        int(exact_f64), torch.get_num_threads(),
    )  # fmt: skip
    return out


def fake_quant(x: torch.Tensor, scale: float, zp: float, lo: float, hi: float) -> torch.Tensor:
    """(clamp(rint(x / s) + z, lo, hi) - z) · s in float32 (contiguous `x`), as the torch expression."""
    (x,) = _same_dense_layout([x])
    out = torch.empty_like(x)
    threads = torch.get_num_threads()
    library().fw_fake_quant(x.data_ptr(), out.data_ptr(), x.numel(), scale, zp, lo, hi, threads)
    return out


def _dense(x: torch.Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _same_dense_layout(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """`xs` as tensors whose storage can be walked element by element in step (same strides, dense):
    as they are when they already are (NCHW or channels-last alike), else made contiguous."""
    if all(_dense(x) and x.stride() == xs[0].stride() for x in xs):
        return xs
    return [x.contiguous() for x in xs]
