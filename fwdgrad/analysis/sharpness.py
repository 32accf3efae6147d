"""Sharpness of a loss at a point: the top Hessian eigenvalue (float, backprop) and a forward-only estimate
that works through any loss evaluation, the fixed-point engine included.

Both take the point as named tensors (``dict[str, Tensor]``) and a loss function of such a dict:

* :func:`top_hessian_eigenvalue` — power iteration on Hessian-vector products (PyHessian style). The HVP is
  ``torch.autograd.grad`` of the gradient with ``create_graph=True`` (double backward): the graph of the
  gradient is built once and every iteration is one backward through it. Power iteration converges to the
  eigenvalue of **largest magnitude**; at (or near) a minimum that is the top positive eigenvalue, the usual
  "sharpness". ``loss_fn`` must be differentiable (a float model).
* :func:`hessian_trace` — Hutchinson's estimator E[vᵀHv] = tr(H) with Rademacher v (float, double
  backward): the float reference for the forward-only ``trace``.
* :func:`forward_sharpness` — forward passes only. For directions ``z`` on the unit sphere,

      c(z) = [L(w + ρz) + L(w − ρz) − 2 L(w)] / ρ²  ≈  zᵀ H z          (exact for a quadratic)

  and ``mean`` = average of c over the directions estimates E[zᵀHz] = tr(H)/d (``trace`` = d·mean). The
  directions are drawn in orthonormal blocks (QR of a Gaussian matrix), so with ``d`` directions in
  dimension ``d`` the trace is exact on a quadratic and otherwise the variance is lower than i.i.d. draws.
  Two estimates of the maximum over directions come with it: ``max_sampled`` = max c(z) over the drawn
  directions, and ``ritz`` = the top eigenvalue of the k×k matrix ZᵀHZ of the Hessian restricted to the span
  of the first ``subspace`` directions (off-diagonals from c(zᵢ+zⱼ) = c(zᵢ) + c(zⱼ) + 2zᵢᵀHzⱼ).
  Both are lower bounds of λ_max (up to the O(ρ²) finite-difference error); in high dimension they are
  far below it unless the spectrum is dominated by a few directions — report them as what they are.
  With a quantized model ρ must span many weight LSBs, else w ± ρz re-quantize to w (c = 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

Params = dict[str, torch.Tensor]


def _flat(p: Params, names: list[str]) -> torch.Tensor:
    return torch.cat([p[n].detach().reshape(-1).double() for n in names])


def _unflat(v: torch.Tensor, like: Params, names: list[str]) -> Params:
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = v[i : i + k].reshape(like[n].shape).to(like[n].dtype)
        i += k
    return out


@dataclass
class EigenResult:
    """Top Hessian eigenvalue (largest magnitude) by power iteration."""

    eigenvalue: float
    iterations: int
    converged: bool
    eigenvector: Params | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("eigenvector")
        return d


def top_hessian_eigenvalue(
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    iters: int = 50,
    tol: float = 1e-4,
    seed: int = 0,
    return_vector: bool = False,
) -> EigenResult:
    """Power iteration on Hessian-vector products of ``loss_fn`` at ``params`` (double backward).

    loss_fn: differentiable function of a dict of tensors (same keys as ``params``) returning a scalar.
    Stops when the Rayleigh quotient changes by less than ``tol`` (relative) or after ``iters`` HVPs.
    """
    if iters < 1:
        raise ValueError(f"iters={iters!r} is invalid; allowed: integers >= 1")
    names, p, hvp = _hvp_setup(loss_fn, params)
    g = torch.Generator().manual_seed(seed)
    v = [torch.randn(p[n].shape, generator=g, dtype=p[n].dtype) for n in names]
    norm = math.sqrt(sum(float((t * t).sum()) for t in v))
    v = [t / norm for t in v]
    lam, converged, done = float("nan"), False, 0
    for it in range(1, iters + 1):
        done = it
        hv = hvp(v)
        new = sum(float((a * b).sum()) for a, b in zip(hv, v))
        norm = math.sqrt(sum(float((t * t).sum()) for t in hv))
        if norm == 0.0:  # v in the null space: the Hessian is 0 along everything we can reach
            lam, converged = 0.0, True
            break
        v = [t / norm for t in hv]
        if not math.isnan(lam) and abs(new - lam) <= tol * max(abs(lam), 1e-12):
            lam, converged = new, True
            break
        lam = new
    vec = {n: t.detach() for n, t in zip(names, v)} if return_vector else None
    return EigenResult(lam, done, converged, vec)


def _hvp_setup(loss_fn, params: Params):
    names = list(params)
    p = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(p), [p[n] for n in names], create_graph=True)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        hv = torch.autograd.grad(
            grads, [p[n] for n in names], grad_outputs=v, retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(t) if h is None else h.detach() for h, t in zip(hv, v)]

    return names, p, hvp


def hessian_trace(
    loss_fn: Callable[[Params], torch.Tensor], params: Params, samples: int = 16, seed: int = 0
) -> tuple[float, float]:
    """Hutchinson estimate of tr(H) at ``params``: mean of vᵀHv over Rademacher v -> (trace, std error)."""
    if samples < 1:
        raise ValueError(f"samples={samples!r} is invalid; allowed: integers >= 1")
    names, p, hvp = _hvp_setup(loss_fn, params)
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(samples):
        v = [torch.randint(0, 2, p[n].shape, generator=g).to(p[n].dtype) * 2 - 1 for n in names]
        vals.append(sum(float((a * b).sum()) for a, b in zip(hvp(v), v)))
    t = torch.tensor(vals, dtype=torch.float64)
    se = float(t.std() / math.sqrt(samples)) if samples > 1 else float("nan")
    return float(t.mean()), se


@dataclass
class ForwardSharpness:
    """Forward-only curvature along random unit directions (see the module docstring)."""

    mean: float  # average zᵀHz over unit directions: tr(H)/d
    trace: float  # d · mean
    std: float  # standard deviation of the per-direction curvatures
    max_sampled: float  # max over the drawn directions
    ritz: float | None  # top eigenvalue of the Hessian restricted to the span of `subspace` directions
    rho: float
    directions: int
    dim: int
    forward_passes: int
    curvatures: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def orthonormal_directions(dim: int, n: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    """``n`` unit vectors in R^dim (rows), orthonormal in blocks of ``min(n, dim)`` (QR of Gaussians)."""
    if dim < 1 or n < 1:
        raise ValueError(f"need dim >= 1 and n >= 1 directions, got dim={dim}, n={n}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    while sum(len(r) for r in rows) < n:
        k = min(dim, n - sum(len(r) for r in rows))
        q, r = torch.linalg.qr(torch.randn(dim, k, generator=g, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # unique QR
        rows.append(q.T)
    return torch.cat(rows).to(dtype)


def forward_sharpness(
    loss_fn: Callable[[Params], float | torch.Tensor],
    params: Params,
    rho: float = 1e-2,
    directions: int = 16,
    subspace: int = 0,
    seed: int = 0,
) -> ForwardSharpness:
    """Forward-only sharpness at ``params``: second differences along random unit directions.

    loss_fn: any function of a dict of tensors returning the loss (float or 0-d tensor); it is only ever
    evaluated, never differentiated — e.g. a quantized model run in integer mode.
    rho: step length (absolute, in parameter units; the directions have unit norm over all of ``params``).
    subspace: k > 1 also estimates the top eigenvalue of ZᵀHZ over the first k directions
    (k(k−1) extra forwards).
    """
    if not rho > 0:
        raise ValueError(f"rho={rho!r} is invalid; allowed: > 0")
    if directions < 1:
        raise ValueError(f"directions={directions!r} is invalid; allowed: integers >= 1")
    if subspace < 0 or subspace > directions:
        raise ValueError(f"subspace={subspace!r} is invalid; allowed: 0..directions ({directions})")
    names = list(params)
    w = _flat(params, names)
    z = orthonormal_directions(w.numel(), directions, seed)
    calls = 0

    def loss_at(v: torch.Tensor) -> float:
        nonlocal calls
        calls += 1
        with torch.no_grad():
            return float(loss_fn(_unflat(v, params, names)))

    l0 = loss_at(w)

    def curvature(u: torch.Tensor) -> float:  # ≈ uᵀHu
        return (loss_at(w + rho * u) + loss_at(w - rho * u) - 2 * l0) / rho**2

    c = [curvature(zi) for zi in z]
    ct = torch.tensor(c, dtype=torch.float64)
    ritz = None
    if min(subspace, w.numel()) > 1:
        k = min(subspace, w.numel())  # the first k directions are orthonormal
        m = torch.diag(ct[:k])
        for i in range(k):
            for j in range(i + 1, k):
                m[i, j] = m[j, i] = (curvature(z[i] + z[j]) - c[i] - c[j]) / 2
        ritz = float(torch.linalg.eigvalsh(m)[-1])
    mean = float(ct.mean())
    return ForwardSharpness(
        mean=mean,
        trace=mean * w.numel(),
        std=float(ct.std()) if len(c) > 1 else 0.0,
        max_sampled=float(ct.max()),
        ritz=ritz,
        rho=rho,
        directions=directions,
        dim=w.numel(),
        forward_passes=calls,
        curvatures=c,
    )
