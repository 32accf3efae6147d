"""The `fwdgrad` command.

    fwdgrad run [HYDRA OVERRIDES...]       one experiment, or a sweep with -m (same app as experiments/run.py)
    fwdgrad report SWEEP_DIR [--by KEY..]  aggregate every metrics.json below SWEEP_DIR (Markdown, CSV, PNG)
    fwdgrad main [--out DIR]               the main job: BP vs ZO vs QZO-FF on the embedded digits
    fwdgrad memory MODEL [options]         training-memory table of a model (BP vs FF, per number format)
    fwdgrad export ...                     export a QModel as an edge bundle (fwdgrad.export)
    fwdgrad landscape ...                  loss-landscape plots (fwdgrad.analysis.landscape)

Bad input (a config value, a missing dataset, a device the run does not fit) ends with one line
`error: <message>` on stderr and exit status 2; set HYDRA_FULL_ERROR=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from .config import CONF_DIR, validate

ERRORS = (ValueError, FileNotFoundError, FloatingPointError, HydraException, OmegaConfBaseException)


def one_line(e: BaseException) -> str:
    """The message of e on one line (the cause of an instantiation error; Hydra's group listings folded)."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    if isinstance(e, MissingConfigException) and e.options is not None and e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is invalid; allowed: {', '.join(sorted(e.options))}"
    lines = [part.strip() for part in str(e).splitlines() if part.strip()]
    if isinstance(e, OmegaConfBaseException):  # drop OmegaConf's "full_key: ... object_type=..." lines
        lines = lines[:1]
    if isinstance(e, HydraException) and isinstance(e.__cause__, OmegaConfBaseException):
        lines.append(one_line(e.__cause__))
    return ": ".join(lines) or type(e).__name__


def guarded(fn, *args) -> int:
    """Run fn(*args); bad input becomes one line on stderr and exit status 2 (HYDRA_FULL_ERROR: re-raise)."""
    try:
        rc = fn(*args)
    except ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1" and not os.environ.get("_FWDGRAD_QUIET"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def hydra_app(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    try:
        validate(cfg)  # before importing torch: a bad value fails within a second or two
        from .pipeline import run_experiment

        m = run_experiment(cfg)
    except ERRORS as e:  # a single run: one line and exit 2 here, before Hydra logs its own report
        if HydraConfig.get().mode == RunMode.MULTIRUN or not os.environ.get("_FWDGRAD_QUIET"):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{m['dataset']} {m['model']} {m['mode']} {m['method']} {m['quant']} seed={m['seed']}: "
          f"zero-shot {m['zero_shot_acc']:.4f} -> test {m['test_acc']:.4f} in {m['steps']} steps "
          f"({m['forward_passes']} forward passes, {m['wall_s']:.1f} s)")


def run(argv: list[str]) -> int:
    """The Hydra app with argv as its command line. Hydra prints its own (multi-line) reports unless
    HYDRA_FULL_ERROR is set, so it is set here and the exception is caught and folded by `guarded`."""
    if "HYDRA_FULL_ERROR" not in os.environ:
        os.environ["HYDRA_FULL_ERROR"] = os.environ["_FWDGRAD_QUIET"] = "1"
    sys.argv = [sys.argv[0], *argv]
    return guarded(hydra_app)


# ----------------------------------------------------------------------------------------- main job
#: The main job's arms: (label, Hydra overrides on top of experiment=main). Learning rates tuned on this task.
MAIN_ARMS = (
    ("bp_fp32", ["method=bp", "method.lr=0.5", "train.steps=300"]),
    ("zo_fp32", ["method=sign_spsa_fp32", "method.lr=0.05", "method.eps=1e-2", "train.steps=1000"]),
    ("qzo_ff_w16a8", ["method=qzo_ff", "quant=w16a8", "method.lr=0.05", "method.eps=1e-2",
                      "train.steps=1000"]),
)


def main_job(argv: list[str] | None = None) -> int:
    """Pretrain small_cnn on digits 0-4 (cached), adapt to digits 5-9 with fp32 BP, fp32 sign-SPSA and
    QZO-FF w16a8 (integer engine); print the comparison and write plots, results.json and results.md."""
    from hydra import compose, initialize_config_dir

    from .pipeline import run_experiment
    from .plots import plot_curves
    from .report import main_table

    ap = argparse.ArgumentParser(prog="fwdgrad main", description=main_job.__doc__)
    ap.add_argument("--out", default="outputs/main", help="output directory (default outputs/main)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm, e.g. progress=false")
    args = ap.parse_args(argv)
    out, t0 = Path(args.out), time.perf_counter()
    results = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for label, arm in MAIN_ARMS:
            shutil.rmtree(out / label, ignore_errors=True)  # a fresh run, never a resume of an old one
            cfg = compose("config", overrides=["experiment=main", *arm, f"seed={args.seed}",
                                               f"out_dir={out / label}", *args.overrides])
            m = run_experiment(cfg)
            print(f"{label}: zero-shot {m['zero_shot_acc']:.3f} -> test {m['test_acc']:.3f} "
                  f"({m['steps']} steps, {m['wall_s']:.1f} s)", flush=True)
            results.append(m | {"label": label})
    logs = {r["label"]: _read_log(out / r["label"] / "log.csv") for r in results}
    for x in ("step", "forward_passes"):
        plot_curves(logs, out / f"curves_{x}.png", "digits 0-4 -> 5-9, small_cnn, linear probing", x=x)
    table = main_table(results)
    total = time.perf_counter() - t0
    print(f"\n{table}\n\ntotal wall time {total:.1f} s; written to {out}/")
    with open(out / "results.json", "w") as f:
        json.dump({"total_wall_s": total, "runs": results}, f, indent=2, default=str)
    title = "# Main job: digits 0-4 -> 5-9 (small_cnn, linear probing)"
    (out / "results.md").write_text(f"{title}\n\n{table}\n\nTotal wall time {total:.1f} s.\n")
    return 0


def _read_log(path: Path) -> list[dict]:
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------- commands
def memory_main(argv: list[str]) -> int:
    from .analysis.memory import format_table
    from .models import build_model

    ap = argparse.ArgumentParser(prog="fwdgrad memory", description="Training memory, BP vs FF, per format.")
    ap.add_argument("model", help="model name (fwdgrad.models.MODELS)")
    ap.add_argument("--input-shape", type=int, nargs="+", default=[1, 3, 32, 32], help="N C H W")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--mode", default="ft", choices=["ft", "lp", "sparse"])
    ap.add_argument("--lp-layers", type=int, default=1)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--formats", nargs="+", default=["fp32", "fp16", "w16a16", "w16a8", "w8a8"])
    a = ap.parse_args(argv)
    model = build_model(a.model, a.num_classes, a.input_shape[1])
    print(format_table(model, tuple(a.input_shape), a.formats, a.mode, a.density, a.lp_layers))
    return 0


def report_main(argv: list[str]) -> int:
    from .report import report

    ap = argparse.ArgumentParser(prog="fwdgrad report", description="Aggregate the metrics.json of a sweep.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="where report.md/.csv/.png go (default: SWEEP_DIR)")
    ap.add_argument("--by", nargs="+", default=[], help="extra grouping keys: metrics fields or config paths")
    a = ap.parse_args(argv)
    print(report(a.sweep_dir, a.out, tuple(a.by)))
    return 0


def _export(argv):
    from .export import export_main

    return export_main(argv)


def _landscape(argv):
    from .analysis.landscape import main as landscape_main

    return landscape_main(argv)


COMMANDS = {"run": run, "report": report_main, "main": main_job, "memory": memory_main, "export": _export,
            "landscape": _landscape}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        help_asked = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__, file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "run":
        return run(rest)
    return guarded(COMMANDS[cmd], rest)


if __name__ == "__main__":
    sys.exit(main())
