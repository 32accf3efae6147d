"""C runtime (fwdgrad.edge.cgen): C99 generated from a bundle, built with the host cc, run through ctypes; its
logit codes, integer losses and QZO-FF steps (losses, every trained weight) bit-identical with the numpy edge
runtime and the engine's integer mode."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.data.digits import load_digits_tensors
from fwdgrad.edge import Runtime, load_bundle
from fwdgrad.edge import loss as EL
from fwdgrad.edge.cgen import CExportError, generate_c, plan_arena
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle
from fwdgrad.ff import intloss as IL
from fwdgrad.ff import qzo_ff
from fwdgrad.models import build_model

CC = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
needs_cc = pytest.mark.skipif(CC is None, reason="no host C compiler (cc/gcc/clang) on PATH")
CFLAGS = ["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic", "-fno-strict-aliasing"]


pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _digits(size: int, n: int = 64):
    x, y = load_digits_tensors(size)
    return x[:n], y[:n]


def _export(q, path):
    export_bundle(q, path, None, eps=1e-3, lr=1e-3, m=2, seed=7)
    return load_bundle(path)


def _build(bundle, tmp_path, shape, **kw):
    """Generate, compile as a shared library, load with ctypes; returns (lib, generate_c's info)."""
    info = generate_c(bundle, tmp_path / "c", shape, **kw)
    so = tmp_path / "c" / "libmodel.so"
    res = subprocess.run(
        [CC, *CFLAGS, "-shared", "-fPIC", info["source"], "-o", str(so)], capture_output=True, text=True
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lib = ctypes.CDLL(str(so))
    lib.loss_q.restype = ctypes.c_int64
    lib.loss_q.argtypes = [ctypes.c_void_p, ctypes.c_int32]
    return lib, info


def _c_logits(lib, codes: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((len(codes), classes), np.int32)
    for i in range(len(codes)):
        xi = np.ascontiguousarray(codes[i])
        lib.infer(xi.ctypes.data_as(ctypes.c_void_p), out[i].ctypes.data_as(ctypes.c_void_p))
    return out


def _check(q, x, y, tmp_path, shape):
    """C logits == numpy runtime == engine integer mode; C loss_q == numpy integer loss."""
    bundle = _export(q, tmp_path / "b.npz")
    lib, info = _build(bundle, tmp_path, shape)
    rt = Runtime(bundle)
    codes = rt.quantize_input(x.numpy())
    ref = rt.run(codes).astype(np.int64)
    engine = q.run(x, mode="integer").numpy().astype(np.int64)
    got = _c_logits(lib, codes, ref.shape[1]).astype(np.int64)
    assert np.array_equal(ref, engine)
    assert np.array_equal(got, ref)
    assert len(np.unique(got)) > 5  # a non-degenerate output
    spec = EL.output_spec(bundle.header, bundle.ops)
    losses = [lib.loss_q(np.ascontiguousarray(r, np.int32).ctypes.data, int(t)) for r, t in zip(got, y)]
    assert losses == EL.cross_entropy_q(ref, y.numpy(), spec).tolist()
    return bundle, info


@needs_cc
def test_small_cnn_on_digits(tmp_path):
    """The main job's model type: small_cnn, w16a8, 8x8 digits."""
    torch.manual_seed(0)
    x, y = _digits(8)
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x)
    _, info = _check(q, x, y, tmp_path, (1, 8, 8))
    header = open(info["header"]).read()
    assert "void infer(const model_input_t *input_codes, int32_t *logits_codes);" in header
    # conv0 (16x8x8 bytes) and conv1 (32x4x4) are live together; everything later fits beside them
    assert info["arena_bytes"] == 16 * 64 + 32 * 16 == int(re.search(r"MODEL_ARENA_BYTES (\d+)", header)[1])
    assert "malloc" not in open(info["source"]).read()


@needs_cc
def test_resnet8_on_digits(tmp_path):
    torch.manual_seed(0)
    x, y = _digits(28, 32)
    q = convert(build_model("resnet8", 10, 1, width=0.25), "w16a8", x)
    _, info = _check(q, x, y, tmp_path, (1, 28, 28))
    # three 4x28x28 uint8 buffers live at once (the residual input, conv1's and conv2's outputs)
    assert info["arena_bytes"] == 3 * 4 * 28 * 28


@needs_cc
@pytest.mark.parametrize(
    "kw",
    [
        dict(requant="gemmlowp"),
        dict(acc_bits=22, overflow="wrap"),
        dict(acc_bits=22, overflow="saturate"),
        dict(per_channel=True),
        dict(acc_bits=40),
    ],
    ids=["gemmlowp", "wrap22", "sat22", "per_channel", "acc40"],
)
def test_engine_variants(tmp_path, kw):
    torch.manual_seed(1)
    x, y = torch.randn(32, 1, 8, 8) * 2, torch.randint(0, 10, (32,))
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x, **kw)
    _, info = _check(q, x, y, tmp_path, (1, 8, 8))
    if kw.get("acc_bits") == 22:
        assert q.stats.total > 0  # the narrow accumulator really overflowed
    if kw.get("acc_bits") == 40:  # wide accumulators take requantize's split-multiplier branch
        assert re.search(r"finish\(acc, op\d+_mult\[0\], op\d+_shift\[0\], 1, ", open(info["source"]).read())


class _Zoo(nn.Module):
    """The other CNN ops: grouped and depthwise conv (dilated), LUT activations, max/avg pooling with
    padding, concat, a standalone ReLU (clamp), flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.g = nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=2)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4, stride=2)
        self.act, self.pool, self.avg = (
            nn.Hardswish(),
            nn.MaxPool2d(3, 2, padding=1),
            nn.AvgPool2d(2, padding=1),
        )
        self.fc = nn.Linear(12 * 3 * 3, 5)

    def forward(self, x):
        h = self.act(self.a(x))
        y = torch.cat([self.pool(torch.sigmoid(self.g(h))), self.dw(h)], 1)
        return self.fc(torch.flatten(self.avg(F.relu(y)), 1))


@needs_cc
def test_other_ops(tmp_path):
    torch.manual_seed(2)
    x = torch.randn(24, 2, 8, 8)
    y = torch.randint(0, 5, (24,))
    q = convert(_Zoo().eval(), "w16a8", x)
    bundle, _ = _check(q, x, y, tmp_path, (2, 8, 8))
    kinds = {op["kind"] for op in bundle.ops}
    assert {"lut", "maxpool", "avgpool", "concat", "clamp", "conv2d", "linear"} <= kinds, kinds


class _Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(self.a(x).transpose(2, 3), 1))


def test_unsupported_op_is_a_one_line_error(tmp_path):
    x = torch.randn(8, 1, 6, 6)
    bundle = _export(convert(_Transposed().eval(), "w16a8", x), tmp_path / "b.npz")
    with pytest.raises(CExportError, match=r"unsupported op\(s\) .*\(transpose\)") as err:
        generate_c(bundle, tmp_path / "c", (1, 6, 6))
    assert "\n" not in str(err.value)
    with pytest.raises(CExportError, match="no input shape"):
        generate_c(
            _export(
                convert(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), "w16a8", torch.randn(4, 4)),
                tmp_path / "l.npz",
            ),
            tmp_path / "c",
        )


def test_median_difference_is_a_one_line_error(tmp_path):
    x = torch.randn(8, 1, 6, 6)
    q = convert(nn.Sequential(nn.Flatten(), nn.Linear(36, 3)).eval(), "w16a8", x)
    export_bundle(q, tmp_path / "b.npz", None, eps=1e-3, lr=1e-3, m=4, seed=7, difference="median")
    with pytest.raises(CExportError, match=r"training\.difference='median'.*allowed: 'sign'") as err:
        generate_c(load_bundle(tmp_path / "b.npz"), tmp_path / "c", (1, 6, 6))
    assert "\n" not in str(err.value)


def test_arena_plan_reuses_dead_buffers():
    ops = [
        {"kind": "input", "name": "x", "inputs": []},
        {"kind": "conv2d", "name": "a", "inputs": ["x"]},
        {"kind": "conv2d", "name": "b", "inputs": ["a"]},
        {"kind": "flatten", "name": "f", "inputs": ["b"]},
        {"kind": "conv2d", "name": "c", "inputs": ["f"]},
        {"kind": "linear", "name": "d", "inputs": ["c", "a"]},
    ]
    sizes = {"a": 100, "b": 30, "c": 20, "d": 10}
    offsets, total, root = plan_arena(ops, sizes, "d")
    assert root["f"] == "b"
    # a lives to d; b (aliased by f) to c; c to d; d to the end: b's bytes are free again for d
    assert offsets == {"a": 0, "b": 104, "c": 136, "d": 104} and total == 160


# ------------------------------------------------------------------------------------------- training
def _c_weights(lib, t: int, dtype) -> np.ndarray:
    n = lib.model_weight_count(t)
    ptr = ctypes.cast(lib.model_weights(t), ctypes.POINTER(np.ctypeslib.as_ctypes_type(dtype)))
    return np.ctypeslib.as_array(ptr, (n,)).copy()


def _train_three(tmp_path, q, x, y, trainable, shape, steps=5, batch=8, prefix_samples=32, **kw):
    """`steps` QZO-FF steps with the integer loss in C, in numpy (IntegerLossTrainer) and in the engine
    (qzo_ff + integer_closure): the same losses every step and the same weights at the end."""
    opt_kw = {k: v for k, v in kw.items() if k not in ("masks", "distribution")}
    export_bundle(q, tmp_path / "t.npz", trainable, eps=1e-2, lr=1e-2, m=2, seed=7, **kw)
    lib, info = _build(load_bundle(tmp_path / "t.npz"), tmp_path, shape, prefix_samples=prefix_samples)
    lib.model_weights.restype = ctypes.c_void_p
    lib.train_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    bundle = load_bundle(tmp_path / "t.npz")
    trainer, rt = EL.IntegerLossTrainer(bundle), Runtime(bundle)
    opt = qzo_ff(
        q, 1e-2, 1e-2, 2, 7, trainable=trainable, distribution=kw.get("distribution", "qgaussian"), **opt_kw
    )
    if "masks" in kw:
        opt.space.masks = {i: kw["masks"][n] for i, n in enumerate(opt.space.names)}
    closure = IL.integer_closure(q, lambda: trainable[0])
    start = {t["name"]: bundle.arrays[f"{t['name']}.weight"].copy() for t in bundle.training["tensors"]}
    for k in range(steps):
        xb, yb = x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        codes = np.ascontiguousarray(rt.quantize_input(xb.numpy()))
        labels = yb.numpy().astype(np.int32)
        losses = np.zeros(4, np.int64)
        lib.train_step(codes.ctypes.data, labels.ctypes.data, len(xb), losses.ctypes.data)
        c_loss = sum(float(int(v)) / (len(xb) * 2.0**EL.LOSS_BITS) for v in losses) / len(losses)
        assert trainer.step(xb.numpy(), yb.numpy()) == c_loss == opt.step(closure(xb, yb))
    assert lib.model_step() == steps == bundle.training["step"]
    moved = 0
    for t, spec in enumerate(bundle.training["tensors"]):
        w = bundle.arrays[f"{spec['name']}.weight"]
        assert np.array_equal(_c_weights(lib, t, w.dtype), w.reshape(-1)), spec["name"]
        assert np.array_equal(q.weight_nodes()[spec["name"]].weight_q.numpy(), w), spec["name"]
        moved += int((w != start[spec["name"]]).sum())
    assert moved > 0
    return info


@needs_cc
def test_train_small_cnn_head(tmp_path):
    torch.manual_seed(0)
    x, y = _digits(8)
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x)
    info = _train_three(tmp_path, q, x, y, ["_8"], (1, 8, 8))
    # head weights + their perturbed copy + the prefix store: 32 samples of the head's 32 input codes
    assert info["prefix_bytes"] == 32 * 32
    assert info["sram_bytes"] == info["arena_bytes"] + 2 * 2 * 10 * 32 + info["prefix_bytes"]


@needs_cc
@pytest.mark.parametrize("prefix_samples", [1, 3])
def test_train_prefix_chunks(tmp_path, prefix_samples):
    """A prefix store smaller than the batch (chunks of 1 or 3 of 8 samples) gives the same steps."""
    torch.manual_seed(0)
    x, y = _digits(8)
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x)
    info = _train_three(tmp_path, q, x, y, ["_8"], (1, 8, 8), steps=3, prefix_samples=prefix_samples)
    assert info["prefix_bytes"] == prefix_samples * 32


@needs_cc
def test_train_resnet8_last_layers(tmp_path):
    torch.manual_seed(0)
    x, y = _digits(28, 40)
    q = convert(build_model("resnet8", 10, 1, width=0.25), "w16a8", x)
    _train_three(tmp_path, q, x, y, ["layer3_conv2", "fc"], (1, 28, 28), steps=3)


@needs_cc
@pytest.mark.parametrize(
    "kw",
    [
        dict(rounding="stochastic"),
        dict(rounding="floor", perturb_scale="delta_z", distribution="qrademacher", eps_min_q=300),
        dict(rounding="nearest", sparse=True),
    ],
    ids=["stochastic", "floor-deltaz-rademacher", "sparse"],
)
def test_train_variants(tmp_path, kw):
    torch.manual_seed(3)
    x, y = _digits(8)
    q = convert(build_model("small_cnn", 10, 1), "w16a8", x, per_channel=True)
    if kw.pop("sparse", False):
        g = torch.Generator().manual_seed(1)
        kw["masks"] = {
            n: torch.rand(node.weight_q.shape, generator=g) < 0.3 for n, node in q.weight_nodes().items()
        }
    _train_three(tmp_path, q, x, y, list(q.weight_nodes()), (1, 8, 8), steps=4, **kw)
