"""The `fwdgrad` command.

    fwdgrad run [HYDRA OVERRIDES...]       one experiment, or a sweep with -m (same app as experiments/run.py)
    fwdgrad report SWEEP_DIR [--by KEY..]  aggregate every metrics.json below SWEEP_DIR (Markdown, CSV, PNG)
    fwdgrad main [--out DIR]               the main job: BP vs ZO vs QZO-FF on the embedded digits
    fwdgrad memory MODEL [options]         training-memory table of a model (BP vs FF, per number format)
    fwdgrad export ...                     export a QModel as an edge bundle (fwdgrad.export)
    fwdgrad landscape ...                  loss-landscape plots (fwdgrad.pipeline.landscape)

Bad input (a config value, a missing dataset, a device the run does not fit, a file or folder that cannot
be read or written) ends with one line `error: <message>` on stderr and exit status 2; set
HYDRA_FULL_ERROR=1 for the full traceback. Ctrl-C or SIGTERM during training writes a checkpoint at the
end of the current step and exits 130 / 143 with one line saying how to resume.
Tab completion of `fwdgrad run` overrides (bash): eval "$(fwdgrad run -sc install=bash)"
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import sys
import warnings
from pathlib import Path

from .conf import CONF_DIR
from .signals import terminate_raises

# Hydra, OmegaConf, torch and the rest of fwdgrad are imported by the commands that need them, so that
# `fwdgrad --help` and `fwdgrad main --help` answer at once (tests/test_cli.py checks it).


def errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are bad input: one line on stderr and exit status 2."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, OSError, FloatingPointError, HydraException, OmegaConfBaseException)


def one_line(e: BaseException) -> str:
    """The message of e on one line (the cause of an instantiation error; Hydra's group listings folded)."""
    from hydra.errors import HydraException, InstantiationException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

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
    except Exception as e:  # not `except errors()`: that would import Hydra on `--help`'s SystemExit
        if not isinstance(e, errors()):
            raise
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
        except errors() as e:
            if HydraConfig.get().mode == RunMode.MULTIRUN or not os.environ.get("_FWDGRAD_QUIET"):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            raise SystemExit(2) from None

    return job


def shown_path(path) -> str:
    """path relative to the working directory when it lies below it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def experiment_task(cfg) -> None:
    """One experiment (`fwdgrad run`): validate, run the pipeline, print the result line and where it went."""
    from hydra.core.hydra_config import HydraConfig

    from .config import validate

    c = validate(cfg)  # before importing torch: a bad value fails within a second or two
    out = shown_path(c.out_dir or HydraConfig.get().runtime.output_dir)  # = pipeline.steps.output_dir
    what = f"{c.data.name} {c.model['name']} {c.mode.name} {c.method.name} {c.scheme} seed={c.seed}"
    logging.getLogger("fwdgrad.run").info("%s -> %s", what, out)  # before torch is imported
    from .pipeline import run_experiment

    m = run_experiment(cfg)
    print(
        f"{m['dataset']} {m['model']} {m['mode']} {m['method']} {m['quant']} seed={m['seed']}: "
        f"zero-shot {m['zero_shot_acc']:.4f} -> test {m['test_acc']:.4f} in {m['steps']} steps "
        f"({m['forward_passes']} forward passes, {m['wall_s']:.1f} s)"
    )
    print(f"written to {out}", flush=True)


class WrittenTo:
    """Hydra callback (fwdgrad/conf/hydra/callbacks/written_to.yaml): a sweep ends by printing its
    directory (each job prints its own when it ends). Hydra's other hooks do nothing."""

    def on_multirun_end(self, config, **kwargs) -> None:
        print(f"written to {shown_path(config.hydra.sweep.dir)}", flush=True)

    def __getattr__(self, name: str):
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def landscape_task(cfg) -> dict:
    """The loss-landscape experiment (`fwdgrad landscape`, fwdgrad.pipeline.landscape)."""
    from .pipeline.landscape import run_landscape

    return run_landscape(cfg)


#: The Hydra commands: name -> (config name, task)
HYDRA_APPS = {"run": ("config", experiment_task), "landscape": ("landscape", landscape_task)}
COMPLETION = ("-sc", "--shell-completion")


def hydra_app(command: str = "run"):
    """The Hydra app of a command (`hydra.main` around its task)."""
    import hydra

    from . import config  # noqa: F401  (registers the structured schemas in Hydra's ConfigStore)

    config_name, task = HYDRA_APPS[command]
    return hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=config_name)(
        one_line_job(task)
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


#: The signal SLURM jobs launched through submitit (hydra/launcher=slurm) take as "checkpoint and requeue":
#: SIGTERM, which SLURM sends on preemption and (submitit's sbatch --signal) before the time limit. The
#: training loop checkpoints at the end of its step, then submitit requeues the job, which resumes.
PREEMPT_SIGNAL = ("SUBMITIT_PREEMPT_SIGNAL", "TERM")


def run(argv: list[str]) -> int:
    """`fwdgrad run [overrides]`: one experiment, or a sweep with -m."""
    if any(a in COMPLETION for a in argv):
        return shell_completion(argv, "run")
    os.environ.setdefault(*PREEMPT_SIGNAL)  # read by submitit here (sbatch) and in the job (inherited)
    return _hydra_command(hydra_app("run"), argv)


def landscape(argv: list[str]) -> int:
    """`fwdgrad landscape [overrides]`: the loss-landscape experiment (fwdgrad/conf/landscape.yaml)."""
    if any(a in COMPLETION for a in argv):
        return shell_completion(argv, "landscape")
    return _hydra_command(hydra_app("landscape"), argv)


def shell_completion(argv: list[str], command: str) -> int:
    """Hydra's shell completion (`-sc install=bash|zsh|fish`, `-sc uninstall=...`, `-sc query=...`).

    The script that `install` prints completes the word `fwdgrad`: on TAB it runs `fwdgrad -sc query=SHELL`
    with the command line in $COMP_LINE. Hydra reads that line as `<app> <overrides>`, so the command word
    (`run`, `landscape`) is taken out of it here and picks the app; on the command word itself the
    commands are the candidates, other commands have none (the shell completes file names)."""
    query = next((a.partition("=")[2] for a in argv if a.startswith("query=")), None)
    line = os.environ.get("COMP_LINE")
    if query is not None and line is not None:
        words = line.split()
        if words and Path(words[0]).name == "fwdgrad":
            if len(words) == 1 or (len(words) == 2 and not line[-1].isspace()):
                print(("\n" if query == "fish" else " ").join(COMMANDS))
                return 0
            if words[1] not in HYDRA_APPS:
                return 0
            command = words[1]
            os.environ["COMP_LINE"] = re.sub(rf"^(\s*\S+\s+){command}(?=\s|$)", r"\1", line, count=1)
    return _hydra_command(hydra_app(command), argv)


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
    from .methods import SCOPES

    ap = argparse.ArgumentParser(prog="fwdgrad memory", description="Training memory, BP vs FF, per format.")
    ap.add_argument("model", help="model name (fwdgrad.models.MODELS)")
    ap.add_argument("--input-shape", type=int, nargs="+", default=[1, 3, 32, 32], help="N C H W")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--mode", default="ft", choices=list(SCOPES), help="the training scope")
    ap.add_argument("--lp-layers", type=int, default=1)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--prompts", type=int, default=10, help="deep prompts per encoder layer (--mode dvpt)")
    ap.add_argument("--formats", nargs="+", default=["fp32", "fp16", "w16a16", "w16a8", "w8a8"])
    ap.add_argument("--segments", type=int, default=None, help="bp_ckpt's segments (default: ~sqrt(blocks))")
    a = ap.parse_args(argv)
    from .analysis.memory import format_table
    from .models import build_model

    model = build_model(a.model, a.num_classes, a.input_shape[1])
    shape = tuple(a.input_shape)
    try:
        print(format_table(model, shape, a.formats, a.mode, a.density, a.lp_layers, a.prompts, a.segments))
    except RuntimeError as e:  # the model runs on meta tensors of --input-shape
        first = str(e).strip().splitlines()[0]
        raise SystemExit(
            f"fwdgrad memory: {a.model} cannot take --input-shape {a.input_shape}: {first}"
        ) from None
    return 0


def report_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="fwdgrad report", description="Aggregate the metrics.json of a sweep.")
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="where report.md/.csv/.png go (default: SWEEP_DIR)")
    ap.add_argument("--by", nargs="+", default=[], help="extra grouping keys: metrics fields or config paths")
    ap.add_argument("--title", default=None, help="the report's heading (default: SWEEP_DIR)")
    a = ap.parse_args(argv)
    from .report import report

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


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """fwdgrad's own warnings as `warning: <message>`; others in Python's usual form."""
    if category.__module__.startswith("fwdgrad"):
        return f"warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


_python_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    """The `fwdgrad` command: exit status 0, 2 for bad input (one line), 128 + signal when interrupted."""
    warnings.formatwarning = one_line_warning
    try:
        with terminate_raises():
            return dispatch(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (fwdgrad.signals.Interrupted)
        print(f"fwdgrad: {e or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    finally:
        warnings.formatwarning = _python_warning  # in-process callers (tests) keep Python's format


def dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMPLETION:  # the installed completion script asks `fwdgrad -sc query=...`
        return shell_completion(argv, "run")
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
