"""Microcontroller runtime, phase 2 (fwdgrad.edge.mcu): the generated C built with arm-none-eabi-gcc for an
emulated Cortex-M3 (mps2-an385) and Cortex-M7 (mps2-an500), run under qemu-system-arm with semihosting;
logits codes, QZO-FF losses and trained weights bit-identical with the numpy runtime and
`IntegerLossTrainer`. Also `fwdgrad export --target c`. The QEMU tests skip without the toolchain."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from fwdgrad.data.digits import load_digits_tensors
from fwdgrad.edge import Runtime, load_bundle, mcu
from fwdgrad.edge import loss as EL
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle, export_main, save_model
from fwdgrad.models import build_model

REASON = mcu.unavailable()
needs_qemu = pytest.mark.skipif(REASON is not None, reason=REASON or "")

pytestmark = pytest.mark.usefixtures("one_blas_thread")


def _small_cnn():
    torch.manual_seed(0)
    x, y = load_digits_tensors(8)
    x, y = x[:64], y[:64]
    return convert(build_model("small_cnn", 10, 1), "w16a8", x), x, y


def _check_instructions(res, n, steps):
    """QEMU's instruction counts (-icount, SysTick): one per infer / train_step call; a step (2m perturbed
    forwards of a batch) executes more than one inference."""
    assert len(res.infer_instructions) == n and len(res.step_instructions) == steps
    assert min(res.infer_instructions) > 0
    assert all(c % mcu.TICK_INSTRUCTIONS == 0 for c in res.infer_instructions + res.step_instructions)
    assert min(res.step_instructions) > max(res.infer_instructions)


@needs_qemu
@pytest.mark.parametrize("board", ["mps2-an385", "mps2-an500"])
def test_small_cnn_on_cortex_m(tmp_path, board):
    """Inference on 40 digits, then 5 QZO-FF steps (batch 8, head trained) in one QEMU run."""
    q, x, y = _small_cnn()
    export_bundle(q, tmp_path / "b.npz", ["_8"], eps=1e-2, lr=1e-2, m=2, seed=7)
    bundle = load_bundle(tmp_path / "b.npz")
    trained = load_bundle(tmp_path / "b.npz")  # IntegerLossTrainer updates its bundle's arrays
    rt, trainer = Runtime(bundle), EL.IntegerLossTrainer(trained)
    n, steps, batch = 40, 5, 8
    codes = rt.quantize_input(x[:n].numpy())
    res = mcu.run_mcu(bundle, tmp_path / board, codes, y[:n].numpy(), steps, batch, board=board)
    ref = rt.run(codes).astype(np.int64)
    assert np.array_equal(res.logits, ref)
    assert np.array_equal(ref, q.run(x[:n], mode="integer").numpy().astype(np.int64))
    assert len(np.unique(res.logits)) > 5
    assert len(res.losses) == steps
    for k, losses in enumerate(res.losses):
        xb, yb = x[k * batch : (k + 1) * batch].numpy(), y[k * batch : (k + 1) * batch].numpy()
        c_loss = sum(float(v) / (batch * 2.0**EL.LOSS_BITS) for v in losses) / len(losses)
        assert trainer.step(xb, yb) == c_loss
    name = bundle.training["tensors"][0]["name"]
    w = trained.arrays[f"{name}.weight"].reshape(-1).astype(np.int64)
    assert list(res.weights) == [0] and np.array_equal(res.weights[0], w)
    assert not np.array_equal(w, bundle.arrays[f"{name}.weight"].reshape(-1))  # the steps moved weights
    # model.o: code + const arrays in flash; arena + head weights and their perturbed copy in SRAM
    assert res.model_sram_bytes >= 1536 + 2 * 2 * 10 * 32
    assert 10_000 < res.model_flash_bytes < 32_000 and res.flash_bytes > res.model_flash_bytes
    _check_instructions(res, n, steps)


def test_unavailable_reason_is_one_line(monkeypatch):
    monkeypatch.setattr(mcu.shutil, "which", lambda _t: None)
    reason = mcu.unavailable()
    assert reason and "\n" not in reason and "arm-none-eabi-gcc" in reason
    with pytest.raises(mcu.MCUError, match="no arm-none-eabi-gcc"):
        mcu.build(None, "unused", np.zeros((1, 4), np.uint8))


def test_export_target_c(tmp_path, capsys):
    q, x, _ = _small_cnn()
    save_model(
        tmp_path / "q.pt", q, {"_target_": "fwdgrad.models.build_model", "name": "small_cnn"}, 10, x.shape[1:]
    )
    argv = ["--lr", "1e-4", "--m", "1", "--trainable", "_8", "--target", "c"]
    assert export_main([str(tmp_path / "q.pt"), str(tmp_path / "c"), *argv]) == 0
    out = capsys.readouterr().out
    assert re.search(r"model\.h and .*model\.c: arena 1536 B", out), out
    header = (tmp_path / "c" / "model.h").read_text()
    assert "void train_step(" in header and "#define MODEL_M 1" in header
    assert load_bundle(tmp_path / "c" / "model.npz").training["trainable"] == ["_8"]
    # the default target stays the numpy bundle alone
    assert export_main([str(tmp_path / "q.pt"), str(tmp_path / "b.npz"), "--lr", "1e-4"]) == 0
    assert (tmp_path / "b.npz").is_file() and not (tmp_path / "model.h").exists()


def test_export_target_c_unsupported_op(tmp_path, capsys, monkeypatch):
    from fwdgrad.edge import cgen

    monkeypatch.setattr(cgen, "SUPPORTED", tuple(k for k in cgen.SUPPORTED if k != "linear"))
    q, x, _ = _small_cnn()
    save_model(
        tmp_path / "q.pt", q, {"_target_": "fwdgrad.models.build_model", "name": "small_cnn"}, 10, x.shape[1:]
    )
    assert export_main([str(tmp_path / "q.pt"), str(tmp_path / "c"), "--lr", "1e-4", "--target", "c"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fwdgrad export: error: cannot export to C: unsupported op(s)") and "\n" not in err
    assert "(linear)" in err
    assert not (tmp_path / "c" / "model.npz").exists() and not (tmp_path / "c" / "model.c").exists()


@needs_qemu
@pytest.mark.parametrize("board", ["mps2-an385", "mps2-an500"])
def test_resnet8_on_cortex_m(tmp_path, board):
    """ResNet-8 (width 0.25, 28x28 digits, layer3_conv2 + fc trained): inference on 20 digits, then 5 QZO-FF
    steps of batch 4 in one QEMU run, bit-identical with the numpy runtime and IntegerLossTrainer."""
    torch.manual_seed(0)
    x, y = load_digits_tensors(28)
    x, y = x[:32], y[:32]
    q = convert(build_model("resnet8", 10, 1, width=0.25), "w16a8", x)
    export_bundle(q, tmp_path / "b.npz", ["layer3_conv2", "fc"], eps=1e-2, lr=1e-2, m=2, seed=7)
    bundle, trained = load_bundle(tmp_path / "b.npz"), load_bundle(tmp_path / "b.npz")
    rt, trainer = Runtime(bundle), EL.IntegerLossTrainer(trained)
    n, steps, batch = 20, 5, 4
    codes = rt.quantize_input(x[:n].numpy())
    res = mcu.run_mcu(bundle, tmp_path / board, codes, y[:n].numpy(), steps, batch, board=board, timeout=80)
    assert np.array_equal(res.logits, rt.run(codes).astype(np.int64))
    assert len(res.losses) == steps
    for k, losses in enumerate(res.losses):
        xb, yb = x[k * batch : (k + 1) * batch].numpy(), y[k * batch : (k + 1) * batch].numpy()
        c_loss = sum(float(v) / (batch * 2.0**EL.LOSS_BITS) for v in losses) / len(losses)
        assert trainer.step(xb, yb) == c_loss
    moved = 0
    assert sorted(res.weights) == [0, 1]
    for t, spec in enumerate(bundle.training["tensors"]):
        w = trained.arrays[f"{spec['name']}.weight"].reshape(-1).astype(np.int64)
        assert np.array_equal(res.weights[t], w), spec["name"]
        moved += int((w != bundle.arrays[f"{spec['name']}.weight"].reshape(-1)).sum())
    assert moved > 0
    _check_instructions(res, n, steps)
    assert 15_000 < res.model_flash_bytes < 40_000 and res.model_sram_bytes >= 3 * 4 * 28 * 28
