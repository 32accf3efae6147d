"""The transfer path: the source model with a head for the target classes -> zero-shot accuracy ->
conversion -> adaptation with the configured method (fwdgrad.train.train) -> model.pt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from ..config import Config
from ..export import run_settings, save_model
from ..models import add_prompts
from ..tracking import tee
from ..train import TrainConfig, train
from .progress import evaluate_shown
from .steps import convert_model, fit_head, imprint_head, progress_bar


def run_transfer(
    cfg: DictConfig,
    c: Config,
    model: nn.Module,
    src_train,
    target,
    n_target: int,
    out: Path,
    on_step: Callable[[dict], None] | None = None,
    identity: dict | None = None,
) -> dict:
    """Adapt `model` to the target task; returns the results with the training log under "log".
    `on_step(row)` gets every step's log row next to the progress bar (the experiment tracker); `identity`
    joins the checkpoint's run fingerprint (fwdgrad.train.fingerprint)."""
    tgt_train, tgt_test = target
    model = fit_head(model, n_target, c.seed)
    imprint_passes = imprint_head(model, *tgt_train) if c.train.head_init == "imprint" else 0
    model_config = dict(c.model)
    if c.mode.name == "dvpt":  # the prompts join the model (a saved run rebuilds it with them)
        add_prompts(model, c.mode.prompts, c.mode.prompt_init, c.seed)
        model_config["prompts"], model_config["prompt_init"] = c.mode.prompts, c.mode.prompt_init
    zero_shot = evaluate_shown(c, "zero-shot accuracy", model, *tgt_test)
    qmodel = convert_model(model, c, (src_train if c.quant.calib == "source" else tgt_train)[0])
    quantized = f"zero-shot accuracy {c.scheme}"
    zero_shot_quant = evaluate_shown(c, quantized, qmodel, *tgt_test) if qmodel is not model else zero_shot
    bar, update = progress_bar(c, f"{c.method.name} {c.scheme}")
    update = tee(update, on_step)  # the progress bar, then the experiment tracker
    with bar:  # closed also when train raises
        tc = TrainConfig.from_config(c)
        r = train(qmodel, tc, tgt_train, tgt_test, out_dir=str(out), progress=update, identity=identity)
    save_model(  # plain data; "training": what `fwdgrad export` defaults to (fwdgrad.export.run_settings)
        out / "model.pt",
        r.model,
        model_config,
        n_target,
        tuple(tgt_train[0].shape[1:]),
        config=OmegaConf.to_container(cfg, resolve=True),
        training=run_settings(tc, r.model, r.steps),
    )
    return {
        "steps": r.steps,
        "forward_passes": r.forward_passes,
        "head_init_passes": imprint_passes,  # train.head_init=imprint: its forward passes (batches of 512)
        "compute": round(r.compute, 3),  # MAC-weighted forward-pass equivalents (fwdgrad.train)
        "zero_shot_acc": zero_shot,
        "zero_shot_acc_quant": zero_shot_quant,
        "test_acc": r.test_acc,
        "wall_s": r.wall_s,
        "peak_mem_bytes": r.peak_mem_bytes,
        "log": r.log,
        "faults": r.faults,
    }
