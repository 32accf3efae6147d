"""Forward-only optimizers with the `torch.optim` calling convention: ``opt.step(closure)``, where the
closure runs a forward pass and returns the loss — it never calls backward.

`ForwardGradient` is the one training step for every zeroth-order method (SPSA, one-sided, sign-m-SPSA,
QZO-FF); what differs lives in the strategy objects it holds (estimator, space). One step, top to bottom:

    0. (sharpness-aware) probe ±ρ·z_s, keep the worse neighbour w' = w + s*·ρ·z_s as the base   [+2 forwards]
    1. (one-sided) L0 = L(w')                                                                  [+1 forward]
    2. for i in 1..m:  L_i± = L(w' ± ε·z_i)   →  c_i = difference(L_i+, L_i−, L0)             [2m forwards]
    3. update  w ← w − η · (1/m) Σ_i c_i · z_i   (z_i regenerated tensor by tensor, never stored)

Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (QZO-FF); Malladi et al. 2023 (MeZO).
`qzo_ff(...)` and `zo_sgd(...)` build the usual configurations.
"""

from __future__ import annotations

import torch

from ..engine.model import QModel
from ..fixed_point import FixedPointSettings
from ..methods import check_positive
from ..rng.streams import SAM_STREAM
from .estimators import Estimator, preset
from .masks import make_masks
from .spaces import FixedPointSpace, FloatSpace, MomentumGuided, Space, Term


class ForwardGradient:
    """Zeroth-order SGD on a `Space` (float parameters or fixed-point integers).

    lr: η; eps: ε (real units; the fixed-point space converts it to ε_q = round(ε/Δ_w));
    sharpness_rho: ρ of the sharpness-aware ascent probe (None: off).
    """

    def __init__(
        self, space: Space, estimator: Estimator, lr: float, eps: float, sharpness_rho: float | None = None
    ):
        check_positive("lr", lr)
        check_positive("eps", eps)
        if sharpness_rho is not None and not sharpness_rho > 0:
            raise ValueError(f"sharpness_rho={sharpness_rho!r} is invalid; allowed: > 0 or None")
        self.space, self.estimator, self.lr, self.eps = space, estimator, lr, eps
        self.sharpness_rho = sharpness_rho
        self.step_count = 0
        self.forward_passes = 0
        self.last_coeffs: list[float] = []

    @property
    def forwards_per_step(self) -> int:
        return self.estimator.forwards_per_step + (2 if self.sharpness_rho else 0)

    def _loss(self, closure, terms: list[Term]) -> float:
        with self.space.perturbed(self.step_count, terms):
            loss = closure()
        self.forward_passes += 1
        return float(loss)

    @torch.no_grad()
    def step(self, closure) -> float:
        """One forward-gradient step; returns the mean loss of the perturbed evaluations."""
        diff, eps = self.estimator.difference, self.eps
        base: list[Term] = []
        if self.sharpness_rho:
            rho = self.sharpness_rho
            up = self._loss(closure, [Term(SAM_STREAM, rho, +1)])
            down = self._loss(closure, [Term(SAM_STREAM, rho, -1)])
            base = [Term(SAM_STREAM, rho, +1 if up >= down else -1)]
        center = self._loss(closure, base) if diff.needs_center else None
        coeffs, losses = [], []
        for i in range(self.estimator.m):
            plus = self._loss(closure, base + [Term(i, eps, +1)])
            minus = self._loss(closure, base + [Term(i, eps, -1)]) if diff.two_sided else None
            coeffs.append(diff.coefficient(plus, minus, center, eps))
            losses += [plus] if minus is None else [plus, minus]
        self.space.update(self.step_count, coeffs, self.lr)
        self.last_coeffs = coeffs
        self.step_count += 1
        return sum(losses) / len(losses)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients to clear (kept for drop-in use in torch training loops)."""

    def state_dict(self) -> dict:
        return {
            "step_count": self.step_count,
            "forward_passes": self.forward_passes,
            "lr": self.lr,
            "eps": self.eps,
            "space": self.space.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.forward_passes = state["step_count"], state["forward_passes"]
        self.lr, self.eps = state["lr"], state["eps"]
        self.space.load_state_dict(state["space"])


def _momentum(momentum: dict | bool | None) -> MomentumGuided | None:
    if not momentum:
        return None
    return MomentumGuided(**(momentum if isinstance(momentum, dict) else {}))


def qzo_ff(
    model: QModel,
    lr: float,
    eps: float = 1e-3,
    m: int = 3,
    seed: int = 0,
    trainable: list[str] | None = None,
    distribution: str = "qgaussian",
    z_max: float = 3.5,
    rounding: str = "nearest",
    perturb_scale: str = "one",
    eps_min_q: int = 0,
    sparse: dict | None = None,
    momentum: dict | bool | None = None,
    kernel_norm: bool = False,
    sharpness_rho: float | None = None,
    weight_headroom: float = 1.0,
) -> ForwardGradient:
    """QZO-FF on a QModel: sign-m-SPSA with 8-bit z, integer perturbation and update
    (docs/method.md#the-fixed-point-formulation).

    trainable: names of the conv/linear nodes to train (default: all); everything else is never perturbed.
    sparse: e.g. {"kind": "topk", "density": 0.1} (see `fwdgrad.ff.masks`).
    weight_headroom: the trainable layers' Δ_w is multiplied by this once before training, so weights can
    grow by that factor before saturating (costs log2(headroom) bits of precision; 1 = the paper).
    """
    settings = FixedPointSettings(distribution, z_max, rounding, perturb_scale, eps_min_q, weight_headroom)
    est = preset("qzo_ff", m=m, distribution=distribution, z_max=z_max)
    names = list(model.weight_nodes()) if trainable is None else list(trainable)
    if weight_headroom != 1.0:
        for n in names:
            node = model.weight_nodes().get(n)
            if node is not None:
                node.set_weight_scale(node.w_qp.scale * weight_headroom)
    weights = {n: model.weight_nodes()[n].weight_q for n in names if n in model.weight_nodes()}
    masks = make_masks(weights, seed=seed, **sparse) if sparse else None
    space = FixedPointSpace(model, names, settings, seed, masks, _momentum(momentum), kernel_norm)
    return ForwardGradient(space, est, lr, eps, sharpness_rho)


def zo_sgd(
    params,
    lr: float,
    eps: float = 1e-3,
    estimator: str | Estimator = "spsa",
    seed: int = 0,
    sparse: dict | None = None,
    momentum: dict | bool | None = None,
    kernel_norm: bool = False,
    sharpness_rho: float | None = None,
    **estimator_overrides,
) -> ForwardGradient:
    """Float zeroth-order SGD on named parameters (an iterable of (name, nn.Parameter) or a module)."""
    if isinstance(params, torch.nn.Module):
        params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    params = list(params)
    est = estimator if isinstance(estimator, Estimator) else preset(estimator, **estimator_overrides)
    masks = make_masks({n: p.detach() for n, p in params}, seed=seed, **sparse) if sparse else None
    space = FloatSpace(params, est.distribution, seed, masks, _momentum(momentum), kernel_norm)
    return ForwardGradient(space, est, lr, eps, sharpness_rho)
