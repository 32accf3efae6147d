"""Integer cross-entropy in torch, bit-identical with the numpy edge runtime's `fwdgrad.edge.loss` (same
formulas, same `LossSpec` tables and constants; see that module's docstring): the loss of integer logit
codes as an int64 on 2^-Q nats, decided without libm, so the sign of L+ − L− in a QZO-FF step is the same
in the engine, the numpy runtime and the C runtime.

`integer_closure(model)` builds the forward-only closure(x, y) of a QModel with this loss (the float
closure's counterpart in `fwdgrad.train`), for `ForwardGradient.step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..edge.loss import LN2_MULT, MANT_BITS, LossSpec, loss_spec
from ..engine.model import QModel
from .optim import PassLoss

__all__ = ["LossSpec", "loss_spec", "model_loss_spec", "cross_entropy_q", "mean_loss", "integer_closure"]


def model_loss_spec(model: QModel) -> LossSpec:
    """The LossSpec of a QModel's output format (scale, code range qmax − qmin)."""
    qp = model.output_qparams()
    scale = qp.scale.reshape(-1)
    if scale.numel() != 1:
        raise ValueError("the integer loss needs a per-tensor output scale, got a per-channel one")
    return loss_spec(float(scale[0]), qp.fmt.qmax - qp.fmt.qmin)


def _log2_fixed(x: torch.Tensor, frac: int) -> torch.Tensor:
    """log2(x) on 2^-frac of positive int64 x, truncated (as `fwdgrad.edge.loss.log2_fixed`)."""
    e, v = torch.zeros_like(x), x.clone()
    for sh in (32, 16, 8, 4, 2, 1):
        big = (v >> sh) > 0
        e += big.to(torch.int64) * sh
        v = torch.where(big, v >> sh, v)
    m = torch.where(e >= MANT_BITS, x >> (e - MANT_BITS).clamp_min(0), x << (MANT_BITS - e).clamp_min(0))
    out = e << frac
    for i in range(frac - 1, -1, -1):
        m = (m * m) >> MANT_BITS
        bit = m >> (MANT_BITS + 1)
        m = m >> bit
        out += bit << i
    return out


def cross_entropy_q(codes: torch.Tensor, y: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Per-sample integer cross-entropy (int64, on 2^-Q nats) of integer logit codes (N, C) (any dtype
    holding integers, e.g. `QModel.run(x, mode="integer")`) and labels (N,)."""
    q = codes.to(torch.int64)
    y = y.to(torch.int64)
    if q.ndim != 2 or y.shape != q.shape[:1]:
        raise ValueError(
            f"codes must be (N, classes) and labels (N,), got {list(q.shape)} and {list(y.shape)}"
        )
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= q.shape[1]):
        raise ValueError(
            f"labels must be in [0, {q.shape[1]}) (the model's classes), got {y.min()}..{y.max()}"
        )
    table = torch.as_tensor(spec.table, dtype=torch.int64, device=q.device)
    d = q.amax(dim=1, keepdim=True) - q
    total = table[d.clamp(max=len(table) - 1)].sum(dim=1)
    lam = _log2_fixed(total, spec.log_bits) - (spec.exp_bits << spec.log_bits)
    r = 31 + spec.log_bits - spec.loss_bits
    lse = (lam * LN2_MULT + (1 << (r - 1))) >> r
    dy = d.gather(1, y[:, None])[:, 0]
    return lse + ((dy * spec.scale_mult + (1 << (spec.scale_n - 1))) >> spec.scale_n)


def mean_loss(per_sample: torch.Tensor, spec: LossSpec) -> float:
    """Σ L / (N·2^Q) as a float64, exactly as `fwdgrad.edge.loss.mean_loss`."""
    return float(int(per_sample.sum())) / (len(per_sample) * 2.0**spec.loss_bits)


def integer_closure(model: QModel, frozen_upto: Callable[[], str] | None = None):
    """closure(x, y) for forward-only optimizers on a QModel in integer mode (a `PassLoss`: its
    passes may run stacked), the loss being `mean_loss(cross_entropy_q(...))`. With `frozen_upto`
    (returning the first node the coming step perturbs), the frozen prefix runs once per batch and every
    pass resumes from it (`QModel.run_prefix`), as the float closure does."""
    spec = model_loss_spec(model)

    def loss(codes, y) -> float:
        return mean_loss(cross_entropy_q(codes, y, spec), spec)

    def closure(x, y):
        with torch.no_grad():
            prefix = None if frozen_upto is None else model.run_prefix(x, frozen_upto(), mode="integer")
        return PassLoss(lambda: model.run(x, mode="integer", prefix=prefix), y, loss)

    return closure
