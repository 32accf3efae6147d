"""Sparse-update masks (docs/method.md#sparse-update-masks): which entries of each trainable tensor are
perturbed and updated.

* ``topk``      the `density` fraction of largest-magnitude entries of each tensor
* ``random``    a uniformly random `density` fraction, from its own seeded generator (never the global RNG)
* ``threshold`` entries with |w| >= threshold · max|w| of their tensor

Masks are fixed when training starts (computed from the starting weights) and stored as bool tensors
(one bit per weight on a device).
"""

from __future__ import annotations

import math

import torch

from ..rng.streams import MASK_STREAM
from .estimators import Key, _generator

MASK_KINDS = ("topk", "random", "threshold")


def make_masks(
    weights: dict[str, torch.Tensor],
    kind: str = "topk",
    density: float = 0.1,
    threshold: float = 0.5,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    if kind not in MASK_KINDS:
        raise ValueError(f"sparse mask kind {kind!r} is invalid; allowed: {MASK_KINDS}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"sparse density={density!r} is invalid; allowed: (0, 1]")
    masks = {}
    for t, (name, w) in enumerate(weights.items()):
        mag = w.detach().abs().double().reshape(-1)
        k = max(1, math.ceil(density * mag.numel()))
        if kind == "topk":
            flat = torch.zeros(mag.numel(), dtype=torch.bool)
            flat[torch.topk(mag, k).indices] = True
        elif kind == "random":
            g = _generator(Key(seed, 0, MASK_STREAM, t), "cpu")
            flat = torch.zeros(mag.numel(), dtype=torch.bool)
            flat[torch.randperm(mag.numel(), generator=g)[:k]] = True
        else:
            flat = mag >= threshold * mag.max()
        masks[name] = flat.reshape(w.shape).to(w.device)
    return masks
