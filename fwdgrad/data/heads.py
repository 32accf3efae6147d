"""Few-shot classification heads on embedding tensors: ProtoNet and SimpleShot. Pure functions.

* ProtoNet (Snell et al. 2017): class prototypes are the mean support embeddings; the logits of a
  query are its negative squared Euclidean distances to the prototypes.
* SimpleShot (Wang et al. 2019), "CL2N": subtract the mean embedding of the base (training) classes,
  L2-normalise, then classify by the nearest class centroid (same distance logits).
"""

from __future__ import annotations

import torch


def prototypes(support: torch.Tensor, support_labels: torch.Tensor, n_way: int) -> torch.Tensor:
    """Mean support embedding of each class ``0..n_way-1``: (n_way, D)."""
    one_hot = torch.nn.functional.one_hot(support_labels, n_way).to(support.dtype)  # (S, n_way)
    counts = one_hot.sum(0)
    if bool((counts == 0).any()):
        raise ValueError(f"every class 0..{n_way - 1} needs a support example, counts {counts.tolist()}")
    return (one_hot.T @ support) / counts[:, None]


def protonet_logits(query: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distances from each query (Q, D) to each prototype (C, D): (Q, C)."""
    return -torch.cdist(query, protos).pow(2)


def simpleshot_transform(embeddings: torch.Tensor, base_mean: torch.Tensor) -> torch.Tensor:
    """Centre by the base-class mean, then L2-normalise each embedding (SimpleShot's CL2N)."""
    return torch.nn.functional.normalize(embeddings - base_mean, dim=-1)


def simpleshot_logits(
    support: torch.Tensor,
    support_labels: torch.Tensor,
    query: torch.Tensor,
    base_mean: torch.Tensor,
    n_way: int,
) -> torch.Tensor:
    """Nearest-centroid logits (Q, n_way) on CL2N-transformed embeddings."""
    centroids = prototypes(simpleshot_transform(support, base_mean), support_labels, n_way)
    return protonet_logits(simpleshot_transform(query, base_mean), centroids)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of rows whose arg-max logit is the label."""
    return float((logits.argmax(dim=-1) == labels).float().mean())
