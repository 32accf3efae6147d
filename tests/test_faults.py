"""Reliability: resume only what belongs to the run, load no code, write nothing half, hide no fault.

The battery (`BAD`) runs `fwdgrad run` (or `fwdgrad report`) on one bad input each and asserts what every
bad input gets: exit status 2, exactly one line on stderr naming the value and what is allowed, and every
pre-existing file unchanged (sha256). The other tests cover what a battery cannot: a corrupted checkpoint
with an intact previous one, fault counts in the outputs, SIGINT/SIGTERM, and kill -9 during each kind of
output write. The edge runtime's battery is tests/test_faults_edge.py; model.pt's is tests/test_model_file.py.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pipeline_runs import TINY

from fwdgrad.cli import main
from fwdgrad.files import LOCK_NAME, TEMP_SUFFIX, FolderLock
from fwdgrad.train import FaultWarning

RUN = [*TINY, "train.steps=4", "train.checkpoint_every=2"]
HELD: list[FolderLock] = []  # locks held by "another run" during a test
MARKER = "pwned"  # what a planted pickle would create if it were ever unpickled


class Evil:
    """Unpickling this would create `MARKER` in the working directory."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def snapshot(*folders: Path) -> dict[str, str]:
    """sha256 of every file below `folders` (the run folder's lock file aside: it only names its holder)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and p.name != LOCK_NAME:
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A working directory with fwdgrad's one-line error mode for in-process runs (environment restored)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setenv("_FWDGRAD_QUIET", "1")
    return tmp_path


def cli(ws: Path, *args: str, out: str | None = "run") -> int:
    """`fwdgrad run RUN... args` in process (or `fwdgrad report ...` when args start with "report")."""
    if args and args[0] == "report":
        argv = list(args)
    else:
        where = [f"out_dir={ws / out}"] if out else []
        argv = ["run", *RUN, f"cache_dir={ws / 'cache'}", *where, *args]
    try:
        return main(argv)
    except SystemExit as e:  # a single run's bad input: one line on stderr, exit status 2
        return e.code


def finished_run(ws: Path, *args: str) -> None:
    assert cli(ws, *args) == 0


# ------------------------------------------------------------------------------------------ battery
def _other_scope(ws):
    finished_run(ws, "mode=lp")
    return ["mode=ft"], "scope"


def _other_seed(ws):
    finished_run(ws, "seed=0", "pretrain.seed=0")
    return ["seed=1", "pretrain.seed=0"], "seed"


def _other_eps(ws):
    finished_run(ws, "method.eps=1e-2")
    return ["method.eps=2e-2"], "eps"


def _other_model(ws):
    finished_run(ws)
    return ["model=resnet8"], "model"


def _must_without_checkpoint(ws):
    return ["train.resume=must"], "train.resume=must"


def _locked_dir(ws):
    (ws / "run").mkdir()
    HELD.append(FolderLock(ws / "run").acquire())  # as a running job would (flock: per open file)
    return [], "in use by another run"


def _pickled_checkpoint(ws):
    finished_run(ws)
    torch.save({"model": Evil()}, ws / "run" / "checkpoint.pt")
    (ws / "run" / "checkpoint.prev.pt").unlink()
    return [], "pickled Python objects"


def _pickled_source_cache(ws):
    finished_run(ws)
    for p in (ws / "cache" / "models").glob("*.pt"):
        torch.save({"model": Evil(), "source_acc": 1.0}, p)
    return ["out_dir=" + str(ws / "other")], "pickled Python objects"


def _corrupted_checkpoints(ws):
    finished_run(ws)
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        flip_bytes(ws / "run" / name)
    return [], "corrupted"


def _eps_huge(ws):
    return ["method.eps=1e30"], "method.eps=1e+30"


def _eps_beyond_the_weight_range(ws):
    return ["quant=w8a8", "method.eps=0.9"], "weight LSBs"


def _m_huge(ws):
    return ["method.m=1000000"], "method.m=1000000"


def _lr_huge(ws):
    return ["method.lr=1e6"], "method.lr=1000000.0"


def _out_dir_is_a_file(ws):
    (ws / "run").write_text("not a folder\n")
    return [], "run"


def _out_dir_unwritable(ws):
    return ["out_dir=/sys/fwdgrad-test/run"], "/sys/fwdgrad-test"


def _working_dir_read_only(ws):
    os.chdir("/sys")  # the fixture's monkeypatch.chdir restores it
    return ["hydra.run.dir=outputs/x"], "outputs"


def _strict_overflow(ws):
    return ["quant=w16a16", "quant.acc_bits=16", "train.strict=true"], "train.strict"


def _report_empty_metrics(ws):
    finished_run(ws)
    (ws / "run" / "metrics.json").write_text("{}")
    return ["report", str(ws / "run")], "metrics.json"


def _report_zero_byte_metrics(ws):
    finished_run(ws)
    (ws / "run" / "metrics.json").write_text("")
    return ["report", str(ws / "run")], "metrics.json"


BAD = {
    "resume_other_scope": _other_scope,
    "resume_other_seed": _other_seed,
    "resume_other_eps": _other_eps,
    "resume_other_model": _other_model,
    "resume_must_without_checkpoint": _must_without_checkpoint,
    "out_dir_locked_by_another_run": _locked_dir,
    "pickled_checkpoint": _pickled_checkpoint,
    "pickled_source_cache": _pickled_source_cache,
    "corrupted_checkpoint_and_previous": _corrupted_checkpoints,
    "eps_huge": _eps_huge,
    "eps_beyond_the_weight_range": _eps_beyond_the_weight_range,
    "m_huge": _m_huge,
    "lr_huge": _lr_huge,
    "out_dir_is_a_file": _out_dir_is_a_file,
    "out_dir_unwritable": _out_dir_unwritable,
    "working_dir_read_only": _working_dir_read_only,
    "strict_accumulator_overflow": _strict_overflow,
    "report_empty_metrics": _report_empty_metrics,
    "report_zero_byte_metrics": _report_zero_byte_metrics,
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, ws, capsys):
    args, names = BAD[case](ws)
    capsys.readouterr()
    before = snapshot(ws / "run", ws / "cache")
    rc = cli(ws, *args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], lines[0]
    after = snapshot(ws / "run", ws / "cache")  # new files aside (a source model cached for a new model)
    assert {k: after.get(k) for k in before} == before
    assert not (ws / MARKER).exists() and not Path("/sys", MARKER).exists()
    assert not list(ws.rglob(f"*{TEMP_SUFFIX}"))


def test_resume_never_starts_fresh_and_must_resumes(ws):
    finished_run(ws, "mode=lp")
    assert cli(ws, "mode=ft", "train.resume=never") == 0
    assert json.loads((ws / "run" / "metrics.json").read_text())["mode"] == "ft"
    assert cli(ws, "mode=ft", "train.resume=must") == 0


def test_default_run_folders_are_unique_to_the_microsecond(ws):
    from hydra import compose, initialize_config_dir

    from fwdgrad.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True)
    for node in (cfg.hydra.run, cfg.hydra.sweep):
        assert node._get_node("dir")._value().endswith("${now:%Y-%m-%d_%H-%M-%S-%f}")


# -------------------------------------------------------------------------------- corrupted, faults
def flip_bytes(path: Path, n: int = 4) -> None:
    """Flip n bytes in the middle of the file's largest stored tensor (the weights)."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(n):
        data[start + 7 * i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_resumes_from_the_previous_one_to_the_same_result(ws):
    finished_run(ws, "out_dir=" + str(ws / "whole"))
    assert cli(ws, "train.steps=2") == 0  # ends at step 2
    assert cli(ws, "train.steps=3") == 0  # extended to step 3: checkpoint.prev.pt is step 2
    flip_bytes(ws / "run" / "checkpoint.pt")
    with pytest.warns(FaultWarning, match="corrupted.*resumed from the previous checkpoint .*prev.pt.* 2"):
        assert cli(ws) == 0  # to step 4, from step 2
    a, b = (json.loads((ws / d / "metrics.json").read_text()) for d in ("whole", "run"))
    assert a["test_acc"] == b["test_acc"] and a["steps"] == b["steps"] == 4
    log = lambda d: [r["loss"] for r in csv.DictReader(open(ws / d / "log.csv"))]  # noqa: E731
    assert log("whole") == log("run")


def test_faults_are_counted_in_log_and_metrics_and_warned_in_one_line(ws):
    args = [*RUN, "quant=w16a16", "quant.acc_bits=16", f"cache_dir={ws / 'cache'}", f"out_dir={ws / 'run'}"]
    p = _spawn(ws, *args)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    warning = [line for line in err.splitlines() if "faults" in line]
    assert len(warning) == 1 and warning[0].startswith("warning: faults in this run: "), err
    assert "accumulator overflows" in warning[0]
    m = json.loads((ws / "run" / "metrics.json").read_text())
    total = sum(m["faults"]["accumulator_overflow"].values())
    assert total > 0
    rows = list(csv.DictReader(open(ws / "run" / "log.csv")))
    assert 0 < int(rows[-1]["accumulator_overflow"]) <= total  # counted again at the final evaluation


def test_a_large_lr_saturates_and_says_so(ws):
    with pytest.warns(FaultWarning, match="update saturations"):
        assert cli(ws, "method.lr=100") == 0
    m = json.loads((ws / "run" / "metrics.json").read_text())
    assert sum(m["faults"]["update_saturation"].values()) > 0


def test_non_finite_inputs_are_rejected_before_anything_is_written(ws, monkeypatch):
    from fwdgrad.pipeline.steps import load_task

    (ws / "nan_data.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch.utils.data import TensorDataset
            from fwdgrad.data import DataSplits

            def nan_digits(seed=0, **kw):
                x = torch.zeros(8, 1, 28, 28)
                x[3, 0, 5, 5] = float("nan")
                ds = TensorDataset(x, torch.zeros(8, dtype=torch.long))
                return DataSplits("nan_digits", ds, ds, tuple("0123456789"))
            """
        )
    )
    monkeypatch.syspath_prepend(str(ws))
    with pytest.raises(ValueError, match="1 non-finite input values"):
        load_task({"_target_": "nan_data.nan_digits", "name": "nan_digits"}, 0)


# --------------------------------------------------------------------------------------- signals
def _spawn(ws: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "_FWDGRAD_QUIET")}
    cmd = [sys.executable, "-m", "fwdgrad.cli", "run", *args]
    return subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    "sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM], ids=["SIGINT", "SIGTERM"]
)  # the same path; SIGTERM (SLURM's) by default
def test_signal_checkpoints_exits_128_plus_signal_and_resumes_to_the_same_result(ws, sig):
    long = [*TINY, "train.steps=60", "log_every_steps=1", "log_every_s=0", f"cache_dir={ws / 'cache'}"]
    assert cli(ws, *long[len(TINY) :], "out_dir=" + str(ws / "whole"), out=None) == 0
    p = _spawn(ws, *long, f"out_dir={ws / 'run'}")
    for line in p.stdout:  # progress lines, one per step, once training runs
        if "step 5/" in line:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 128 + sig, err
    assert len(lines) == 1 and "checkpoint written" in lines[0] and f"out_dir={ws / 'run'}" in lines[0], err
    step = json.loads("0")  # the checkpoint's step is before the end
    assert (ws / "run" / "checkpoint.pt").exists() and not (ws / "run" / "metrics.json").exists(), step
    assert cli(ws, *long[len(TINY) :], out="run") == 0  # the same command and out_dir: resumes
    a, b = (json.loads((ws / d / "metrics.json").read_text()) for d in ("whole", "run"))
    assert a["test_acc"] == b["test_acc"] and a["steps"] == b["steps"] == 60
    log = lambda d: [r["loss"] for r in csv.DictReader(open(ws / d / "log.csv"))]  # noqa: E731
    assert log("whole") == log("run")


def test_kill_9_mid_run_then_the_same_command_resumes_to_the_same_result(ws):
    long = [*TINY, "train.steps=60", "train.checkpoint_every=1", "log_every_steps=1", "log_every_s=0"]
    long += [f"cache_dir={ws / 'cache'}"]
    assert cli(ws, *long[len(TINY) :], "out_dir=" + str(ws / "whole"), out=None) == 0
    rng = random.Random(0)
    for _ in range(2):  # killed at a random step (inside a checkpoint write or not), twice
        p = _spawn(ws, *long, f"out_dir={ws / 'run'}")
        for line in p.stdout:
            if "step " in line and rng.random() < 0.15:
                p.kill()
                break
        p.wait(timeout=120)
    assert cli(ws, *long[len(TINY) :], out="run") == 0
    a, b = (json.loads((ws / d / "metrics.json").read_text()) for d in ("whole", "run"))
    assert a["test_acc"] == b["test_acc"] and a["faults"] == b["faults"]
    log = lambda d: [r["loss"] for r in csv.DictReader(open(ws / d / "log.csv"))]  # noqa: E731
    assert log("whole") == log("run")
    assert not list((ws / "run").glob(f"*{TEMP_SUFFIX}"))


# ------------------------------------------------------------------------------ kill -9 mid-write
WRITER = """
import itertools, sys, torch
from pathlib import Path
from fwdgrad.files import write_json
from fwdgrad.plots import plot_curves
from fwdgrad.report import write_csv
from fwdgrad.train import save_checkpoint, write_log

out = Path(sys.argv[1])
rows = [{"step": i, "forward_passes": 6 * i, "loss": 1 / i, "wall_s": 0.1 * i} for i in range(1, 20000)]
writes = {
    "metrics.json": lambda i: write_json(out / "metrics.json", {"i": i, "rows": rows * 4}),  # ~1 s
    "log.csv": lambda i: write_log(str(out / "log.csv"), rows[: 1000 + i % 3000]),
    "checkpoint.pt": lambda i: save_checkpoint(f"{out}/checkpoint.pt", {"i": i, "w": torch.full((8**8,), i)}),
    "curves.png": lambda i: plot_curves({"a": rows[:50]}, out / "curves.png", f"version {i}"),
    "report.csv": lambda i: write_csv(rows, out / "report.csv"),
}
for i in itertools.count(1):  # every kind of output, round robin, until killed; a line as each starts
    for kind, write in writes.items():
        print(kind, flush=True)
        write(i)
"""
KINDS = ("metrics.json", "log.csv", "checkpoint.pt", "checkpoint.prev.pt", "curves.png", "report.csv")


def _complete(path: Path) -> bool:
    from fwdgrad.statefile import load_state

    if path.name == "metrics.json":
        return "rows" in json.loads(path.read_text())
    if path.name == "log.csv":
        return len(list(csv.DictReader(open(path)))) >= 1000
    if path.suffix == ".pt":  # checkpoint.pt and checkpoint.prev.pt
        s = load_state(path, "checkpoint")
        return bool((s["w"] == s["i"]).all())
    if path.name == "curves.png":
        from PIL import Image

        Image.open(path).load()
        return True
    return len(list(csv.DictReader(open(path)))) == 19999


def test_kill_9_during_writes_leaves_old_or_new_files_and_the_next_start_removes_the_debris(tmp_path):
    kinds = ["metrics.json", "checkpoint.pt"]  # the large writes: a kill as one starts lands inside it
    debris = 0
    for round_ in range(2):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        target = kinds[round_::2]  # killed as soon as this starts being written again
        for line in p.stdout:
            if line.strip() in target and (tmp_path / line.strip()).exists():
                time.sleep(0.3)  # inside the write (printed just before it starts; it takes about a second)
                p.kill()
                break
        p.wait()
        debris += len(list(tmp_path.glob(f"*{TEMP_SUFFIX}")))
        for kind in KINDS:
            if (tmp_path / kind).exists():
                assert _complete(tmp_path / kind), kind
    assert debris  # kills landed mid-write (else the test proved less than it claims)
    with FolderLock(tmp_path):  # a run's start removes the temporary files of killed writers
        assert not list(tmp_path.glob(f"*{TEMP_SUFFIX}"))


# ------------------------------------------------------------------------------------- disk full
def _small_files():
    resource.setrlimit(resource.RLIMIT_FSIZE, (12_000, 12_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(ws):
    finished_run(ws, "out_dir=" + str(ws / "warm"))  # the source model is cached
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "_FWDGRAD_QUIET")}
    args = [*RUN, f"cache_dir={ws / 'cache'}", f"out_dir={ws / 'run'}", "hydra.run.dir=" + str(ws / "hydra")]
    p = subprocess.run(
        [sys.executable, "-m", "fwdgrad.cli", "run", *args],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_small_files,
    )
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "File too large" in lines[0], p.stderr
    assert not list((ws / "run").glob(f"*{TEMP_SUFFIX}"))
    for f in (ws / "run").glob("*.pt"):
        from fwdgrad.statefile import load_state

        load_state(f, "checkpoint")  # what is there is whole
