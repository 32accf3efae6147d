"""What a finished run trained with (`run_settings`, stored in the pipeline's model.pt under "training"), and
how `fwdgrad export` chooses each bundle option from the command line, the run or the default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..fixed_point import FixedPointSettings
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
    the edge runtime cannot reproduce, as the run set them: momentum, kernel_norm, sharpness_rho)."""
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
    }


#: export options that default to the run's settings: (option, key in run_settings, default without a run)
RUN_OPTIONS = (
    ("trainable", "trainable", None),
    ("lr", "lr", None),
    ("eps", "eps", 1e-3),
    ("m", "m", 3),
    ("seed", "seed", 0),
    ("step", "step", 0),
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
            value, origin = run[key] if key in run else run["fixed_point"][key], "from the run"
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
