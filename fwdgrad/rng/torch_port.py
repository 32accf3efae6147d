"""Counter-based perturbation sampler in PyTorch, bit-identical to :mod:`fwdgrad.rng.reference`.

The algorithm (Philox4x32-10 keyed by (seed, step, sample, tensor_id), counter = element index,
then an integer threshold table for the 8-bit Gaussian) is specified in :mod:`fwdgrad.rng.reference` and
``docs/rng.md``. This module computes the same words with torch integer ops, on any device, through the
reference's own round code (``philox4x32``) and chunk walk (``map_words``):

* torch has no unsigned 32/64-bit arithmetic, so 32-bit words are held in ``int64`` tensors with
  values in ``[0, 2**32)``;
* a 32x32 -> 64-bit product does not fit a signed int64, so ``mulhilo(M, a)`` splits the constant
  ``M = Mh * 2**16 + Ml``: ``p = a * Ml`` and ``q = a * Mh`` are both ``< 2**48`` (exact), and
  ``hi = ((p >> 16) + q) >> 16``, ``lo = (p + ((q & 0xFFFF) << 16)) & 0xFFFFFFFF``;
  no operation ever overflows, so the result does not depend on wrap-around behaviour;
* the Gaussian table lookup is the same two-level integer search as the numpy one.

Words are returned as ``int64`` tensors, perturbations as ``int8`` tensors on the requested device.

On the CPU the same algorithm runs in C (``philox.c``, built by `fwdgrad.native`; 2-3x faster than the
numpy reference, docs/results/engine/bench.md) or, without a compiler, through the numpy reference.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from .. import native
from . import reference
from .reference import (
    MASK32,
    Z_MAX_DEFAULT,
    check_z_max,
    element_range,
    gaussian_lut,
    map_words,
    one_q,
    philox4x32,
    shape_size,
    stream_key,
)

__all__ = [
    "hash_words",
    "gaussian_q",
    "rademacher_q",
    "uniform_q",
    "gaussian_from_words",
    "rademacher_from_words",
    "uniform_from_words",
    "one_q",
    "gaussian_lut",
]

CHUNK_BLOCKS_CPU = 1 << 16
CHUNK_BLOCKS_CUDA = 1 << 22

_U32, _I64, _P = ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p
_STREAM = [_U32] * 5 + [_I64, _I64]  # c1 c2 c3 k0 k1, offset, n
SOURCE = Path(__file__).with_name("philox.c")
SIGNATURES = {
    "fw_philox_words": (None, [*_STREAM, _P]),
    "fw_gaussian_q": (None, [*_STREAM, _P, _P, ctypes.c_int, _P]),
    "fw_rademacher_q": (None, [*_STREAM, ctypes.c_int, _P]),
    "fw_uniform_q": (None, [*_STREAM, _P]),
}


def _native(seed, step, sample, tensor_id, n, offset, dtype, fill) -> torch.Tensor | None:
    """``fill(lib, stream args, out)`` on a fresh CPU tensor of n elements, or None without the C library."""
    lib = native.load(SOURCE, SIGNATURES)
    if lib is None:
        return None
    ctr_rest, key = stream_key(seed, step, sample, tensor_id)
    n, offset = element_range(n, offset)
    out = torch.empty(n, dtype=dtype)
    fill(lib, (*ctr_rest, *key, offset, n), out.data_ptr())
    return out


def _mulhilo_torch(m: int, a):
    """``(hi, lo)`` of the exact 64-bit product of the 32-bit constant ``m`` and words ``a``."""
    if not isinstance(a, torch.Tensor):
        p = m * a
        return p >> 32, p & MASK32
    p = a * (m & 0xFFFF)  # < 2**48
    q = a * (m >> 16)  # < 2**48
    hi = torch.bitwise_right_shift(p, 16).add_(q).bitwise_right_shift_(16)
    lo = q.bitwise_and_(0xFFFF).bitwise_left_shift_(16).add_(p).bitwise_and_(MASK32)
    return hi, lo


def _block_words(ctr_rest, key, device, c0_start: int, n_blocks: int) -> torch.Tensor:
    """Words of Philox blocks ``c0_start ..`` in element order (``int64[4 n_blocks]``)."""
    c0 = torch.arange(c0_start, c0_start + n_blocks, dtype=torch.int64, device=device)
    out = philox4x32((c0, *ctr_rest), key, _mulhilo_torch)
    return torch.stack(out, dim=1).reshape(-1)


def _resolve_device(device) -> torch.device:
    return torch.device("cpu") if device is None else torch.device(device)


def _map_words(seed, step, sample, tensor_id, n, offset, device, dtype, fn) -> torch.Tensor:
    """``fn`` applied chunk by chunk to the words of elements ``offset .. offset+n-1``."""
    ctr_rest, key = stream_key(seed, step, sample, tensor_id)
    n, offset = element_range(n, offset)
    device = _resolve_device(device)
    chunk = CHUNK_BLOCKS_CUDA if device.type == "cuda" else CHUNK_BLOCKS_CPU
    blocks = functools.partial(_block_words, ctr_rest, key, device)
    return map_words(blocks, torch.empty(n, dtype=dtype, device=device), offset, fn, chunk)


def _on_cpu(device) -> bool:
    """On the CPU the C or numpy implementation (bit-identical by construction and test) is the faster one."""
    return _resolve_device(device).type == "cpu"


def hash_words(seed, step, sample, tensor_id, n, offset=0, device=None) -> torch.Tensor:
    """Uniform 32-bit words of elements ``offset .. offset+n-1`` as ``int64`` values in [0, 2**32).

    Equal to ``fwdgrad.rng.reference.hash_words`` (same arguments) element for element.
    """
    if _on_cpu(device):
        fill = lambda lib, args, ptr: lib.fw_philox_words(*args, ptr)  # noqa: E731
        words = _native(seed, step, sample, tensor_id, n, offset, torch.int32, fill)
        if words is not None:
            return words.to(torch.int64) & MASK32
        words = reference.hash_words(seed, step, sample, tensor_id, n, offset)
        return torch.from_numpy(words.astype("int64"))
    return _map_words(seed, step, sample, tensor_id, n, offset, device, torch.int64, lambda w: w)


@functools.lru_cache(maxsize=64)
def _lut_tensors(z_max: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(bucket_base, thresholds_padded, span)`` of the z_max table as int64 tensors on ``device``."""
    lut = gaussian_lut(z_max)
    base = torch.from_numpy(lut.bucket_base.copy()).to(device)
    padded = torch.from_numpy(lut.thresholds_padded.copy()).to(device)
    return base, padded, lut.bucket_span


@functools.lru_cache(maxsize=64)
def _lut_bytes(z_max: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The z_max table as the C sampler reads it: ``bucket_base`` as uint8 (its values count thresholds,
    at most 254: 64 KiB that stay in cache, where the int64 form takes 512 KiB), the padded thresholds
    int64."""
    base, padded, span = _lut_tensors(z_max, torch.device("cpu"))
    if int(base.max()) > 255:  # by construction (254 thresholds) never; a wrapped byte would be wrong
        raise RuntimeError(f"z_max={z_max}: a Gaussian bucket index above 255")
    return base.to(torch.uint8), padded, span


def gaussian_from_words(words: torch.Tensor, z_max=Z_MAX_DEFAULT) -> torch.Tensor:
    """Map int64 words in [0, 2**32) to int8 z_q = (number of thresholds <= word) - 127."""
    if words.dtype != torch.int64:
        raise TypeError(f"words must be an int64 tensor of values in [0, 2**32), got dtype {words.dtype}")
    base, padded, span = _lut_tensors(check_z_max(z_max), words.device)
    flat = words.reshape(-1)
    b = torch.index_select(base, 0, flat >> 16)
    idx = b.to(torch.int16)
    for t in range(span):
        cand = torch.index_select(padded, 0, b + t) if t else torch.index_select(padded, 0, b)
        idx.add_(cand <= flat)
    return idx.sub_(127).to(torch.int8).reshape(words.shape)


def rademacher_from_words(words: torch.Tensor, one: int) -> torch.Tensor:
    """``+one`` where bit 31 of the word is 0, ``-one`` where it is 1 (int8)."""
    sign = (words >> 31).to(torch.int16)
    return sign.mul_(-2 * one).add_(one).to(torch.int8)


def uniform_from_words(words: torch.Tensor) -> torch.Tensor:
    """Uniform on the 255 levels -127..127: ``((u * 255) >> 32) - 127`` (int8)."""
    return ((words * 255) >> 32).sub_(127).to(torch.int8)


def gaussian_q(
    seed, step, sample, tensor_id, shape, z_max=Z_MAX_DEFAULT, offset=0, device=None
) -> torch.Tensor:
    """Gaussian perturbation z_q (``int8``, scale ``z_max / 127``) of ``shape`` on ``device``.

    Elements are taken in C order from the stream starting at element ``offset``; equal to
    ``fwdgrad.rng.reference.gaussian_q`` with the same arguments.
    """
    z_max = check_z_max(z_max)
    dims, size = shape_size(shape)
    if _on_cpu(device):
        base, padded, span = _lut_bytes(z_max)

        def fill(lib, args, ptr):
            lib.fw_gaussian_q(*args, base.data_ptr(), padded.data_ptr(), span, ptr)

        z = _native(seed, step, sample, tensor_id, size, offset, torch.int8, fill)
        if z is not None:
            return z.reshape(dims)
        return torch.from_numpy(reference.gaussian_q(seed, step, sample, tensor_id, shape, z_max, offset))
    fn = functools.partial(gaussian_from_words, z_max=z_max)
    return _map_words(seed, step, sample, tensor_id, size, offset, device, torch.int8, fn).reshape(dims)


def rademacher_q(
    seed, step, sample, tensor_id, shape, z_max=Z_MAX_DEFAULT, offset=0, device=None
) -> torch.Tensor:
    """Rademacher perturbation ``±1_q`` (``int8``, scale ``z_max / 127``) of ``shape`` on ``device``."""
    dims, size = shape_size(shape)
    if _on_cpu(device):
        one = one_q(z_max)
        fill = lambda lib, args, ptr: lib.fw_rademacher_q(*args, one, ptr)  # noqa: E731
        z = _native(seed, step, sample, tensor_id, size, offset, torch.int8, fill)
        if z is not None:
            return z.reshape(dims)
        return torch.from_numpy(reference.rademacher_q(seed, step, sample, tensor_id, shape, z_max, offset))
    fn = functools.partial(rademacher_from_words, one=one_q(z_max))
    return _map_words(seed, step, sample, tensor_id, size, offset, device, torch.int8, fn).reshape(dims)


def uniform_q(seed, step, sample, tensor_id, shape, offset=0, device=None) -> torch.Tensor:
    """Uniform perturbation on the 255 levels -127..127 (``int8``) of ``shape`` on ``device``."""
    dims, size = shape_size(shape)
    if _on_cpu(device):
        fill = lambda lib, args, ptr: lib.fw_uniform_q(*args, ptr)  # noqa: E731
        z = _native(seed, step, sample, tensor_id, size, offset, torch.int8, fill)
        if z is not None:
            return z.reshape(dims)
    return _map_words(
        seed, step, sample, tensor_id, size, offset, device, torch.int8, uniform_from_words
    ).reshape(dims)
