"""SLURM sweeps for real: a throw-away one-node cluster (experiments/slurm_cluster.py), the documented
`hydra/launcher=slurm` sweep submitted as a job array through submitit, `fwdgrad report` over it, two jobs
sharing one source model through the cache's file lock, and a job preempted by SIGTERM that checkpoints,
is requeued and resumes to the same result as an uninterrupted run.

Needs root and Debian's slurm-wlm, slurmdbd, munge and mariadb-server (.ci/run installs them when it is
root); elsewhere the tests skip with the reason.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_runs import TINY

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import slurm_cluster  # noqa: E402

SLURM = ["-m", "hydra/launcher=slurm", f"hydra.launcher.partition={slurm_cluster.PARTITION}"]
SMALL_JOBS = ["hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]  # two at a time on 2 CPUs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = slurm_cluster.missing()
    if why:
        pytest.skip(f"no SLURM cluster here: {why}")
    c = slurm_cluster.Cluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        c.start(log=lambda s: None)
    except Exception:
        c.stop()
        raise
    yield c
    pids = [int((c.root / f"{d}.run").read_text()) for d in slurm_cluster.DAEMONS]
    c.stop()
    alive = [pid for pid in pids if slurm_cluster._alive(pid)]
    assert not alive and not slurm_cluster.MUNGE_SOCKET.exists(), alive  # nothing left running


def fwdgrad(cluster, cwd: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in cluster.env.items() if k not in ("HYDRA_FULL_ERROR", "_FWDGRAD_QUIET")}
    env["FWDGRAD_CACHE"] = str(cwd / "cache")
    cmd = [sys.executable, "-m", "fwdgrad.cli", *args]
    return subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def sacct(cluster, job: str) -> str:
    cmd = ["sacct", "-j", job.split("_")[0], "-D", "-X", "-n", "-P", "-o", "JobID,State"]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True).stdout


def test_sweep_runs_as_an_array_shares_the_source_model_and_reports(cluster, tmp_path):
    t0 = time.monotonic()
    p = fwdgrad(cluster, tmp_path, "run", *SLURM, *SMALL_JOBS, *TINY, "seed=0,1", "pretrain.seed=0",
                "hydra.sweep.dir=sweep")  # fmt: skip
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    assert "Bypassing" not in out and "sacct" not in out, out  # accounting answers submitit's polling
    runs = [json.loads((tmp_path / "sweep" / j / "metrics.json").read_text()) for j in ("0", "1")]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    # the two jobs ran at once and needed the same uncached source model: one pretrained, one waited
    assert sorted(r["source_cached"] for r in runs) == [False, True]
    jobs = list((tmp_path / "sweep" / ".submitit").iterdir())
    array = {j.name.split("_")[0] for j in jobs if re.fullmatch(r"\d+_\d+", j.name)}
    assert len(array) == 1, jobs  # one array job, two tasks
    job, end = array.pop() + "_0", time.monotonic() + 60
    while sacct(cluster, job).count("COMPLETED") < 2 and time.monotonic() < end:  # the tasks' epilogues
        time.sleep(0.5)
    assert sacct(cluster, job).count("COMPLETED") == 2, sacct(cluster, job)
    r = fwdgrad(cluster, tmp_path, "report", "sweep")
    report, _ = r.communicate(timeout=120)
    assert r.returncode == 0 and (tmp_path / "sweep" / "report.md").exists(), report
    print(f"sweep of 2 jobs and report in {time.monotonic() - t0:.1f} s")


def _losses(run: Path) -> list[str]:
    return [row["loss"] for row in csv.DictReader(open(run / "log.csv"))]


def test_sigterm_checkpoints_requeues_and_resumes_to_the_same_result(cluster, tmp_path):
    run = [*TINY, "train.steps=600", "train.eval_every=100", "log_every_steps=1", "log_every_s=0"]
    p = fwdgrad(cluster, tmp_path, "run", *SLURM, *run, "hydra.sweep.dir=sweep")
    log = tmp_path / "sweep" / "0" / "fwdgrad.log"
    end = time.monotonic() + 180
    while not (log.exists() and "step 60/600" in log.read_text()):
        assert time.monotonic() < end and p.poll() is None, "the job did not reach step 60"
        time.sleep(0.2)
    queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True)
    job = queue.stdout.split()[0]
    subprocess.run(["scancel", "--signal=TERM", job], env=cluster.env, check=True)  # as preemption does
    # SLURM holds a requeued job for about two minutes (Reason=BeginTime) before it may start again; the
    # test releases it as soon as it is held
    reason = ["squeue", "-h", "-j", job, "-o", "%r"]
    while "BeginTime" not in subprocess.run(reason, env=cluster.env, capture_output=True, text=True).stdout:
        assert time.monotonic() < end and p.poll() is None, "the job was not requeued"
        time.sleep(0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=cluster.env, check=True)
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out
    text = log.read_text()
    assert "resuming" in text.lower() or text.count("training, 600 steps") == 2, text[-3000:]
    assert "REQUEUED" in sacct(cluster, job), sacct(cluster, job)
    # the same run, uninterrupted, here
    ref = fwdgrad(cluster, tmp_path, "run", *run, "out_dir=ref", "hydra.run.dir=ref_hydra")
    ref_out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, ref_out
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())
    assert a["test_acc"] == b["test_acc"] and a["steps"] == b["steps"] == 600
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "sweep" / "0")
