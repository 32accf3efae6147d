"""What a person sees of the `fwdgrad` command: no C++ warnings, progress lines when stdout is not a
terminal (also in <run dir>/fwdgrad.log), where the results went, a fast --help, Hydra tab completion."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TINY = ["pretrain.steps=2", "data.max_train=48", "data.max_test=24"]
SCRIPT = Path(sys.executable).parent / "fwdgrad"  # the installed command (uv run / the virtualenv)


def fwdgrad(cwd: Path, *args: str, env: dict | None = None, timeout: int = 300):
    """`fwdgrad ARGS` (or `python -m fwdgrad.cli ARGS`) in cwd with stdout and stderr to pipes."""
    base = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "_FWDGRAD_QUIET")}
    command = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "fwdgrad.cli"]
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=base | {"FWDGRAD_CACHE": str(cwd / "cache")} | (env or {}),
    )


@pytest.fixture(scope="module")
def piped_run(tmp_path_factory):
    """A tiny BP run (BP frees the previous batch inside the first step's memory profile) at default settings,
    its output piped."""
    cwd = tmp_path_factory.mktemp("piped")
    p = fwdgrad(cwd, "run", "method=bp", "train.steps=3", "train.eval_every=2", *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    return cwd, p


def test_run_prints_no_cpp_warnings(piped_run):
    _, p = piped_run
    assert "CPUAllocator" not in p.stderr, p.stderr
    assert not [line for line in p.stderr.splitlines() if line.startswith("[W")], p.stderr


def test_run_ends_with_its_output_dir_and_fills_the_job_log(piped_run):
    cwd, p = piped_run
    last = p.stdout.strip().splitlines()[-1]
    assert last.startswith("written to outputs/run/"), p.stdout
    out = cwd / last.removeprefix("written to ")
    assert (out / "metrics.json").exists()
    job_log = (out / "fwdgrad.log").read_text()
    assert "[fwdgrad.run][INFO] - digits small_cnn lp bp fp32 seed=0 -> outputs/run/" in job_log
    assert "[fwdgrad.progress][INFO] - bp fp32: training, 3 steps" in job_log
    assert "bp fp32: step 3/3 (100%), loss " in job_log  # the last step is always logged
    for line in ("zero-shot accuracy: evaluating 24 test examples", "pretrain: step 2/2 (100%)"):
        assert line in p.stdout and line in job_log


def test_sweep_logs_every_n_steps_and_ends_with_the_sweep_dir(tmp_path):
    p = fwdgrad(tmp_path, "run", "-m", "method=bp", "seed=0", "train.steps=3", "log_every_steps=1", *TINY)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    steps = [line.split(" - ", 1)[1].split(",")[0] for line in lines if "][fwdgrad.progress][" in line]
    assert [s for s in steps if s.startswith("bp fp32: step")] == [
        "bp fp32: step 1/3 (33%)",
        "bp fp32: step 2/3 (66%)",
        "bp fp32: step 3/3 (100%)",
    ]
    assert any("step/s, elapsed" in line and "ETA" in line for line in lines)
    assert lines[-2].startswith("written to multirun/sweep/") and lines[-2].endswith("/0"), p.stdout
    sweep = lines[-1].removeprefix("written to ")
    assert lines[-1].startswith("written to multirun/sweep/") and lines[-2] == f"written to {sweep}/0"
    assert json.loads((tmp_path / sweep / "0" / "metrics.json").read_text())["steps"] == 3


def test_help_imports_neither_torch_nor_hydra(tmp_path):
    """`fwdgrad --help` and `fwdgrad main --help` answer without the heavy imports (about 0.3 s instead of
    about 2 s on the 2-core machine)."""
    code = (
        "import sys\n"
        "from fwdgrad.cli import main\n"
        "assert main(['--help']) == 0\n"
        "try:\n"
        "    main(['main', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0\n"
        "heavy = ('torch', 'hydra', 'omegaconf', 'numpy', 'tqdm')\n"
        "print('LOADED', [m for m in heavy if m in sys.modules])\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "fwdgrad main [--out DIR]" in p.stdout and "--seed" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "LOADED []"


@pytest.mark.parametrize(
    "args, line, expect",
    [
        (["-sc", "query=bash"], "fwdgrad run meth", "method="),  # what the installed script asks
        (["run", "-sc", "query=bash"], "fwdgrad run meth", "method="),
        (["--shell-completion", "query=bash"], "fwdgrad run -m experiment=ood data.sev", "data.severity="),
        (["-sc", "query=bash"], "fwdgrad ru", "run report main memory export landscape"),
    ],
)
def test_tab_completion(tmp_path, args, line, expect):
    p = fwdgrad(tmp_path, *args, env={"COMP_LINE": line, "COMP_POINT": str(len(line))}, timeout=60)
    assert p.returncode == 0, p.stderr
    assert expect in p.stdout.split() or expect == p.stdout.strip(), p.stdout


@pytest.mark.skipif(not SCRIPT.exists(), reason="the fwdgrad command is not installed next to this python")
def test_completion_install_script_completes_fwdgrad(tmp_path):
    p = fwdgrad(tmp_path, "run", "-sc", "install=bash", timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion fwdgrad")


def test_quiet_cpp_warnings_restores_the_level():
    """(The warning itself: test_run_prints_no_cpp_warnings; c10 prints it once per process.)"""
    from fwdgrad.measure import _c10_log_level, quiet_cpp_warnings

    level = _c10_log_level()
    if level is None:
        pytest.skip("this torch build does not export c10's log level")
    before = level.value
    with quiet_cpp_warnings():
        assert level.value >= 2
    assert level.value == before


def test_progress_lines_every_n_steps_and_during_evaluations(caplog):
    from fwdgrad.pipeline.progress import Progress
    from fwdgrad.train import EVAL_PROGRESS, evaluate

    caplog.set_level(logging.INFO, logger="fwdgrad.progress")
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(10, 4), torch.zeros(10, dtype=torch.long)
    with Progress("bp fp32", 5, bar=False, lines=True, every_s=0, every_steps=2, evaluations=True) as shown:
        for n in range(1, 6):
            shown.update(n, loss=1.0 / n)
        assert EVAL_PROGRESS.get() == shown.evaluating
        shown.every_s = 1e-9  # every chunk of this evaluation is "late"
        evaluate(model, x, y, batch_size=4)
    assert EVAL_PROGRESS.get() is None
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0] == "bp fp32: 5 steps"
    assert [m.split(",")[0] for m in msgs[1:4]] == [f"bp fp32: step {n}/5 ({20 * n}%)" for n in (2, 4, 5)]
    assert "loss 0.5000" in msgs[1] and "step/s" in msgs[1] and "ETA" in msgs[1] and "ETA" not in msgs[3]
    assert [m.split(" (")[0] for m in msgs[4:]] == [
        "bp fp32: evaluating on the test set after step 5: 4/10 examples",
        "bp fp32: evaluating on the test set after step 5: 8/10 examples",
    ]
