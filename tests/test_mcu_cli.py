"""`python -m fwdgrad.edge mcu`: QZO-FF fine-tuning in the C runtime on an emulated Cortex-M, the batches
streamed in over semihosting. It leaves the bundle exactly as `finetune --loss integer` (the numpy runtime)
does, resumes from the bundle's step, and rejects bad input in one line without writing anything. Skips
without the arm toolchain / QEMU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fwdgrad.data.digits import load_digits_tensors
from fwdgrad.edge import load_bundle, mcu
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle
from fwdgrad.models import build_model

REASON = mcu.unavailable()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"Cortex-M toolchain missing: {REASON}"),
    pytest.mark.usefixtures("one_blas_thread"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small_cnn bundle (head trainable, m = 2) and digits train/test sets of 8x8 images."""
    d = tmp_path_factory.mktemp("mcu_cli")
    torch.manual_seed(0)
    x, y = load_digits_tensors(8)
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x[:64])
    export_bundle(q, d / "b.npz", ["_8"], eps=1e-2, lr=5e-2, m=2, seed=7)
    np.savez(d / "train.npz", x=x[:120].numpy(), y=y[:120].numpy())
    np.savez(d / "test.npz", x=x[120:160].numpy(), y=y[120:160].numpy())
    return d


def edge(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fwdgrad.edge", *map(str, args)], cwd=cwd, capture_output=True, text=True
    )


def test_mcu_equals_numpy_finetune_and_resumes(files, tmp_path):
    """3 steps, then resumed to 5, on the MCU == 5 steps of `finetune --loss integer`: every array and the
    step counter; the summary JSON holds the losses, accuracy before/after and the memory figures."""
    common = ["train.npz", "--batch", "16", "--log-every", "1"]
    mcu_out, np_out = tmp_path / "mcu.npz", tmp_path / "np.npz"
    r = edge("mcu", "b.npz", *common, "--steps", 3, "--output", mcu_out, "--eval", "test.npz", cwd=files)
    assert r.returncode == 0, r.stderr
    assert "step 3/3" in r.stdout and "eval accuracy after" in r.stdout
    summary = tmp_path / "s.json"
    r = edge("mcu", mcu_out, *common, "--steps", 5, "--device", "mcu_m7", "--json", summary, cwd=files)
    assert r.returncode == 0, r.stderr
    assert "resuming at step 3" in r.stdout and "fits mcu_m7" in r.stdout
    s = json.loads(summary.read_text())
    assert s["steps"] == [3, 5] and len(s["losses"]) == 2 and s["instructions"]["train_step_median"] > 0
    assert s["memory"]["device"]["name"] == "mcu_m7"
    r = edge("finetune", "b.npz", *common, "--steps", 5, "--loss", "integer", "--output", np_out, cwd=files)
    assert r.returncode == 0, r.stderr
    a, b, start = load_bundle(mcu_out), load_bundle(np_out), load_bundle(files / "b.npz")
    assert a.training["step"] == b.training["step"] == 5
    assert all(np.array_equal(a.arrays[k], b.arrays[k]) for k in b.arrays)
    assert not np.array_equal(a.arrays["_8.weight"], start.arrays["_8.weight"])  # it trained


@pytest.mark.parametrize(
    "args, message",
    [
        (["--board", "mps9"], "argument --board: invalid choice: 'mps9'"),
        (["--device", "toaster"], "unknown device 'toaster'; allowed: "),
        (["--batch", "500"], "--batch 500 is larger than the 120 samples"),
        (["--json", "no/such/dir/s.json"], "cannot write summary 'no/such/dir/s.json': No such file"),
    ],
    ids=["board", "device", "batch", "json"],
)
def test_mcu_bad_input(files, tmp_path, args, message):
    """One line on stderr, exit 2, nothing written."""
    out = tmp_path / "out.npz"
    r = edge("mcu", "b.npz", "train.npz", "--steps", "2", "--output", out, *args, cwd=files)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists()


def test_mcu_does_not_fit(files, tmp_path):
    """A model too large for the device profile fails at link time, in one line, before any training."""
    bundle = load_bundle(files / "b.npz")
    with pytest.raises(mcu.MCUError) as err:
        mcu.build(
            bundle,
            tmp_path,
            (1, 8, 8),
            16,
            device={"name": "tiny", "sram_bytes": 2048, "flash_bytes": 1 << 20},
        )
    assert str(err.value).startswith("model does not fit tiny: SRAM needs ") and "\n" not in str(err.value)
