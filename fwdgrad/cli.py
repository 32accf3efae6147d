"""The `fwdgrad` command.

    fwdgrad run [HYDRA OVERRIDES...]       one experiment, or a sweep with -m (same app as experiments/run.py)
    fwdgrad report SWEEP_DIR [--by KEY..]  aggregate every metrics.json below SWEEP_DIR (Markdown, CSV, PNG)
    fwdgrad main [--out DIR]               the main job: BP vs ZO vs QZO-FF on the embedded digits
    fwdgrad memory MODEL [options]         training-memory table of a model (BP vs FF, per number format)
    fwdgrad export ...                     export a QModel as an edge bundle (fwdgrad.export)
    fwdgrad landscape ...                  loss-landscape plots (fwdgrad.pipeline.landscape)

Bad input (a config value, a missing dataset, a device the run does not fit) ends with one line
`error: <message>` on stderr and exit status 2; set HYDRA_FULL_ERROR=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.errors import HydraException, InstantiationException, MissingConfigException
from omegaconf.errors import OmegaConfBaseException

from .conf import CONF_DIR
from .config import validate

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


def one_line_job(task):
    """A Hydra task that, in a single run, turns bad input into one line and exit 2 before Hydra logs its
    own report; in a sweep the job raises, so Hydra records the failure."""

    def job(cfg):
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        try:
            return task(cfg)
        except ERRORS as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN or not os.environ.get("_FWDGRAD_QUIET"):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None

    return job


def experiment_task(cfg) -> None:
    """One experiment (`fwdgrad run`): validate, run the pipeline, print the result line."""
    validate(cfg)  # before importing torch: a bad value fails within a second or two
    from .pipeline import run_experiment

    m = run_experiment(cfg)
    print(
        f"{m['dataset']} {m['model']} {m['mode']} {m['method']} {m['quant']} seed={m['seed']}: "
        f"zero-shot {m['zero_shot_acc']:.4f} -> test {m['test_acc']:.4f} in {m['steps']} steps "
        f"({m['forward_passes']} forward passes, {m['wall_s']:.1f} s)"
    )


def landscape_task(cfg) -> dict:
    """The loss-landscape experiment (`fwdgrad landscape`, fwdgrad.pipeline.landscape)."""
    from .pipeline.landscape import run_landscape

    return run_landscape(cfg)


hydra_app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(
    one_line_job(experiment_task)
)
landscape_app = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="landscape")(
    one_line_job(landscape_task)
)


def _hydra_command(app, argv: list[str]) -> int:
    """A Hydra app with argv as its command line. Hydra prints its own (multi-line) reports unless
    HYDRA_FULL_ERROR is set: it is set here (unless the user did), so the exception reaches `guarded`,
    which folds it to one line."""
    if "HYDRA_FULL_ERROR" not in os.environ:
        os.environ["HYDRA_FULL_ERROR"] = os.environ["_FWDGRAD_QUIET"] = "1"
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        return guarded(app)
    finally:
        sys.argv = saved


def run(argv: list[str]) -> int:
    """`fwdgrad run [overrides]`: one experiment, or a sweep with -m."""
    return _hydra_command(hydra_app, argv)


def landscape(argv: list[str]) -> int:
    """`fwdgrad landscape [overrides]`: the loss-landscape experiment (fwdgrad/conf/landscape.yaml)."""
    return _hydra_command(landscape_app, argv)


def main_job(argv: list[str] | None = None) -> int:
    """Pretrain small_cnn on digits 0-4 (cached), adapt to digits 5-9 with fp32 BP, fp32 sign-SPSA and
    QZO-FF w16a8 (integer engine); print the comparison and write plots, results.json and results.md."""
    ap = argparse.ArgumentParser(prog="fwdgrad main", description=main_job.__doc__)
    ap.add_argument("--out", default="outputs/main", help="output directory (default outputs/main)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="extra Hydra overrides for every arm, e.g. progress=false")
    args = ap.parse_args(argv)
    from .pipeline.main_job import run_main_job

    command = " ".join(["fwdgrad", "main", *(shlex.quote(x) for x in (argv or []))])
    run_main_job(Path(args.out), args.seed, args.overrides, command)
    return 0


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
    ap.add_argument("--title", default=None, help="the report's heading (default: SWEEP_DIR)")
    a = ap.parse_args(argv)
    command = " ".join(["fwdgrad", "report", *(shlex.quote(x) for x in argv)])
    print(report(a.sweep_dir, a.out, tuple(a.by), a.title, command))
    return 0


def _export(argv):
    from .export import export_main

    return export_main(argv)


COMMANDS = {
    "run": run,
    "report": report_main,
    "main": main_job,
    "memory": memory_main,
    "export": _export,
    "landscape": landscape,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        help_asked = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__, file=sys.stdout if help_asked else sys.stderr)
        return 0 if help_asked else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("run", "landscape"):
        return COMMANDS[cmd](rest)
    return guarded(COMMANDS[cmd], rest)


if __name__ == "__main__":
    sys.exit(main())
