"""Few-shot episodes: per episode the source embedding gets a ProtoNet (or SimpleShot) linear head built
from the support set, is adapted on the support set and tested on the queries; accuracies are averaged
over episodes."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from ..config import Config
from ..data import episodes, prototypes
from ..data.heads import simpleshot_transform
from ..files import write_json
from ..models import head_layers
from ..train import FaultWarning, TrainConfig, evaluate, fault_summary, train, write_log
from .progress import Progress
from .steps import convert_model, set_module


class CL2N(nn.Module):
    """SimpleShot's feature transform as a module (`fwdgrad.data.heads.simpleshot_transform`)."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simpleshot_transform(x, self.mean)


@torch.no_grad()
def embed(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """The input of the model's last linear layer (the embedding) for every row of x."""
    head, out = model.get_submodule(head_layers(model, 1)[0]), []
    hook = head.register_forward_pre_hook(lambda _, args: out.append(args[0].flatten(1)))
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
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


def mean_log(logs: list[list[dict]]) -> list[dict]:
    """The per-step training log averaged over episodes."""
    out = []
    for step_rows in zip(*logs):
        row = {k: step_rows[0][k] for k in ("step", "forward_passes")}
        for k in ("loss", "test_acc", "wall_s", "tie_fraction"):
            if k in step_rows[0]:
                row[k] = sum(r[k] for r in step_rows) / len(step_rows)
        out.append(row)
    return out


def run_fewshot(
    c: Config,
    model: nn.Module,
    src_train,
    target,
    out: Path,
    on_episode: Callable[[dict], None] | None = None,
) -> dict:
    """N-way K-shot episodes on the target (novel) classes; returns the averaged results.
    `on_episode(row)` gets each episode's results (the row of episodes.json) when it ends."""
    fs = c.data.fewshot
    x = torch.cat([target[0][0], target[1][0]])
    y = torch.cat([target[0][1], target[1][1]])
    base_mean = embed(model, src_train[0][:2048]).mean(0) if fs.head == "simpleshot" else None
    rows, logs, faults = [], [], {}
    eps_iter = episodes(y, fs.episodes, fs.n_way, fs.k_shot, fs.n_query, seed=c.seed)
    start = f"{fs.n_way}-way {fs.k_shot}-shot, {fs.n_query} queries per class, adapted with {c.method.name}"
    shown = Progress.of(c, "episodes", fs.episodes, "episode", start=f"{fs.episodes} episodes, {start}")
    for i, ep in enumerate(eps_iter):
        sx, sy, qx, qy = x[ep.support], ep.support_labels, x[ep.query], ep.query_labels
        em = episode_model(model, sx, sy, fs.n_way, base_mean)
        zero_shot = evaluate(em, qx, qy)
        with warnings.catch_warnings(record=i > 0):  # converter notes (e.g. CL2N runs in float) once
            qm = convert_model(em, c, src_train[0] if c.quant.calib == "source" else sx)
        zero_shot_quant = evaluate(qm, qx, qy) if qm is not em else zero_shot
        with warnings.catch_warnings():  # one fault warning for all episodes, below
            warnings.simplefilter("ignore", FaultWarning)
            r = train(qm, TrainConfig.from_config(c, seed=c.seed * 1_000_003 + i), (sx, sy), (qx, qy))
        for kind, per_layer in r.faults.items():
            for layer, n in per_layer.items():
                faults.setdefault(kind, {})[layer] = faults.get(kind, {}).get(layer, 0) + n
        rows.append(
            {
                "episode": i,
                "zero_shot_acc": zero_shot,
                "zero_shot_acc_quant": zero_shot_quant,
                "test_acc": r.test_acc,
                "wall_s": r.wall_s,
                "steps": r.steps,
                "forward_passes": r.forward_passes,
                "peak_mem_bytes": r.peak_mem_bytes,
            }
        )
        logs.append(r.log)
        shown.update(i + 1, acc=sum(row["test_acc"] for row in rows) / len(rows))  # mean so far
        if on_episode:
            on_episode(rows[-1])
    shown.close()
    summary = fault_summary(faults)
    if summary:
        warnings.warn(f"faults over {len(rows)} episodes: {summary}", FaultWarning, stacklevel=2)
    log = mean_log(logs)
    write_log(str(out / "log.csv"), log)
    write_json(out / "episodes.json", rows, indent=1)
    accs = torch.tensor([r["test_acc"] for r in rows])

    def mean(k):
        return sum(r[k] for r in rows) / len(rows)

    return {
        "steps": rows[0]["steps"],
        "forward_passes": rows[0]["forward_passes"],
        "zero_shot_acc": mean("zero_shot_acc"),
        "zero_shot_acc_quant": mean("zero_shot_acc_quant"),
        "test_acc": float(accs.mean()),
        "test_acc_ci95": float(1.96 * accs.std() / len(accs) ** 0.5) if len(accs) > 1 else 0.0,
        "wall_s": sum(r["wall_s"] for r in rows),
        "peak_mem_bytes": max(r["peak_mem_bytes"] for r in rows),
        "episodes": len(rows),
        "n_way": fs.n_way,
        "k_shot": fs.k_shot,
        "n_query": fs.n_query,
        "head": fs.head,
        "log": log,
        "faults": faults,
    }
