"""The experiment pipeline, one function: `run_experiment(cfg) -> metrics` (docs/experiments.md).

    source model (BP pretraining on the source task, cached by a hash of its config)
    -> zero-shot accuracy on the target task
    -> quantize + calibrate (cfg.quant; fp32 = no conversion)
    -> adapt with cfg.method in cfg.mode (fwdgrad.train.train) -> evaluate
    -> metrics.json, log.csv, checkpoint.pt, model.pt and curves.png in the output directory.

Few-shot data configs (`data.fewshot`) run N-way K-shot episodes instead: per episode the source embedding
gets a ProtoNet (or SimpleShot) linear head built from the support set, is adapted on the support set and
tested on the queries; accuracies are averaged over episodes.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from .analysis.devices import assert_fits, load_device
from .analysis.memory import memory_breakdown
from .config import Config, validate
from .data import episodes, prototypes
from .engine import convert
from .models import head_layers
from .plots import plot_curves
from .train import BatchStream, TrainConfig, evaluate, save_checkpoint, train, write_log

SOURCE_VERSION = 1  # bump when pretraining changes, so stale cached source models are never reused


# ------------------------------------------------------------------------------------------- data
def load_task(spec: dict, seed: int, max_train: int | None = None, max_test: int | None = None):
    """Instantiate a `build_dataset` spec -> (DataSplits, (x_train, y_train), (x_test, y_test))."""
    splits = instantiate(spec, seed=seed)
    parts = []
    for ds, cap in ((splits.train, max_train), (splits.test, max_test)):
        if not hasattr(ds, "tensors"):
            raise ValueError(f"dataset {spec['name']!r} yields raw clips; the pipeline needs tensors "
                             "(image sets, or synth_keywords features)")
        x, y = ds.tensors
        if cap is not None and cap < len(x):  # a seeded subset (quick runs, tests)
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap]
            x, y = x[keep], y[keep]
        parts.append((x, y))
    return splits, parts[0], parts[1]


# ------------------------------------------------------------------------------------ source model
def cache_dir(c: Config) -> Path:
    root = c.cache_dir or os.environ.get("FWDGRAD_CACHE") or Path.home() / ".cache" / "fwdgrad"
    return Path(root).expanduser() / "models"


def source_key(c: Config, num_classes: int, in_channels: int) -> str:
    """Hash of everything that determines the source model (the data root is not part of it)."""
    spec = {k: v for k, v in c.data.source.items() if k != "root"}
    key = {"data": spec, "model": c.model, "pretrain": vars(c.pretrain), "num_classes": num_classes,
           "in_channels": in_channels, "version": SOURCE_VERSION}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pretrain(model: nn.Module, xy, c: Config) -> nn.Module:
    """Supervised source training: Adam, BatchNorm in train mode, seeded batches."""
    p = c.pretrain
    opt = torch.optim.Adam(model.parameters(), lr=p.lr)
    stream = BatchStream(*xy, p.batch_size, p.seed)
    model.train()
    for _ in tqdm(range(p.steps), desc="pretrain", disable=None if c.progress else True, leave=False):
        x, y = stream.next()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def source_model(c: Config, src_train, src_test, num_classes: int, in_channels: int):
    """The pretrained source model, from `<cache>/models/<hash>.pt` or trained now (and cached).

    Returns (model, source test accuracy, whether it came from the cache)."""
    path = cache_dir(c) / f"{source_key(c, num_classes, in_channels)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(c.pretrain.seed)
    model = instantiate(c.model, num_classes=num_classes, in_channels=in_channels)
    with open(f"{path}.lock", "w") as lock:  # parallel sweep jobs pretrain a shared source model once
        fcntl.flock(lock, fcntl.LOCK_EX)
        cached = path.exists()
        if cached:
            state = torch.load(path, weights_only=False)
            model.load_state_dict(state["model"])
            return model.eval(), state["source_acc"], True
        pretrain(model, src_train, c)
        acc = evaluate(model, *src_test)
        save_checkpoint(str(path), {"model": model.state_dict(), "source_acc": acc, "config": {
            "data": c.data.source, "model": c.model, "pretrain": vars(c.pretrain)}})
    return model, acc, False


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def fit_head(model: nn.Module, num_classes: int, seed: int) -> nn.Module:
    """Replace the last linear layer by a fresh one when the target has another number of classes."""
    name = head_layers(model, 1)[0]
    head = model.get_submodule(name)
    if head.out_features != num_classes:
        torch.manual_seed(seed)
        set_module(model, name, nn.Linear(head.in_features, num_classes))
    return model


# ------------------------------------------------------------------------------------------ adapt
def quantize(model: nn.Module, c: Config, calib: torch.Tensor) -> nn.Module:
    """A QModel in c.scheme, calibrated on `calib`; the float model itself for fp32."""
    if c.scheme == "fp32":
        return model
    q = c.quant
    return convert(model, c.scheme, calib[:q.calib_size], observer=q.observer, per_channel=q.per_channel,
                   acc_bits=q.acc_bits, overflow=q.overflow, requant=q.requant, mode=q.engine_mode)


def train_config(c: Config, seed: int | None = None) -> TrainConfig:
    t, m = c.train, c.mode
    return TrainConfig(method=c.method.name, mode=m.name, lp_layers=m.lp_layers, sparse_kind=m.sparse_kind,
                       sparse_density=m.sparse_density, lr=c.lr, lr_schedule=t.lr_schedule,
                       eps=c.method.eps, m=c.method.m,
                       steps=t.steps, forward_budget=t.forward_budget, batch_size=t.batch_size,
                       eval_every=t.eval_every, checkpoint_every=t.checkpoint_every,
                       seed=c.seed if seed is None else seed, ff=dict(c.method.ff))


def memory_model(model: nn.Module, c: Config, input_shape: tuple[int, ...]):
    """Modelled on-device training memory (fwdgrad.analysis.memory) of this method, mode and format."""
    tc = train_config(c)
    fmt = {"bp_fp16": "fp16", "bp_bf16": "bf16"}.get(c.method.name, c.scheme)
    m = c.method.m if c.method.name in ("qzo_ff", "sign_spsa_fp32") else 1
    return memory_breakdown(model, input_shape, "ff" if tc.is_forward_only else "bp", c.mode.name, fmt,
                            density=c.mode.sparse_density, lp_layers=c.mode.lp_layers, m=m,
                            model_name=c.model["name"])


def progress_bar(c: Config, desc: str):
    """A tqdm bar and the `progress` callback for train(): steps, loss, latest test accuracy."""
    t = c.train
    bar = tqdm(total=t.steps or t.forward_budget, unit="step" if t.steps else "fwd", desc=desc,
               disable=None if c.progress else True, leave=False)
    acc = {}

    def update(row: dict) -> None:
        acc.update({"acc": f"{row['test_acc']:.3f}"} if "test_acc" in row else {})
        bar.update(1 if t.steps else row["forward_passes"] - bar.n)
        bar.set_postfix(loss=f"{row['loss']:.3f}", **acc)
    return bar, update


# ---------------------------------------------------------------------------------------- few-shot
class CL2N(nn.Module):
    """SimpleShot's feature transform: subtract the base-class mean embedding, L2-normalise."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x - self.mean, dim=-1)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The input of the model's last linear layer (the embedding) for every row of x."""
    head, out = model.get_submodule(head_layers(model, 1)[0]), []
    hook = head.register_forward_pre_hook(lambda _, args: out.append(args[0].flatten(1)))
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        hook.remove()
    return torch.cat(out)


def episode_model(model: nn.Module, sx, sy, n_way: int, base_mean: torch.Tensor | None) -> nn.Module:
    """The source model with a linear head equal to ProtoNet's classifier on the support set:
    -|q - c|^2 = 2 c.q - |c|^2 - |q|^2, so W = 2c, b = -|c|^2 (Triantafillou et al. 2020); SimpleShot puts
    CL2N in front (base_mean given)."""
    model = copy.deepcopy(model)
    name = head_layers(model, 1)[0]
    pre = nn.Identity() if base_mean is None else CL2N(base_mean)
    with torch.no_grad():
        protos = prototypes(pre(embed(model, sx)), sy, n_way)
        linear = nn.Linear(protos.shape[1], n_way)
        linear.weight.copy_(2 * protos)
        linear.bias.copy_(-protos.pow(2).sum(1))
    set_module(model, name, linear if base_mean is None else nn.Sequential(pre, linear))
    return model


def run_fewshot(c: Config, model: nn.Module, src_train, target, out: Path) -> dict:
    """N-way K-shot episodes on the target (novel) classes; returns the averaged results."""
    fs = c.data.fewshot
    x = torch.cat([target[0][0], target[1][0]])
    y = torch.cat([target[0][1], target[1][1]])
    base_mean = embed(model, src_train[0][:2048]).mean(0) if fs.head == "simpleshot" else None
    rows, logs = [], []
    eps_iter = episodes(y, fs.episodes, fs.n_way, fs.k_shot, fs.n_query, seed=c.seed)
    bar = tqdm(eps_iter, total=fs.episodes, desc="episodes", disable=None if c.progress else True)
    for i, ep in enumerate(bar):
        sx, sy, qx, qy = x[ep.support], ep.support_labels, x[ep.query], ep.query_labels
        em = episode_model(model, sx, sy, fs.n_way, base_mean)
        zero_shot = evaluate(em, qx, qy)
        with warnings.catch_warnings(record=i > 0):  # converter notes (e.g. CL2N runs in float) once
            qm = quantize(em, c, src_train[0] if c.quant.calib == "source" else sx)
        zero_shot_quant = evaluate(qm, qx, qy) if qm is not em else zero_shot
        r = train(qm, train_config(c, seed=c.seed * 1_000_003 + i), (sx, sy), (qx, qy))
        rows.append({"episode": i, "zero_shot_acc": zero_shot, "zero_shot_acc_quant": zero_shot_quant,
                     "test_acc": r.test_acc, "wall_s": r.wall_s, "steps": r.steps,
                     "forward_passes": r.forward_passes, "peak_mem_bytes": r.peak_mem_bytes})
        logs.append(r.log)
    mean_log = []
    for step_rows in zip(*logs):  # the per-step log averaged over episodes
        row = {k: step_rows[0][k] for k in ("step", "forward_passes")}
        for k in ("loss", "test_acc", "wall_s"):
            if k in step_rows[0]:
                row[k] = sum(r[k] for r in step_rows) / len(step_rows)
        mean_log.append(row)
    write_log(str(out / "log.csv"), mean_log)
    with open(out / "episodes.json", "w") as f:
        json.dump(rows, f, indent=1)
    accs = torch.tensor([r["test_acc"] for r in rows])

    def mean(k):
        return sum(r[k] for r in rows) / len(rows)
    return {"steps": rows[0]["steps"], "forward_passes": rows[0]["forward_passes"],
            "zero_shot_acc": mean("zero_shot_acc"), "zero_shot_acc_quant": mean("zero_shot_acc_quant"),
            "test_acc": float(accs.mean()),
            "test_acc_ci95": float(1.96 * accs.std() / len(accs) ** 0.5) if len(accs) > 1 else 0.0,
            "wall_s": sum(r["wall_s"] for r in rows),
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows),
            "episodes": len(rows), "n_way": fs.n_way, "k_shot": fs.k_shot, "n_query": fs.n_query,
            "head": fs.head, "log": mean_log}


# --------------------------------------------------------------------------------------- pipeline
def output_dir(c: Config) -> Path:
    if c.out_dir:
        return Path(c.out_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def run_experiment(cfg: DictConfig) -> dict:
    """Run one experiment (module docstring) and return the metrics written to metrics.json."""
    t_start = time.perf_counter()
    c = validate(cfg)
    torch.set_num_threads(c.threads)
    out = output_dir(c)
    out.mkdir(parents=True, exist_ok=True)
    d = c.data
    src, src_train, src_test = load_task(d.source, c.seed)
    tgt, tgt_train, tgt_test = load_task(d.target, c.seed, d.max_train, d.max_test)
    in_channels, sample_shape = tgt_train[0].shape[1], tuple(tgt_train[0].shape[1:])
    n_target = d.fewshot.n_way if d.fewshot else tgt.num_classes

    # the memory model and device check come first: a configuration that does not fit stops here
    arch = instantiate(c.model, num_classes=n_target, in_channels=in_channels)
    batch = min(c.train.batch_size, d.fewshot.n_way * d.fewshot.k_shot if d.fewshot else len(tgt_train[0]))
    mem = memory_model(arch, c, (batch, *sample_shape))
    fit = assert_fits(load_device(c.device), mem).summary() if c.device else None

    model, source_acc, cached = source_model(c, src_train, src_test, src.num_classes, in_channels)
    mode = f"lp{c.mode.lp_layers}" if c.mode.name == "lp" and c.mode.lp_layers > 1 else c.mode.name
    metrics = {"method": c.method.name, "quant": c.scheme, "dataset": d.name, "model": c.model["name"],
               "mode": mode, "variant": c.variant, "seed": c.seed}
    if d.fewshot:
        res = run_fewshot(c, model, src_train, (tgt_train, tgt_test), out)
        log = res.pop("log")
    else:
        model = fit_head(model, n_target, c.seed)
        zero_shot = evaluate(model, *tgt_test)
        qmodel = quantize(model, c, (src_train if c.quant.calib == "source" else tgt_train)[0])
        zero_shot_quant = evaluate(qmodel, *tgt_test) if qmodel is not model else zero_shot
        bar, update = progress_bar(c, f"{c.method.name} {c.scheme}")
        r = train(qmodel, train_config(c), tgt_train, tgt_test, out_dir=str(out), progress=update)
        bar.close()
        torch.save({"model": r.model, "config": OmegaConf.to_container(cfg, resolve=True)}, out / "model.pt")
        log = r.log
        res = {"steps": r.steps, "forward_passes": r.forward_passes, "zero_shot_acc": zero_shot,
               "zero_shot_acc_quant": zero_shot_quant, "test_acc": r.test_acc, "wall_s": r.wall_s,
               "peak_mem_bytes": r.peak_mem_bytes}
    metrics |= res | {
        "train_mem_bytes_model": mem.total,
        "memory": mem.as_dict(),
        "device_fit": fit,
        "source_acc": source_acc,
        "source_cached": cached,
        "synthetic": bool(src.synthetic or tgt.synthetic),
        "lr": c.lr, "eps": c.method.eps, "m": c.method.m,
        "total_wall_s": time.perf_counter() - t_start,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    with open(out / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2, default=str)
    plot_curves({f"{c.method.name} {c.scheme}": log}, out / "curves.png", f"{d.name} / {c.model['name']}")
    return metrics
