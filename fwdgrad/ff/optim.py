"""Forward-only optimizers with the `torch.optim` calling convention: ``opt.step(closure)``, where the
closure runs a forward pass and returns the loss — it never calls backward.

`ForwardGradient` is the one training step for every zeroth-order method (SPSA, one-sided, sign-m-SPSA,
QZO-FF); what differs lives in the strategy objects it holds (estimator, space). One step, top to bottom:

    0. (sharpness-aware) probe ±ρ·z_s, keep the worse neighbour w' = w + s*·ρ·z_s as the base   [+2 forwards]
    1. (one-sided) L0 = L(w')                                                                  [+1 forward]
    2. for i in 1..m:  L_i± = L(w' ± ε·z_i)   →  c = difference(L+, L−, L0)   [2m forwards; m one-sided]
    3. update  w ← w − η · (1/m) Σ_i c_i · z_i   (z_i regenerated tensor by tensor, never stored)

The passes of 1–2 run one by one, or as one stacked forward when a `PassLoss` closure meets a step that
perturbs a single linear layer feeding the rest of the model (linear probing): `FixedPointSpace.stacked`,
bit-identical to the passes one by one.

Feng et al., "Stepping Forward on the Last Mile", NeurIPS 2024 (QZO-FF); Malladi et al. 2023 (MeZO).
`qzo_ff(...)` and `zo_sgd(...)` build the usual configurations.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..engine.model import QModel
from ..fixed_point import FixedPointSettings
from ..methods import PERTURB_TARGETS, check_positive
from ..rng.streams import SAM_STREAM
from .estimators import Estimator, preset
from .group import OneGroupOptimizer
from .masks import make_masks
from .spaces import FixedPointSpace, FloatSpace, MomentumGuided, Space, Term

if TYPE_CHECKING:
    from .activity import ActivityGradient


@dataclass
class PassLoss:
    """The closure of a forward-only step, `loss(forward(), y)`, that can also give the losses of P passes
    run at once: under a stacked perturbation (`FixedPointSpace.stacked`) `forward()` returns the passes'
    outputs stacked along the batch (P·B rows for the B labels) and `losses()` splits them, each pass's
    loss computed on exactly the rows its own forward returns, so the losses equal the sequential ones."""

    forward: Callable[[], torch.Tensor]
    y: torch.Tensor
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | float]

    def __call__(self) -> torch.Tensor | float:
        return self.loss(self.forward(), self.y)

    def losses(self) -> list[float]:
        out, b = self.forward(), len(self.y)
        if not b or len(out) % b:
            rows = f"the forward returned {len(out)} rows for {b} labels"
            raise ValueError(f"{rows}; allowed: a multiple of {b} (one block of rows per pass)")
        return [float(self.loss(out[i : i + b], self.y)) for i in range(0, len(out), b)]


class TieWarning(UserWarning):
    """Most perturbation pairs of the first steps had equal losses (L+ == L−): the steps are lost."""


#: The tie diagnosis: over the first TIE_WARN_STEPS steps, more than TIE_WARN_FRACTION of the pairs tied.
TIE_WARN_STEPS = 10
TIE_WARN_FRACTION = 0.5


def _space_tensors(space: Space) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what the space updates: float parameters, or a QModel's integer weight buffers."""
    if isinstance(space, FixedPointSpace):
        return [(n, node.weight_q) for n, node in zip(space.names, space.nodes)]
    return list(zip(space.names, space.params))


class ForwardGradient(OneGroupOptimizer):
    """Zeroth-order SGD on a `Space` (float parameters or fixed-point integers), a `torch.optim.Optimizer`.

    One parameter group holds the space's tensors (named) with `lr` (η) and `eps` (ε, real units; the
    fixed-point space converts it to ε_q = round(ε/Δ_w)); the step reads both from the group, so every
    `torch.optim.lr_scheduler` drives η (in fixed point, η enters the integer update through the multiplier
    computed from it). sharpness_rho: ρ of the sharpness-aware ascent probe (None: off).

    Ties: a perturbation pair whose two losses are equal (L+ == L−, or L+ == L0 one-sided) gives no
    gradient. `last_ties`/`last_pairs` count them in the latest step, `ties`/`pairs` over all steps
    (`tie_fraction`); when more than half of the pairs tie over the first 10 steps, one `TieWarning`.
    """

    def __init__(
        self, space: Space, estimator: Estimator, lr: float, eps: float, sharpness_rho: float | None = None
    ):
        check_positive("lr", lr)
        check_positive("eps", eps)
        if sharpness_rho is not None and not sharpness_rho > 0:
            raise ValueError(f"sharpness_rho={sharpness_rho!r} is invalid; allowed: > 0 or None")
        super().__init__(_space_tensors(space), {"lr": lr, "eps": eps})
        self.space, self.estimator, self.sharpness_rho = space, estimator, sharpness_rho
        self.step_count = 0
        self.forward_passes = 0
        self.last_coeffs: list[float] = []
        self.ties = self.pairs = self.last_ties = self.last_pairs = 0
        self.early_ties = self.early_pairs = 0  # over the first TIE_WARN_STEPS steps
        self.tie_warned = False

    eps = property(lambda self: self._hyper("eps"), lambda self, v: self._set_hyper("eps", v))

    @property
    def forwards_per_step(self) -> int:
        return self.estimator.forwards_per_step + (2 if self.sharpness_rho else 0)

    @property
    def tie_fraction(self) -> float | None:
        """The fraction of perturbation pairs with equal losses over all steps (None before the first)."""
        return self.ties / self.pairs if self.pairs else None

    def _losses(self, closure, passes: list[list[Term]]) -> list[float]:
        """The loss of each pass (its perturbation terms), in order: one stacked forward where the space
        and the closure (a `PassLoss`) allow it, bit-identical to one forward per pass, which runs
        otherwise."""
        self.forward_passes += len(passes)
        if isinstance(closure, PassLoss) and len(passes) > 1 and self.space.can_stack(self.step_count):
            with self.space.stacked(self.step_count, passes):
                losses = closure.losses()
            if len(losses) != len(passes):
                raise ValueError(
                    f"the stacked forward gave {len(losses)} losses for {len(passes)} passes; allowed: one "
                    "per pass (a PassLoss whose forward runs the model once on the batch)"
                )
            return losses
        losses = []
        self.space.plan(self.step_count, passes)
        for terms in passes:
            with self.space.perturbed(self.step_count, terms):
                losses.append(float(closure()))
        return losses

    @torch.no_grad()
    def step(self, closure=None) -> float:
        """One forward-gradient step; returns the mean loss of the perturbed evaluations."""
        if closure is None:
            raise ValueError(
                "closure=None is invalid; allowed: a function running a forward pass that returns the loss"
            )
        group = self.param_groups[0]
        diff, eps = self.estimator.difference, group["eps"]
        base: list[Term] = []
        if self.sharpness_rho:
            rho = self.sharpness_rho
            up, down = self._losses(closure, [[Term(SAM_STREAM, rho, +1)], [Term(SAM_STREAM, rho, -1)]])
            base = [Term(SAM_STREAM, rho, +1 if up >= down else -1)]
        signs = (+1, -1) if diff.two_sided else (+1,)
        passes = [base + [Term(i, eps, s)] for i in range(self.estimator.m) for s in signs]
        losses = self._losses(closure, [base] * diff.needs_center + passes)
        center = losses.pop(0) if diff.needs_center else None
        plus, minus = (losses[::2], losses[1::2]) if diff.two_sided else (losses, [])
        coeffs = diff.coefficients(plus, minus if diff.two_sided else None, center, eps)
        self.space.update(self.step_count, coeffs, group["lr"])
        self.last_coeffs = coeffs
        self._count_ties(sum(c == 0 for c in coeffs), len(coeffs))
        losses = plus + minus
        self.step_count += 1
        return sum(losses) / len(losses)

    def _count_ties(self, ties: int, pairs: int) -> None:
        self.last_ties, self.last_pairs = ties, pairs
        self.ties, self.pairs = self.ties + ties, self.pairs + pairs
        if self.step_count < TIE_WARN_STEPS:
            self.early_ties, self.early_pairs = self.early_ties + ties, self.early_pairs + pairs
            if self.step_count == TIE_WARN_STEPS - 1 and not self.tie_warned:
                self.tie_warned = self.early_ties > TIE_WARN_FRACTION * self.early_pairs
                if self.tie_warned:
                    warnings.warn(self._tie_message(), TieWarning, stacklevel=2)

    def _tie_message(self) -> str:
        why = (
            "the perturbation moves the quantized logits by less than one LSB"
            if isinstance(self.space, FixedPointSpace)
            else "the perturbation does not change the float loss"
        )
        return (
            f"fwdgrad: more than {TIE_WARN_FRACTION:.0%} of the perturbation pairs tied (L+ == L-) over "
            f"the first {TIE_WARN_STEPS} steps at eps={self.eps:g}: {why}, so those pairs give no gradient; "
            "use a larger eps, e.g. method.eps=1e-2 (tie_fraction in log.csv and metrics.json)"
        )

    def state_dict(self) -> dict:
        """torch.optim's state (the param group with lr and eps) plus the step counters and the space."""
        state = super().state_dict()
        state["forward_gradient"] = {
            "step_count": self.step_count,
            "forward_passes": self.forward_passes,
            "ties": [self.ties, self.pairs, self.last_ties, self.last_pairs],
            "early_ties": [self.early_ties, self.early_pairs, self.tie_warned],
            "space": self.space.state_dict(),
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" not in state:  # a checkpoint written before ForwardGradient was a torch Optimizer
            self.lr, self.eps = state["lr"], state["eps"]
            own = state
        else:
            super().load_state_dict({k: v for k, v in state.items() if k != "forward_gradient"})
            own = state["forward_gradient"]
        self.step_count, self.forward_passes = own["step_count"], own["forward_passes"]
        self.ties, self.pairs, self.last_ties, self.last_pairs = own.get("ties", [0, 0, 0, 0])
        self.early_ties, self.early_pairs, self.tie_warned = own.get("early_ties", [0, 0, False])
        self.space.load_state_dict(own["space"])


def _momentum(momentum: dict | bool | None) -> MomentumGuided | None:
    if not momentum:
        return None
    return MomentumGuided(**(momentum if isinstance(momentum, dict) else {}))


def apply_headroom(model: QModel, names: list[str], headroom: float) -> None:
    """Multiply the Δ_w of the named trainable nodes by `headroom`, once before training (1: unchanged)."""
    if headroom != 1.0:
        for n in names:
            node = model.weight_nodes().get(n)
            if node is not None:
                node.set_weight_scale(node.w_qp.scale * headroom)


def qzo_ff(
    model: QModel,
    lr: float,
    eps: float = 1e-3,
    m: int = 3,
    seed: int = 0,
    trainable: list[str] | None = None,
    difference: str = "sign",
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
    layerwise: str = "off",
    perturb: str = "weights",
) -> ForwardGradient | ActivityGradient:
    """QZO-FF on a QModel: sign-m-SPSA with 8-bit z, integer perturbation and update
    (docs/method.md#the-fixed-point-formulation).

    difference: "sign" (the paper's, 2m passes) or "median" (m one-sided passes, each signed against the
    step's median loss; `fwdgrad.edge.train.median_signs`).
    trainable: names of the nodes to train (`model.weight_nodes()`: conv/linear, LayerNorm, tokens; default:
    all); everything else is never perturbed.
    sparse: e.g. {"kind": "topk", "density": 0.1} (see `fwdgrad.ff.masks`).
    weight_headroom: the trainable layers' Δ_w is multiplied by this once before training, so weights can
    grow by that factor before saturating (costs log2(headroom) bits of precision; 1 = the paper).
    layerwise: "cycle" / "sample" perturb and update one trainable tensor per step (`fwdgrad.ff.spaces`).
    perturb: "weights" (the paper's) or "outputs": activity-perturbed forward gradients on the one linear
    layer `trainable` names (`fwdgrad.ff.activity.ActivityGradient`, which is returned; difference may then
    also be "central").
    """
    if not isinstance(model, QModel):
        raise ValueError(
            f"qzo_ff needs a converted model (fwdgrad.engine.QModel), got a float {type(model).__name__}; "
            'convert it first: q = fwdgrad.engine.convert(model, "w16a8", calib) (calib: a batch of inputs)'
        )
    settings = FixedPointSettings(
        difference, distribution, z_max, rounding, perturb_scale, eps_min_q, weight_headroom, layerwise
    )
    names = list(model.weight_nodes()) if trainable is None else list(trainable)
    if perturb not in PERTURB_TARGETS:
        raise ValueError(f"perturb={perturb!r} is invalid; allowed: {', '.join(PERTURB_TARGETS)}")
    if perturb == "outputs":
        refused = dict(sparse=sparse, momentum=momentum, kernel_norm=kernel_norm, sharpness_rho=sharpness_rho)
        refused |= {
            "layerwise": layerwise != "off" and layerwise,
            "perturb_scale": perturb_scale != "one" and perturb_scale,
        }
        for key, value in refused.items():
            if value:
                raise ValueError(
                    f"method.ff.{key}={value!r} is invalid with method.ff.perturb=outputs; allowed: unset "
                    "(it applies to perturbed weights)"
                )
        if len(names) != 1:
            raise ValueError(
                f"method.ff.perturb=outputs trains one linear layer, not {len(names)} layers {names}; "
                "allowed: mode=lp with mode.lp_layers=1"
            )
        from .activity import ActivityGradient  # here: activity imports intloss, which imports this module

        apply_headroom(model, names, weight_headroom)
        return ActivityGradient(model, names[0], lr, eps, m, seed, settings)
    est = preset("qzo_ff", m=m, difference=difference, distribution=distribution, z_max=z_max)
    apply_headroom(model, names, weight_headroom)
    weights = {n: model.weight_nodes()[n].weight_q for n in names if n in model.weight_nodes()}
    masks = make_masks(weights, seed=seed, **sparse) if sparse else None
    space = FixedPointSpace(model, names, settings, seed, masks, _momentum(momentum), kernel_norm)
    space.check_size("eps", eps)
    if sharpness_rho:
        space.check_size("sharpness_rho", sharpness_rho)
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
    layerwise: str = "off",
    **estimator_overrides,
) -> ForwardGradient:
    """Float zeroth-order SGD on named parameters (an iterable of (name, nn.Parameter) or a module);
    layerwise: "cycle" / "sample" perturb and update one tensor per step (`fwdgrad.ff.spaces`)."""
    if isinstance(params, torch.nn.Module):
        params = [(n, p) for n, p in params.named_parameters() if p.requires_grad]
    params = list(params)
    est = estimator if isinstance(estimator, Estimator) else preset(estimator, **estimator_overrides)
    masks = make_masks({n: p.detach() for n, p in params}, seed=seed, **sparse) if sparse else None
    space = FloatSpace(params, est.distribution, seed, masks, _momentum(momentum), kernel_norm, layerwise)
    return ForwardGradient(space, est, lr, eps, sharpness_rho)
