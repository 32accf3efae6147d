"""The built wheel works installed: it ships the Hydra configs (fwdgrad/conf/) and nothing else but the
package, and its `fwdgrad` console script prints the config and runs a 5-step experiment from a directory
outside the checkout. The wheel goes into a fresh venv with --no-deps; the dependencies (torch, hydra, ...)
come from the project venv through a .pth file, which is appended after the new venv's site-packages (and
whose own .pth files, among them the editable install of fwdgrad, are not processed), so the wheel's
fwdgrad is the one imported."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = shutil.which("uv")
CONF_FILES = tuple(
    f"fwdgrad/conf/{f}.yaml"
    for f in (
        "config",
        "method/qzo_ff",
        "experiment/main",
        "data/digits",
        "model/small_cnn",
        "quant/w16a8",
        "mode/lp",
        "hydra/launcher/local",
    )
)


def sh(cmd, timeout, **kw):
    """Run cmd; on a non-zero exit fail with its output."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{cmd} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p.stdout


@pytest.mark.skipif(UV is None, reason="uv is not on PATH (needed to build and install the wheel)")
def test_wheel_installs_and_runs(tmp_path):
    assert not tmp_path.resolve().is_relative_to(ROOT), "the installed run must happen outside the checkout"
    # 1. build
    sh([UV, "build", "--wheel", "--out-dir", tmp_path / "dist", ROOT], timeout=600, cwd=ROOT)
    (wheel,) = (tmp_path / "dist").glob("fwdgrad-*.whl")

    # 2. contents: the package with its configs, no tests, no venv, no caches
    names = zipfile.ZipFile(wheel).namelist()
    missing = [n for n in CONF_FILES if n not in names]
    assert not missing, f"wheel lacks {missing}"
    assert "fwdgrad/conf/__init__.py" in names
    top = {n.split("/")[0] for n in names}
    assert top == {"fwdgrad", wheel.name.split("-py")[0] + ".dist-info"}, top
    stray = [n for n in names if "__pycache__" in n or n.endswith(".pyc") or ".venv" in n or "tests/" in n]
    assert not stray, stray

    # 3. a fresh venv with the wheel (no deps); the project venv's site-packages appended via a .pth
    venv = tmp_path / "venv"
    sh([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    py = venv / "bin" / "python"
    sh([UV, "pip", "install", "--no-deps", "--python", py, wheel], timeout=300)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(sh([py, "-c", purelib], timeout=60).strip())
    deps = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))  # this (project) venv
    (site / "_fwdgrad_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))

    work = tmp_path / "work"
    (work / "home").mkdir(parents=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FWDGRAD_", "PYTHON", "HYDRA_", "_FWDGRAD")) and k != "VIRTUAL_ENV"
    }
    env |= {"HOME": str(work / "home"), "OMP_NUM_THREADS": "1"}
    where = sh(
        [py, "-c", "import fwdgrad, hydra, torch; print(fwdgrad.__file__)"], timeout=120, cwd=work, env=env
    )
    assert Path(where.strip()).resolve().is_relative_to(venv.resolve()), f"imported {where.strip()}"

    # 4. the installed console script, from outside the checkout
    fwdgrad = venv / "bin" / "fwdgrad"
    cfg = sh([fwdgrad, "run", "--cfg", "job"], timeout=120, cwd=work, env=env)
    assert "method:" in cfg and "name: qzo_ff" in cfg, cfg

    out = tmp_path / "out"
    sh(
        [
            fwdgrad,
            "run",
            "train.steps=5",
            "train.eval_every=5",
            "pretrain.steps=5",
            "progress=false",
            f"cache_dir={tmp_path / 'cache'}",
            f"out_dir={out}",
        ],
        timeout=600,
        cwd=work,
        env=env,
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 5, metrics["steps"]
