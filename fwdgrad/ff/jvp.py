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


class JVPForwardGradient:
    """SGD with the forward-mode forward gradient, `opt.step(closure)` style; the closure maps a dict of
    parameter tensors to the loss (use `closure_for(model, loss_fn)`)."""

    def __init__(self, model: torch.nn.Module, lr: float, m: int = 1, seed: int = 0):
        check_positive("lr", lr)
        check_count("m", m)
        self.model, self.lr, self.m, self.seed = model, lr, m, seed
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.step_count = self.forward_passes = 0
        self.forwards_per_step = m  # one (dual-number) forward per direction

    @torch.no_grad()
    def step(self, closure) -> float:
        grads, loss = jvp_gradient(closure, self.params, Key(self.seed, self.step_count, 0, 0), self.m)
        for n, p in self.params.items():
            p.sub_(grads[n], alpha=self.lr)
        self.step_count += 1
        self.forward_passes += self.m
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """No gradients to clear."""

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "forward_passes": self.forward_passes, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count, self.forward_passes, self.lr = (
            state["step_count"],
            state["forward_passes"],
            state["lr"],
        )


def closure_for(model: torch.nn.Module, loss_fn):
    """Closure `params -> loss_fn(model(params))` over `functional_call`."""

    def closure(params):
        return loss_fn(lambda *a, **k: functional_call(model, params, a, k))

    return closure
