"""The true forward gradient by forward-mode AD (Baydin et al. 2022): g = (∇L · z) z, unbiased for
E[z zᵀ] = I. Float only; the reference the zeroth-order estimators are measured against.

`torch.func.jvp` evaluates L and the directional derivative ∇L·z in one forward pass (with dual numbers),
over `torch.func.functional_call` so the module's own parameters are not touched.
"""

from __future__ import annotations

import torch
from torch.func import functional_call, jvp

from ..methods import check_count, check_positive
from .estimators import Distribution, Gaussian, Key
from .group import OneGroupOptimizer


def jvp_gradient(
    loss_of_params,
    params: dict[str, torch.Tensor],
    key: Key,
    m: int = 1,
    distribution: Distribution | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """(1/m) Σ_i (∇L·z_i) z_i for `loss_of_params(params_dict) -> scalar`; returns (gradient dict, loss)."""
    dist = distribution or Gaussian()
    names = list(params)
    primals = tuple(params[n].detach() for n in names)
    grads = {n: torch.zeros_like(p) for n, p in zip(names, primals)}
    loss = None

    def f(*ps):
        return loss_of_params(dict(zip(names, ps)))

    for i in range(m):
        zs = tuple(
            dist.sample(Key(key.seed, key.step, key.sample + i, t), p.shape, p.device, p.dtype)
            for t, p in enumerate(primals)
        )
        loss, dd = jvp(f, primals, zs)
        for n, z in zip(names, zs):
            grads[n].add_(z, alpha=float(dd) / m)
    return grads, float(loss)


class JVPForwardGradient(OneGroupOptimizer):
    """SGD with the forward-mode forward gradient, a `torch.optim.Optimizer` (`opt.step(closure)`; one
    parameter group, the model's trainable parameters, with `lr`, so `torch.optim.lr_scheduler`s drive it).
    The closure maps a dict of parameter tensors to the loss (use `closure_for(model, loss_fn)`)."""

    def __init__(self, model: torch.nn.Module, lr: float, m: int = 1, seed: int = 0):
        check_positive("lr", lr)
        check_count("m", m)
        self.model, self.m, self.seed = model, m, seed
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(list(self.params.items()), {"lr": lr})
        self.step_count = self.forward_passes = 0
        self.forwards_per_step = m  # one (dual-number) forward per direction

    @torch.no_grad()
    def step(self, closure=None) -> float:
        if closure is None:
            raise ValueError(
                "closure=None is invalid; allowed: a function mapping a parameter dict to the loss"
            )
        grads, loss = jvp_gradient(closure, self.params, Key(self.seed, self.step_count, 0, 0), self.m)
        for n, p in self.params.items():
            p.sub_(grads[n], alpha=self.lr)
        self.step_count += 1
        self.forward_passes += self.m
        return loss

    def state_dict(self) -> dict:
        """torch.optim's state (the param group with lr) plus the step counters."""
        state = super().state_dict()
        state["jvp"] = {"step_count": self.step_count, "forward_passes": self.forward_passes}
        return state

    def load_state_dict(self, state: dict) -> None:
        if "param_groups" not in state:  # a checkpoint written before this was a torch Optimizer
            self.lr, own = state["lr"], state
        else:
            super().load_state_dict({k: v for k, v in state.items() if k != "jvp"})
            own = state["jvp"]
        self.step_count, self.forward_passes = own["step_count"], own["forward_passes"]


def closure_for(model: torch.nn.Module, loss_fn):
    """Closure `params -> loss_fn(model(params))` over `functional_call`."""

    def closure(params):
        return loss_fn(lambda *a, **k: functional_call(model, params, a, k))

    return closure
