"""Tests of the integer counter-based perturbation sampler (fwdgrad.rng.reference, fwdgrad.rng.torch_port)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fwdgrad.rng import reference as rn
from fwdgrad.rng import torch_port as rt

N_STAT = 1 << 20
KEY = (20240917, 3, 1, 7)

KEYS = [
    (0, 0, 0, 0),
    (1, 2, 3, 4),
    (2**31 - 1, 2**31 - 1, 2**31, 2**31 + 1),
    (2**32 + 5, 2**31 + 17, 2, 2**32 - 1),
    (2**64 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1),
]
RANGES = [(1, 0), (7, 0), (1000, 3), (33, 2**24 + 1), (5000, 2**24 - 2), (4097, 2**31 + 6), (10, 2**34 - 10)]

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    """fwdgrad.rng.torch_port hands CPU requests to the (faster) numpy code; the tests here pin the torch
    integer kernels themselves, on every device, against numpy."""
    monkeypatch.setattr(rt, "_on_cpu", lambda device: False)


def _phi(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def _chi2_upper_p(stat: float, df: int) -> float:
    """Upper-tail p-value of chi-square via the Wilson-Hilferty cube-root normal approximation."""
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ----------------------------------------------------------------------------------------------
# the hash
# ----------------------------------------------------------------------------------------------
KAT = [  # Random123 tests/kat_vectors, philox4x32 10: ctr, key -> out
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    assert rn.philox4x32_int(ctr, key) == want
    # the vectorized numpy and torch paths on the same vectors
    out_np = rn.philox4x32([np.array([c], dtype=np.uint64) for c in ctr], key, rn._mulhilo_np)
    assert tuple(int(x[0]) for x in out_np) == want
    out_t = rn.philox4x32([torch.tensor([c], dtype=torch.int64) for c in ctr], key, rt._mulhilo_torch)
    assert tuple(int(x[0]) for x in out_t) == want


def test_word_layout_matches_spec():
    seed, step, sample, tid = 2**40 + 99, 5, 6, 7
    words = rn.hash_words(seed, step, sample, tid, 12, offset=8)
    for i in range(8, 20):
        block = rn.philox4x32_int((i >> 2, tid, sample, step), (seed & 0xFFFFFFFF, seed >> 32))
        assert int(words[i - 8]) == block[i & 3]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", KEYS)
def test_words_bit_identical_numpy_torch(key, device):
    for n, offset in RANGES:
        a = rn.hash_words(*key, n, offset)
        b = rt.hash_words(*key, n, offset, device=device)
        assert a.dtype == np.uint32 and b.dtype == torch.int64 and b.device.type == device
        np.testing.assert_array_equal(a.astype(np.int64), b.cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key", KEYS)
def test_samples_bit_identical_numpy_torch(key, device):
    for shape, offset in [((3, 5), 0), ((2, 3, 4, 5), 1), ((1000,), 2**24 + 3), ((17, 33), 2**33 + 2)]:
        for z_max in (1.0, 2.5, 3.5, 6.0):
            a = rn.gaussian_q(*key, shape, z_max=z_max, offset=offset)
            b = rt.gaussian_q(*key, shape, z_max=z_max, offset=offset, device=device)
            assert a.dtype == np.int8 and b.dtype == torch.int8 and tuple(b.shape) == shape
            np.testing.assert_array_equal(a, b.cpu().numpy())
            a = rn.rademacher_q(*key, shape, z_max=z_max, offset=offset)
            b = rt.rademacher_q(*key, shape, z_max=z_max, offset=offset, device=device)
            np.testing.assert_array_equal(a, b.cpu().numpy())
        a = rn.uniform_q(*key, shape, offset=offset)
        b = rt.uniform_q(*key, shape, offset=offset, device=device)
        np.testing.assert_array_equal(a, b.cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_large_tensor_bit_identical_across_chunks(device):
    n = 4 * rn.CHUNK_BLOCKS * 3 + 11  # several chunks on both sides
    a = rn.gaussian_q(*KEY, n, offset=5)
    b = rt.gaussian_q(*KEY, n, offset=5, device=device)
    np.testing.assert_array_equal(a, b.cpu().numpy())


def test_offset_slices_equal_full_tensor():
    full_np = rn.hash_words(*KEY, 4 * rn.CHUNK_BLOCKS + 100)
    full_t = rt.hash_words(*KEY, 4 * rn.CHUNK_BLOCKS + 100)
    for offset, n in [(0, 1), (1, 1), (2, 5), (3, 4), (4, 4), (5, 1000), (4 * rn.CHUNK_BLOCKS - 3, 50)]:
        np.testing.assert_array_equal(rn.hash_words(*KEY, n, offset), full_np[offset : offset + n])
        assert torch.equal(rt.hash_words(*KEY, n, offset), full_t[offset : offset + n])
    z_full = rn.gaussian_q(*KEY, (64, 50))
    np.testing.assert_array_equal(rn.gaussian_q(*KEY, (10, 50), offset=50 * 20), z_full[20:30])
    zt_full = rt.gaussian_q(*KEY, (64, 50))
    assert torch.equal(rt.gaussian_q(*KEY, (10, 50), offset=50 * 20), zt_full[20:30])
    # a slice far past 2**24 equals the tail of a range that starts just before it
    far = 2**30 + 1
    np.testing.assert_array_equal(rn.hash_words(*KEY, 9, far + 3), rn.hash_words(*KEY, 12, far)[3:])


def test_shapes_and_empty():
    assert rn.gaussian_q(*KEY, 5).shape == (5,)
    assert rn.gaussian_q(*KEY, (0, 3)).shape == (0, 3)
    assert rn.hash_words(*KEY, 0).shape == (0,)
    assert tuple(rt.gaussian_q(*KEY, ()).shape) == ()
    assert rt.gaussian_q(*KEY, ()).item() == rn.gaussian_q(*KEY, ()).item()
    assert tuple(rt.hash_words(*KEY, 0).shape) == (0,)
    # numpy integer arguments are accepted
    np.testing.assert_array_equal(rn.gaussian_q(*(np.int64(k) for k in KEY), 9), rn.gaussian_q(*KEY, 9))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rn.hash_words(-1, 0, 0, 0, 4), "seed must be in"),
        (lambda: rn.hash_words(2**64, 0, 0, 0, 4), "seed must be in"),
        (lambda: rn.hash_words(0, 2**32, 0, 0, 4), "step must be in"),
        (lambda: rn.hash_words(0, 0, -3, 0, 4), "sample must be in"),
        (lambda: rn.hash_words(0, 0, 0, 2**32, 4), "tensor_id must be in"),
        (lambda: rn.hash_words(0, 0, 0, 0, 4, offset=2**34 - 2), "offset \\+ n"),
        (lambda: rn.hash_words(1.5, 0, 0, 0, 4), "seed must be an integer"),
        (lambda: rn.gaussian_q(0, 0, 0, 0, 4, z_max=0.5), "z_max must be in"),
        (lambda: rn.gaussian_q(0, 0, 0, 0, 4, z_max=float("nan")), "z_max must be in"),
        (lambda: rn.GaussianLUT(7.0), "z_max must be in"),
        (lambda: rt.gaussian_q(0, 0, 0, 0, 4, z_max=6.5), "z_max must be in"),
        (lambda: rt.hash_words(0, 0, 0, -1, 4), "tensor_id must be in"),
        (lambda: rn.gaussian_q(0, 0, 0, 0, (2, -1)), "shape entry must be in"),
        (lambda: rn.GaussianLUT(3.5).sample(np.zeros(3, dtype=np.int64)), "uint32"),
        (lambda: rt.gaussian_from_words(torch.zeros(3, dtype=torch.int32)), "int64"),
    ],
)
def test_bad_input_raises_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_words_have_uniform_bits():
    w = rn.hash_words(*KEY, N_STAT)
    bits = (w[:, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)
    freq = bits.mean(axis=0)
    assert np.all(np.abs(freq - 0.5) < 5 * 0.5 / math.sqrt(N_STAT)), freq
    # and the words themselves: mean of u / 2**32 ~ 1/2, 16 equal bins ~ flat
    u = w / 2.0**32
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / N_STAT)
    counts = np.bincount(w >> np.uint32(28), minlength=16)
    expect = N_STAT / 16
    assert _chi2_upper_p(float(np.sum((counts - expect) ** 2 / expect)), 15) > 1e-4


# ----------------------------------------------------------------------------------------------
# the Gaussian table
# ----------------------------------------------------------------------------------------------
def test_worked_example_z_max_3_5():
    lut = rn.gaussian_lut(3.5)
    assert lut.delta == pytest.approx(0.02756, abs=1e-5)
    assert lut.one_q == 36 == rn.one_q(3.5)
    assert lut.thresholds.dtype == np.uint32 and lut.thresholds.shape == (254,)
    # pinned values (docs/rng.md): a change here changes every perturbation ever generated
    assert int(lut.thresholds[0]) == 1052046
    assert int(lut.thresholds[126]) == 2123873946
    assert int(lut.thresholds[127]) == 2171093350
    assert int(lut.thresholds.astype(np.int64).sum()) == 545460846592
    assert rn.gaussian_q(42, 0, 0, 0, 12).tolist() == [10, -3, -53, -15, 82, -16, 1, -4, 34, 15, 9, 27]
    assert [int(x) for x in rn.hash_words(42, 0, 0, 0, 2)] == [0x9CEAF053, 0x77F5493B]


@pytest.mark.parametrize("z_max", [1.0, 2.0, 3.5, 4.25, 6.0])
def test_table_is_symmetric_and_matches_quantized_normal(z_max):
    lut = rn.GaussianLUT(z_max)
    t = lut.thresholds.astype(np.int64)
    assert np.all(np.diff(t) > 0)
    np.testing.assert_array_equal(t + t[::-1], np.full(254, 2**32))
    assert int(lut.counts.sum()) == 2**32
    d = z_max / 127
    cdf = [_phi((k + 0.5) * d) for k in range(-127, 127)]
    want = np.diff(np.concatenate([[0.0], cdf, [1.0]]))
    np.testing.assert_allclose(lut.pmf, want, rtol=0, atol=2e-9)
    assert rn.gaussian_lut(z_max) is rn.gaussian_lut(float(z_max))  # cached
    assert lut.one_q == round(127 / z_max)


@pytest.mark.parametrize("z_max", [1.0, 3.5, 6.0])
def test_two_level_search_equals_binary_search(z_max):
    lut = rn.gaussian_lut(z_max)
    t = lut.thresholds
    edges = np.concatenate([t, t - np.uint32(1), t + np.uint32(1), np.array([0, 2**32 - 1], dtype=np.uint32)])
    words = np.concatenate([edges, rn.hash_words(*KEY, 200_000)])
    want = np.searchsorted(t, words, side="right") - 127
    np.testing.assert_array_equal(lut.sample(words), want)
    got_t = rt.gaussian_from_words(torch.from_numpy(words.astype(np.int64)), z_max)
    np.testing.assert_array_equal(got_t.numpy(), want)
    assert torch.equal(
        torch.searchsorted(
            torch.from_numpy(t.astype(np.int64)), torch.from_numpy(words.astype(np.int64)), right=True
        )
        - 127,
        got_t.long(),
    )


def _clipped_normal_var(c: float) -> float:
    """Var of N(0,1) clipped to [-c, c]."""
    tail = _phi(-c)
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    return (1 - 2 * tail - 2 * c * pdf) + 2 * c * c * tail


def test_gaussian_moments_tails_and_chi_square():
    lut = rn.gaussian_lut(3.5)
    z = rn.gaussian_q(*KEY, N_STAT).astype(np.int64)
    x = z * lut.delta
    assert abs(x.mean()) < 5 / math.sqrt(N_STAT)
    assert abs(lut.variance() - _clipped_normal_var(3.5)) < 2e-3
    assert abs(lut.variance() - 1.0) < 2e-3
    assert abs(x.var() - lut.variance()) < 5 * math.sqrt(2 / N_STAT)
    counts = np.bincount(z + 127, minlength=255)
    expect = lut.pmf * N_STAT
    for end in (0, 254):  # merged tails at -127 and +127
        assert expect[end] == pytest.approx(N_STAT * _phi(-126.5 * lut.delta), rel=1e-6)
        assert abs(counts[end] - expect[end]) < 5 * math.sqrt(expect[end])
    assert expect.min() > 5
    stat = float(np.sum((counts - expect) ** 2 / expect))
    assert _chi2_upper_p(stat, 254) > 1e-4, stat


def test_gaussian_independence_across_counters_and_keys():
    seed, step, sample, tid = KEY
    z = rn.gaussian_q(seed, step, sample, tid, N_STAT).astype(np.float64)
    tol = 5 / math.sqrt(N_STAT)
    for lag in (1, 2, 3, 4, 5):
        assert abs(np.corrcoef(z[:-lag], z[lag:])[0, 1]) < tol, lag
    others = {
        "seed": (seed + 1, step, sample, tid),
        "seed_hi": (seed + 2**32, step, sample, tid),
        "step": (seed, step + 1, sample, tid),
        "sample": (seed, step, sample + 1, tid),
        "tensor_id": (seed, step, sample, tid + 1),
    }
    for name, key in others.items():
        other = rn.gaussian_q(*key, N_STAT).astype(np.float64)
        assert abs(np.corrcoef(z, other)[0, 1]) < tol, name
        assert np.mean(z == other) < 0.05, name  # P(equal) is about 0.015 for independent draws


def test_rademacher_and_uniform():
    r = rn.rademacher_q(*KEY, N_STAT, z_max=3.5)
    assert set(np.unique(r).tolist()) == {-36, 36}
    assert abs(float(np.mean(r > 0)) - 0.5) < 5 * 0.5 / math.sqrt(N_STAT)
    assert rn.rademacher_q(*KEY, 10, z_max=1.0).max() == 127
    u = rn.uniform_q(*KEY, N_STAT).astype(np.int64)
    assert u.min() == -127 and u.max() == 127
    counts = np.bincount(u + 127, minlength=255)
    expect = N_STAT / 255
    assert _chi2_upper_p(float(np.sum((counts - expect) ** 2 / expect)), 254) > 1e-4


def test_numpy_module_does_not_import_torch():
    code = (
        "import sys; import fwdgrad.rng as r; r.gaussian_q(1, 2, 3, 4, (5, 5)); "
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')); "
        "assert not bad, bad"
    )
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


def test_cpu_requests_use_numpy_and_match(monkeypatch):
    monkeypatch.undo()
    assert rt._on_cpu(None)
    np.testing.assert_array_equal(rt.gaussian_q(*KEY, (7, 9)).numpy(), rn.gaussian_q(*KEY, (7, 9)))
    np.testing.assert_array_equal(rt.hash_words(*KEY, 50).numpy(), rn.hash_words(*KEY, 50).astype(np.int64))
