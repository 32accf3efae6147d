"""Integer-only, counter-based perturbation sampler (numpy reference; never imports torch).

This module is the bit-exact specification of the perturbation z_q used by QZO-FF
(docs/method.md#the-fixed-point-formulation).
The PyTorch trainer (:mod:`fwdgrad.rng.torch_port`), this numpy runtime and a C implementation on a
device without an FPU must all produce the *same* int8 values for the same key. Everything below is
integer arithmetic on unsigned 32-bit words; the only floating point is in building the threshold table,
which is done once, deterministically, with exact decimal arithmetic (or copied from ``docs/rng.md``).

Algorithm (re-implementable in C from this docstring)
-----------------------------------------------------
**1. Uniform words: Philox4x32-10** (Salmon et al., SC'11; Random123 ``philox4x32_R(10, ctr, key)``).
All values are ``uint32``; ``+`` is mod 2**32; ``mulhilo(M, a)`` is the full 64-bit product
``M * a`` split into its high and low 32-bit halves. Constants::

    M0 = 0xD2511F53   M1 = 0xCD9E8D57          (multipliers)
    W0 = 0x9E3779B9   W1 = 0xBB67AE85          (Weyl key increments)

One round on counter ``(c0, c1, c2, c3)`` with key ``(k0, k1)``::

    (hi0, lo0) = mulhilo(M0, c0)
    (hi1, lo1) = mulhilo(M1, c2)
    (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0,  lo1,  hi0 ^ c3 ^ k1,  lo0)

Ten rounds; between consecutive rounds (9 times) the key is bumped: ``k0 += W0; k1 += W1``.
The output is the final ``(c0, c1, c2, c3)``: four words. Known answers (Random123
``tests/kat_vectors``)::

    ctr = 0,0,0,0  key = 0,0  ->  6627e8d5 e169c58d bc57ac4c 9b00dbd8
    ctr = ffffffff x4  key = ffffffff x2  ->  408f276d 41c83b0e a20bc7c6 6d5451fd
    ctr = 243f6a88 85a308d3 13198a2e 03707344  key = a4093822 299f31d0
        ->  d16cfe09 94fdcceb 5001e420 24126ea1

**2. Key and counter layout.** Stream key = (seed, step, sample, tensor_id) with
``0 <= seed < 2**64`` and ``0 <= step, sample, tensor_id < 2**32``; element index ``i`` with
``0 <= i < 2**34``. Element ``i`` of the stream takes word ``i & 3`` of::

    philox4x32_10(ctr = (i >> 2, tensor_id, sample, step),
                  key = (seed & 0xFFFFFFFF, seed >> 32))

so one Philox call yields the words of elements ``4b .. 4b+3`` (block ``b = i >> 2``). Because Philox
is a bijection of the counter for a fixed key, no two (step, sample, tensor_id, element) tuples of
one seed share a block.

**3. Gaussian z_q: integer threshold table.** Parameter ``z_max`` (``1 <= z_max <= 6``; default
3.5), scale ``delta = z_max / 127``. 254 ``uint32`` thresholds ``T[0..253]``, exactly symmetric::

    for j in 0..126:   T[j]       = floor(2**32 * Phi((2*j - 253) * z_max / 254) + 1/2)
                       T[253 - j] = 2**32 - T[j]

where Phi is the standard normal CDF; ``(2j - 253) z_max / 254 = (j - 126.5) * delta`` is the lower
edge of level ``j - 126``. Sampling a word ``u`` (integer compares only)::

    z_q = (number of j with T[j] <= u) - 127        # = searchsorted(T, u, side="right") - 127

A binary search over T (8 compares) is the natural device implementation; here the count is
computed by an equivalent two-level search (a 65536-entry index on ``u >> 16``, see
:func:`bucket_index`), which gives exactly the same count and is several times faster in numpy/torch.

so ``P(z_q = k) = (T[k + 127] - T[k + 126]) / 2**32`` (with ``T[-1] = 0``, ``T[254] = 2**32``)
= ``Phi((k + 1/2) delta) - Phi((k - 1/2) delta)`` up to 2**-32 rounding, the tails beyond
``±126.5 delta`` merged into ``±127``. The table is computed here with :mod:`decimal` at 50
significant digits (a positive-term series for erf, no platform libm), so it is identical everywhere;
``docs/rng.md`` lists it for ``z_max = 3.5`` for a device to hard-code.

**4. Other distributions from the same words.**
``1_q = floor(127 / z_max + 1/2)`` (36 for z_max = 3.5). Rademacher: ``z_q = +1_q`` if
``u >> 31 == 0`` else ``-1_q``. Uniform on the 255 levels: ``z_q = ((u * 255) >> 32) - 127``
(64-bit product).
"""

from __future__ import annotations

import decimal
import functools
import math
import numbers
import operator
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "M0",
    "M1",
    "W0",
    "W1",
    "ROUNDS",
    "Z_MAX_DEFAULT",
    "Z_MAX_MIN",
    "Z_MAX_MAX",
    "MAX_ELEMENTS",
    "GaussianLUT",
    "gaussian_lut",
    "gaussian_thresholds",
    "one_q",
    "philox4x32",
    "philox4x32_int",
    "stream_key",
    "hash_words",
    "iter_word_chunks",
    "walk_chunks",
    "map_words",
    "check_z_max",
    "bucket_index",
    "gaussian_q",
    "rademacher_q",
    "uniform_q",
    "rademacher_from_words",
    "uniform_from_words",
]

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
Z_MAX_DEFAULT = 3.5
Z_MAX_MIN = 1.0
Z_MAX_MAX = 6.0
N_LEVELS = 255
MAX_ELEMENTS = 1 << 34  # element indices are < 2**34 (block index i >> 2 must fit 32 bits)
CHUNK_BLOCKS = 1 << 16  # Philox blocks generated per vectorized chunk (bounds temporary memory)

# pi to 60 significant digits, for the exact-decimal normal CDF
_PI = decimal.Decimal("3.14159265358979323846264338327950288419716939937510582097494")
_DEC_PREC = 50


# ----------------------------------------------------------------------------------------------
# argument checking
# ----------------------------------------------------------------------------------------------
def _check_int(name: str, value, lo: int, hi: int) -> int:
    """Return ``value`` as a Python int in ``[lo, hi)`` or raise a one-line error."""
    if type(value) is int and lo <= value < hi:  # the common case, without the ABC checks below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer in [{lo}, {hi}), got {value!r}")
    v = operator.index(value)
    if not lo <= v < hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}), got {v}")
    return v


def check_z_max(z_max) -> float:
    """Validate ``z_max`` (a real in [1, 6]) and return it as a float."""
    if isinstance(z_max, bool) or not isinstance(z_max, numbers.Real):
        raise TypeError(f"z_max must be a real number in [{Z_MAX_MIN}, {Z_MAX_MAX}], got {z_max!r}")
    z = float(z_max)
    if not (math.isfinite(z) and Z_MAX_MIN <= z <= Z_MAX_MAX):
        raise ValueError(
            f"z_max must be in [{Z_MAX_MIN}, {Z_MAX_MAX}] (below 1 the unit 1_q does not fit int8, "
            f"above 6 the tail levels approach the 2**-32 table resolution), got {z_max!r}"
        )
    return z


def stream_key(seed, step, sample, tensor_id) -> tuple[tuple[int, int, int], tuple[int, int]]:
    """Validate a stream key; return ``((tensor_id, sample, step), (k0, k1))`` as Python ints.

    The first triple is counter words c1..c3; ``(k0, k1)`` is the Philox key (seed low/high half).
    """
    seed = _check_int("seed", seed, 0, 1 << 64)
    step = _check_int("step", step, 0, 1 << 32)
    sample = _check_int("sample", sample, 0, 1 << 32)
    tensor_id = _check_int("tensor_id", tensor_id, 0, 1 << 32)
    return (tensor_id, sample, step), (seed & MASK32, seed >> 32)


def element_range(n, offset) -> tuple[int, int]:
    """Validate an element range ``offset .. offset+n-1``; return ``(n, offset)``."""
    n = _check_int("n", n, 0, MAX_ELEMENTS + 1)
    offset = _check_int("offset", offset, 0, MAX_ELEMENTS)
    if offset + n > MAX_ELEMENTS:
        raise ValueError(f"offset + n must be <= 2**34 elements, got offset={offset}, n={n}")
    return n, offset


def shape_size(shape) -> tuple[tuple[int, ...], int]:
    """Normalize ``shape`` (int or sequence of ints >= 0) and return ``(shape, numel)``."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (operator.index(shape),)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    dims = tuple(_check_int("shape entry", d, 0, MAX_ELEMENTS + 1) for d in shape)
    return dims, math.prod(dims)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 and the chunk walk, written once (pluggable mulhilo / block-word function) so numpy,
# torch and Python ints share them
# ----------------------------------------------------------------------------------------------
def philox4x32(ctr: Sequence, key: tuple[int, int], mulhilo: Callable, rounds: int = ROUNDS) -> tuple:
    """Philox4x32-``rounds`` on counter words ``ctr`` (ints or integer arrays, values < 2**32).

    ``key`` is a pair of Python ints. ``mulhilo(m, a)`` must return ``(hi, lo)`` of the exact
    64-bit product of the 32-bit constant ``m`` and the words ``a``. Works elementwise on any mix of
    Python ints and arrays (numpy uint64, torch int64); returns the four output words.
    """
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        hi0, lo0 = mulhilo(M0, c0)
        hi1, lo1 = mulhilo(M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _mulhilo_np(m: int, a):
    """Exact 32x32->64 product in numpy uint64 (no wrap-around can occur) or Python ints."""
    p = a * np.uint64(m) if isinstance(a, np.ndarray) else m * a
    return p >> 32, p & MASK32


def philox4x32_int(ctr: Sequence[int], key: Sequence[int], rounds: int = ROUNDS) -> tuple[int, ...]:
    """Scalar Philox4x32 with Python ints (the readable reference; used for known-answer tests)."""
    ctr = [_check_int("counter word", c, 0, 1 << 32) for c in ctr]
    key = tuple(_check_int("key word", k, 0, 1 << 32) for k in key)
    return tuple(int(x) for x in philox4x32(ctr, key, _mulhilo_np, rounds))


def walk_chunks(block_words: Callable, n: int, offset: int, chunk_blocks: int):
    """Yield ``(start, words)``: consecutive pieces of the words of elements ``offset .. offset+n-1``.

    The chunk walk shared by every backend. ``block_words(b_first, n_blocks)`` returns the ``4 n_blocks``
    words of Philox blocks ``b_first ..`` in element order (a 1-D numpy array or torch tensor); at most
    ``chunk_blocks`` blocks are generated at a time. ``start`` is the position of the piece within the
    requested range. ``n`` and ``offset`` must already be validated (:func:`element_range`).
    """
    end = offset + n
    pos = offset
    while pos < end:
        b_first = pos >> 2
        b_end = min((end + 3) >> 2, b_first + chunk_blocks)
        words = block_words(b_first, b_end - b_first)
        lo = pos - 4 * b_first
        hi = min(end, 4 * b_end) - 4 * b_first
        yield pos - offset, words[lo:hi]
        pos = 4 * b_first + hi


def map_words(block_words: Callable, out, offset: int, fn: Callable, chunk_blocks: int):
    """Fill the 1-D array ``out`` with ``fn(words)`` of elements ``offset .. offset+len(out)-1``; return it.

    Backend-neutral (``out`` is a numpy array or a torch tensor, ``block_words`` as in :func:`walk_chunks`).
    """
    for start, words in walk_chunks(block_words, len(out), offset, chunk_blocks):
        out[start : start + len(words)] = fn(words)
    return out


def _block_words(ctr_rest: tuple[int, int, int], key, c0_start: int, n_blocks: int) -> np.ndarray:
    """Words of blocks ``c0_start .. c0_start+n_blocks-1`` in element order (``uint32[4 n_blocks]``)."""
    c0 = np.arange(c0_start, c0_start + n_blocks, dtype=np.uint64)
    out = philox4x32((c0, *ctr_rest), key, _mulhilo_np)
    words = np.empty((n_blocks, 4), dtype=np.uint32)
    for j, w in enumerate(out):  # 4 columns, not a loop over elements
        words[:, j] = w
    return words.reshape(-1)


def iter_word_chunks(seed, step, sample, tensor_id, n, offset=0, chunk_blocks=CHUNK_BLOCKS):
    """Yield ``(start, words)``: consecutive ``uint32`` pieces of the ``n`` words from ``offset``.

    ``start`` is the position of the piece within the requested range. Bounds temporary memory to
    about ``48 * chunk_blocks`` bytes whatever ``n`` is.
    """
    ctr_rest, key = stream_key(seed, step, sample, tensor_id)
    n, offset = element_range(n, offset)
    yield from walk_chunks(functools.partial(_block_words, ctr_rest, key), n, offset, chunk_blocks)


def hash_words(seed, step, sample, tensor_id, n, offset=0) -> np.ndarray:
    """Uniform 32-bit words of elements ``offset .. offset+n-1`` of the stream; ``uint32[n]``.

    ``hash_words(k, n, offset)`` equals ``hash_words(k, offset + n)[offset:]``: any slice of a
    tensor's perturbation can be generated on its own.
    """
    return _map_words(seed, step, sample, tensor_id, n, offset, np.uint32, lambda w: w)


def _map_words(seed, step, sample, tensor_id, n, offset, dtype, fn) -> np.ndarray:
    """``fn`` applied chunk by chunk to the words of a range, gathered into one ``dtype[n]`` array."""
    n, offset = element_range(n, offset)
    ctr_rest, key = stream_key(seed, step, sample, tensor_id)
    blocks = functools.partial(_block_words, ctr_rest, key)
    return map_words(blocks, np.empty(n, dtype=dtype), offset, fn, CHUNK_BLOCKS)


# ----------------------------------------------------------------------------------------------
# Gaussian threshold table
# ----------------------------------------------------------------------------------------------
def _normal_cdf_neg(x: decimal.Decimal) -> decimal.Decimal:
    """Phi(-x) for x >= 0 in the current decimal context.

    erf(y) = 2/sqrt(pi) * exp(-y^2) * sum_n 2^n y^(2n+1) / (1*3*...*(2n+1)) (all terms positive),
    y = x / sqrt(2); Phi(-x) = (1 - erf(y)) / 2.
    """
    y = x / decimal.Decimal(2).sqrt()
    y2 = y * y
    term = y
    total = y
    n = 0
    eps = decimal.Decimal(10) ** (-(_DEC_PREC + 5))
    while term > eps * total:
        n += 1
        term = term * 2 * y2 / (2 * n + 1)
        total += term
    erf = 2 / _PI.sqrt() * (-y2).exp() * total
    return (1 - erf) / 2


def _round_half_up(x: decimal.Decimal) -> int:
    """floor(x + 1/2) as a Python int."""
    return int((x + decimal.Decimal("0.5")).to_integral_value(rounding=decimal.ROUND_FLOOR))


@functools.lru_cache(maxsize=32)
def _thresholds_cached(z_max: float) -> tuple[int, ...]:
    with decimal.localcontext() as ctx:
        ctx.prec = _DEC_PREC
        ctx.rounding = decimal.ROUND_HALF_EVEN
        z = decimal.Decimal(z_max)  # the float's exact binary value
        scale = decimal.Decimal(1 << 32)
        lower = []
        for j in range(N_LEVELS // 2):  # j = 0..126: edges below zero
            x = (253 - 2 * j) * z / 254  # = -(lower edge) >= 0
            lower.append(_round_half_up(scale * _normal_cdf_neg(x)))
    return tuple(lower) + tuple((1 << 32) - t for t in reversed(lower))


def gaussian_thresholds(z_max=Z_MAX_DEFAULT) -> tuple[int, ...]:
    """The 254 thresholds ``T[j]`` (Python ints, ascending) for ``z_max``; cached per z_max."""
    return _thresholds_cached(check_z_max(z_max))


def one_q(z_max=Z_MAX_DEFAULT) -> int:
    """The constant 1.0 on z's scale: ``1_q = floor(127 / z_max + 1/2)`` (36 for z_max = 3.5)."""
    z = decimal.Decimal(check_z_max(z_max))
    with decimal.localcontext() as ctx:
        ctx.prec = _DEC_PREC
        return _round_half_up(127 / z)


class GaussianLUT:
    """8-bit Gaussian lookup table for one ``z_max``: words -> z_q in [-127, 127] (int8).

    Attributes: ``z_max``; ``delta`` (= z_max / 127, the scale of z_q); ``one_q`` (= round(1/delta));
    ``thresholds`` (read-only ``uint32[254]``); ``counts`` (``int64[255]``, the number of 32-bit words
    mapped to each level -127..127; sums to 2**32); ``pmf`` (``counts / 2**32``); ``levels``
    (-127..127); and the two-level search index ``bucket_base`` (``int64[65536]``), ``bucket_span``
    and ``thresholds_padded`` (see :func:`bucket_index`). All arrays are read-only.
    """

    def __init__(self, z_max=Z_MAX_DEFAULT):
        self.z_max = check_z_max(z_max)
        self.delta = self.z_max / 127.0
        self.one_q = one_q(self.z_max)
        t = np.array(gaussian_thresholds(self.z_max), dtype=np.uint32)
        t.setflags(write=False)
        self.thresholds = t
        edges = np.concatenate([[0], t.astype(np.int64), [1 << 32]])
        counts = np.diff(edges)
        counts.setflags(write=False)
        self.counts = counts
        self.pmf = counts / float(1 << 32)
        self.pmf.setflags(write=False)
        self.levels = np.arange(-127, 128, dtype=np.int64)
        self.levels.setflags(write=False)
        base, span = bucket_index(self.thresholds)
        self.bucket_base = base
        self.bucket_span = span
        padded = np.concatenate([t.astype(np.int64), np.full(span, 1 << 32, dtype=np.int64)])
        padded.setflags(write=False)
        self.thresholds_padded = padded

    def sample(self, words) -> np.ndarray:
        """Map uint32 words to int8 z_q = (number of thresholds <= word) - 127 (integer compares).

        Two-level search, exactly equal to ``np.searchsorted(thresholds, words, "right") - 127``:
        ``b = bucket_base[u >> 16]`` counts the thresholds below the word's 2**16-bucket, then the at
        most ``bucket_span`` thresholds from index ``b`` on are compared with the word.
        """
        w = np.asarray(words)
        if w.dtype != np.uint32:
            raise TypeError(f"words must be a uint32 array, got dtype {w.dtype}")
        b = self.bucket_base[w >> np.uint32(16)]
        idx = b.astype(np.int16)
        for t in range(self.bucket_span):
            idx += self.thresholds_padded[b + t] <= w
        return (idx - 127).astype(np.int8)

    def variance(self) -> float:
        """Exact variance of ``z_q * delta`` under the table (mean is exactly 0 by symmetry)."""
        return float(np.sum(self.pmf * (self.levels * self.delta) ** 2))

    def __repr__(self) -> str:
        return f"GaussianLUT(z_max={self.z_max!r}, delta={self.delta:.6g}, one_q={self.one_q})"


def bucket_index(thresholds: np.ndarray) -> tuple[np.ndarray, int]:
    """Index for the two-level search of a sorted threshold table.

    ``base[h]`` = number of thresholds ``< h * 2**16`` (h = 0..65535); ``span`` = the largest number of
    thresholds inside one bucket ``[h * 2**16, (h + 1) * 2**16)`` (1 for z_max = 3.5). For a word u,
    ``count(T <= u) = base[u >> 16] + sum_{t < span} (T[base[u >> 16] + t] <= u)`` with T padded by
    ``span`` entries of 2**32: thresholds before ``base`` are below u's bucket, those at
    ``base + span`` or later are above it.
    """
    t = np.asarray(thresholds, dtype=np.int64)
    starts = np.arange(1 << 16, dtype=np.int64) << 16
    base = np.searchsorted(t, starts, side="left").astype(np.int64)
    span = int(np.max(np.diff(np.append(base, t.size))))
    base.setflags(write=False)
    return base, max(span, 1)


@functools.lru_cache(maxsize=32)
def _lut_cached(z_max: float) -> GaussianLUT:
    return GaussianLUT(z_max)


def gaussian_lut(z_max=Z_MAX_DEFAULT) -> GaussianLUT:
    """The cached :class:`GaussianLUT` for ``z_max``."""
    return _lut_cached(check_z_max(z_max))


# ----------------------------------------------------------------------------------------------
# distributions
# ----------------------------------------------------------------------------------------------
def rademacher_from_words(words, one: int) -> np.ndarray:
    """``+one`` where bit 31 of the word is 0, ``-one`` where it is 1 (int8)."""
    w = np.asarray(words, dtype=np.uint32)
    sign = (w >> np.uint32(31)).astype(np.int16)
    return (one * (1 - 2 * sign)).astype(np.int8)


def uniform_from_words(words) -> np.ndarray:
    """Uniform on the 255 levels -127..127: ``((u * 255) >> 32) - 127`` (int8)."""
    w = np.asarray(words, dtype=np.uint32).astype(np.uint64)
    return (((w * np.uint64(N_LEVELS)) >> np.uint64(32)).astype(np.int16) - 127).astype(np.int8)


def gaussian_q(seed, step, sample, tensor_id, shape, z_max=Z_MAX_DEFAULT, offset=0) -> np.ndarray:
    """Gaussian perturbation z_q (``int8``, scale ``z_max / 127``) of the given shape.

    Elements are taken in C order from the stream starting at element ``offset``.
    """
    lut = gaussian_lut(z_max)
    dims, size = shape_size(shape)
    return _map_words(seed, step, sample, tensor_id, size, offset, np.int8, lut.sample).reshape(dims)


def rademacher_q(seed, step, sample, tensor_id, shape, z_max=Z_MAX_DEFAULT, offset=0) -> np.ndarray:
    """Rademacher perturbation ``±1_q`` (``int8``, scale ``z_max / 127``) of the given shape."""
    one = one_q(z_max)
    dims, size = shape_size(shape)
    fn = functools.partial(rademacher_from_words, one=one)
    return _map_words(seed, step, sample, tensor_id, size, offset, np.int8, fn).reshape(dims)


def uniform_q(seed, step, sample, tensor_id, shape, offset=0) -> np.ndarray:
    """Uniform perturbation on the 255 levels -127..127 (``int8``) of the given shape."""
    dims, size = shape_size(shape)
    return _map_words(seed, step, sample, tensor_id, size, offset, np.int8, uniform_from_words).reshape(dims)
