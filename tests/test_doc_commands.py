"""Documented commands are tested commands.

Every shell command in the fenced code blocks of README.md and docs/*.md (```bash / ```sh / ```console
blocks, and `$ `-prefixed lines in untyped blocks; `\\` continuations joined, comments and output skipped)
is either RUN here in a smoke form, or listed in NOT_RUN with the reason. The smoke form is the command as
written plus only overrides that shrink it (steps, data, episodes, grid sizes; a sweep's swept lists cut so
that it runs 2 jobs, see `shrink_sweep`); placeholders (`<date>`, `outputs/.../model.pt`) are filled with
what the command they refer to produced. A command documented with an `error: ...` output line must fail
with exactly that line. `fwdgrad ...` runs in-process through `fwdgrad.cli.main` (scripts of experiments/
through runpy), from one temporary directory, with $FWDGRAD_CACHE in it (source models pretrain once).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fwdgrad.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
DOCS = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
SHELL_BLOCKS = ("bash", "sh", "shell", "console")

#: Documented commands this test does not run, and why. A key that no longer appears in the docs fails.
NOT_RUN = {
    "python3 -m pip install uv": "installs the tool that runs everything (network); this test runs under it",
    "uv run pytest": "the test suite itself, this file included",
    "apt-get install dataset-fashion-mnist": "a system package (root, network); the Fashion-MNIST commands "
    "below read it",
    "uv run python -c 'from fwdgrad.data import build_dataset; ...'": "an elided script (`...`); its output "
    "lines document dataset sizes and load times",
    "uv run python experiments/publish_docs.py": "rewrites README.md and docs/*.md in the repository (tests/"
    "test_published.py runs its --check)",
    "uv run fwdgrad run -m experiment=ood hydra/launcher=slurm hydra.launcher.partition=cpu "
    "hydra.launcher.timeout_min=30 cache_dir=/shared/fwdgrad data_root=/shared/fwdgrad-data": "needs a SLURM "
    "cluster; test_slurm_command_composes composes it with --cfg",
    "uv run python experiments/slurm_cluster.py start /tmp/slurm": "starts SLURM's daemons as root; "
    "tests/test_slurm.py starts the same cluster (slurm_cluster.Cluster) and runs the sweep below on it",
    "export SLURM_CONF=/tmp/slurm/slurm.conf": "a shell setting for the commands after it "
    "(tests/test_slurm.py)",
    "uv run fwdgrad run -m hydra/launcher=slurm hydra.launcher.partition=debug "
    "hydra.launcher.cpus_per_task=1 method=bp,qzo_ff seed=0,1": "needs the cluster above; "
    "tests/test_slurm.py runs this sweep (tiny) on it",
    "sacct -X -o JobID,JobName%12,State,Elapsed -j 1": "SLURM's accounting of the sweep above "
    "(tests/test_slurm.py checks its states)",
    "uv run fwdgrad report multirun/sweep/2026-12-02_03-03-20-470617": "the report of the SLURM sweep above "
    "(tests/test_slurm.py reports its sweep)",
    "uv run python experiments/slurm_cluster.py stop /tmp/slurm": "stops the cluster above "
    "(tests/test_slurm.py's fixture stops it and checks that no daemon is left)",
}

#: docs/edge.md's runtime example: its inputs come from no documented command.
EDGE_EXAMPLE = (
    "python -c 'import sys; from fwdgrad.export import export_main; "
    "sys.exit(export_main(sys.argv[1:]))' small_cnn_w16a8.pt head.npz --lr 1e-2 --eps 1e-3 --m 3 "
    "--trainable _8",
    "python -m fwdgrad.edge eval head.npz test.npz",
    "python -m fwdgrad.edge finetune head.npz train.npz --steps 300 --batch 32 --checkpoint-every 100 "
    "--log-every 50 --eval test.npz",
    "python -m fwdgrad.edge finetune head.npz train.npz --steps 600 --batch 32 --checkpoint-every 100 "
    "--log-every 100 --eval test.npz",
)
NOT_RUN |= {
    cmd: "the example's inputs (small_cnn_w16a8.pt, a digits CNN with a re-initialized head; then head.npz, "
    "train.npz, test.npz) come from no documented command; the main job's flow below it runs"
    for cmd in EDGE_EXAMPLE
}

#: Overrides that shrink a `fwdgrad run` / experiments/run.py job (and every arm of the main job).
SMOKE_RUN = {
    "train.steps": "2",
    "train.eval_every": "2",
    "pretrain.steps": "5",
    "data.max_train": "64",
    "data.max_test": "64",
    "progress": "false",
}
#: A command documented to fail gets only these (a guard in case it ran; none changes the error message,
#: which data.max_train would through the batch size in the memory model).
SMOKE_ERROR = {"train.steps": "2", "pretrain.steps": "5", "progress": "false"}
#: Per preset: what SMOKE_RUN does not shrink (episodes, clips, model size, one corruption instead of ten).
SMOKE_PRESET = {
    "fewshot_vision": {"data.fewshot.episodes": "2", "data.max_train": None, "data.max_test": None},
    "fewshot_audio": {
        "data.fewshot.episodes": "2",
        "data.fewshot.n_query": "1",
        "data.source.clips_per_word": "4",
        "data.target.clips_per_word": "2",
        "model.channels": "8",
        "model.blocks": "1",
        "data.max_train": None,
        "data.max_test": None,
    },
    "ood": {"data.target.corruption": "gaussian_noise", "model.width": "0.25"},
    "crossdomain_lp": {"model.width": "0.25"},
}
#: the transformer presets: a one-layer, 16-wide ViT / AST
TINY_TRANSFORMER = {"model.depth": "1", "model.hidden_dim": "16", "model.heads": "2"}
SMOKE_PRESET |= {
    "ood_vit": {"data.target.corruption": "gaussian_noise", "mode.prompts": "2", **TINY_TRANSFORMER},
    "crossdomain_vit": {"mode.prompts": "2", **TINY_TRANSFORMER},
    "fewshot_audio_ast": {
        k: v for k, v in SMOKE_PRESET["fewshot_audio"].items() if not k.startswith("model.")
    }
    | TINY_TRANSFORMER,
}
SMOKE_LANDSCAPE = {
    "landscape.grid": "3",
    "sharpness.enabled": "false",
    "runs.bp.steps": "2",
    "runs.ff.steps": "2",
    "pretrain.steps": "5",
    "landscape.eval_examples": "64",
    "landscape.line_points": "3",
    "snapshots": "2",
    "progress": "false",
}
#: `python -m fwdgrad.edge finetune`: these counts / 100 (at least 1). --steps is the step to reach, counted
#: from the bundle's step (an exported run's last step), so a resumed run still resumes.
EDGE_SCALED = ("--steps", "--checkpoint-every", "--log-every")
#: argparse scripts: option -> smoke value (bench_train: small_cnn, as ResNet-8 takes 3x its time).
SMOKE_ARGS = {
    "experiments/bench_engine.py": {
        "--reps": "1",
        "--batches": "2",
        "--schemes": "w16a8",
        "--models": "resnet8",
        "--m": "1",
    },
    "experiments/bench_ood.py": {
        "--steps": "2",
        "--set": [f"{k}={v}" for k, v in {**SMOKE_RUN, **SMOKE_PRESET["ood"]}.items() if k != "train.steps"],
    },
    "experiments/bench_train.py": {"--reps": "1", "--batch": "2", "--model": "small_cnn"},
    "experiments/bench_vit.py": {
        "--max-test": "64",
        "--reps": "1",
        "--batch": "2",
        "--schemes": "w16a8",
        "--residual": "16",
        "--set": ["pretrain.steps=5", *(f"{k}={v}" for k, v in TINY_TRANSFORMER.items())],
    },
    "experiments/bench_edge.py": {"--batch": "2", "--size": "8", "--steps": "1"},
    "experiments/vs_bp.py": {},  # reads the reports the smoke sweeps before it wrote: already small
    "experiments/mcu_finetune.py": {"--steps": "2", "--batch": "8"},  # QEMU: 2 steps of 8 samples
    "experiments/mcu_memory.py": {"--models": "small_cnn", "--boards": "mps2-an385"},
    "experiments/mcu_cost.py": {"--batch": "8", "--steps": "1", "--infer": "2"},
}
#: Placeholder -> (the documented command that produces it, the glob its output matches, relative to the
#: test directory).
PLACEHOLDERS = {
    "multirun/ablation_m/<date>": (
        "uv run fwdgrad run -m experiment=ablation_m hydra/launcher=local",
        "multirun/ablation_m/*",
    ),
    "multirun/compare/<date>": (
        "uv run fwdgrad run -m experiment=compare hydra/launcher=local",
        "multirun/compare/*",
    ),
    "outputs/.../model.pt": (
        "uv run fwdgrad run experiment=ood method=qzo_ff quant=w16a8 seed=0",
        "outputs/ood/*/model.pt",
    ),
}


# ------------------------------------------------------------------------------------------ extraction
@dataclass
class DocCommand:
    key: str  # the command as shlex tokens re-joined (comments and `$ ` dropped, continuations joined)
    where: str  # file:line of its first occurrence
    output: list[str] = field(default_factory=list)  # documented output lines (untyped/console `$ ` blocks)
    after: list[str] = field(default_factory=list)  # the commands above it in its block: they run first

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.key)


def doc_commands(docs=DOCS, root=ROOT) -> list[DocCommand]:
    """The shell commands of the docs' fenced code blocks, first occurrence of each, in document order."""
    found: dict[str, DocCommand] = {}
    for doc in docs:
        lang, pending, last, block = None, None, None, []
        for no, line in enumerate(doc.read_text().splitlines(), 1):
            s = line.strip()
            if s.startswith("```"):
                lang, pending, last, block = (s[3:].strip().lower() if lang is None else None), None, None, []
                continue
            if lang is None:
                continue
            if pending is not None:
                (text, start, prompt), pending = pending, None
                text = f"{text} {s}"
            elif s.startswith("$ "):
                text, start, prompt = s[2:], no, True
            elif lang in SHELL_BLOCKS and lang != "console" and s and not s.startswith("#"):
                text, start, prompt = s, no, False
            else:
                if last is not None and s:
                    last.output.append(s)  # output of the `$ ` command above
                continue
            if text.endswith("\\"):
                pending = (text[:-1].rstrip(), start, prompt)
                continue
            key = shlex.join(shlex.split(text, comments=True))
            last = None
            if key and key not in found:
                found[key] = DocCommand(key, f"{doc.relative_to(root)}:{start}", after=list(block))
                last = found[key] if prompt else None  # a repeat's output stays with its first occurrence
            if key:
                block.append(key)
    return list(found.values())


COMMANDS = doc_commands()
ERROR_COMMANDS = {c.key for c in COMMANDS if any(line.startswith("error:") for line in c.output)}


# ------------------------------------------------------------------------------------------ smoke forms
def _key(token: str) -> str:
    return token.split("=", 1)[0].lstrip("+~")


def _is_list(value: str) -> bool:
    return "," in value and value[:1] not in "[{'\""


def with_overrides(args: list[str], overrides: dict[str, str | None]) -> list[str]:
    """args with each key of overrides set: a token of that key gets the new value (None drops a smoke
    value, it never drops a documented one), the others are appended."""
    out, done = [], set()
    for t in args:
        k = _key(t)
        if "=" in t and k in overrides:
            done.add(k)
            if overrides[k] is not None:
                t = f"{t.split('=', 1)[0]}={overrides[k]}"
        out.append(t)
    return out + [f"{k}={v}" for k, v in overrides.items() if k not in done and v is not None]


def preset_of(args: list[str]) -> str | None:
    return next((t.split("=", 1)[1] for t in args if _key(t) == "experiment"), None)


def shrink_sweep(args: list[str]) -> dict[str, str]:
    """Overrides that cut a sweep to 2 jobs: of the swept lists (the preset's `hydra.sweeper.params`, as the
    command changes them), `seed` keeps its first value, the first other key its first 2 values, the rest
    their first value."""
    swept: dict[str, list[str]] = {}
    preset = preset_of(args)
    if preset is not None:
        params = OmegaConf.load(CONF_DIR / "experiment" / f"{preset}.yaml").get("hydra", {})
        params = params.get("sweeper", {}).get("params", {}) or {}
        swept |= {k: [v.strip() for v in str(vs).split(",")] for k, vs in params.items()}
    for t in args:  # the command line replaces the preset's sweep of a key (one value: not swept)
        if "=" in t and _is_list(t.split("=", 1)[1]):
            swept[_key(t)] = t.split("=", 1)[1].split(",")
        elif "=" in t:
            swept.pop(_key(t), None)
    out, two = {}, True
    for k, vs in swept.items():
        if k != "seed" and two:
            out[k], two = ",".join(vs[:2]), False
        else:
            out[k] = vs[0]
    return out


#: Hydra flags under which `fwdgrad run` runs no job (it prints a config, help or a completion script).
NO_JOB = {"-c", "--cfg", "-sc", "--shell-completion", "-i", "--info", "-h", "--help", "--hydra-help"}


def smoke_run_args(args: list[str], errors: bool, root: Path | None = None) -> list[str]:
    """The smoke form of `fwdgrad run` overrides (SMOKE_ERROR for a command documented to fail; with the
    smoke run's data when it resumes into an out_dir a smoke run left a checkpoint in, below `root`)."""
    if NO_JOB & set(args):
        return args
    if errors:
        out = next((t.split("=", 1)[1] for t in args if _key(t) == "out_dir"), None)
        resumes = root is not None and out is not None and (root / out / "checkpoint.pt").exists()
        data = {k: v for k, v in SMOKE_RUN.items() if k.startswith("data.")} if resumes else {}
        return with_overrides(args, SMOKE_ERROR | data)
    over = SMOKE_RUN | SMOKE_PRESET.get(preset_of(args) or "", {})
    if "-m" in args or "--multirun" in args:
        over |= shrink_sweep(args)
    return with_overrides(args, over)


def smoke_script_args(script: str, args: list[str]) -> list[str]:
    smoke = SMOKE_ARGS.get(script, {})
    out, i, done = [], 0, set()
    while i < len(args):
        if args[i] in smoke:
            value = smoke[args[i]]
            out += [args[i], *(value if isinstance(value, list) else [value])]
            done.add(args[i])
            i += 2
        else:
            out.append(args[i])
            i += 1
    rest = [(k, v if isinstance(v, list) else [v]) for k, v in smoke.items() if k not in done]
    return out + [x for k, v in rest for x in (k, *v)]


# ------------------------------------------------------------------------------------------ running
def kind(argv: list[str]) -> str | None:
    """How this test runs a command: "fwdgrad" (in-process), "script" (experiments/*.py via runpy), "edge"
    (`python -m fwdgrad.edge`, a subprocess: the numpy runtime), or None (it cannot)."""
    argv = argv[2:] if argv[:2] == ["uv", "run"] else argv
    if argv[:1] == ["fwdgrad"] and len(argv) > 1:
        return "fwdgrad"
    if argv[:1] in (["python"], ["python3"]) and len(argv) > 1:
        if argv[1].startswith("experiments/"):
            return "script"
        if argv[1:3] == ["-m", "fwdgrad.edge"]:
            return "edge"
    return None


@dataclass
class Result:
    rc: int
    out: str
    err: str
    created: list[Path]  # new outputs/*/* and multirun/*/* dirs, sweeps/* and files in the test dir

    def tail(self) -> str:
        return f"rc={self.rc}\n--- stdout\n{self.out[-3000:]}\n--- stderr\n{self.err[-3000:]}"


def _in_process(fn, argv0: str, args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [argv0, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = fn()
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved
    return (rc if isinstance(rc, int) else 0), out.getvalue(), err.getvalue()


class Runner:
    """Runs doc commands in the test directory, each once (later requests get the first result)."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[str, Result] = {}

    def _snapshot(self) -> set[Path]:
        made = {p for pat in ("outputs/*/*", "multirun/*/*", "sweeps/*") for p in self.root.glob(pat)}
        return made | {p for p in self.root.iterdir() if p.is_file()}

    def ensure(self, key: str) -> Result:
        if key not in self.results:
            cmd = next((c for c in COMMANDS if c.key == key), None) or DocCommand(key, "?")
            for before in cmd.after:
                if before not in NOT_RUN:
                    r = self.ensure(before)
                    assert r.rc == 0 or before in ERROR_COMMANDS, f"{before!r} (before {key!r}) failed"
            before = self._snapshot()
            rc, out, err = self._execute(cmd)
            created = sorted(self._snapshot() - before)
            self.results[key] = Result(rc, out, err, created)
        return self.results[key]

    def fill(self, args: list[str]) -> list[str]:
        out = []
        for t in args:
            if t in PLACEHOLDERS:
                producer, pattern = PLACEHOLDERS[t]
                made = self.ensure(producer)
                assert made.rc == 0, f"{producer!r} (which makes {t}) failed:\n{made.tail()}"
                hits = [p for p in self.root.glob(pattern) if any(p.is_relative_to(c) for c in made.created)]
                assert len(hits) == 1, f"{t}: {producer!r} made {hits}, expected one match of {pattern}"
                t = str(hits[0].relative_to(self.root))
            elif "<" in t or "..." in t:
                raise AssertionError(f"unresolved placeholder {t!r}: add it to PLACEHOLDERS or NOT_RUN")
            out.append(t)
        return out

    def _execute(self, cmd: DocCommand) -> tuple[int, str, str]:
        from fwdgrad.cli import main

        how, argv = kind(cmd.argv), cmd.argv[2:] if cmd.argv[:2] == ["uv", "run"] else cmd.argv
        errors = any(line.startswith("error:") for line in cmd.output)
        if how == "fwdgrad":
            sub, args = argv[1], self.fill(argv[2:])
            if sub == "run":
                args = smoke_run_args(args, errors, self.root)
            elif sub == "main":
                args = args + [f"{k}={v}" for k, v in SMOKE_RUN.items()]
            elif sub == "landscape":
                args = with_overrides(args, SMOKE_LANDSCAPE)
            return _in_process(lambda: main([sub, *args]), "fwdgrad", [])
        if how == "script":
            script, args = argv[1], self.fill(argv[2:])
            if script == "experiments/run.py":
                args = smoke_run_args(args, errors)
            elif script == "experiments/main.py":
                args = args + [f"{k}={v}" for k, v in SMOKE_RUN.items()]
            elif script == "experiments/landscape.py":
                args = with_overrides(args, SMOKE_LANDSCAPE)
            elif script in SMOKE_ARGS:
                args = smoke_script_args(script, args)
            else:
                raise AssertionError(f"{script}: no smoke form; add one (SMOKE_ARGS) or list it in NOT_RUN")
            sys.path.insert(0, str(ROOT / "experiments"))
            try:
                path = str(ROOT / script)
                return _in_process(lambda: runpy.run_path(path, run_name="__main__"), script, args)
            finally:
                sys.path.remove(str(ROOT / "experiments"))
        if how == "edge":
            args = self.fill(argv[3:])
            scaled = [i for i in range(1, len(args)) if args[i - 1] in EDGE_SCALED]
            args = [str(max(1, int(a) // 100)) if i in scaled else a for i, a in enumerate(args)]
            # the batch fits the smoke data (data.max_train samples; the runtime refuses a larger one)
            cap = int(SMOKE_RUN["data.max_train"])
            args = [str(min(cap, int(a))) if args[i - 1] == "--batch" else a for i, a in enumerate(args)]
            p = subprocess.run(
                [sys.executable, "-m", "fwdgrad.edge", *args],
                cwd=self.root,
                capture_output=True,
                text=True,
                timeout=300,
            )
            return p.returncode, p.stdout, p.stderr
        raise AssertionError(f"no way to run {cmd.key!r} ({cmd.where}): handle it here or list it in NOT_RUN")


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    """A test directory to run from (cwd, outputs, $FWDGRAD_CACHE). Hydra's joblib launcher resolves the
    relative output dirs in its loky workers, which keep the cwd they started with: the reusable executor is
    shut down before (workers start here) and after (they are not left behind in a deleted directory)."""
    from joblib.externals.loky import get_reusable_executor

    root = tmp_path_factory.mktemp("doc_commands")
    cwd, env = Path.cwd(), dict(os.environ)
    for k in ("HYDRA_FULL_ERROR", "_FWDGRAD_QUIET"):
        os.environ.pop(k, None)
    os.environ["FWDGRAD_CACHE"] = str(root / "cache")
    get_reusable_executor().shutdown(wait=True)
    os.chdir(root)
    try:
        yield Runner(root)
    finally:
        get_reusable_executor().shutdown(wait=True, kill_workers=True)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)


# ------------------------------------------------------------------------------------------ tests
def test_every_doc_command_is_run_or_listed():
    assert COMMANDS, "no commands found in the docs"
    stale = sorted(set(NOT_RUN) - {c.key for c in COMMANDS})
    assert not stale, f"NOT_RUN lists commands the docs no longer have: {stale}"
    assert all(reason.strip() for reason in NOT_RUN.values())
    for placeholder, (producer, _) in PLACEHOLDERS.items():
        assert any(producer == c.key for c in COMMANDS), f"{placeholder}: {producer!r} is not documented"
    unhandled = [f"{c.where}: {c.key}" for c in COMMANDS if c.key not in NOT_RUN and kind(c.argv) is None]
    assert not unhandled, f"documented commands neither run here nor listed in NOT_RUN: {unhandled}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.key not in NOT_RUN], ids=lambda c: c.where)
def test_doc_command_runs(runner, cmd):
    r = runner.ensure(cmd.key)
    errors = [line for line in cmd.output if line.startswith("error:")]
    if errors:
        assert r.rc == 2 and r.err.strip().splitlines()[-1:] == errors, f"{cmd.where}: {cmd.key}\n{r.tail()}"
    else:
        assert r.rc == 0, f"{cmd.where}: {cmd.key}\n{r.tail()}"


def test_documented_sweep_then_report(runner):
    """The documented 2-parallel-job sweep (cut to 2 jobs) lands in multirun/ablation_m/<date>/<job>/, and
    `fwdgrad report` of that directory shows both arms."""
    sweep_cmd = "uv run fwdgrad run -m experiment=ablation_m hydra/launcher=local"
    r = runner.ensure(sweep_cmd)
    assert r.rc == 0, r.tail()
    sweeps = [p for p in r.created if p.parent == runner.root / "multirun" / "ablation_m"]
    assert len(sweeps) == 1, r.created
    printed = re.findall(r"^written to (\S+)$", r.out, re.MULTILINE)  # the sweep's last line, if it has one
    assert printed in ([], [str(sweeps[0].relative_to(runner.root))]), printed
    jobs = sorted(p.parent.name for p in sweeps[0].rglob("metrics.json"))
    assert jobs == ["0", "1"]
    from fwdgrad.cli import main

    rc, out, err = _in_process(lambda: main(["report", str(sweeps[0].relative_to(runner.root))]), "x", [])
    assert rc == 0, err
    md = (sweeps[0] / "report.md").read_text()
    for arm in ("m1", "m3"):
        assert f"| digits | small_cnn | lp | w16a8 | qzo_ff | {arm} | 1 |" in md, md


def test_slurm_command_composes(runner):
    """The SLURM sweep (NOT_RUN: no cluster) composes: its launcher, its options and the sweep dir."""
    from fwdgrad.cli import main

    cmd = next(c for c in COMMANDS if "hydra/launcher=slurm" in c.key)
    args = [a for a in cmd.argv[4:] if a != "-m"]  # uv run fwdgrad run -m ...
    rc, out, err = _in_process(lambda: main(["run", *args, "--cfg", "hydra", "--resolve"]), "x", [])
    assert rc == 0, err
    hydra = OmegaConf.create(out)["hydra"]
    assert hydra.launcher._target_.endswith("SlurmLauncher")
    assert (hydra.launcher.partition, hydra.launcher.timeout_min) == ("cpu", 30)
    assert hydra.sweep.dir.startswith("multirun/ood/")
    rc, out, err = _in_process(lambda: main(["run", *args, "--cfg", "job"]), "x", [])
    assert rc == 0, err
    job = OmegaConf.create(out)
    assert (job.cache_dir, job.data_root) == ("/shared/fwdgrad", "/shared/fwdgrad-data")


def test_extraction_rules(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "```bash\nuv run fwdgrad run a=1 \\\n    b=2   # comment\n# a comment\nfwdgrad main\n```\n"
        "```\n$ uv run fwdgrad run c=3\nerror: bad c\n$ fwdgrad memory m\n```\n"
        "```console\n$ ls\noutput\n```\n"
        "```\nnot a command\n```\n```python\nprint(1)\n```\n"
    )
    got = [(c.key, c.where, c.output, c.after) for c in doc_commands([doc], tmp_path)]
    assert got == [
        ("uv run fwdgrad run a=1 b=2", "x.md:2", [], []),
        ("fwdgrad main", "x.md:5", [], ["uv run fwdgrad run a=1 b=2"]),
        ("uv run fwdgrad run c=3", "x.md:8", ["error: bad c"], []),
        ("fwdgrad memory m", "x.md:10", [], ["uv run fwdgrad run c=3"]),
        ("ls", "x.md:13", ["output"], []),
    ]


def test_smoke_forms():
    args = shlex.split("-m experiment=ood data.severity=hard mode.lp_layers=1 method=bp,qzo_ff seed=0,1")
    assert shrink_sweep(args) == {"method": "bp,qzo_ff", "seed": "0"}
    assert shrink_sweep(["-m", "experiment=ablation_m"]) == {"method.m": "1,3", "seed": "0"}
    got = smoke_run_args(["experiment=ablation_m", "progress=true", "train.steps=600"], errors=False)
    assert got[:3] == ["experiment=ablation_m", "progress=false", "train.steps=2"]
    got = smoke_script_args("experiments/bench_train.py", ["--threads", "2", "--reps", "9"])
    assert got == ["--threads", "2", "--reps", "1", "--batch", "2", "--model", "small_cnn"]
