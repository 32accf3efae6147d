"""`run_experiment(cfg) -> metrics`: one Hydra job, from the composed config to metrics.json.

    source model (BP pretraining on the source task, cached by a hash of its config)
    -> zero-shot accuracy on the target task
    -> convert + calibrate (cfg.quant; fp32 = no conversion)
    -> adapt with cfg.method in the training scope cfg.mode (fwdgrad.train.train) -> evaluate
    -> metrics.json, log.csv, checkpoint.pt, model.pt and curves.png in the output directory,
       and the run in the experiment tracker cfg.logger (fwdgrad.tracking).

Few-shot data configs (`data.fewshot`) run N-way K-shot episodes instead (fwdgrad.pipeline.fewshot).
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig, OmegaConf

from ..analysis.devices import assert_fits, load_device
from ..config import model_label, validate
from ..files import FolderLock, write_json
from ..methods import spec
from ..models import build_from_config
from ..plots import plot_curves
from ..provenance import provenance
from ..tracking import Tracker, make_tracker
from ..train import tie_fraction
from .fewshot import run_fewshot
from .steps import load_task, memory_model, output_dir, source_key, source_model
from .transfer import run_transfer


def run_experiment(cfg: DictConfig) -> dict:
    """Run one experiment (module docstring) and return the metrics written to metrics.json."""
    t_start = time.perf_counter()
    c = validate(cfg)
    torch.set_num_threads(c.threads)
    out = output_dir(c)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):  # one run per folder: a second one stops here
        tracker = make_tracker(c.logger, out)  # a missing tracker package stops the run here
        name = f"{c.data.name} {c.method.name} {c.scheme} {c.variant} seed={c.seed}".replace("  ", " ")
        tracker.start(OmegaConf.to_container(cfg, resolve=True), name)
        try:
            metrics = _run(cfg, c, out, tracker, t_start)
        except BaseException:
            tracker.fail()
            raise
        files = [out / f for f in ("metrics.json", "log.csv", "episodes.json", "curves.png")]
        tracker.finish(metrics, files)
    return metrics


def _run(cfg: DictConfig, c, out, tracker: Tracker, t_start: float) -> dict:
    """The experiment after validation: data, memory model, source model, adaptation, metrics and plot."""
    d = c.data
    src, src_train, src_test = load_task(d.source, c.seed)
    tgt, tgt_train, tgt_test = load_task(d.target, c.seed, d.max_train, d.max_test, d.validation)
    in_channels, sample_shape = tgt_train[0].shape[1], tuple(tgt_train[0].shape[1:])
    n_target = d.fewshot.n_way if d.fewshot else tgt.num_classes

    # the memory model and device check come first: a configuration that does not fit stops here
    arch = build_from_config(c.model, n_target, in_channels)
    batch = min(c.train.batch_size, d.fewshot.n_way * d.fewshot.k_shot if d.fewshot else len(tgt_train[0]))
    mem = memory_model(arch, c, (batch, *sample_shape))
    fit = assert_fits(load_device(c.device), mem).summary() if c.device else None

    model, source_acc, cached = source_model(c, src_train, src_test, src.num_classes, in_channels)
    scope = f"lp{c.mode.lp_layers}" if c.mode.name == "lp" and c.mode.lp_layers > 1 else c.mode.name
    metrics = {
        "method": c.method.name,
        "quant": c.scheme,
        "dataset": d.name,
        "model": model_label(c.model),
        "mode": scope,
        "variant": c.variant,
        "seed": c.seed,
        **({"eval_split": "validation"} if d.validation else {}),  # test_acc is the held-out accuracy
    }
    if d.fewshot:
        res = run_fewshot(c, model, src_train, (tgt_train, tgt_test), out, on_episode=tracker.log_episode)
    else:
        identity = {  # what else determines the trajectory (the checkpoint's fingerprint, fwdgrad.train)
            "model": c.model,
            "format": c.scheme,
            "quant": vars(c.quant),
            "data": d.name,
            "source_model": source_key(c, src.num_classes, in_channels),
            **({"head_init": c.train.head_init} if c.train.head_init != "source" else {}),
        }
        target = (tgt_train, tgt_test)
        res = run_transfer(cfg, c, model, src_train, target, n_target, out, tracker.log_step, identity)
    log = res.pop("log")
    for row in log if d.fewshot else ():  # few-shot: the per-step log averaged over episodes, at the end
        tracker.log_step(row)
    used = spec(c.method.name).hyper
    metrics |= res | {
        "train_mem_bytes_model": mem.total,
        "memory": mem.as_dict(),
        "device_fit": fit,
        "source_acc": source_acc,
        "source_cached": cached,
        "synthetic": bool(src.synthetic or tgt.synthetic),
        "lr": c.lr,
        "eps": c.method.eps if "eps" in used else None,
        "m": c.method.m if "m" in used else None,
        "tie_fraction": tie_fraction(log),  # forward-only: perturbation pairs with L+ == L- (else None)
        "total_wall_s": time.perf_counter() - t_start,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "provenance": provenance(),
    }
    write_json(out / "metrics.json", metrics)
    plot_curves({f"{c.method.name} {c.scheme}": log}, out / "curves.png", f"{d.name} / {metrics['model']}")
    return metrics
