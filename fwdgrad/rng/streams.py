"""Stream ids: the sample-index offsets that keep every random stream of a run apart (one table).

A stream key is ``(seed, step, sample, tensor_id)`` (:mod:`fwdgrad.rng.reference`). Perturbation ``i`` of a
step uses ``sample = i`` (``i < m``, small); every other use of the sampler adds one of the offsets below to
its own sample index, so no two uses share a key. Each offset is a distinct power of two far above any m.
The numpy edge runtime, the torch trainer and a device must use the same values: changing one changes
every run that depends on it.
"""

from __future__ import annotations

from .reference import hash_words

__all__ = [
    "SR_STREAM",
    "SAM_STREAM",
    "MASK_STREAM",
    "DATA_STREAM",
    "LAYER_STREAM",
    "LAYERWISE",
    "active_tensor",
]

# stochastic rounding: sample = SR_STREAM + 2t (perturbation) or SR_STREAM + 2t + 1 (update) for tensor t
SR_STREAM = 1 << 20
# sharpness-aware minimization: the ascent direction z_s of each step (fwdgrad.ff.optim)
SAM_STREAM = 1 << 21
# the "random" sparse-update masks: key (seed, 0, MASK_STREAM, t) seeds tensor t's generator (ff.masks)
MASK_STREAM = 1 << 22
# the batch-order permutation of the edge runtime's fine-tuning data, step 0, tensor 0 (fwdgrad.edge)
DATA_STREAM = 1 << 23
# layer-wise training, layerwise="sample": the tensor that trains at step k is word 0 of key
# (seed, k, LAYER_STREAM, 0) modulo the number of trainable tensors (fwdgrad.rng.layerwise)
LAYER_STREAM = 1 << 24

#: which trainable tensors a forward-gradient step perturbs and updates: all of them, or one per step
LAYERWISE = ("off", "cycle", "sample")


def active_tensor(layerwise: str, seed: int, step: int, count: int) -> int | None:
    """The one tensor id (of `count`, in forward order) that step `step` trains under layer-wise forward
    gradients, or None (all train) with layerwise="off". cycle: step mod count; sample: a uniform draw,
    word 0 of the hash stream (seed, step, LAYER_STREAM, 0) mod count (the same on every runtime)."""
    if layerwise == "off":
        return None
    if layerwise == "cycle":
        return step % count
    if layerwise == "sample":
        return int(hash_words(seed, step, LAYER_STREAM, 0, 1)[0]) % count
    raise ValueError(f"layerwise={layerwise!r} is invalid; allowed: {', '.join(LAYERWISE)}")
