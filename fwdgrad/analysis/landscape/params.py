"""Points of a loss landscape and directions through them.

A point is a set of named tensors (``Params = dict[str, Tensor]``): the weights that vary. This module is
their algebra (clone, flatten/unflatten to one float64 vector, linear combinations) and the directions of
a plot: filter-normalized random directions (Li et al. 2018), PCA directions of trajectories, and the
least-squares projection of points onto a plane.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Params = dict[str, torch.Tensor]

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")


# ------------------------------------------------------------------------------------ named-tensor algebra
def clone(p: Params) -> Params:
    return {k: v.detach().clone() for k, v in p.items()}


def flatten(p: Params, names: Sequence[str] | None = None) -> torch.Tensor:
    """All tensors of ``p`` (in ``names`` order, default insertion order) as one float64 vector."""
    names = list(p) if names is None else names
    return torch.cat([p[n].detach().reshape(-1).double() for n in names])


def unflatten(v: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten` for the shapes/dtypes (and order) of ``like``."""
    out, i = {}, 0
    for n, t in like.items():
        out[n] = v[i : i + t.numel()].reshape(t.shape).to(t.dtype)
        i += t.numel()
    if i != v.numel():
        raise ValueError(f"vector has {v.numel()} entries but the parameters have {i}")
    return out


def combine(center: Params, directions: Sequence[Params], coeffs: Sequence[float]) -> Params:
    """center + Σ coeffs[i] · directions[i]."""
    out = {}
    for n, c in center.items():
        t = c.detach().clone()
        for d, a in zip(directions, coeffs):
            if a:
                t.add_(d[n].to(t.dtype), alpha=float(a))
        out[n] = t
    return out


def subtract(a: Params, b: Params) -> Params:
    return {n: a[n].detach() - b[n].detach() for n in a}


def check_same_keys(a: Params, b: Params, what: str) -> None:
    if list(a) != list(b):
        raise ValueError(f"{what}: tensor names differ: {list(a)} vs {list(b)}")


# -------------------------------------------------------------------------------------------- directions
def filter_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm of each filter (slice along dim 0) of a ≥2-D tensor; the whole norm for 0/1-D tensors."""
    if t.dim() <= 1:
        return t.detach().double().norm().reshape(1)
    return t.detach().double().reshape(t.shape[0], -1).norm(dim=1)


def normalize_direction(
    direction: Params, weights: Params, norm: str = "filter", ignore: str = "biasbn"
) -> Params:
    """Rescale ``direction`` to the scale of ``weights`` (Li et al. 2018).

    norm: ``filter`` — each filter d_i ← d_i · ‖w_i‖/‖d_i‖; ``layer`` — each tensor d ← d · ‖w‖/‖d‖;
    ``none`` — unchanged. ignore: ``biasbn`` zeroes the direction of 0/1-D tensors (biases, BatchNorm),
    ``none`` sets it to the weights themselves (Li et al.'s choice when biases are not ignored).
    """
    if norm not in NORMS:
        raise ValueError(f"direction normalization {norm!r} is invalid; allowed: {NORMS}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore={ignore!r} is invalid; allowed: {IGNORES}")
    check_same_keys(direction, weights, "normalize_direction")
    out = {}
    for n, d in direction.items():
        w = weights[n].detach()
        if w.dim() <= 1:
            out[n] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        dd = d.detach().double()
        if norm == "filter":
            dn = dd.reshape(dd.shape[0], -1).norm(dim=1).clamp_min(1e-300)
            dd = dd * (filter_norms(w) / dn).reshape([-1] + [1] * (dd.dim() - 1))
        elif norm == "layer":
            dd = dd * (w.double().norm() / dd.norm().clamp_min(1e-300))
        out[n] = dd.to(w.dtype)
    return out


def random_direction(weights: Params, seed: int = 0, norm: str = "filter", ignore: str = "biasbn") -> Params:
    """A Gaussian direction with the shapes of ``weights``, normalized by :func:`normalize_direction`."""
    g = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in weights.items()}
    return normalize_direction(raw, weights, norm, ignore)


def random_plane(center: Params, seed: int = 0, norm: str = "filter", ignore: str = "biasbn") -> list[Params]:
    """Two independent filter-normalized random directions through ``center`` (seeds ``seed``, ``seed+1``)."""
    return [random_direction(center, seed, norm, ignore), random_direction(center, seed + 1, norm, ignore)]


def pca_directions(
    center: Params, snapshots: Sequence[Params], k: int = 2, weights: Sequence[float] | None = None
) -> tuple[list[Params], np.ndarray]:
    """Top-``k`` principal directions of the differences ``snapshot − center`` (unit vectors).

    Uncentered SVD of the difference matrix: the span of the result is the k-dimensional subspace through
    ``center`` closest (least squares) to all snapshots. ``weights`` scale each snapshot's row (e.g. to give
    two trajectories of very different lengths an equal say). Returns (directions, fraction of the total
    (weighted) squared displacement each direction explains). With fewer than k independent differences, the
    missing directions are filled by arbitrary orthonormal vectors with explained fraction 0.
    """
    if not snapshots:
        raise ValueError("pca_directions needs at least one snapshot")
    c = flatten(center)
    rows = torch.stack([flatten(s, list(center)) - c for s in snapshots])
    if weights is not None:
        if len(weights) != len(snapshots):
            raise ValueError(f"{len(weights)} weights for {len(snapshots)} snapshots")
        rows = rows * torch.as_tensor(weights, dtype=rows.dtype).unsqueeze(1)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    total = float((s**2).sum())
    dirs, ratios = [], []
    for i in range(k):
        if i < len(s) and s[i] > 1e-12 * max(1.0, float(s[0])):
            v, r = vh[i], float(s[i] ** 2) / total
        else:  # rank-deficient: any unit vector orthogonal to the previous ones
            g = torch.Generator().manual_seed(1234 + i)
            v = torch.randn(c.numel(), generator=g, dtype=torch.float64)
            for d in dirs:
                v -= (v @ d) * d
            v, r = v / v.norm(), 0.0
        # sign convention: the last snapshot has a non-negative coordinate
        if float(rows[-1] @ v) < 0:
            v = -v
        dirs.append(v)
        ratios.append(r)
    return [unflatten(v, center) for v in dirs], np.array(ratios)


def project(
    points: Sequence[Params], center: Params, directions: Sequence[Params]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coordinates of each point on the plane ``center + span(directions)``.

    Returns (coords (n, k), in_plane (n,)): in_plane = ‖projection‖ / ‖point − center‖ (1: on the plane;
    1 for the center itself).
    """
    c = flatten(center)
    a = torch.stack([flatten(d, list(center)) for d in directions], 1)  # (D, k)
    coords, frac = [], []
    for p in points:
        diff = flatten(p, list(center)) - c
        x = torch.linalg.lstsq(a, diff.unsqueeze(1)).solution.squeeze(1)
        coords.append(x.numpy())
        dn = float(diff.norm())
        frac.append(1.0 if dn == 0 else float((a @ x).norm()) / dn)
    return np.array(coords).reshape(len(points), len(directions)), np.array(frac)
