"""model.pt: a trained model as plain data (`save_model`, `load_model`, fwdgrad.statefile) with what the run
trained with (`run_settings`, under "training"), and how `fwdgrad export` chooses each bundle option from the
command line, the run or the default."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch.nn as nn
from torchvision.models import list_models

from ..config import BUILD_MODEL
from ..engine import QModel, qmodel_state, rebuild_qmodel
from ..fixed_point import INTEGER_DIFFERENCES, FixedPointSettings
from ..models import build_from_config
from ..statefile import StateFileError, load_state, save_state
from ..train import TrainConfig, trainable_names
from .bundle import BUNDLE_FIXED_POINT, FIXED_POINT_FIELDS, UNSUPPORTED_FF


def _plain(v):
    """Config values (OmegaConf containers included) as plain JSON-able Python values."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, Sequence) and not isinstance(v, str):
        return [_plain(x) for x in v]
    return v


def run_settings(cfg: TrainConfig, model, steps: int) -> dict:
    """What a finished run trained with, as the pipeline stores it in model.pt (key "training"), so that
    `fwdgrad export` can continue the run on the device as it was trained:

    method; trainable (the node names the run trained, in tensor-id order); lr, lr_schedule, eps, m, seed;
    step (the step count reached: the perturbation stream continues there); batch_size; scope and sparse
    ({kind, density} for mode=sparse); fixed_point (`FixedPointSettings` fields, qzo_ff only; its
    weight_headroom is already applied to the trained nodes' weight scales); unsupported (the qzo_ff options
    the edge runtime cannot reproduce, as the run set them: momentum, kernel_norm, sharpness_rho); perturb
    (weights, or outputs: `fwdgrad.ff.activity`); loss
    (float or integer: the cross-entropy each step's signs were decided on)."""
    ff = _plain(dict(cfg.ff))
    fixed = None
    if cfg.method == "qzo_ff":
        fixed = FixedPointSettings(**{k: v for k, v in ff.items() if k in FIXED_POINT_FIELDS}).as_dict()
    return {
        "method": cfg.method,
        "trainable": list(trainable_names(model, cfg)),
        "lr": float(cfg.lr),
        "lr_schedule": cfg.lr_schedule,
        "eps": float(cfg.eps),
        "m": int(cfg.m),
        "seed": int(cfg.seed),
        "step": int(steps),
        "batch_size": int(cfg.batch_size),
        "scope": cfg.scope,
        "sparse": {"kind": cfg.sparse_kind, "density": cfg.sparse_density} if cfg.scope == "sparse" else None,
        "fixed_point": fixed,
        "unsupported": {k: ff.get(k) for k in UNSUPPORTED_FF},
        "perturb": ff.get("perturb", "weights") if cfg.method == "qzo_ff" else "weights",
        "loss": cfg.loss,
    }


#: export options that default to the run's settings: (option, key in run_settings, default without a run)
RUN_OPTIONS = (
    ("trainable", "trainable", None),
    ("lr", "lr", None),
    ("eps", "eps", 1e-3),
    ("m", "m", 3),
    ("seed", "seed", 0),
    ("step", "step", 0),
    ("loss", "loss", "float"),
    ("perturb", "perturb", "weights"),
    *((name, name, getattr(FixedPointSettings(), name)) for name in BUNDLE_FIXED_POINT),
)


def unsupported(run: dict, lr_given: bool) -> list[str]:
    """What the run used that a bundle cannot carry, as 'option=value (why)' items."""
    out = [f"{k}={v!r}" for k, v in run["unsupported"].items() if v]
    if run["scope"] == "sparse":
        out.append(f"mode=sparse {run['sparse']} (its masks are not stored in model.pt)")
    if run["lr_schedule"] != "constant" and not lr_given:
        out.append(f"lr_schedule={run['lr_schedule']!r} (the runtime's lr is constant; or pass --lr)")
    return out


def choose(args, run: dict | None, where: str) -> tuple[dict, list[str]]:
    """Every run option from the command line, else the run, else the default; with one line each."""
    chosen, lines = {}, []
    for opt, key, default in RUN_OPTIONS:
        value, origin = getattr(args, opt), "from the command line"
        if value is None and run is not None:
            value, origin = run[key] if key in run else run["fixed_point"].get(key), "from the run"
            if key in ("loss", "difference", "perturb") and value is None:  # runs saved before these were
                value = default  # recorded: trained on the float loss, with sign differences, on weights
            central = key == "difference" and value not in INTEGER_DIFFERENCES  # perturbed outputs' central
            if central and chosen.get("perturb") != "outputs":
                value, origin = default, f"default: the run's {value!r} needs --perturb outputs"
        elif value is None:
            value, origin = default, "default"
        if opt == "lr" and value is None:
            raise ValueError(
                f"--lr is required: {where!r} holds no run settings (a bare QModel, or a run that did not "
                "train with qzo_ff)"
            )
        if opt in ("step", "seed") and not value >= 0:
            raise ValueError(f"--{opt} {value} is invalid; allowed: integers >= 0")
        chosen[opt] = value
        shown = "all conv/linear layers" if opt == "trainable" and value is None else value
        shown = " ".join(shown) if isinstance(shown, list) else shown
        if opt == "step" and origin == "from the run":
            origin += f"; finetune --steps counts from here, e.g. --steps {value + 300} for 300 more"
        lines.append(f"{opt:<16} {shown}  ({origin})")
    if run is not None:
        h = run["fixed_point"]["weight_headroom"]
        lines.append(
            f"{'weight_headroom':<16} {h:g}  (from the run; already in the weight scales, not re-applied)"
        )
        b = run["batch_size"]
        lines.append(
            f"{'batch':<16} {b}  (from the run; pass --batch {b} to python -m fwdgrad.edge finetune)"
        )
    return chosen, lines


# ------------------------------------------------------------------------------------------- model.pt
def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    model_config: Mapping,
    num_classes: int,
    input_shape: Sequence[int],
    config: dict | None = None,
    training: dict | None = None,
) -> None:
    """Write `model` (a QModel, or the float model of an fp32 run) as a model file of plain data, which
    `load_model` rebuilds with `fwdgrad.models.build_from_config(model_config, num_classes, in_channels)`:

        {"model": {"config": model_config, "num_classes": int, "in_channels": int, "input_shape": [C, ...],
                   "qmodel": fwdgrad.engine.qmodel_state(model) or None (a float model),
                   "float": the float model's state dict or None (a QModel)},
         "config": the run's resolved config or None, "training": run_settings(...) or None}

    input_shape is the per-sample input shape (in_channels is its first entry)."""
    quantized = isinstance(model, QModel)
    payload = {
        "model": {
            "config": _plain(model_config),
            "num_classes": int(num_classes),
            "in_channels": int(input_shape[0]),
            "input_shape": [int(n) for n in input_shape],
            "qmodel": qmodel_state(model) if quantized else None,
            "float": None if quantized else dict(model.state_dict()),
        },
        "config": config,
        "training": training,
    }
    save_state(path, "model", payload)


def load_model(path: str | os.PathLike, trust_model_target: bool = False) -> tuple[nn.Module, dict]:
    """(the model, the payload) of a model file written by `save_model`; anything else, or a model that
    does not fit its stored tensors, is a one-line `StateFileError` naming the file.

    The model is built from its stored config, so only fwdgrad's zoo and torchvision's builders with plain
    options are called, never their pretrained weights (the stored tensors replace them); a callable of
    one's own (`model._target_`) only with `trust_model_target`: what a file names can run any code."""
    payload = load_state(path, "model")
    where = str(path)
    try:
        m = payload["model"]
        arch = build_from_config(
            _buildable(m["config"], trust_model_target), m["num_classes"], m["in_channels"]
        )
        if m["qmodel"] is not None:
            return rebuild_qmodel(arch, m["qmodel"]), payload
        arch.load_state_dict(m["float"])
        return arch.eval(), payload
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise StateFileError(f"{where!r} holds no usable model: {why}") from None


def _buildable(spec: Mapping, trust: bool) -> dict:
    """The stored model config to build, once checked that building it calls only known code."""
    spec = dict(spec)
    target = spec.get("_target_", BUILD_MODEL)
    known = target == BUILD_MODEL or (
        str(target).startswith("torchvision.models.") and str(target).rpartition(".")[2] in list_models()
    )
    if not known:
        if trust:
            return spec
        raise ValueError(
            f"its model is built by model._target_={target!r}, a callable of your own, which is imported "
            "and called only when trusted (fwdgrad export --trust-model-target): what a file names can run "
            "any code"
        )
    odd = [k for k, v in spec.items() if k != "_target_" and (str(k).startswith("_") or not _plain_value(v))]
    if odd:
        raise ValueError(
            f"model options {odd} are not plain values; allowed: numbers, strings without ${{...}} and lists"
        )
    return spec | {k: None for k in ("pretrained", "weights") if k in spec}


def _plain_value(v) -> bool:
    """Whether `v` is a number, bool, None or string, or a list of such: no node hydra would instantiate or
    interpolation it would resolve."""
    if isinstance(v, list | tuple):
        return all(_plain_value(x) for x in v)
    return v is None or isinstance(v, bool | int | float) or (isinstance(v, str) and "${" not in v)
