"""The shared training loop: backprop baselines and forward-gradient methods on the same data order,
budget and evaluation, with atomic checkpoints and bit-identical resume.

Methods are specs in `fwdgrad.methods` (what each trains, its hyperparameters, its cost); each spec names a
builder in `BUILDERS` below that makes its optimizer and its per-batch closure:

| builder | methods                  | update                                                           |
|---------|--------------------------|------------------------------------------------------------------|
| sgd     | bp, bp_fp16, bp_bf16,    | SGD on autograd gradients (fp16/bf16: forward+backward autocast; |
|         | bp_ckpt                  | bp_ckpt: activation checkpointing, `_checkpointed`)              |
| qat     | bp_qat                   | SGD on float master weights through STE fake-quantized weights   |
| zo      | zo_fp32, sign_spsa_fp32  | `ForwardGradient` on a FloatSpace (SPSA / sign-m-SPSA in float)  |
| qzo     | qzo_ff                   | QZO-FF: sign-m-SPSA in fixed point (FixedPointSpace)             |
| hybrid  | hybrid                   | BP for the top trained layers, QZO-FF below, in one step         |
| jvp     | jvp                      | forward-mode forward gradient (∇L·z) z                           |

Every step draws the next batch from a seeded stream (epoch e is a permutation seeded by (seed, e)), so
all methods see the same data order. Budgets are steps or forward passes (a BP step counts as
`BP_FORWARD_EQUIVALENTS` = 3 forward passes, docs/method.md). All models run in eval mode (BatchNorm
statistics frozen, as in the folded integer model).

Compute (the log's `compute` column): a step's cost in full-forward equivalents weighted by multiply-
accumulates, S(a) being the fraction of a forward pass's MACs from node/module a to the output:

    forward-only, prefix reuse from a (QZO-FF, float ZO on a chain model):   (1 − S(a)) + P·S(a)
                                                  P: its forward passes per step
    forward-only, no prefix (JVP; float ZO when the first block trains):      P
    backprop, first trained layer b:              1 + 2·S(b)   (+ S(b) recomputed with checkpointing)
    hybrid:                                       QZO-FF's part + 1 + 2·S(first BP layer)

so a linear probe's QZO-FF samples cost only the head's share, as its backward costs BP.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import LOSSES, LR_SCHEDULES, RESUME_MODES
from .engine.model import QModel, chunk_rows
from .engine.transformer import QLayerNorm, QTokens
from .ff.activity import ActivityGradient, example_closure
from .ff.intloss import integer_closure
from .ff.jvp import JVPForwardGradient, closure_for
from .ff.masks import make_masks
from .ff.optim import PassLoss, qzo_ff, zo_sgd
from .files import atomic_open
from .measure import measure_peak_memory
from .methods import BP_FORWARD_EQUIVALENTS, METHOD_NAMES, MethodSpec, check_hyper, check_scope, spec
from .models import SCOPE_PARTS, checkpoint_segments, frozen_prefix, scope_params
from .quant import dequantize, fake_quantize, quantize
from .signals import Interrupted, deferred_signals
from .statefile import StateFileError, digest, load_state, save_state

METHODS = METHOD_NAMES
CHECKPOINT_VERSION = 2  # the checkpoint's layout; part of the run fingerprint
__all__ = ["BP_FORWARD_EQUIVALENTS", "METHODS", "TrainConfig", "train", "evaluate", "tie_fraction"]


def scheduled_lr(cfg: TrainConfig, step: int, total: int) -> float:
    """Learning rate for 0-based `step` of `total`: constant, cosine or linear decay to 0."""
    frac = step / max(1, total)
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    if cfg.lr_schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr


@dataclass
class TrainConfig:
    """What to train and for how long. `steps` or `forward_budget` (forward passes) sets the budget.

    scope (fwdgrad.methods.SCOPES; the `mode` config group): ft | lp (the last lp_layers layers) | sparse |
    dvpt (a ViT's deep prompts, added before by `fwdgrad.models.add_prompts`, and the head) | ln (LayerNorms
    and the head) | bias (the biases and the head, float models). segments: bp_ckpt's checkpointed segments
    (`fwdgrad.models.checkpoint_segments`; None: about sqrt of the model's blocks)."""

    method: str = "qzo_ff"
    scope: str = "lp"
    lp_layers: int = 1
    sparse_kind: str = "topk"
    sparse_density: float = 0.1
    prompts: int = 10  # dvpt: what `add_prompts` was given (the model carries them)
    prompt_init: str = "uniform"
    lr: float = 0.01
    lr_schedule: str = "constant"  # constant | cosine (to 0 at the end of the budget) | linear
    eps: float = 1e-3
    m: int = 3
    steps: int | None = 300
    forward_budget: int | None = None
    batch_size: int = 64
    eval_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end (and on SIGINT/SIGTERM)
    resume: str = "auto"  # auto | must | never: what to do with a checkpoint in out_dir (RESUME_MODES)
    strict: bool = False  # faults (overflows, saturations) stop the run instead of a warning at its end
    loss: str = "float"  # LOSSES: "integer" (qzo_ff) decides each step on the integer cross-entropy
    seed: int = 0
    ff: dict = field(default_factory=dict)  # extra options of qzo_ff / zo_sgd (rounding, momentum, ...)
    segments: int | None = None

    def __post_init__(self):
        check_scope(self.method, self.scope, where="training scope ")
        check_hyper("qzo_ff", self.lr, self.eps, self.m)  # ranges (the values a method ignores included)
        if (self.steps is None) == (self.forward_budget is None):
            raise ValueError("give exactly one budget: steps or forward_budget")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is invalid; allowed: {LR_SCHEDULES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} is invalid; allowed: >= 1")
        if self.resume not in RESUME_MODES:
            raise ValueError(f"resume={self.resume!r} is invalid; allowed: {', '.join(RESUME_MODES)}")
        if self.loss not in LOSSES or (self.loss == "integer" and self.method != "qzo_ff"):
            allowed = ", ".join(LOSSES) if self.method == "qzo_ff" else "float"
            raise ValueError(
                f"train.loss={self.loss!r} is invalid for method {self.method!r}; allowed: {allowed}"
            )

    @classmethod
    def from_config(cls, c, seed: int | None = None) -> TrainConfig:
        """From a validated `fwdgrad.config.Config`: method, training scope (`mode` group), train settings."""
        scope = {k: v for k, v in vars(c.mode).items() if k != "name"}
        return cls(
            method=c.method.name,
            scope=c.mode.name,
            lr=c.lr,
            eps=c.method.eps,
            m=c.method.m,
            seed=c.seed if seed is None else seed,
            ff=dict(c.method.ff),
            segments=c.method.segments,
            **scope,
            **{k: v for k, v in vars(c.train).items() if k != "head_init"},  # applied before training
        )

    @property
    def spec(self) -> MethodSpec:
        return spec(self.method)


# ------------------------------------------------------------------------------------------- data
class BatchStream:
    """Endless batches; epoch e is the permutation of a generator seeded by (seed, e). Resumable."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int):
        if len(x) == 0:
            raise ValueError("the training set is empty")
        self.x, self.y, self.batch_size, self.seed = x, y, min(batch_size, len(x)), seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.x), generator=g)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.batch_size > len(self.x):
            self.epoch, self.pos = self.epoch + 1, 0
            self._perm = self._permutation()
        idx = self._perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.pos = s["epoch"], s["pos"]
        self._perm = self._permutation()


#: Where `evaluate` reports its progress when it is given no callback: (examples done, total) before the
#: first chunk and after each: `train`'s evaluations every `eval_every` steps take no callback of their own,
#: so fwdgrad.pipeline.progress sets it (`EVAL_PROGRESS.set` / `.reset`) while a run shows progress.
EVAL_PROGRESS: ContextVar[Callable[[int, int], None] | None] = ContextVar("eval_progress", default=None)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> float:
    """Top-1 accuracy (fraction) of `model` on (x, y), in chunks of `batch_size` examples (default:
    `fwdgrad.engine.model.chunk_rows`, about 2^15 input elements per chunk). `progress(done, total)` (default:
    the one in `EVAL_PROGRESS`) hears of the examples done, before the first chunk and after each."""
    batch_size = batch_size or chunk_rows(x)
    progress = progress or EVAL_PROGRESS.get()
    correct = 0
    if progress:
        progress(0, len(x))
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
        if progress:
            progress(min(i + batch_size, len(x)), len(x))
    return correct / max(1, len(x))


# --------------------------------------------------------------------------------------- methods
def trainable_names(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Float parameter names (or QModel node names) that the training scope updates (`scope_params`)."""
    if not isinstance(model, QModel):
        return scope_params(model, cfg.scope, cfg.lp_layers)
    nodes = model.weight_nodes()
    head = list(nodes)[-cfg.lp_layers :]
    if cfg.scope in ("ft", "sparse"):
        return list(nodes)
    if cfg.scope == "lp":
        return head
    kind = QTokens if cfg.scope == "dvpt" else QLayerNorm
    chosen = [
        n for n, node in nodes.items() if isinstance(node, kind) and (kind is QLayerNorm or node.prompt)
    ]
    if not chosen:
        raise ValueError(f"training scope {cfg.scope!r} found no {SCOPE_PARTS[cfg.scope]} in the model")
    return chosen + [n for n in head if n not in chosen]


@dataclass
class Built:
    """What a builder makes: the optimizer, the closure for a batch, float master weights (QAT, hybrid), and
    the step on a batch when it is more than `opt.step(closure(x, y))` (hybrid)."""

    opt: Any
    closure: Callable[[torch.Tensor, torch.Tensor], Callable]
    forwards_per_step: int
    master: dict[str, nn.Parameter] = field(default_factory=dict)
    step: Callable[[torch.Tensor, torch.Tensor], Any] | None = None
    #: the coming step's compute (module docstring) from S (`mac_suffix`): S(name) for a node or module;
    #: None: forwards_per_step full passes
    compute: Callable[[Callable[[str], float]], float] | None = None


def mac_suffix(model: nn.Module, x: torch.Tensor) -> Callable[[str], float]:
    """S(name): the fraction of one forward pass's multiply-accumulates from QModel node / float module
    `name` (or a module holding a parameter called so) to the output, measured on x[:1]."""
    if isinstance(model, QModel):
        order = list(model.macs(x).items())
    else:
        from .analysis.memory import trace_model  # the memory model's op trace (meta tensors, no values)

        order = [(op.module, op.macs) for op in trace_model(model, tuple(x[:1].shape)).ops]
    total = max(1, sum(m for _, m in order))
    params = {n for n, _ in model.named_parameters()}

    def suffix(name: str) -> float:
        owner = name.rpartition(".")[0] if name in params else name
        for i, (where, _) in enumerate(order):
            if where == owner or where.startswith(owner + "."):
                return sum(m for _, m in order[i:]) / total
        return 1.0  # not found: count a whole pass

    return suffix


def _bp_compute(first: str, checkpointed: bool = False) -> Callable[[Callable[[str], float]], float]:
    """Backprop's compute: a forward, and a backward through the layers from `first` on (2x their share)."""
    return lambda S: 1 + (3 if checkpointed else 2) * S(first)


def _float_params(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    """Marks exactly `names` as requiring grad; returns them in model order."""
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    return {n: p for n, p in model.named_parameters() if n in names}


def _mask_gradients(params: dict[str, nn.Parameter], sparse: dict | None, seed: int) -> None:
    """Sparse BP: gradient hooks that zero the entries outside each tensor's mask."""
    if sparse:
        masks = make_masks({n: p.detach() for n, p in params.items()}, seed=seed, **sparse)
        for n, p in params.items():
            p.register_hook(lambda g, mk=masks[n]: g * mk)


def _bp_closure(opt, forward: Callable[[], torch.Tensor], y: torch.Tensor) -> Callable:
    def closure():
        opt.zero_grad()
        with torch.enable_grad():
            loss = F.cross_entropy(forward().float(), y)
            loss.backward()
        return loss

    return closure


def _checkpointed(model: nn.Module, segments: int | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model's forward in `segments` sequential segments (`fwdgrad.models.checkpoint_segments`), every one
    but the last under `torch.utils.checkpoint` (non-reentrant): only the segment inputs are kept, and each
    segment's activations are recomputed in the backward (`torch.utils.checkpoint.checkpoint_sequential`'s
    rule; Chen et al. 2016). The same ops on the same values, so the gradients are BP's, bit for bit."""
    parts = checkpoint_segments(model, segments)

    def forward(x):
        for part in parts[:-1]:
            x = checkpoint(part, x, use_reentrant=False)
        return parts[-1](x)

    return forward


def _build_sgd(model, cfg, names, sparse) -> Built:
    """bp / bp_fp16 / bp_bf16 / bp_ckpt: SGD on the float parameters, optionally under autocast or with
    activation checkpointing (`_checkpointed`)."""
    params = _float_params(model, names)
    opt = torch.optim.SGD(list(params.values()), lr=cfg.lr)
    _mask_gradients(params, sparse, cfg.seed)
    dtype = getattr(torch, cfg.spec.autocast) if cfg.spec.autocast else None
    run = _checkpointed(model, cfg.segments) if cfg.spec.checkpointed else model

    def forward(x):
        if dtype is None:
            return run(x)
        with torch.autocast(x.device.type, dtype=dtype):
            return run(x)

    compute = _bp_compute(next(iter(params)), cfg.spec.checkpointed)
    return Built(
        opt,
        lambda x, y: _bp_closure(opt, lambda: forward(x), y),
        cfg.spec.forwards_per_step(),
        compute=compute,
    )


def _ste_master(model: QModel, names: list[str], headroom: float) -> tuple[dict[str, nn.Parameter], Callable]:
    """Float master weights of the QModel nodes `names` and the weight_fn that feeds the fake mode their
    fake-quantized values with a straight-through gradient (the other nodes: their stored integers). Their
    weight scale is first widened by `headroom` (as qzo_ff's weight_headroom), so weights can grow that much
    before the format saturates them."""
    nodes = model.weight_nodes()
    for n in names if headroom != 1.0 else ():
        nodes[n].set_weight_scale(nodes[n].w_qp.scale * headroom)
    master = {n: nn.Parameter(dequantize(nodes[n].weight_q, nodes[n].w_qp)) for n in names}

    def weight_fn(name, node):
        w = master.get(name)
        return node.weight_q if w is None else w + (fake_quantize(w.detach(), node.w_qp) - w.detach())

    return master, weight_fn


def _build_qat(model, cfg, names, sparse) -> Built:
    """bp_qat: float master weights, STE through their fake-quantized values in the QModel's fake mode."""
    master, weight_fn = _ste_master(model, names, cfg.ff.get("weight_headroom", 1.0))
    opt = torch.optim.SGD(list(master.values()), lr=cfg.lr)
    _mask_gradients(master, sparse, cfg.seed)

    def closure(x, y):
        return _bp_closure(opt, lambda: model(x, mode="fake", weight_fn=weight_fn), y)

    return Built(opt, closure, BP_FORWARD_EQUIVALENTS, master, compute=_bp_compute(names[0]))


def _forward_only_closure(model, frozen_upto: Callable[[], str] | None = None):
    """closure(x, y) for forward-only optimizers (never calls backward). With `frozen_upto` (returning a
    QModel node: the first one the coming step perturbs), the frozen prefix before it runs once per batch and
    every pass of the step resumes from it (`QModel.run_prefix`): prefix weights are never perturbed, so this
    is bit-identical. The closure is a `PassLoss`, so a QModel's passes may also run stacked."""
    if frozen_upto is None:
        return lambda x, y: PassLoss(lambda: model(x), y, F.cross_entropy)

    def closure(x, y):
        with torch.no_grad():
            prefix = model.run_prefix(x, frozen_upto())
        return PassLoss(lambda: model(x, prefix=prefix), y, F.cross_entropy)

    return closure


def _prefix_compute(first: Callable[[], str], opt) -> Callable[[Callable[[str], float]], float]:
    """A forward-only step's compute with prefix reuse: one pass up to the first perturbed layer/block
    (`first()`, for the coming step), then the step's passes from there: (1 − S(a)) + P·S(a)."""

    def compute(S) -> float:
        share = S(first())
        return 1 - share + opt.forwards_per_step * share

    return compute


def _build_zo(model, cfg, names, sparse) -> Built:
    """zo_fp32 / sign_spsa_fp32: `ForwardGradient` on the float parameters. When the trained parameters sit
    after a frozen prefix of the model's block chain (`fwdgrad.models.frozen_prefix`, e.g. linear probing),
    the prefix runs once per batch and every pass from its output, as QZO-FF's passes do."""
    named = list(_float_params(model, names).items())
    overrides = {} if "m" in cfg.spec.fixed else {"m": cfg.m}
    opt = zo_sgd(named, cfg.lr, cfg.eps, cfg.spec.estimator, cfg.seed, sparse=sparse, **cfg.ff, **overrides)
    cut = frozen_prefix(model, names)
    if cut is None:
        return Built(opt, _forward_only_closure(model), opt.forwards_per_step)
    prefix, suffix, first = cut

    def closure(x, y):
        with torch.no_grad():
            h = prefix(x)
        return lambda: F.cross_entropy(suffix(h), y)

    return Built(opt, closure, opt.forwards_per_step, compute=_prefix_compute(lambda: first, opt))


def _build_qzo(model, cfg, names, sparse) -> Built:
    """qzo_ff: QZO-FF on the QModel's integer weights; with loss "integer" each step compares the integer
    cross-entropy of the integer logits (`fwdgrad.ff.intloss`, as the edge runtimes do). With
    `method.ff.perturb=outputs`, activity-perturbed forward gradients on one linear layer
    (`fwdgrad.ff.activity`)."""
    opt = qzo_ff(model, cfg.lr, cfg.eps, cfg.m, cfg.seed, trainable=names, sparse=sparse, **cfg.ff)
    if isinstance(opt, ActivityGradient):  # every pass resumes after the one layer it trains
        closure = example_closure(model, cfg.loss)
        return Built(opt, closure, opt.forwards_per_step, compute=_prefix_compute(lambda: names[0], opt))
    space = opt.space

    def first() -> str:  # the frozen prefix of the coming step ends at the first tensor it perturbs
        return space.names[min(space.active(opt.step_count))]

    closure = integer_closure(model, first) if cfg.loss == "integer" else _forward_only_closure(model, first)

    return Built(opt, closure, opt.forwards_per_step, compute=_prefix_compute(first, opt))


def _build_hybrid(model, cfg, names, sparse) -> Built:
    """hybrid (ElasticZO-style; Sugiura & Matsutani 2025): the top `method.ff.bp_layers` of the trained layers
    by backprop, the layers below by QZO-FF, in one step:

        1. QZO-FF on the lower layers: 2m integer passes resuming from the prefix before the first of them
           (`_build_qzo`), sign-m-SPSA update of their integers;
        2. BP on the top layers: one fake-mode forward + backward at the updated lower weights, SGD on their
           float master weights (η_bp = `method.ff.bp_lr`, default η, following η's schedule) through the
           straight-through fake quantizer (as bp_qat); the master weights are written back as integers, so
           the next step's integer passes see them.
    """
    ff = dict(cfg.ff)
    k, bp_lr = ff.pop("bp_layers", 1), ff.pop("bp_lr", None) or cfg.lr
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < len(names):
        raise ValueError(
            f"method.ff.bp_layers={k!r} is invalid for {len(names)} trained layers; allowed: "
            f"1..{len(names) - 1} (widen the scope, e.g. mode.lp_layers, so QZO-FF keeps at least one layer)"
        )
    zo = _build_qzo(model, TrainConfig(**{**vars(cfg), "method": "qzo_ff", "ff": ff}), names[:-k], sparse)
    master, weight_fn = _ste_master(model, names[-k:], ff.get("weight_headroom", 1.0))
    sgd = torch.optim.SGD(list(master.values()), lr=bp_lr)
    nodes = model.weight_nodes()

    def step(x, y):
        loss = zo.opt.step(zo.closure(x, y))
        sgd.param_groups[0]["lr"] = bp_lr * zo.opt.param_groups[0]["lr"] / cfg.lr  # η's schedule
        sgd.step(_bp_closure(sgd, lambda: model(x, mode="fake", weight_fn=weight_fn), y))
        with torch.no_grad():
            for n, w in master.items():
                nodes[n].weight_q.copy_(quantize(w, nodes[n].w_qp).to(nodes[n].weight_q.dtype))
        return loss

    bp = _bp_compute(names[-k])
    return Built(
        zo.opt, zo.closure, zo.forwards_per_step + BP_FORWARD_EQUIVALENTS, master, step,
        compute=lambda S: zo.compute(S) + bp(S),
    )  # fmt: skip


def _build_jvp(model, cfg, names, sparse) -> Built:
    """jvp: forward-mode forward gradient over m tangents."""
    _float_params(model, names)
    opt = JVPForwardGradient(model, cfg.lr, cfg.m, cfg.seed)
    return Built(
        opt, lambda x, y: closure_for(model, lambda f: F.cross_entropy(f(x), y)), opt.forwards_per_step
    )


BUILDERS: dict[str, Callable[..., Built]] = {
    "sgd": _build_sgd,
    "qat": _build_qat,
    "zo": _build_zo,
    "qzo": _build_qzo,
    "hybrid": _build_hybrid,
    "jvp": _build_jvp,
}


class Method:
    """A model, the optimizer its method's builder made, and how a batch becomes a closure."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        s = cfg.spec
        if (s.trains == "qmodel") != isinstance(model, QModel):
            if s.trains == "qmodel":
                raise ValueError(
                    f"method {cfg.method!r} needs a quantized model (QModel); set quant to a "
                    "fixed-point scheme such as w16a8"
                )
            raise ValueError(
                f"method {cfg.method!r} trains a float model; quantize only for the methods training a "
                "QModel (qzo_ff, bp_qat, hybrid)"
            )
        sparse = {"kind": cfg.sparse_kind, "density": cfg.sparse_density} if cfg.scope == "sparse" else None
        built = BUILDERS[s.builder](model, cfg, trainable_names(model, cfg), sparse)
        self.opt, self.closure, self.master = built.opt, built.closure, built.master
        self.forwards_per_step, self._step = built.forwards_per_step, built.step
        self._compute = built.compute or (lambda S: self.forwards_per_step)
        self._suffix: Callable[[str], float] | None = None

    def compute(self, x: torch.Tensor) -> float:
        """The coming step's compute in MAC-weighted forward-pass equivalents (module docstring)."""
        if self._suffix is None:
            self._suffix = mac_suffix(self.model, x)
        return self._compute(self._suffix)

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:  # every builder's optimizer is a torch.optim.Optimizer
            group["lr"] = lr

    def ties(self) -> dict:
        """The tie count of the latest step, {"tie_fraction": ...}, for the forward-only optimizers that
        compare perturbation pairs (fwdgrad.ff.ForwardGradient); {} for the others."""
        pairs = getattr(self.opt, "last_pairs", 0)
        return {"tie_fraction": self.opt.last_ties / pairs} if pairs else {}

    def step(self, x, y) -> float:
        loss = self._step(x, y) if self._step else self.opt.step(self.closure(x, y))
        return float(loss.detach()) if torch.is_tensor(loss) else float(loss)

    def finish(self) -> None:
        """QAT: write the trained master weights back as integers."""
        nodes = self.model.weight_nodes() if isinstance(self.model, QModel) else {}
        for n, w in self.master.items():
            nodes[n].weight_q.copy_(quantize(w.detach(), nodes[n].w_qp).to(nodes[n].weight_q.dtype))

    def faults(self) -> dict[str, dict[str, int]]:
        """Fault counts so far, per kind and layer: accumulator overflows of the integer engine (every forward
        pass of the model, evaluations included) and weights clamped at their format's limits by a
        perturbation or an update (fixed-point forward gradients). Empty dicts where none can occur."""
        stats = getattr(self.model, "stats", None)
        sat = getattr(getattr(self.opt, "space", None), "saturations", {})
        return {
            "accumulator_overflow": dict(stats.overflow) if stats is not None else {},
            "perturb_saturation": dict(sat.get("perturb", {})),
            "update_saturation": dict(sat.get("update", {})),
        }

    def weights_seen(self) -> dict[str, int]:
        """How many weights were perturbed / updated so far (the base of the saturation rates)."""
        seen = getattr(getattr(self.opt, "space", None), "weights_seen", {})
        return {f"{k}_saturation": n for k, n in seen.items()}

    def state_dict(self) -> dict:
        return {
            "opt": self.opt.state_dict(),
            "master": {n: p.detach().clone() for n, p in self.master.items()},
            "faults": self.faults(),
            "weights_seen": self.weights_seen(),
        }

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["opt"])
        with torch.no_grad():
            for n, p in self.master.items():
                p.copy_(s["master"][n])
        f = s["faults"]  # counted across the resume as in one uninterrupted run
        if isinstance(self.model, QModel):
            self.model.stats.overflow = dict(f["accumulator_overflow"])
        space = getattr(self.opt, "space", None)
        if hasattr(space, "saturations"):
            space.saturations["perturb"] = dict(f["perturb_saturation"])
            space.saturations["update"] = dict(f["update_saturation"])
            space.weights_seen = {k: s["weights_seen"][f"{k}_saturation"] for k in space.weights_seen}


# ------------------------------------------------------------------------------------ checkpoints
class FaultWarning(UserWarning):
    """A run had accumulator overflows or saturated weights (see `Method.faults`)."""


class FaultError(ValueError):
    """A fault in a run with train.strict=true."""


def fingerprint(cfg: TrainConfig, model: nn.Module, train_xy, identity: dict | None = None) -> dict[str, str]:
    """Everything that determines a run's trajectory, as flat {"key": "value"}: the method and the settings
    it reads, scope, seed, batch size, schedule (and budget when the schedule depends on it), fixed-point
    options, the model's structure (parameter and buffer names, shapes, dtypes), a digest of the training
    data, the checkpoint layout version, and what the caller adds in `identity` (the pipeline: model
    config, number format, quantization options, source model). The budget (train.steps) is not part of
    it under a constant schedule: a finished run can be extended."""
    f: dict[str, Any] = {
        "checkpoint_version": CHECKPOINT_VERSION,
        "method": cfg.method,
        "scope": cfg.scope,
        **({"loss": cfg.loss} if cfg.loss != "float" else {}),  # earlier runs' fingerprints stay valid
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "lr_schedule": cfg.lr_schedule,
        **{k: getattr(cfg, k) for k in cfg.spec.hyper},  # lr / eps / m as the method reads them
        "ff": cfg.ff,
        "model_structure": digest([(k, str(v.dtype), tuple(v.shape)) for k, v in model.state_dict().items()]),
        "train_data": digest(list(train_xy)),
    }
    if cfg.scope == "lp":
        f["lp_layers"] = cfg.lp_layers
    if cfg.scope == "sparse":
        f["sparse"] = {"kind": cfg.sparse_kind, "density": cfg.sparse_density}
    if cfg.lr_schedule != "constant":
        f["budget"] = {"steps": cfg.steps, "forward_budget": cfg.forward_budget}
    return _flat(f | (identity or {}))


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str)
    return out


def check_fingerprint(path: str, stored: dict[str, str], current: dict[str, str]) -> None:
    """One-line ValueError naming every key whose value differs between a checkpoint and this run."""
    keys = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if not keys:
        return

    def short(v: str | None) -> str:
        return "unset" if v is None else (v if len(v) <= 24 else v[:21] + "...")

    diffs = ", ".join(f"{k} {short(stored.get(k))} -> {short(current.get(k))}" for k in keys[:6])
    more = f" and {len(keys) - 6} more" if len(keys) > 6 else ""
    raise ValueError(
        f"checkpoint {path!r} belongs to another run ({diffs}{more}; checkpoint -> this run); allowed: the "
        "settings of the run that wrote it, train.resume=never to start this run fresh there (replacing "
        "it), or another out_dir"
    )


def previous_path(path: str) -> str:
    """Where the checkpoint before the latest is kept (checkpoint.pt -> checkpoint.prev.pt)."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def save_checkpoint(path: str, state: dict) -> None:
    """Write a checkpoint atomically with its checksum (fwdgrad.statefile), keeping the one before it at
    `previous_path(path)`: a checkpoint corrupted on disk later still leaves an intact one to resume from."""
    if os.path.exists(path):
        os.replace(path, previous_path(path))
    save_state(path, "checkpoint", state)


def load_checkpoint(path: str, current: dict[str, str] | None = None) -> dict:
    """The checkpoint at `path`, or the previous one when it is unreadable or corrupted (a one-line warning
    names the file); checked against this run's fingerprint `current`. No intact checkpoint, or one from
    another run, is a one-line ValueError."""
    candidates = [p for p in (path, previous_path(path)) if os.path.exists(p)]
    first = None
    for p in candidates:
        try:
            state = load_state(p, "checkpoint")
        except StateFileError as e:
            first = first or e
            continue
        if current is not None:
            check_fingerprint(p, state["fingerprint"], current)
        if first is not None:
            resumed = f"resumed from the previous checkpoint {p!r} (step {state['step']})"
            warnings.warn(f"{first}; {resumed}", FaultWarning, stacklevel=2)
        return state
    if first is None:
        raise StateFileError(f"checkpoint {path!r} does not exist")
    raise StateFileError(
        f"{first}, and there is no intact previous checkpoint; allowed: train.resume=never to start fresh"
    )


# ------------------------------------------------------------------------------------------ loop
@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    forward_passes: int
    test_acc: float
    wall_s: float
    peak_mem_bytes: int
    log: list[dict]
    tie_fraction: float | None = None  # forward-only: the fraction of perturbation pairs with L+ == L−
    faults: dict[str, dict[str, int]] = field(default_factory=dict)  # `Method.faults` at the end
    compute: float = 0.0  # MAC-weighted forward-pass equivalents (module docstring)


@dataclass
class Progress:
    """Where a run stands: what a checkpoint stores besides the model, method and data position."""

    step: int = 0
    forward_passes: int = 0
    wall_s: float = 0.0
    log: list[dict] = field(default_factory=list)
    peak: int = 0
    compute: float = 0.0  # MAC-weighted forward-pass equivalents (module docstring)

    def save(self, path: str | None, model: nn.Module, method: Method, stream: BatchStream, cfg, fp) -> None:
        if path:
            save_checkpoint(
                path,
                {
                    "fingerprint": fp,
                    "model": model.state_dict(),
                    "method": method.state_dict(),
                    "stream": stream.state_dict(),
                    "step": self.step,
                    "forward_passes": self.forward_passes,
                    "wall_s": self.wall_s,
                    "log": self.log,
                    "peak": self.peak,
                    "compute": self.compute,
                    "config": vars(cfg),
                },
            )

    @classmethod
    def resume(cls, s: dict, model: nn.Module, method: Method, stream: BatchStream) -> Progress:
        try:
            model.load_state_dict(s["model"])
        except RuntimeError as e:  # the fingerprint's model structure matched, so this is a damaged file
            first = str(e).strip().splitlines()[0]
            raise StateFileError(f"the checkpoint's model state does not fit the model: {first}") from None
        method.load_state_dict(s["method"])
        stream.load_state_dict(s["stream"])
        return cls(s["step"], s["forward_passes"], s["wall_s"], s["log"], s["peak"], s.get("compute", 0.0))


def _start(ckpt: str | None, cfg: TrainConfig, fp: dict, model, method, stream) -> Progress:
    """Progress() for a fresh run, or the checkpoint's (train.resume: auto | must | never)."""
    found = ckpt is not None and any(os.path.exists(p) for p in (ckpt, previous_path(ckpt)))
    if cfg.resume == "must" and not found:
        raise ValueError(
            f"train.resume=must but there is no checkpoint {ckpt!r} to resume; allowed: the out_dir of an "
            "interrupted run, or train.resume=auto"
        )
    if not found or cfg.resume == "never":
        return Progress()
    return Progress.resume(load_checkpoint(ckpt, fp), model, method, stream)


def _fault_totals(faults: dict[str, dict[str, int]]) -> dict[str, int]:
    return {kind: sum(per_layer.values()) for kind, per_layer in faults.items()}


def fault_summary(faults: dict[str, dict[str, int]], seen: dict[str, int] | None = None) -> str | None:
    """'105,536 accumulator overflows (conv2 105,000, fc 536); 12 perturb saturations (0.004% of 307,200
    weights; fc 12)' and the like (`seen`: the rates' base per kind), or None without faults."""
    parts = []
    for kind, per_layer in faults.items():
        total = sum(per_layer.values())
        if total:
            layers = ", ".join(f"{n} {c:,}" for n, c in sorted(per_layer.items(), key=lambda x: -x[1])[:3])
            base = (seen or {}).get(kind)
            rate = f"{100 * total / base:.2g}% of {base:,} weights; " if base else ""
            parts.append(f"{total:,} {kind.replace('_', ' ')}s ({rate}{layers})")
    return "; ".join(parts) or None


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_xy,
    test_xy,
    out_dir: str | None = None,
    progress: Callable[[dict], None] | None = None,
    identity: dict | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Run `cfg` on `model` (float module, or QModel for qzo_ff / bp_qat).

    Writes `log.csv` and `checkpoint.pt` (and the one before it, checkpoint.prev.pt) to out_dir when given,
    and resumes from the checkpoint there (cfg.resume) if its fingerprint (`fingerprint`, with the caller's
    `identity` added) matches this run. SIGINT/SIGTERM checkpoint at the end of the current step and raise
    `Interrupted`. Faults (`Method.faults`) are counted in the log rows, warned about at the end
    (`FaultWarning`), or raise `FaultError` with cfg.strict. `stop_after` abandons the run after that many
    steps, as a crash would (nothing written) — to test resume.
    """
    model.eval()
    method = Method(model, cfg)
    stream = BatchStream(*train_xy, cfg.batch_size, cfg.seed)
    total = cfg.steps if cfg.steps is not None else cfg.forward_budget // method.forwards_per_step
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    fp = fingerprint(cfg, model, train_xy, identity)
    run = _start(ckpt, cfg, fp, model, method, stream)
    counted = _fault_totals(method.faults())
    with deferred_signals() as signals:
        while run.step < total:
            if stop_after is not None and run.step >= stop_after:  # simulated crash: no final checkpoint
                return TrainResult(
                    model, run.step, run.forward_passes, float("nan"), run.wall_s, run.peak, run.log
                )
            x, y = stream.next()
            method.set_lr(scheduled_lr(cfg, run.step, total))
            run.compute += method.compute(x)
            t0 = time.perf_counter()
            if run.step == 0:  # measure the peak memory of one real training step
                loss, run.peak = _measured_step(method, x, y)
            else:
                loss = method.step(x, y)
            run.wall_s += time.perf_counter() - t0
            run.step += 1
            run.forward_passes += method.forwards_per_step
            row = {
                "step": run.step,
                "forward_passes": run.forward_passes,
                "compute": round(run.compute, 4),
                "loss": loss,
                "wall_s": round(run.wall_s, 4),
                **method.ties(),
            }
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {run.step}; lower lr (now {cfg.lr})")
            if run.step % cfg.eval_every == 0 or run.step == total:
                method.finish()  # QAT: evaluate the trained integers (its passes never read them)
                row["test_acc"] = evaluate(model, *test_xy)
            now = _fault_totals(method.faults())
            if isinstance(model, QModel):
                row |= now
            if cfg.strict and now != counted:
                news = {k: v - counted[k] for k, v in now.items() if v != counted[k]}
                found = ", ".join(f"{v:,} new {k.replace('_', ' ')}s" for k, v in news.items())
                raise FaultError(
                    f"train.strict: {found} at step {run.step}; "
                    "allowed: none with train.strict=true (widen quant.acc_bits, lower method.lr or "
                    "method.eps, or set train.strict=false to count them and go on)"
                )
            counted = now
            run.log.append(row)
            if progress:
                progress(row)
            if signals:
                run.save(ckpt, model, method, stream, cfg, fp)
                signals.hand_over()  # under SLURM: submitit requeues the job (and exits)
                name = signal.Signals(signals[0]).name
                where = (
                    f"checkpoint written to {ckpt}; resume with the same command and out_dir={out_dir}"
                    if ckpt
                    else "no out_dir, nothing saved"
                )
                raise Interrupted(signals[0], f"stopped by {name} at step {run.step} of {total}; {where}")
            if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
                run.save(ckpt, model, method, stream, cfg, fp)
        method.finish()
        run.save(ckpt, model, method, stream, cfg, fp)
    if out_dir:
        write_log(os.path.join(out_dir, "log.csv"), run.log)
    last = run.log[-1] if run.log else {}
    # the last step's evaluation is the final one unless finish() changed the weights (QAT's write-back)
    acc = last["test_acc"] if "test_acc" in last and not method.master else evaluate(model, *test_xy)
    faults = method.faults()
    summary = fault_summary(faults, method.weights_seen())
    if summary:
        warnings.warn(
            f"faults in this run: {summary}; train.strict=true makes them errors", FaultWarning, stacklevel=2
        )
    ties = tie_fraction(run.log)
    return TrainResult(
        model, run.step, run.forward_passes, acc, run.wall_s, run.peak, run.log, ties, faults, run.compute
    )


def tie_fraction(log: list[dict]) -> float | None:
    """The fraction of perturbation pairs whose losses tied over a training log (every step compares the
    same number of pairs), or None when no step recorded one (backprop, jvp)."""
    fractions = [r["tie_fraction"] for r in log if "tie_fraction" in r]
    return sum(fractions) / len(fractions) if fractions else None


def _measured_step(method: Method, x, y) -> tuple[float, int]:
    """One training step under the memory profiler: (loss, measured peak bytes)."""
    box = {}
    peak = measure_peak_memory(lambda: box.setdefault("loss", method.step(x, y)))
    return box["loss"], peak


LOG_KEYS = ("step", "forward_passes", "compute", "loss", "test_acc", "wall_s", "tie_fraction")
FAULT_KEYS = ("accumulator_overflow", "perturb_saturation", "update_saturation")


def write_log(path: str, rows: list[dict]) -> None:
    """The training log as CSV (atomically): LOG_KEYS, and the cumulative fault counts when rows have them."""
    keys = list(LOG_KEYS) + [k for k in FAULT_KEYS if any(k in r for r in rows)]
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
