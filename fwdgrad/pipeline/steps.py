"""The steps every experiment shares: task data, the cached source model, the head, conversion to the
integer engine, the memory model, the output directory and the progress bar. Each is a plain function of
the validated `Config` (fwdgrad.config)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate

from ..analysis.memory import memory_breakdown
from ..config import Config, PretrainSettings, model_label
from ..engine import convert
from ..files import remove_stale_temps
from ..methods import spec
from ..models import build_from_config, head_layers
from ..statefile import StateFileError, load_state, save_state
from ..train import BatchStream
from .progress import Progress, duration, evaluate_shown, log, stdout_is_terminal

SOURCE_VERSION = 2  # bump when pretraining or the cache file changes, so stale cached models are never read


# ------------------------------------------------------------------------------------------- data
def load_task(
    spec_: dict,
    seed: int,
    max_train: int | None = None,
    max_test: int | None = None,
    validation: float | None = None,
):
    """Instantiate a `build_dataset` spec -> (DataSplits, (x_train, y_train), (x_test, y_test)). With
    `validation` (a fraction), the test split is never read: a seeded `validation` share of the training set
    (after max_train) is returned in its place and the rest is the training set."""
    lines, t0 = not stdout_is_terminal(), time.perf_counter()
    if lines:
        log.info("data: loading %s", spec_["name"])
    splits = instantiate(spec_, seed=seed)
    parts = []
    for ds, cap in ((splits.train, max_train), (splits.test, max_test)):
        if not hasattr(ds, "tensors"):
            raise ValueError(
                f"dataset {spec_['name']!r} yields raw clips; the pipeline needs tensors "
                "(image sets, or synth_keywords features)"
            )
        x, y = ds.tensors
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise ValueError(
                f"dataset {spec_['name']!r} has {bad:,} non-finite input values (NaN or Inf); allowed: "
                "finite inputs only"
            )
        if cap is not None and cap < len(x):  # a seeded subset (quick runs, tests)
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap]
            x, y = x[keep], y[keep]
        parts.append((x, y))
        if validation is not None:  # the held-out part replaces the test split, which is never read
            x, y = parts.pop()
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed + 7919))
            n = max(1, min(len(x) - 1, round(validation * len(x))))
            parts += [(x[perm[n:]], y[perm[n:]]), (x[perm[:n]], y[perm[:n]])]
            break
    if lines:
        held = "validation (held out of train)" if validation is not None else "test"
        sizes = f"{len(parts[0][0]):,} train / {len(parts[1][0]):,} {held} examples"
        log.info("data: %s, %s (%s)", spec_["name"], sizes, duration(time.perf_counter() - t0))
    return splits, parts[0], parts[1]


# ------------------------------------------------------------------------------------ source model
def cache_dir(c: Config) -> Path:
    root = c.cache_dir or os.environ.get("FWDGRAD_CACHE") or Path.home() / ".cache" / "fwdgrad"
    return Path(root).expanduser() / "models"


def source_key(c: Config, num_classes: int, in_channels: int) -> str:
    """Hash of everything that determines the source model (the data root is not part of it)."""
    spec_ = {k: v for k, v in c.data.source.items() if k != "root"}
    key = {
        "data": spec_,
        "model": c.model,
        "pretrain": vars(c.pretrain),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "version": SOURCE_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain(model: nn.Module, xy, p: PretrainSettings, progress: Progress | None = None) -> nn.Module:
    """Supervised source training: Adam, BatchNorm in train mode, seeded batches (`BatchStream`)."""
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    stream = BatchStream(*xy, p.batch_size, p.seed)
    model.train()
    for step in range(p.steps):
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if progress:
            progress.update(step + 1, loss=loss.item())
    return model.eval()


def source_model(c: Config, src_train, src_test, num_classes: int, in_channels: int):
    """The pretrained source model, from `<cache>/models/<hash>.pt` or trained now (and cached).

    Returns (model, source test accuracy, whether it came from the cache)."""
    path = cache_dir(c) / f"{source_key(c, num_classes, in_channels)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.pretrain.seed)
    model = build_from_config(c.model, num_classes, in_channels)
    with open(f"{path}.lock", "w") as lock:  # parallel sweep jobs pretrain a shared source model once
        fcntl.flock(lock, fcntl.LOCK_EX)
        remove_stale_temps(path.parent)  # of writers killed mid-write
        cached = path.exists()
        if cached:
            try:
                state = load_state(path, "source-model")
            except StateFileError as e:
                raise StateFileError(f"cached source model: {e}; delete it to pretrain it again") from None
            model.load_state_dict(state["model"])
            if not stdout_is_terminal():
                log.info("source model: %s (cached, source test accuracy %.4f)", path, state["source_acc"])
            return model.eval(), state["source_acc"], True
        start = f"{c.pretrain.steps:,} Adam steps on the source task (cached afterwards in {path})"
        with Progress.of(c, "pretrain", c.pretrain.steps, start=start) as shown:
            pretrain(model, src_train, c.pretrain, shown)
        acc = evaluate_shown(c, "source test accuracy", model, *src_test)
        save_state(
            path,
            "source-model",
            {
                "model": model.state_dict(),
                "source_acc": acc,
                "config": {"data": c.data.source, "model": c.model, "pretrain": vars(c.pretrain)},
            },
        )
    return model, acc, False


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fit_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Replace the last linear layer by a fresh one when the target has another number of classes (the head
    is the last parametrized layer in forward order, `fwdgrad.models.head_layers`)."""
    name = head_layers(model, 1)[0]
    head = model.get_submodule(name)
    outputs = getattr(head, "out_features", getattr(head, "out_channels", None))
    if outputs != num_classes and not isinstance(head, nn.Linear):
        raise ValueError(
            f"the head {name!r} ({type(head).__name__}) has {outputs} outputs, not {num_classes}, and is no "
            "nn.Linear to replace; allowed: models whose last parametrized layer is an nn.Linear"
        )
    if outputs != num_classes:
        torch.manual_seed(seed)
        set_module(model, name, nn.Linear(head.in_features, num_classes))
    return model


#: The imprinted head's logit margin between two class means, in nats (averaged over class pairs).
IMPRINT_MARGIN = 3.0


@torch.no_grad()
def imprint_head(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> int:
    """Weight imprinting (Qi et al., CVPR 2018; the Edge TPU's on-device retraining): the head (the last
    linear layer) becomes the nearest-class-mean classifier of its own input features f on (x, y):

        W_k = τ·(μ_k − μ̄),   b_k = −τ·(‖μ_k‖² − mean_j ‖μ_j‖²)/2,   μ_k = mean of f over class k's examples

    (μ̄ the mean of the μ_k), so argmax_k (W f + b)_k is the class whose mean is nearest to f: the logits are
    τ·(μ_k·f − ‖μ_k‖²/2) less a term all classes share, which softmax ignores and which, left in, would widen
    the range an 8-bit output format must cover. τ is set so that the logit margin
    between two class means, τ·‖μ_i − μ_j‖²/2, is IMPRINT_MARGIN nats on average. Forward passes only, one
    per batch of `batch_size` examples, whose number it returns. Classes without examples keep their row."""
    name = head_layers(model, 1)[0]
    head = model.get_submodule(name)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"train.head_init='imprint' needs a linear head; {name!r} is a {type(head).__name__}; allowed: "
            "models whose last parametrized layer is an nn.Linear, or train.head_init=source"
        )
    k = head.out_features
    sums, counts = torch.zeros(k, head.in_features, dtype=torch.float64), torch.zeros(k, dtype=torch.float64)

    def hook(module, inputs, output):
        f = inputs[0].reshape(-1, head.in_features).double()
        sums.index_add_(0, batch_y, f)
        counts.index_add_(0, batch_y, torch.ones(len(f), dtype=torch.float64))

    handle, was_training = head.register_forward_hook(hook), model.training
    model.eval()
    try:
        passes = 0
        for i in range(0, len(x), batch_size):
            batch_y = y[i : i + batch_size].long()
            model(x[i : i + batch_size])
            passes += 1
    finally:
        handle.remove()
        model.train(was_training)
    seen = counts > 0
    n = int(seen.sum())
    if n < 2:
        raise ValueError(f"train.head_init='imprint' needs examples of at least 2 classes, got {n}")
    mu = sums[seen] / counts[seen, None]
    pairs = torch.cdist(mu, mu).pow(2) / 2
    tau = IMPRINT_MARGIN / float(pairs.sum() / (n * (n - 1))) if float(pairs.sum()) > 0 else 1.0
    sq = mu.pow(2).sum(1) / 2
    head.weight[seen] = (tau * (mu - mu.mean(0))).to(head.weight.dtype)  # softmax ignores what all classes
    if head.bias is not None:  # share: centred, the logits span only their differences (finer 8-bit codes)
        head.bias[seen] = (-tau * (sq - sq.mean())).to(head.bias.dtype)
    return passes


# ------------------------------------------------------------------------------------------ adapt
def convert_model(model: nn.Module, c: Config, calib: torch.Tensor) -> nn.Module:
    """The whole model converted to a QModel in c.scheme, calibrated on `calib`; the float model itself
    for fp32."""
    if c.scheme == "fp32":
        return model
    q = c.quant
    return convert(
        model,
        c.scheme,
        calib[: q.calib_size],
        observer=q.observer,
        per_channel=q.per_channel,
        acc_bits=q.acc_bits,
        overflow=q.overflow,
        requant=q.requant,
        mode=q.engine_mode,
        residual_bits=q.residual_bits,
    )


def memory_model(model: nn.Module, c: Config, input_shape: tuple[int, ...]):
    """Modelled on-device training memory (fwdgrad.analysis.memory) of this method, scope and format; for
    dvpt, of the model with `c.mode.prompts` deep prompts per encoder layer (as `run_transfer` adds them);
    for bp_ckpt, with `c.method.segments` checkpointed segments (a bad count stops the run here); for hybrid,
    backprop's memory over its top `method.ff.bp_layers` layers (the QZO-FF layers below add only their
    perturbation state, which BP's saved activations and gradients exceed)."""
    s = spec(c.method.name)
    mode, lp_layers = c.mode.name, c.mode.lp_layers
    if s.builder == "hybrid":
        mode, lp_layers = "lp", c.method.ff.get("bp_layers", 1)
    try:
        return memory_breakdown(
            model,
            input_shape,
            "ff" if s.forward_only else "bp_ckpt" if s.checkpointed else "bp",
            mode,
            s.memory_format or c.scheme,
            density=c.mode.sparse_density,
            lp_layers=lp_layers,
            m=s.memory_samples(c.method.m),
            model_name=model_label(c.model),
            prompts=c.mode.prompts,  # dvpt: the prompts run_transfer adds, so the longer sequence is counted
            segments=c.method.segments,
            perturb=(c.method.ff or {}).get("perturb", "weights") if s.name == "qzo_ff" else "weights",
        )
    except RuntimeError as e:  # the memory model runs the model on meta tensors (shapes, no values)
        raise ValueError(
            f"model {model_label(c.model)!r} cannot run on meta tensors for the memory model "
            f"({str(e).strip().splitlines()[0]}); allowed: models whose forward does not depend on tensor "
            "values (which the integer engine cannot trace either)"
        ) from e


def output_dir(c: Config) -> Path:
    if c.out_dir:
        return Path(c.out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def progress_bar(c: Config, desc: str):
    """What a person sees of train() (fwdgrad.pipeline.progress): a `Progress` over the steps (or forward
    passes) that also shows train()'s evaluations until it is closed, and the `progress` callback for
    train(): step, loss, latest test accuracy."""
    t = c.train
    budget = f"{t.steps:,} steps" if t.steps else f"{t.forward_budget:,} forward passes"
    start = f"training, {budget}, batch {t.batch_size}, test accuracy every {t.eval_every} steps"
    unit = "step" if t.steps else "fwd"
    shown = Progress.of(c, desc, t.steps or t.forward_budget, unit, evaluations=True, start=start)

    def update(row: dict) -> None:
        fields = {"loss": row["loss"]} | ({"acc": row["test_acc"]} if "test_acc" in row else {})
        if not t.steps:
            fields["step"] = row["step"]
        shown.update(row["step"] if t.steps else row["forward_passes"], **fields)

    return shown, update
