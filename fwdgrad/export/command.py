"""`fwdgrad export CHECKPOINT OUTPUT [options]`: the QModel of a model file (a pipeline run's model.pt, whose
options default to the run's settings, or `save_model`'s) as an edge bundle, optionally with the run's target
data (--data)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from ..edge.bundle import LOSS_NAMES, BundleError
from ..engine.model import QModel
from ..files import atomic_open
from ..fixed_point import (
    INTEGER_DIFFERENCES,
    PERTURB_SCALES,
    QUANT_DISTRIBUTIONS,
    ROUNDINGS,
    FixedPointSettings,
)
from ..rng import LAYERWISE
from .bundle import BUNDLE_FIXED_POINT, export_bundle
from .settings import choose, load_model, unsupported


def _data_config(payload: dict, where: str) -> dict:
    """The run's config, once checked that its target data can be written (--data; before any writing)."""
    config = payload.get("config")
    if not isinstance(config, dict):
        raise ValueError(f"--data needs a run's model.pt; {where!r} holds no run config")
    data = config.get("data") or {}
    if (data.get("target") or {}).get("_target_") != "fwdgrad.data.build_dataset" or data.get("fewshot"):
        raise ValueError(f"--data: the run's data {data.get('name')!r} has no single target set to write")
    return config


def _write_data(config: dict, out_dir: str) -> list[str]:
    """The run's target train/test data (as the pipeline loaded them) as OUT_DIR/train.npz and test.npz."""
    from ..data import build_dataset

    data, spec_ = config["data"], dict(config["data"]["target"])
    spec_.pop("_target_"), spec_.pop("_convert_", None)

    splits = build_dataset(**spec_, seed=config["seed"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for part, ds, cap in (
        ("train", splits.train, data.get("max_train")),
        ("test", splits.test, data.get("max_test")),
    ):
        x, y = ds.tensors
        if cap is not None and cap < len(x):  # the seeded subset fwdgrad.pipeline.steps.load_task takes
            keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(config["seed"]))[:cap]
            x, y = x[keep], y[keep]
        path = Path(out_dir) / f"{part}.npz"
        with atomic_open(path, "wb") as f:  # a file object: np.savez would append .npz to a temp name
            np.savez(f, x=x.numpy().astype(np.float32), y=y.numpy().astype(np.int64))
        lines.append(f"wrote {path}: the run's target {part} data ({len(x)} samples)")
    return lines


def _write_c(bundle, bundle_path: Path, input_shape) -> list[str]:
    """--target c: model.h and model.c beside the bundle; on a CExportError the bundle is removed again."""
    from ..edge.cgen import generate_c

    try:
        info = generate_c(bundle, bundle_path.parent, input_shape)
    except ValueError:
        bundle_path.unlink(missing_ok=True)
        raise
    return [
        f"wrote {info['header']} and {info['source']}: arena {info['arena_bytes']} B, SRAM "
        f"{info['sram_bytes']} B, const data {info['flash_bytes']} B"
    ]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fwdgrad export", description="Export a QModel as an edge bundle.")
    ap.add_argument("checkpoint", help="a run's model.pt (or a model file of fwdgrad.export.save_model)")
    ap.add_argument("output", help="bundle file to write (.npz); with --target c: a directory")
    ap.add_argument(
        "--target",
        choices=("bundle", "c"),
        default="bundle",
        help="bundle: the numpy edge bundle (default); c: OUTPUT/model.h and model.c (fwdgrad.edge.cgen: "
        "C99, static arena, no malloc) plus OUTPUT/model.npz, the bundle they are generated from",
    )
    run_default = "default: the run's"
    ap.add_argument("--lr", type=float, help=f"learning rate η ({run_default}; required without a run)")
    ap.add_argument("--eps", type=float, help=f"perturbation size ε, real units ({run_default}, else 1e-3)")
    ap.add_argument("--m", type=int, help=f"perturbations per step ({run_default}, else 3)")
    ap.add_argument("--seed", type=int, help=f"{run_default}, else 0")
    ap.add_argument("--step", type=int, help=f"step counter to start from ({run_default} last step, else 0)")
    ap.add_argument(
        "--trainable",
        nargs="+",
        help=f"trainable node names: conv/linear, LayerNorm, tokens ({run_default}, else all)",
    )
    ap.add_argument(
        "--loss",
        choices=tuple(LOSS_NAMES),
        help=f"the cross-entropy the device decides signs on ({run_default}, else float)",
    )
    ap.add_argument("--z-max", dest="z_max", type=float)
    ap.add_argument("--rounding", choices=ROUNDINGS)
    ap.add_argument("--perturb-scale", dest="perturb_scale", choices=PERTURB_SCALES)
    ap.add_argument("--eps-min-q", dest="eps_min_q", type=int)
    ap.add_argument("--distribution", choices=QUANT_DISTRIBUTIONS)
    ap.add_argument(
        "--difference",
        choices=(*INTEGER_DIFFERENCES, "central"),
        help="sign (2m passes) | median (m passes) | central (with --perturb outputs)",
    )
    ap.add_argument(
        "--perturb",
        choices=("weights", "outputs"),
        help=f"what a step perturbs: the weights, or the head's outputs ({run_default}, else weights)",
    )
    ap.add_argument("--layerwise", choices=LAYERWISE, help="one trained tensor per step: cycle | sample")
    ap.add_argument(
        "--ignore-unsupported",
        action="store_true",
        help="export a run that used momentum, kernel_norm, sharpness_rho, mode=sparse or an lr schedule "
        "anyway: the device then fine-tunes with plain sign-m-SPSA (dense, constant lr)",
    )
    ap.add_argument(
        "--data", metavar="DIR", help="also write the run's target data as DIR/train.npz, test.npz"
    )
    ap.add_argument(
        "--trust-model-target",
        action="store_true",
        help="build a model whose model._target_ is a callable of your own (import and call it: only for "
        "files you trust); without, only fwdgrad's zoo and torchvision builders",
    )
    ap.add_argument("--mean", type=float, nargs="+", help="per-channel input mean (preprocessing)")
    ap.add_argument("--std", type=float, nargs="+", help="per-channel input std (preprocessing)")
    ap.add_argument("--input-shape", type=int, nargs="+", help="per-sample input shape, e.g. 3 32 32")
    return ap


def _load(args) -> tuple:
    """(model file payload, QModel, the run's settings or None, notes), after checking what export refuses."""
    model, payload = load_model(args.checkpoint, args.trust_model_target)
    if not isinstance(model, QModel):
        raise ValueError(
            f"{args.checkpoint!r} holds a float {type(model).__name__} (an fp32 run); export needs a "
            "converted QModel, e.g. of a run with quant=w16a8"
        )
    run = payload.get("training")
    notes = []
    if run is not None and run.get("method") != "qzo_ff":
        notes.append(f"run settings not used: the run trained with {run.get('method')}, not qzo_ff")
        run = None
    if run is not None:
        bad = unsupported(run, args.lr is not None)
        if bad and not args.ignore_unsupported:
            raise ValueError(
                f"the run trained with {', '.join(bad)}, which the edge runtime cannot reproduce; "
                "pass --ignore-unsupported to export it for plain sign-m-SPSA anyway"
            )
        notes += [f"ignored (--ignore-unsupported): {b}" for b in bad]
    return payload, model, run, notes


def export_main(argv: list[str] | None = None) -> int:
    """``fwdgrad export CHECKPOINT OUTPUT [options]``: checkpoint = a pipeline run's model.pt (its options
    default to the run's settings) or a model file of `save_model`, read as plain data only
    (fwdgrad.statefile). Returns the exit status (0 ok, 2 bad input, with a one-line error)."""
    args = _parser().parse_args(argv)
    try:
        payload, model, run, notes = _load(args)
        config = _data_config(payload, args.checkpoint) if args.data else None
        hp, lines = choose(args, run, args.checkpoint)
        pre = {"mean": args.mean, "std": args.std, "shape": args.input_shape}
        pre = {k: v for k, v in pre.items() if v is not None} or None
        # weight_headroom stays 1: the run already applied it to the trained nodes' scales
        fp = FixedPointSettings(**{k: hp[k] for k in BUNDLE_FIXED_POINT})
        meta = {"source": args.checkpoint}
        out = Path(args.output) / "model.npz" if args.target == "c" else Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        if run is not None:
            meta["run"] = run
        bundle = export_bundle(
            model,
            str(out),
            hp["trainable"],
            hp["eps"],
            hp["lr"],
            hp["m"],
            hp["seed"],
            fp,
            input_preprocessing=pre,
            meta=meta,
            step=hp["step"],
            loss=hp["loss"],
            perturb=hp["perturb"],
        )
        if args.target == "c":
            c_lines = _write_c(
                bundle, out, args.input_shape or (payload.get("model") or {}).get("input_shape")
            )
        if config is not None:
            data_lines = _write_data(config, args.data)
    except (OSError, ValueError, BundleError, RuntimeError) as err:
        print(f"fwdgrad export: error: {err}", file=sys.stderr)
        return 2
    n_w = sum(bundle.arrays[t["name"] + ".weight"].size for t in bundle.training["tensors"])
    lines.append(
        f"wrote {out}: {len(bundle.ops)} ops, {bundle.nbytes() / 1024:.1f} KiB of arrays, "
        f"{len(bundle.training['trainable'])} trainable tensors ({n_w} weights)"
    )
    lines += c_lines if args.target == "c" else []
    print("\n".join(notes + lines + (data_lines if config is not None else [])))
    return 0
