"""The shared training loop: backprop baselines and forward-gradient methods on the same data order,
budget and evaluation, with atomic checkpoints and bit-identical resume.

Methods (`METHODS`):

| method          | model trained           | update                                                    |
|-----------------|-------------------------|-----------------------------------------------------------|
| bp              | float32                 | SGD on autograd gradients                                 |
| bp_fp16/bp_bf16 | float32 master weights  | same, forward/backward under `torch.autocast` (fp16/bf16) |
| bp_qat          | QModel, fake mode + STE | SGD on float master weights, re-quantized at the end      |
| zo_fp32         | float32                 | SPSA central difference (`ForwardGradient`, FloatSpace)   |
| sign_spsa_fp32  | float32                 | sign-m-SPSA in float (the paper's estimator, fp32)        |
| qzo_ff          | QModel (integer/fake)   | QZO-FF: sign-m-SPSA in fixed point (FixedPointSpace)      |
| jvp             | float32                 | forward-mode forward gradient (∇L·z) z                    |

Every step draws the next batch from a seeded stream (epoch e is a permutation seeded by (seed, e)), so
all methods see the same data order. Budgets are steps or forward passes (a BP step counts as
`BP_FORWARD_EQUIVALENTS` = 3 forward passes, SPEC §2.4). All models run in eval mode (BatchNorm statistics
frozen, as in the folded integer model).
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine.model import QModel, chunk_rows
from .ff.jvp import JVPForwardGradient, closure_for
from .ff.masks import make_masks
from .ff.optim import qzo_ff, zo_sgd
from .models import head_params
from .quant import fake_quantize, quantize

METHODS = ("bp", "bp_fp16", "bp_bf16", "bp_qat", "zo_fp32", "sign_spsa_fp32", "qzo_ff", "jvp")
TRAIN_MODES = ("ft", "lp", "sparse")
BP_FORWARD_EQUIVALENTS = 3
LR_SCHEDULES = ("constant", "cosine", "linear")


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
    """What to train and for how long. `steps` or `forward_budget` (forward passes) sets the budget."""

    method: str = "qzo_ff"
    mode: str = "lp"  # ft | lp | sparse
    lp_layers: int = 1
    sparse_kind: str = "topk"
    sparse_density: float = 0.1
    lr: float = 0.01
    lr_schedule: str = "constant"  # constant | cosine (to 0 at the end of the budget) | linear
    eps: float = 1e-3
    m: int = 3
    steps: int | None = 300
    forward_budget: int | None = None
    batch_size: int = 64
    eval_every: int = 50
    checkpoint_every: int = 0  # 0: only at the end
    seed: int = 0
    ff: dict = field(default_factory=dict)  # extra options of qzo_ff / zo_sgd (rounding, momentum, ...)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r} is invalid; allowed: {METHODS}")
        if self.mode not in TRAIN_MODES:
            raise ValueError(f"training mode {self.mode!r} is invalid; allowed: {TRAIN_MODES}")
        for name in ("lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid; allowed: > 0")
        if not isinstance(self.m, int) or self.m < 1:
            raise ValueError(f"m={self.m!r} is invalid; allowed: integers >= 1")
        if (self.steps is None) == (self.forward_budget is None):
            raise ValueError("give exactly one budget: steps or forward_budget")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule {self.lr_schedule!r} is invalid; allowed: {LR_SCHEDULES}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} is invalid; allowed: >= 1")

    @property
    def is_forward_only(self) -> bool:
        return self.method not in ("bp", "bp_fp16", "bp_bf16", "bp_qat")


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


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = None) -> float:
    """Top-1 accuracy (fraction) of `model` on (x, y), in chunks of `batch_size` examples (default:
    `fwdgrad.engine.model.chunk_rows`, about 2^15 input elements per chunk)."""
    batch_size = batch_size or chunk_rows(x)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum())
    return correct / max(1, len(x))


# --------------------------------------------------------------------------------------- methods
def trainable_names(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Float parameter names (or QModel conv/linear node names) that the training mode updates."""
    if isinstance(model, QModel):
        nodes = list(model.weight_nodes())
        return nodes[-cfg.lp_layers :] if cfg.mode == "lp" else nodes
    if cfg.mode == "lp":
        return head_params(model, cfg.lp_layers)
    return [n for n, _ in model.named_parameters()]


class Method:
    """A model, an optimizer with `.step(closure)`, and how a batch becomes a closure."""

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        names = trainable_names(model, cfg)
        sparse = {"kind": cfg.sparse_kind, "density": cfg.sparse_density} if cfg.mode == "sparse" else None
        self.master: dict[str, torch.nn.Parameter] = {}
        m = cfg.method
        if m == "qzo_ff":
            self._need(QModel)
            self.opt = qzo_ff(
                model, cfg.lr, cfg.eps, cfg.m, cfg.seed, trainable=names, sparse=sparse, **cfg.ff
            )
            self.forwards_per_step = self.opt.forwards_per_step
            return
        if m == "bp_qat":
            self._need(QModel)
            nodes = model.weight_nodes()
            from .quant import dequantize

            self.master = {n: nn.Parameter(dequantize(nodes[n].weight_q, nodes[n].w_qp)) for n in names}
            params = list(self.master.values())
        else:
            if isinstance(model, QModel):
                raise ValueError(f"method {m!r} trains a float model; quantize only for qzo_ff / bp_qat")
            for n, p in model.named_parameters():
                p.requires_grad_(n in names)
            params = [p for n, p in model.named_parameters() if n in names]
        if m in ("zo_fp32", "sign_spsa_fp32"):
            est = "spsa" if m == "zo_fp32" else "sign_spsa"
            named = [(n, p) for n, p in model.named_parameters() if n in names]
            overrides = {"m": cfg.m} if m == "sign_spsa_fp32" else {}
            self.opt = zo_sgd(named, cfg.lr, cfg.eps, est, cfg.seed, sparse=sparse, **cfg.ff, **overrides)
            self.forwards_per_step = self.opt.forwards_per_step
        elif m == "jvp":
            self.opt = JVPForwardGradient(model, cfg.lr, cfg.m, cfg.seed)
            self.forwards_per_step = self.opt.forwards_per_step
        else:
            self.opt = torch.optim.SGD(params, lr=cfg.lr)
            self.forwards_per_step = BP_FORWARD_EQUIVALENTS
            if sparse:
                named = (
                    dict(self.master)
                    if self.master
                    else {n: p for n, p in model.named_parameters() if n in names}
                )
                masks = make_masks({n: p.detach() for n, p in named.items()}, seed=cfg.seed, **sparse)
                for n, p in named.items():
                    p.register_hook(lambda g, mk=masks[n]: g * mk)
        self.autocast = {"bp_fp16": torch.float16, "bp_bf16": torch.bfloat16}.get(m)

    def _need(self, cls):
        if not isinstance(self.model, cls):
            raise ValueError(
                f"method {self.cfg.method!r} needs a quantized model (QModel); set quant to a "
                "fixed-point scheme such as w16a8"
            )

    def _qat_weight_fn(self, name, node):
        """STE fake-quantized master weights (QAT)."""
        w = self.master.get(name)
        return node.weight_q if w is None else w + (fake_quantize(w.detach(), node.w_qp) - w.detach())

    def closure(self, x: torch.Tensor, y: torch.Tensor) -> Callable:
        model, m = self.model, self.cfg.method
        if self.cfg.is_forward_only and m != "jvp":
            return lambda: F.cross_entropy(model(x), y)  # forward only: never calls backward
        if m == "jvp":
            return closure_for(model, lambda f: F.cross_entropy(f(x), y))

        def bp_closure():
            self.opt.zero_grad()
            with torch.enable_grad():
                if m == "bp_qat":
                    out = model(x, mode="fake", weight_fn=self._qat_weight_fn)
                elif self.autocast is not None:
                    with torch.autocast(
                        "cpu" if x.device.type == "cpu" else x.device.type, dtype=self.autocast
                    ):
                        out = model(x)
                else:
                    out = model(x)
                loss = F.cross_entropy(out.float(), y)
                loss.backward()
            return loss

        return bp_closure

    def set_lr(self, lr: float) -> None:
        if isinstance(self.opt, torch.optim.Optimizer):
            for group in self.opt.param_groups:
                group["lr"] = lr
        else:
            self.opt.lr = lr

    def step(self, x, y) -> float:
        loss = self.opt.step(self.closure(x, y))
        return float(loss.detach()) if torch.is_tensor(loss) else float(loss)

    def finish(self) -> None:
        """QAT: write the trained master weights back as integers."""
        nodes = self.model.weight_nodes() if isinstance(self.model, QModel) else {}
        for n, w in self.master.items():
            nodes[n].weight_q.copy_(quantize(w.detach(), nodes[n].w_qp).to(nodes[n].weight_q.dtype))

    def state_dict(self) -> dict:
        return {
            "opt": self.opt.state_dict(),
            "master": {n: p.detach().clone() for n, p in self.master.items()},
        }

    def load_state_dict(self, s: dict) -> None:
        self.opt.load_state_dict(s["opt"])
        with torch.no_grad():
            for n, p in self.master.items():
                p.copy_(s["master"][n])


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str, state: dict) -> None:
    """Atomic write: a temporary file in the same folder, fsync, then rename over the old checkpoint."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise ValueError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from e


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


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_xy,
    test_xy,
    out_dir: str | None = None,
    progress: Callable[[dict], None] | None = None,
    resume: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run `cfg` on `model` (float module, or QModel for qzo_ff / bp_qat).

    Writes `log.csv` and `checkpoint.pt` to out_dir (when given) and resumes from the checkpoint there.
    `stop_after` abandons the run after that many steps, as a crash would (nothing written) — to test resume.
    """
    model.eval()
    method = Method(model, cfg)
    stream = BatchStream(*train_xy, cfg.batch_size, cfg.seed)
    total = cfg.steps if cfg.steps is not None else cfg.forward_budget // method.forwards_per_step
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    ckpt = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    step, forward_passes, wall, log, peak = 0, 0, 0.0, [], 0
    if ckpt and resume and os.path.exists(ckpt):
        s = load_checkpoint(ckpt)
        model.load_state_dict(s["model"])
        method.load_state_dict(s["method"])
        stream.load_state_dict(s["stream"])
        step, forward_passes, wall, log, peak = (
            s["step"],
            s["forward_passes"],
            s["wall_s"],
            s["log"],
            s["peak"],
        )

    def checkpoint():
        if ckpt:
            save_checkpoint(
                ckpt,
                {
                    "model": model.state_dict(),
                    "method": method.state_dict(),
                    "stream": stream.state_dict(),
                    "step": step,
                    "forward_passes": forward_passes,
                    "wall_s": wall,
                    "log": log,
                    "peak": peak,
                    "config": vars(cfg),
                },
            )

    while step < total:
        if stop_after is not None and step >= stop_after:  # simulated crash: no final checkpoint
            return TrainResult(model, step, forward_passes, float("nan"), wall, peak, log)
        x, y = stream.next()
        method.set_lr(scheduled_lr(cfg, step, total))
        t0 = time.perf_counter()
        if step == 0:  # measure the peak memory of one real training step
            loss, peak = _measured_step(method, x, y)
        else:
            loss = method.step(x, y)
        wall += time.perf_counter() - t0
        step += 1
        forward_passes += method.forwards_per_step
        row = {"step": step, "forward_passes": forward_passes, "loss": loss, "wall_s": round(wall, 4)}
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss became {loss} at step {step}; lower lr (now {cfg.lr})")
        if step % cfg.eval_every == 0 or step == total:
            row["test_acc"] = evaluate(model, *test_xy)
        log.append(row)
        if progress:
            progress(row)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
    method.finish()
    checkpoint()
    if out_dir:
        write_log(os.path.join(out_dir, "log.csv"), log)
    acc = evaluate(model, *test_xy)
    return TrainResult(model, step, forward_passes, acc, wall, peak, log)


def _measured_step(method: Method, x, y) -> tuple[float, int]:
    """One training step under the memory profiler: (loss, measured peak bytes)."""
    from .analysis.memory import measure_peak_memory

    box = {}
    peak = measure_peak_memory(lambda: box.setdefault("loss", method.step(x, y)))
    return box["loss"], peak


def write_log(path: str, rows: list[dict]) -> None:
    keys = ["step", "forward_passes", "loss", "test_acc", "wall_s"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
