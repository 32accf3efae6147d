"""Activity-perturbed forward gradients in fixed point: perturb a linear layer's *outputs*, not its weights
(Ren et al., "Scaling Forward Gradient With Local Losses", ICLR 2023; the ±1-LSB perturbations of Zhao et
al., "Poor Man's Training on MCUs", 2025).

A weight perturbation moves all N·K weights of a layer along one direction per pass, and the pass's loss
says one number about an N·K-dimensional gradient. Perturbing the layer's outputs instead, every example b
of the batch gets its own direction u_b ∈ Z^N and keeps its own loss l_b, so one pass gives B directional
derivatives of N-dimensional gradients, and the chain rule with the layer's stored input turns them into
the weight gradient, dL/dW = (1/B) Σ_b (dl_b/dy_b)·x_bᵀ, without a backward pass. One step:

    0. x_q, y_q = the layer's input and output codes at the current weights (one pass up to the layer)
    1. for i in 1..m:  y_q,i± = sat(y_q ± δ_i),  δ_i = round(ε_q·u_q,i / 1_q)                [P passes of
       the rest of the model, stacked along the batch; ε_q = max(1, eps_min_q, round(ε/Δ_y)) output LSBs;
       u_q,i the 8-bit codes of z for every output element, scale Δ_z = z_max/127, 1_q = round(1/Δ_z)]
    2. c_i,b = l_b(y_i+) − l_b(y_i−)   (central, P = 2m: the loss difference on 2^-Q nats, Q = 16; the
                                         integer loss as it is, the float one rounded onto that grid)
       c_i,b = sign(l_b(y_i+) − l_b(y_i−))   (sign: P = 2m)
       c_i,b = sign(l_b(y_i+) − median_j l_b(y_j+))   (median: P = m; `fwdgrad.edge.train.median_signs`)
       (`fwdgrad.edge.train.output_coefficients`: the numpy runtime's own functions, from δ to the update)
    3. G = Σ_i Σ_b c_i,b · u_q,i,b ⊗ (x_q,b − zp_x)                                    (int64, exact)
       w_q ← sat( w_q − round( G · r ) ),  per output channel
           r = η·Δ_z·Δ_x / (m·B·Δ_w)                                  (sign, median: ĝ has u's range)
           r = η·2^-Q·Δ_x / (2·ε_q·Δ_y·1_q·m·B·Δ_w)                   (central: SPSA's (L+ − L−)/(2ε)·u)
       as an integer multiplier M and shift n (G first shifted right, rounding, until it fits 31 bits; a
       shift past 62 bits moves into M), with the run's rounding: nearest, floor or stochastic.

Sign coefficients weigh every example alike however well it is already classified, so on a head whose
logits saturate at the ends of their 8-bit range they keep pushing the weights; the central difference
fades with the loss's slope, as backprop's gradient does, and is the one to use (docs/training.md).

The layer is a linear layer whose output alone feeds the rest of the model (`QModel.stackable`: a linear
probe's head), so the P passes of step 1 run as one forward of the suffix on P·B rows (none at all for a
head: the losses come straight from the perturbed logits). Its bias is not trained (as QZO-FF's). The
directions come from the same integer sampler as QZO-FF's (key (seed, step, sample i, tensor 0), shape B × N),
so a step is reproducible bit for bit; `ActivityGradient` is the `torch.optim.Optimizer` that runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..edge.train import (
    output_coefficients,
    output_eps_q,
    output_gradient,
    output_step,
    output_update,
    output_update_factor,
)
from ..engine.model import Prefix, QModel
from ..fixed_point import FixedPointSettings
from ..methods import check_positive
from ..quant import dequantize
from ..rng import torch_port
from ..rng.streams import SR_STREAM
from .estimators import Key, make_distribution
from .group import OneGroupOptimizer
from .intloss import cross_entropy_q, model_loss_spec


@dataclass
class ExampleLoss:
    """The closure of an activity-perturbed step: the model, the batch, and the loss of each example of an
    output (`per_example(out, y)` → one loss per row, float or integer), in execution mode `mode`."""

    model: QModel
    x: torch.Tensor
    y: torch.Tensor
    per_example: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mode: str
    unit: float = 1.0  # nats per loss unit (the integer loss counts 2^-Q nats)


def example_closure(model: QModel, loss: str = "float") -> Callable[..., ExampleLoss]:
    """closure(x, y) → `ExampleLoss`: the float cross-entropy of the model's output (dequantized in integer
    mode), or with loss="integer" the integer cross-entropy of the integer logits (`fwdgrad.ff.intloss`, as
    the edge runtimes compute it) in integer mode."""
    if loss == "integer":
        spec = model_loss_spec(model)
        unit = 2.0**-spec.loss_bits
        per_code = lambda out, t: cross_entropy_q(out, t, spec)  # noqa: E731
        return lambda x, y: ExampleLoss(model, x, y, per_code, "integer", unit)
    qp = model.output_qparams()

    def per_example(out, t):
        logits = dequantize(out, qp) if model.mode == "integer" else out
        return F.cross_entropy(logits.double(), t.long(), reduction="none")

    return lambda x, y: ExampleLoss(model, x, y, per_example, model.mode)


class ActivityGradient(OneGroupOptimizer):
    """Activity-perturbed forward gradients on one linear layer of a QModel (module docstring), with the
    `torch.optim` calling convention `opt.step(closure)` (`example_closure`). `lr` (η) and `eps` (ε, in
    the layer's real output units, at least one output LSB) live in the parameter group, so every
    `torch.optim.lr_scheduler` drives them.

    settings: the fixed-point options it reads: difference (central, the one to use | sign | median),
    distribution (qgaussian | qrademacher: u = ±1_q, so δ = ±ε_q exactly), z_max, rounding (of the update),
    eps_min_q (in output LSBs here)."""

    def __init__(
        self,
        model: QModel,
        name: str,
        lr: float,
        eps: float,
        m: int = 3,
        seed: int = 0,
        settings: FixedPointSettings | None = None,
    ):
        check_positive("lr", lr)
        check_positive("eps", eps)
        nodes = model.weight_nodes()
        if name not in nodes or not model.stackable(name):
            raise ValueError(
                f"method.ff.perturb=outputs trains one linear layer whose output alone feeds the rest of the "
                f"model; {name!r} is not one; allowed: the head of a linear probe (mode=lp, lp_layers=1)"
            )
        self.settings = settings or FixedPointSettings()
        if self.settings.difference == "median" and m < 2:
            raise ValueError(f"m={m!r} is invalid for the median difference; allowed: integers >= 2")
        super().__init__([(name, nodes[name].weight_q)], {"lr": lr, "eps": eps})
        self.model, self.node, self.m, self.seed = model, nodes[name], m, seed
        self.names = [name]
        self.dist = make_distribution(self.settings.distribution, self.settings.z_max)
        self.step_count = self.forward_passes = 0
        self.ties = self.pairs = self.last_ties = self.last_pairs = 0
        # weights clamped at the format's limits (by an update; outputs are perturbed, weights never)
        self.saturations: dict[str, dict[str, int]] = {"perturb": {}, "update": {}}
        self.weights_seen = {"perturb": 0, "update": 0}

    eps = property(lambda self: self._hyper("eps"), lambda self, v: self._set_hyper("eps", v))

    @property
    def space(self):  # the trainer reads saturations and weights_seen from the optimizer's space
        return self

    @property
    def two_sided(self) -> bool:
        return self.settings.difference != "median"

    @property
    def forwards_per_step(self) -> int:
        return self.m * (2 if self.two_sided else 1)

    @property
    def tie_fraction(self) -> float | None:
        return self.ties / self.pairs if self.pairs else None

    # -- the step, top to bottom ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: ExampleLoss | None = None) -> float:
        """One step (module docstring); returns the mean loss of the perturbed passes."""
        if not isinstance(closure, ExampleLoss):
            raise ValueError(
                f"closure={closure!r} is invalid; allowed: an ExampleLoss (fwdgrad.ff.activity."
                "example_closure)"
            )
        group, node, model = self.param_groups[0], self.node, closure.model
        # 0. the layer's input and output codes at the current weights
        prefix = model.run_prefix(closure.x, node.name, closure.mode)
        x_q = self._codes(prefix.values[node.inputs[0]], node.in_qp, closure.mode)
        y_out = model.run_node(closure.x, prefix)
        y_q = self._codes(y_out, node.out_qp, closure.mode)
        # 1. P perturbed copies of the outputs, run through the rest of the model as one stacked batch
        u = torch.stack([self.direction(i, y_q.shape) for i in range(self.m)])  # [m, *y]
        eps_q = self.eps_q(group["eps"])
        delta = torch.from_numpy(output_step(u.numpy(), eps_q, self.dist.one_q))
        signs = (+1, -1) if self.two_sided else (+1,)
        ys = torch.stack([y_q + s * d for d in delta for s in signs]).clamp_(node.lo, node.hi)
        values = {node.name: self._from_codes(ys.flatten(0, 1), node.out_qp, closure.mode, y_out.dtype)}
        start = [n.name for n in model.nodes].index(node.name) + 1
        out = model.run(closure.x, closure.mode, prefix=Prefix(values, start, closure.mode))
        b = len(closure.y)
        losses = closure.per_example(out, closure.y.repeat(len(ys))).reshape(len(ys), b)
        self.forward_passes += len(ys)
        # 2. one coefficient per sample and example; 3. the fixed-point update from G
        coeffs = output_coefficients(losses.numpy(), self.settings.difference)
        self.update(coeffs, u, x_q, b, group["lr"], eps_q)
        ties = int((coeffs == 0).sum())
        self.last_ties, self.last_pairs = ties, coeffs.size
        self.ties, self.pairs = self.ties + ties, self.pairs + coeffs.size
        self.step_count += 1
        return float(losses.double().mean()) * closure.unit

    # -- pieces of the step --------------------------------------------------------------------------
    def direction(self, sample: int, shape) -> torch.Tensor:
        """u_q of sample i of the current step: 8-bit codes, one per output element (int64)."""
        key = Key(self.seed, self.step_count, sample, 0)
        return self.dist.sample_q(key, shape, self.node.weight_q.device).to(torch.int64)

    def eps_q(self, eps: float) -> int:
        """ε in output LSBs: max(1, eps_min_q, round(ε/Δ_y)) (`fwdgrad.edge.train.output_eps_q`)."""
        scale = float(self.node.out_qp.scale.reshape(-1)[0])
        return output_eps_q(eps, scale, int(self.node.hi - self.node.lo), self.settings.eps_min_q)

    def update(self, coeffs, u: torch.Tensor, x_q: torch.Tensor, batch: int, lr: float, eps_q: int) -> None:
        """w_q ← sat(w_q − round(G·r)) with G = Σ_i Σ_b c_i,b·u_i,b ⊗ (x_b − zp_x) (module docstring), in the
        numpy edge runtime's arithmetic (`fwdgrad.edge.train`), so both runtimes update alike."""
        node, fmt = self.node, self.node.w_qp.fmt
        g = output_gradient(np.asarray(coeffs), u.numpy(), x_q.numpy(), int(node.zp_in))
        real = output_update_factor(
            lr, self.settings.difference, self.m, batch, float(node.in_qp.scale.reshape(-1)[0]),
            float(node.out_qp.scale.reshape(-1)[0]), eps_q, self.dist.one_q, self.dist.delta,
            node.w_qp.scale.double().reshape(-1).numpy(),
        )  # fmt: skip
        words = None
        if self.settings.rounding == "stochastic":
            words = torch_port.hash_words(self.seed, self.step_count, SR_STREAM + 1, 0, node.weight_q.numel())
            words = words.reshape(node.weight_q.shape).numpy()
        new, saturated = output_update(
            node.weight_q.numpy(), g, real, self.settings.rounding, words, fmt.qmin, fmt.qmax
        )
        self.weights_seen["update"] += node.weight_q.numel()
        if saturated:
            self.saturations["update"][node.name] = self.saturations["update"].get(node.name, 0) + saturated
        node.weight_q.copy_(torch.from_numpy(new).to(node.weight_q.dtype))

    @staticmethod
    def _codes(v: torch.Tensor, qp, mode: str) -> torch.Tensor:
        """Integer codes (int64) of an engine value: as they are in integer mode, re-derived in fake mode."""
        if mode == "integer":
            return v.to(torch.int64)
        scale, zp = float(qp.scale.reshape(-1)[0]), int(qp.zero_point.reshape(-1)[0])
        return torch.round(v.double() / scale).to(torch.int64) + zp

    @staticmethod
    def _from_codes(codes: torch.Tensor, qp, mode: str, dtype) -> torch.Tensor:
        if mode == "integer":
            return codes.to(dtype)
        return dequantize(codes, qp).to(dtype)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["activity_gradient"] = {
            "step_count": self.step_count,
            "forward_passes": self.forward_passes,
            "ties": [self.ties, self.pairs, self.last_ties, self.last_pairs],
        }
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({k: v for k, v in state.items() if k != "activity_gradient"})
        own = state["activity_gradient"]
        self.step_count, self.forward_passes = own["step_count"], own["forward_passes"]
        self.ties, self.pairs, self.last_ties, self.last_pairs = own["ties"]
