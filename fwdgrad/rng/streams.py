"""Stream ids: the sample-index offsets that keep every random stream of a run apart (one table).

A stream key is ``(seed, step, sample, tensor_id)`` (:mod:`fwdgrad.rng.reference`). Perturbation ``i`` of a
step uses ``sample = i`` (``i < m``, small); every other use of the sampler adds one of the offsets below to
its own sample index, so no two uses share a key. Each offset is a distinct power of two far above any m.
The numpy edge runtime, the torch trainer and a device must use the same values: changing one changes
every run that depends on it.
"""

from __future__ import annotations

__all__ = ["SR_STREAM", "SAM_STREAM", "MASK_STREAM", "DATA_STREAM"]

# stochastic rounding: sample = SR_STREAM + 2t (perturbation) or SR_STREAM + 2t + 1 (update) for tensor t
SR_STREAM = 1 << 20
# sharpness-aware minimization: the ascent direction z_s of each step (fwdgrad.ff.optim)
SAM_STREAM = 1 << 21
# the "random" sparse-update masks: key (seed, 0, MASK_STREAM, t) seeds tensor t's generator (ff.masks)
MASK_STREAM = 1 << 22
# the batch-order permutation of the edge runtime's fine-tuning data, step 0, tensor 0 (fwdgrad.edge)
DATA_STREAM = 1 << 23
