"""Integer counter-based perturbation sampler (Philox4x32-10 words + 8-bit Gaussian threshold table).

* :mod:`fwdgrad.rng.reference` — the numpy reference, the bit-exact specification (see its docstring and
  ``docs/rng.md``); its public API is re-exported here.
* :mod:`fwdgrad.rng.streams` — the one table of stream ids (sample-index offsets), re-exported here.
* :mod:`fwdgrad.rng.torch_port` — the same words and samples with torch integer ops (CPU or CUDA),
  bit-identical to the reference.

This package never imports torch (the numpy edge runtime imports it); only ``torch_port`` does.
"""

from .reference import (
    M0,
    M1,
    MAX_ELEMENTS,
    ROUNDS,
    W0,
    W1,
    Z_MAX_DEFAULT,
    Z_MAX_MAX,
    Z_MAX_MIN,
    GaussianLUT,
    bucket_index,
    check_z_max,
    gaussian_lut,
    gaussian_q,
    gaussian_thresholds,
    hash_words,
    iter_word_chunks,
    map_words,
    one_q,
    philox4x32,
    philox4x32_int,
    rademacher_from_words,
    rademacher_q,
    stream_key,
    uniform_from_words,
    uniform_q,
    walk_chunks,
)
from .streams import DATA_STREAM, LAYER_STREAM, LAYERWISE, MASK_STREAM, SAM_STREAM, SR_STREAM, active_tensor

__all__ = [
    "LAYER_STREAM",
    "LAYERWISE",
    "active_tensor",
    "M0",
    "M1",
    "MAX_ELEMENTS",
    "ROUNDS",
    "W0",
    "W1",
    "Z_MAX_DEFAULT",
    "Z_MAX_MAX",
    "Z_MAX_MIN",
    "GaussianLUT",
    "bucket_index",
    "check_z_max",
    "gaussian_lut",
    "gaussian_q",
    "gaussian_thresholds",
    "hash_words",
    "iter_word_chunks",
    "map_words",
    "one_q",
    "philox4x32",
    "philox4x32_int",
    "rademacher_from_words",
    "rademacher_q",
    "stream_key",
    "uniform_from_words",
    "uniform_q",
    "walk_chunks",
    "SR_STREAM",
    "SAM_STREAM",
    "MASK_STREAM",
    "DATA_STREAM",
]
