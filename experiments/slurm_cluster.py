"""A throw-away one-node SLURM cluster, to run fwdgrad's SLURM sweeps for real on one machine.

    uv run python experiments/slurm_cluster.py start /tmp/slurm   # export SLURM_CONF=/tmp/slurm/slurm.conf
    uv run python experiments/slurm_cluster.py stop /tmp/slurm

Everything but munged's socket (its default, /run/munge) lives in the folder: munged, MariaDB (a private
data directory, listening on 127.0.0.1 only), slurmdbd (job accounting, so that `sacct`, which submitit
polls for job states, answers), slurmctld and slurmd, all as root, with their state, spool, logs and pid
files. `start` returns once `sinfo` shows the node idle; `stop` ends every daemon by the pid it recorded,
so nothing is left running. Needs root and Debian's packages:
apt-get install slurm-wlm slurmdbd munge mariadb-server."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmdbd", "munge", "mariadb-server")
DAEMONS = ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged")  # stopped in this order
PARTITION = "debug"
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")  # where SLURM's clients look for munged


def missing() -> str | None:
    """Why a cluster cannot start here (one line), or None."""
    if os.geteuid() != 0:
        return "needs root (the daemons run as root)"
    tools = (
        "munged",
        "mariadbd",
        "mariadb-install-db",
        "slurmdbd",
        "slurmctld",
        "slurmd",
        "sbatch",
        "sacctmgr",
    )
    absent = [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    if absent:
        return f"missing {', '.join(absent)}; install: apt-get install {' '.join(PACKAGES)}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mb() -> int:
    """This machine's memory in MB (the node's RealMemory: jobs ask for memory, e.g. mem_gb)."""
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) // 1024


def _wait(what: str, ok, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > end:
            raise TimeoutError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.2)


class Cluster:
    """One node (this host, `cpus` CPUs), one partition (`debug`), accounting through slurmdbd."""

    def __init__(self, root: str | os.PathLike, cpus: int | None = None):
        self.root = Path(root).resolve()
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.env = os.environ | {"SLURM_CONF": str(self.root / "slurm.conf")}

    # -- configuration ---------------------------------------------------------------------------
    def _write_configs(self) -> None:
        r, ports = self.root, {k: _free_port() for k in ("db", "dbd", "ctld", "d")}
        for d in ("state", "spool", "log", "db"):
            (r / d).mkdir(parents=True, exist_ok=True)
        auth = "AuthType=auth/munge\n"  # munged on its default socket: not every client reads AuthInfo
        (r / "slurm.conf").write_text(
            f"ClusterName=fwdgrad\nSlurmctldHost={self.host}\nSlurmUser=root\nSlurmdUser=root\n{auth}"
            f"SlurmctldPort={ports['ctld']}\nSlurmdPort={ports['d']}\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'slurmctld.pid'}\nSlurmdPidFile={r / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log/slurmctld.log'}\nSlurmdLogFile={r / 'log/slurmd.log'}\n"
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\nMpiDefault=none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\nSchedulerType=sched/backfill\n"
            "ReturnToService=2\nJobAcctGatherType=jobacct_gather/none\nJobRequeue=1\n"
            f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            f"AccountingStoragePort={ports['dbd']}\n"
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN\n"
            f"PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP\n"
        )
        dbd = r / "slurmdbd.conf"
        dbd.write_text(
            f"DbdHost=localhost\nDbdPort={ports['dbd']}\nSlurmUser=root\n{auth}"
            f"PidFile={r / 'slurmdbd.pid'}\nLogFile={r / 'log/slurmdbd.log'}\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={ports['db']}\nStorageUser=root\nStorageLoc=slurm_acct_db\n"
        )
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read
        self.db_port = ports["db"]

    # -- daemons ---------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        p = subprocess.Popen(argv, env=self.env, stdout=log, stderr=log, start_new_session=True)
        (self.root / f"{name}.run").write_text(str(p.pid))

    def _run(self, argv: list[str]) -> str:
        return subprocess.run(argv, env=self.env, check=True, capture_output=True, text=True).stdout

    def start(self, log=print) -> Cluster:
        t0 = time.monotonic()
        self._write_configs()
        r = self.root
        if MUNGE_SOCKET.exists():
            raise OSError(f"{MUNGE_SOCKET} exists: another munged runs here (stop it, or use its cluster)")
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "munged",
            ["munged", "-F", "--force", f"--pid-file={r / 'munged.pid'}",
             f"--log-file={r / 'log/munged.log'}", f"--seed-file={r / 'munge.seed'}"],
        )  # fmt: skip
        _wait("munged", MUNGE_SOCKET.exists)
        self._run(["mariadb-install-db", "--no-defaults", f"--datadir={r / 'db'}", "--user=root",
                   "--auth-root-authentication-method=normal", "--skip-test-db"])  # fmt: skip
        self._spawn(
            "mariadbd",
            ["mariadbd", "--no-defaults", f"--datadir={r / 'db'}", "--user=root", f"--socket={r / 'db.sock'}",
             "--bind-address=127.0.0.1", f"--port={self.db_port}", f"--pid-file={r / 'mariadb.pid'}"],
        )  # fmt: skip
        _wait("mariadbd", (r / "db.sock").exists)
        self._spawn("slurmdbd", ["slurmdbd", "-D"])
        _wait("slurmdbd", lambda: subprocess.run(["sacctmgr", "-n", "list", "cluster"], env=self.env,
                                                 capture_output=True).returncode == 0)  # fmt: skip
        self._run(["sacctmgr", "-i", "add", "cluster", "fwdgrad"])
        self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._spawn("slurmd", ["slurmd", "-D"])
        _wait("the node", lambda: self.state() == "idle")
        log(f"slurm: node {self.host} idle in partition {PARTITION} ({time.monotonic() - t0:.1f} s); "
            f"export SLURM_CONF={r / 'slurm.conf'}")  # fmt: skip
        return self

    def state(self) -> str:
        p = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else ""

    def stop(self) -> None:
        """Stop every daemon this cluster started (by its recorded pid), then wait for them to go."""
        pids = []
        for name in DAEMONS:
            f = self.root / f"{name}.run"
            if f.exists():
                pid = int(f.read_text())
                try:
                    os.kill(pid, signal.SIGTERM)
                    pids.append(pid)
                except ProcessLookupError:
                    pass
                f.unlink()
                if name == "slurmd":  # jobs it started end with it (their session)
                    time.sleep(0.5)
        end = time.monotonic() + 20
        for pid in pids:
            while time.monotonic() < end and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        MUNGE_SOCKET.unlink(missing_ok=True)  # munged's, gone with it

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap our own children
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("start", "stop"))
    ap.add_argument("folder", help="where the cluster's configs, state and logs live")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the node (default: this machine's)")
    a = ap.parse_args(argv)
    why = missing()
    if why:
        print(f"error: a SLURM cluster cannot start here: {why}", file=sys.stderr)
        return 2
    cluster = Cluster(a.folder, a.cpus)
    if a.action == "start":
        try:
            cluster.start()
        except (OSError, subprocess.CalledProcessError, TimeoutError) as e:
            cluster.stop()
            print(f"error: {e}; logs in {cluster.root / 'log'}", file=sys.stderr)
            return 2
    else:
        cluster.stop()
        print(f"slurm: stopped the daemons of {cluster.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
