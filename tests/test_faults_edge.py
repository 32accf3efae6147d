"""Fault battery for the numpy edge runtime (`python -m fwdgrad.edge`, run as a subprocess on a tiny bundle).

Every bad input (data, bundle, header field, option, output path, full disk) must give exit status 2, exactly
one stderr line naming the value or file, and leave every file as it was (same sha256, no new file). Then:
SIGINT/SIGTERM stop after the step with a checkpoint and the same command resumes bit-identically; kill -9
during checkpoint writes leaves the old or the new bundle, and the next start removes the killed writer's
temp file; a bundle keeps its permission bits and a new one gets 0666 & ~umask; a flipped byte is caught.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fwdgrad.edge import BundleError, load_bundle
from fwdgrad.edge.__main__ import main as edge_main
from fwdgrad.edge.bundle import HEADER_KEY
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle
from fwdgrad.files import TEMP_SUFFIX
from fwdgrad.signals import Interrupted, deferred_signals

N, CLASSES, STEPS = 40, 3, 60  # samples, model classes, the step count the resume tests reach
TRAIN = ["--batch", "8", "--log-every", "1"]
ENV = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """b.npz: conv 1→4 (3×3), ReLU, flatten, linear → 3 classes, on 1×6×6 inputs (shape declared);
    noshape.npz: the same without a declared input shape; d.npz: 40 samples of float x and labels y."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))
    x, y = torch.randn(N, 1, 6, 6, generator=g), torch.randint(0, CLASSES, (N,), generator=g)
    q = convert(model, "w16a8", x)
    d = tmp_path_factory.mktemp("made")
    kw = dict(trainable=None, eps=1e-2, lr=1e-2, m=2, seed=3)
    export_bundle(q, d / "b.npz", input_preprocessing={"shape": [1, 6, 6]}, **kw)
    export_bundle(q, d / "noshape.npz", **kw)
    np.savez(d / "d.npz", x=x.numpy(), y=y.numpy())
    return d


@pytest.fixture
def work(made, tmp_path) -> Path:
    for name in ("b.npz", "noshape.npz", "d.npz"):
        shutil.copy(made / name, tmp_path / name)
    return tmp_path


@pytest.fixture(scope="module")
def reference(made, tmp_path_factory) -> dict[str, np.ndarray]:
    """The arrays of b.npz after an uninterrupted `finetune --steps STEPS`."""
    path = tmp_path_factory.mktemp("reference") / "b.npz"
    shutil.copy(made / "b.npz", path)
    assert edge_main(["finetune", str(path), str(made / "d.npz"), "--steps", str(STEPS), *TRAIN]) == 0
    bundle = load_bundle(path)
    assert bundle.training["step"] == STEPS
    return bundle.arrays


def edge(cwd: Path, *argv: str, preexec_fn=None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fwdgrad.edge", *argv],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
        **kw,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{TEMP_SUFFIX}"))


# ---------------------------------------------------------------------------------------- bad inputs
def data(w: Path, name: str = "bad.npz", **arrays) -> str:
    """d.npz with arrays replaced (None: dropped), written as `name`."""
    with np.load(w / "d.npz") as d:
        out = {"x": d["x"], "y": d["y"]} | arrays
    np.savez(w / name, **{k: v for k, v in out.items() if v is not None})
    return name


def x_with(w: Path, value) -> np.ndarray:
    with np.load(w / "d.npz") as d:
        x = d["x"].copy()
    x[3, 0, 2, 2] = value
    return x


def header(w: Path, edit, name: str = "bad.npz") -> str:
    """b.npz with `edit(header, arrays)` applied, written by np.savez (zip CRCs consistent)."""
    with np.load(w / "b.npz") as npz:
        arrays = {k: npz[k] for k in npz.files}
    h = json.loads(arrays.pop(HEADER_KEY).item())
    edit(h, arrays)
    np.savez(w / name, **{HEADER_KEY: np.array(json.dumps(h))}, **arrays)
    return name


def training(key: str, value):
    def edit(h, arrays):
        if value is None:
            del h["training"][key]
        else:
            h["training"][key] = value

    return edit


def flip(w: Path, member: str) -> str:
    """b.npz with one byte flipped in the middle of `member`'s stored data, as bad.npz."""
    raw = bytearray((w / "b.npz").read_bytes())
    with zipfile.ZipFile(w / "b.npz") as zf:
        info = zf.getinfo(member)
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0xFF
    (w / "bad.npz").write_bytes(bytes(raw))
    return "bad.npz"


def put(w: Path, name: str, content: str | bytes | None) -> str:
    """A file `name` holding `content` (None: a folder) in the work folder; returns `name`."""
    if content is None:
        (w / name).mkdir()
    else:
        (w / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return name


def disk_full():
    """preexec_fn: files of at most 4 KiB (the bundle has 18), writes past it fail with EFBIG."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def finetune(bundle: str, dat: str = "d.npz", *extra: str) -> list[str]:
    return ["finetune", bundle, dat, "--steps", "2", "--batch", "8", *extra]


# (id, setup(work folder) -> argv or (argv, preexec_fn), substrings of the one stderr line)
CASES = [
    (
        "data-nan",
        lambda w: finetune("b.npz", data(w, x=x_with(w, np.nan))),
        ["bad.npz", "non-finite", "index 3"],
    ),
    ("data-inf", lambda w: finetune("b.npz", data(w, x=x_with(w, -np.inf))), ["bad.npz", "NaN/Inf"]),
    (
        "eval-data-nan",
        lambda w: finetune("b.npz", "d.npz", "--eval", data(w, x=x_with(w, np.nan))),
        ["bad.npz", "non-finite"],
    ),
    (
        "eval-command-nan",
        lambda w: ["eval", "b.npz", data(w, x=x_with(w, np.inf))],
        ["bad.npz", "non-finite"],
    ),
    (
        "data-shape",
        lambda w: finetune("b.npz", data(w, x=np.zeros((N, 1, 5, 5), np.float32))),
        ["bad.npz", "[1, 5, 5]", "[1, 6, 6]"],
    ),
    (
        "data-shape-undeclared",
        lambda w: finetune("noshape.npz", data(w, x=np.zeros((N, 2, 6, 6), np.float32))),
        ["bad.npz", "[2, 6, 6]", "does not run through"],
    ),
    (
        "data-integer-codes-out-of-format",
        lambda w: finetune("b.npz", data(w, x=np.full((N, 1, 6, 6), 999, np.int32))),
        ["bad.npz", "999", "input format"],
    ),
    ("data-x-strings", lambda w: finetune("b.npz", data(w, x=np.array(["a"] * N))), ["bad.npz", "dtype <U1"]),
    (
        "labels-too-high",
        lambda w: finetune("b.npz", data(w, y=np.arange(N) % 4)),
        ["bad.npz", "0..3", "0..2"],
    ),
    ("labels-negative", lambda w: finetune("b.npz", data(w, y=-np.ones(N, int))), ["bad.npz", "-1..-1"]),
    ("labels-float", lambda w: finetune("b.npz", data(w, y=np.zeros(N))), ["bad.npz", "float64"]),
    ("data-no-y", lambda w: finetune("b.npz", data(w, y=None)), ["bad.npz", "['y']"]),
    ("data-lengths", lambda w: finetune("b.npz", data(w, y=np.zeros(N - 1, int))), ["bad.npz", "[39]"]),
    ("data-missing-file", lambda w: finetune("b.npz", "nope.npz"), ["nope.npz", "No such file"]),
    ("data-not-npz", lambda w: finetune("b.npz", put(w, "t.npz", "x,y\n1,2\n")), ["t.npz", "not an .npz"]),
    (
        "data-pickled",
        lambda w: finetune("b.npz", data(w, x=np.array([None] * N, dtype=object))),
        ["bad.npz", "Object arrays cannot be loaded"],
    ),
    ("data-is-bundle", lambda w: finetune("b.npz", "b.npz"), ["b.npz", "lacks array(s) ['x', 'y']"]),
    ("bundle-missing", lambda w: finetune("nope.npz"), ["cannot read bundle 'nope.npz'", "No such file"]),
    ("bundle-folder", lambda w: finetune(put(w, "sub", None)), ["'sub'", "Is a directory"]),
    ("bundle-text", lambda w: finetune(put(w, "t.npz", "hello")), ["t.npz", "no zip"]),
    ("bundle-is-data", lambda w: finetune("d.npz"), ["d.npz", "no '__header__'"]),
    (
        "bundle-truncated",
        lambda w: finetune(put(w, "t.npz", (w / "b.npz").read_bytes()[:9000])),
        ["t.npz", "truncated or corrupt"],
    ),
    ("bundle-flip-header", lambda w: finetune(flip(w, HEADER_KEY + ".npy")), ["bad.npz", "corrupt", "CRC"]),
    ("bundle-flip-array", lambda w: finetune(flip(w, "_3.weight.npy")), ["bad.npz", "corrupt", "CRC"]),
    (
        "bundle-checksum",
        lambda w: finetune(header(w, lambda h, a: a["_3.weight"].__setitem__((0, 0), 7))),
        ["bad.npz", "checksum mismatch"],
    ),
    (
        "bundle-no-checksum",
        lambda w: finetune(header(w, lambda h, a: h.pop("arrays_sha256"))),
        ["bad.npz", "'arrays_sha256'", "1.1"],
    ),
    ("header-no-m", lambda w: finetune(header(w, training("m", None))), ["bad.npz", "training.m"]),
    ("header-m-negative", lambda w: finetune(header(w, training("m", -3))), ["bad.npz", "training.m is -3"]),
    ("header-m-zero", lambda w: finetune(header(w, training("m", 0))), ["bad.npz", "training.m is 0"]),
    ("header-m-float", lambda w: finetune(header(w, training("m", 2.5))), ["bad.npz", "training.m is 2.5"]),
    ("header-lr-zero", lambda w: finetune(header(w, training("lr", 0))), ["bad.npz", "training.lr is 0"]),
    ("header-lr-negative", lambda w: finetune(header(w, training("lr", -0.1))), ["bad.npz", "training.lr"]),
    (
        "header-lr-nan",
        lambda w: finetune(header(w, training("lr", float("nan")))),
        ["bad.npz", "training.lr"],
    ),
    ("header-eps-zero", lambda w: finetune(header(w, training("eps", 0.0))), ["bad.npz", "training.eps"]),
    (
        "header-step-negative",
        lambda w: finetune(header(w, training("step", -1))),
        ["bad.npz", "training.step"],
    ),
    (
        "header-rounding",
        lambda w: finetune(header(w, training("rounding", "up"))),
        ["bad.npz", "training.rounding is 'up'"],
    ),
    (
        "header-no-requant",
        lambda w: finetune(header(w, lambda h, a: h["engine"].pop("requant"))),
        ["bad.npz", "engine.requant"],
    ),
    (
        "header-no-op-attr",
        lambda w: finetune(header(w, lambda h, a: h["ops"][1]["attrs"].pop("stride"))),
        ["bad.npz", "ops[1].attrs.stride"],
    ),
    (
        "header-dangling-input",
        lambda w: finetune(header(w, lambda h, a: h["ops"][2].__setitem__("inputs", ["nope"]))),
        ["bad.npz", "['nope']"],
    ),
    (
        "batch-larger-than-data",
        lambda w: finetune("b.npz", "d.npz", "--batch", "41"),
        ["--batch 41", "1..40"],
    ),
    ("steps-zero", lambda w: ["finetune", "b.npz", "d.npz", "--steps", "0"], ["--steps", "'0'"]),
    ("steps-text", lambda w: ["finetune", "b.npz", "d.npz", "--steps", "ten"], ["--steps", "'ten'"]),
    ("no-command", lambda w: [], ["command"]),
    (
        "output-in-a-file",
        lambda w: finetune("b.npz", "d.npz", "--output", "d.npz/o.npz"),
        ["Not a directory"],
    ),
    ("output-folder-missing", lambda w: finetune("b.npz", "d.npz", "--output", "no/o.npz"), ["'no/o.npz'"]),
    ("output-is-a-folder", lambda w: finetune("b.npz", "d.npz", "--output", put(w, "o", None)), ["'o'"]),
    ("disk-full", lambda w: (finetune("b.npz"), disk_full), ["'b.npz'", "File too large", "unchanged"]),
]


@pytest.mark.parametrize("setup,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_one_line_exit_2_nothing_changed(work, setup, expected):
    argv = setup(work)
    argv, preexec_fn = argv if isinstance(argv, tuple) else (argv, None)
    before = snapshot(work)
    res = edge(work, *argv, preexec_fn=preexec_fn)
    assert res.returncode == 2, res.stderr + res.stdout
    assert len(res.stderr.splitlines()) == 1, res.stderr
    line = res.stderr.strip()
    assert line.startswith("python -m fwdgrad.edge") and ": error: " in line, line
    assert all(s in line for s in expected), (line, expected)
    assert snapshot(work) == before  # same bytes, no new file, no temp file left


def test_flipped_byte_anywhere_is_caught_or_harmless(made, tmp_path):
    """A flip inside the header or any array's data is a one-line BundleError naming the file; a flip in
    zip bookkeeping that is never read (e.g. a timestamp) may load, but then with identical content."""
    raw = (made / "b.npz").read_bytes()
    ref = load_bundle(made / "b.npz")
    with zipfile.ZipFile(made / "b.npz") as zf:
        members = [(i.header_offset, i.compress_size) for i in zf.infolist()]
    data_start = [o + 30 + sum(struct.unpack("<HH", raw[o + 26 : o + 30])) for o, _ in members]
    inside = {p for s, (_, n) in zip(data_start, members) for p in range(s, s + n)}
    bad, rejected = tmp_path / "flip.npz", 0
    for pos in range(0, len(raw), 37):
        damaged = bytearray(raw)
        damaged[pos] ^= 0xFF
        bad.write_bytes(bytes(damaged))
        try:
            b = load_bundle(bad)
        except BundleError as err:
            assert str(bad) in str(err) and "\n" not in str(err)
            rejected += 1
            continue
        assert pos not in inside, f"a flip at {pos}, inside a member's data, was not caught"
        assert b.header == ref.header and all(np.array_equal(b.arrays[k], v) for k, v in ref.arrays.items())
    assert rejected > 0.9 * len(range(0, len(raw), 37))


def test_version_1_0_without_checksum_loads_and_is_upgraded(work):
    def old(h, arrays):
        h["version"] = "1.0"
        del h["arrays_sha256"]

    name = header(work, old, "old.npz")
    assert "arrays_sha256" not in load_bundle(work / name).header  # predates checksums: accepted unchecked
    res = edge(work, *finetune(name))
    assert res.returncode == 0, res.stderr
    saved = load_bundle(work / name).header
    assert saved["version"] == "1.1" and len(saved["arrays_sha256"]) == 64


# ---------------------------------------------------------------------------------- signals and kills
def start(work: Path, bundle: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fwdgrad.edge",
            "finetune",
            bundle,
            "d.npz",
            "--steps",
            str(STEPS),
            *TRAIN,
            *extra,
        ],
        cwd=work,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )


def wait_for_step(p: subprocess.Popen, step: int) -> None:
    for line in p.stdout:
        if line.startswith(f"step {step}/"):
            return
    raise AssertionError(f"the run ended before step {step}: {p.stderr.read()}")


def same_arrays(path: Path, ref: dict[str, np.ndarray]) -> bool:
    b = load_bundle(path)
    return b.training["step"] == STEPS and all(np.array_equal(b.arrays[k], v) for k, v in ref.items())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_and_the_same_command_resumes(work, reference, sig):
    p = start(work, "b.npz", "--checkpoint-every", "20")
    wait_for_step(p, 3)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, err
    step = load_bundle(work / "b.npz").training["step"]
    assert 3 <= step < STEPS and f"saved step {step} -> b.npz" in out
    assert err.splitlines() == [
        f"python -m fwdgrad.edge: stopped by {sig.name} at step {step} (saved to 'b.npz'); to resume, "
        "run the same command again"
    ]
    assert not temps(work)
    res = edge(work, "finetune", "b.npz", "d.npz", "--steps", str(STEPS), *TRAIN, "--checkpoint-every", "20")
    assert res.returncode == 0 and f"resuming at step {step}" in res.stdout, res.stderr
    assert same_arrays(work / "b.npz", reference)


def test_second_signal_aborts_at_once(work):
    p = start(work, "b.npz", "--checkpoint-every", "1")
    wait_for_step(p, 2)
    p.send_signal(signal.SIGINT)
    time.sleep(0.005)
    p.send_signal(signal.SIGINT)  # aborts, or finds the run already stopped by the first
    _, err = p.communicate(timeout=60)
    # 130; or -2 (killed by the second SIGINT after the handlers were restored, which a shell reports as 130)
    assert p.returncode in (130, -signal.SIGINT) and len(err.splitlines()) == 1 and "by SIGINT" in err, err
    assert 1 <= load_bundle(work / "b.npz").training["step"] < STEPS and not temps(work)  # the last save


def test_deferred_signals_record_the_first_and_raise_on_the_second():
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers can be set only in the main thread")
    with deferred_signals() as got:
        os.kill(os.getpid(), signal.SIGTERM)  # recorded: the loop stops after its step
        assert got == [signal.SIGTERM]
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)  # the second one stops at once
    assert info.value.signum == signal.SIGTERM and info.value.exit_code == 143


def test_kill_9_during_checkpoint_writes(work, reference):
    """Checkpoints every step, killed at random times: the bundle is always the old or the new one, the
    killed writer's temp file goes on the next start, and resuming still ends bit-identical."""
    rnd, steps, killed = random.Random(0), [0], None
    for _ in range(4):
        p = start(work, "b.npz", "--checkpoint-every", "1")
        p.stdout.readline()  # in the training loop (a step line, or "resuming at step k")
        time.sleep(rnd.uniform(0, 0.05))  # a few steps, each one a checkpoint write
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        p.stdout.close(), p.stderr.close()
        assert [t.name for t in temps(work)] in ([], [f".b.npz.{p.pid}{TEMP_SUFFIX}"])
        steps.append(load_bundle(work / "b.npz").training["step"])  # loadable: the old or the new file
        assert steps[-1] >= steps[-2]
        killed = p.pid
    if not temps(work):  # no kill hit a write: leave what one would have left
        (work / f".b.npz.{killed}{TEMP_SUFFIX}").write_bytes(b"PK\x03\x04 half a bundle")
    assert steps[-1] < STEPS
    res = edge(work, "finetune", "b.npz", "d.npz", "--steps", str(STEPS), *TRAIN)
    assert res.returncode == 0, res.stderr
    assert not temps(work)
    assert same_arrays(work / "b.npz", reference)


# ------------------------------------------------------------------------------------------ file modes
def test_bundle_keeps_its_mode(work):
    os.chmod(work / "b.npz", 0o640)
    assert edge(work, *finetune("b.npz")).returncode == 0
    assert os.stat(work / "b.npz").st_mode & 0o7777 == 0o640
    assert load_bundle(work / "b.npz").training["step"] == 2


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)], ids=["umask022", "umask027"])
def test_new_output_gets_umask_mode(work, umask, mode):
    res = edge(work, *finetune("b.npz", "d.npz", "--output", "new.npz"), preexec_fn=lambda: os.umask(umask))
    assert res.returncode == 0, res.stderr
    assert os.stat(work / "new.npz").st_mode & 0o7777 == mode
