"""Seeded N-way K-shot episode sampling over a labelled set (few-shot evaluation,
docs/method.md#benchmarks-and-offline-data).

An episode draws ``n_way`` classes from the allowed (held-out) classes, then ``k_shot`` support and
``n_query`` query examples per class, without overlap. Indices refer to the labelled set; episode
labels are ``0..n_way-1`` in the order the classes were drawn. All randomness comes from a local
``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Episode:
    """Indices and episode labels of one task: ``n_way*k_shot`` support, ``n_way*n_query`` query."""

    classes: torch.Tensor
    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor


def sample_episode(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n_way: int,
    k_shot: int,
    n_query: int,
    rng: np.random.Generator,
    classes: Sequence[int] | None = None,
) -> Episode:
    """Draw one episode from ``labels`` restricted to ``classes`` (default: every class present).

    Only classes with at least ``k_shot + n_query`` examples are eligible; fewer than ``n_way``
    eligible classes is a ``ValueError``.
    """
    labels = np.asarray(labels)
    if min(n_way, k_shot) < 1 or n_query < 0:
        raise ValueError(f"need n_way >= 1, k_shot >= 1, n_query >= 0, got {n_way}, {k_shot}, {n_query}")
    pool = np.unique(labels) if classes is None else np.asarray(sorted(set(int(c) for c in classes)))
    counts = {int(c): int(np.sum(labels == c)) for c in pool}
    eligible = [c for c in pool.tolist() if counts[c] >= k_shot + n_query]
    if len(eligible) < n_way:
        raise ValueError(
            f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with >= "
            f"{k_shot + n_query} examples; only {len(eligible)} of {len(pool)} classes qualify"
        )
    chosen = rng.choice(eligible, size=n_way, replace=False)
    support, query = [], []
    for cls in chosen:
        picked = rng.choice(np.flatnonzero(labels == cls), size=k_shot + n_query, replace=False)
        support.append(picked[:k_shot])
        query.append(picked[k_shot:])
    return Episode(
        classes=torch.as_tensor(chosen, dtype=torch.int64),
        support=torch.as_tensor(np.concatenate(support), dtype=torch.int64),
        support_labels=torch.arange(n_way).repeat_interleave(k_shot),
        query=torch.as_tensor(np.concatenate(query), dtype=torch.int64),
        query_labels=torch.arange(n_way).repeat_interleave(n_query),
    )


def episodes(
    labels: Sequence[int] | np.ndarray | torch.Tensor,
    n_episodes: int,
    n_way: int = 5,
    k_shot: int = 5,
    n_query: int = 15,
    seed: int = 0,
    classes: Sequence[int] | None = None,
) -> Iterator[Episode]:
    """``n_episodes`` episodes from one generator seeded with ``seed`` (same seed, same episodes)."""
    rng = np.random.default_rng(seed)
    for _ in range(n_episodes):
        yield sample_episode(labels, n_way, k_shot, n_query, rng, classes)
