"""Microcontroller runtime (fwdgrad.edge.mcu): the generated C built with arm-none-eabi-gcc for an emulated
Cortex-M3 (mps2-an385), M7 (mps2-an500) and M55 (mps3-an547), run under qemu-system-arm with semihosting;
logits codes, QZO-FF losses and trained weights bit-identical with the numpy runtime, `IntegerLossTrainer` and
the engine in integer mode with the integer loss. Also linker scripts, device fit, tick calibration and
`fwdgrad export --target c`. The QEMU tests skip without the toolchain."""

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
from fwdgrad.ff import intloss as IL
from fwdgrad.ff import qzo_ff
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
    tick = mcu.TICK_INSTRUCTIONS["mps2-an385"]  # 40 on both MPS2 boards
    assert all(c % tick == 0 for c in res.infer_instructions + res.step_instructions)
    assert min(res.step_instructions) > max(res.infer_instructions)


def _check_steps(res, trainer, q, trainable, x, y, batch):
    """Every step's 2m integer losses on the MCU == IntegerLossTrainer's == the engine's (`qzo_ff` with the
    integer closure on `q`, the bundle's settings: lr 1e-2, eps 1e-2, m 2, seed 7): the MCU's weights then
    equal the trainer's bundle and `q`'s weights."""
    opt = qzo_ff(q, 1e-2, 1e-2, 2, 7, trainable=trainable)
    closure = IL.integer_closure(q, lambda: trainable[0])
    for k, losses in enumerate(res.losses):
        xb, yb = x[k * batch : (k + 1) * batch], y[k * batch : (k + 1) * batch]
        c_loss = sum(float(v) / (batch * 2.0**EL.LOSS_BITS) for v in losses) / len(losses)
        assert trainer.step(xb.numpy(), yb.numpy()) == c_loss == opt.step(closure(xb, yb)), k


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
    _check_steps(res, trainer, q, ["_8"], x, y, batch)
    name = bundle.training["tensors"][0]["name"]
    w = trained.arrays[f"{name}.weight"].reshape(-1).astype(np.int64)
    assert list(res.weights) == [0] and np.array_equal(res.weights[0], w)
    assert np.array_equal(q.weight_nodes()[name].weight_q.reshape(-1).numpy(), w)  # the engine's
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
    assert np.array_equal(res.logits, q.run(x[:n], mode="integer").numpy().astype(np.int64))
    assert len(res.losses) == steps
    _check_steps(res, trainer, q, ["layer3_conv2", "fc"], x, y, batch)
    moved = 0
    assert sorted(res.weights) == [0, 1]
    for t, spec in enumerate(bundle.training["tensors"]):
        w = trained.arrays[f"{spec['name']}.weight"].reshape(-1).astype(np.int64)
        assert np.array_equal(res.weights[t], w), spec["name"]
        assert np.array_equal(q.weight_nodes()[spec["name"]].weight_q.reshape(-1).numpy(), w), spec["name"]
        moved += int((w != bundle.arrays[f"{spec['name']}.weight"].reshape(-1)).sum())
    assert moved > 0
    _check_instructions(res, n, steps)
    assert 15_000 < res.model_flash_bytes < 40_000 and res.model_sram_bytes >= 3 * 4 * 28 * 28


# --- Cortex-M55 (mps3-an547), per-board linker scripts, device fit at link time, linker map figures ---


def test_linker_script_per_board_and_device():
    """FLASH / RAM regions: the board's memories (AN547: ITCM 512 KiB at 0x0, DTCM 512 KiB at 0x20000000),
    cut to a device profile's flash / SRAM, with the stack reservation in RAM."""
    an385 = mcu.linker_script("mps2-an385")
    assert (
        "ORIGIN = 0x00000000, LENGTH = 4194304" in an385 and "ORIGIN = 0x20000000, LENGTH = 4194304" in an385
    )
    an547 = mcu.linker_script("mps3-an547", stack_bytes=4096)
    assert "FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 524288" in an547
    assert "RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 524288" in an547 and ". += 4096;" in an547
    m7 = mcu.linker_script("mps2-an385", "mcu_m7")  # 2 MiB flash, 512 KiB SRAM: below the board's 4 MiB
    assert "LENGTH = 2097152" in m7 and "LENGTH = 524288" in m7 and f". += {mcu.STACK_BYTES};" in m7
    assert "(the profile mcu_m7)" in m7
    assert "LENGTH = 524288" in mcu.linker_script("mps3-an547", "mcu_m7")  # the board's ITCM is smaller
    with pytest.raises(
        mcu.MCUError, match="unknown board 'mps2-an999'; known: mps2-an385, mps2-an500, mps3-an547"
    ):
        mcu.linker_script("mps2-an999")
    with pytest.raises(mcu.MCUError, match="needs name, sram_bytes and flash_bytes"):
        mcu.linker_script("mps2-an385", {"name": "half", "sram_bytes": 4096})


def test_device_profile_without_torch_or_hydra():
    """`device_profile` reads fwdgrad/conf/device/<name>.yaml with PyYAML: the same figures as the Hydra
    loader `fwdgrad.analysis.devices.load_device`; an unknown name gives the allowed ones."""
    from fwdgrad.analysis.devices import list_devices, load_device

    for name in list_devices():
        prof, ref = mcu.device_profile(name), load_device(name)
        assert (prof["name"], prof["sram_bytes"], prof["flash_bytes"]) == (
            name,
            ref.sram_bytes,
            ref.flash_bytes,
        )
        assert prof["formats"] == list(ref.formats) and float(prof["macs_per_s"]) == ref.macs_per_s
    with pytest.raises(mcu.MCUError) as err:
        mcu.device_profile("mcu_m0")
    assert str(err.value) == f"unknown device 'mcu_m0'; allowed: {', '.join(list_devices())}"


@needs_qemu
@pytest.mark.parametrize("board", list(mcu.BOARDS))
def test_tick_calibration(tmp_path, board):
    """A spin loop of known instruction count (subs + bne) under -icount shift=0: SysTick ticks once per
    TICK_INSTRUCTIONS[board] guest instructions (25 MHz MPS2: 40, 32 MHz AN547: 31.25)."""
    assert mcu.calibrate(board, tmp_path, 250_000) == pytest.approx(mcu.TICK_INSTRUCTIONS[board], rel=1e-3)


@needs_qemu
def test_small_cnn_on_cortex_m55(tmp_path):
    """The small CNN on the Cortex-M55 (mps3-an547: code in ITCM, data in DTCM): logits codes and QZO-FF
    losses and weights bit-identical with the numpy runtime and IntegerLossTrainer; instruction counts from
    the 32 MHz SysTick."""
    board = "mps3-an547"
    q, x, y = _small_cnn()
    export_bundle(q, tmp_path / "b.npz", ["_8"], eps=1e-2, lr=1e-2, m=2, seed=7)
    bundle, trained = load_bundle(tmp_path / "b.npz"), load_bundle(tmp_path / "b.npz")
    rt, trainer = Runtime(bundle), EL.IntegerLossTrainer(trained)
    n, steps, batch = 16, 2, 8
    codes = rt.quantize_input(x[:n].numpy())
    res = mcu.run_mcu(bundle, tmp_path / board, codes, y[:n].numpy(), steps, batch, board=board)
    assert np.array_equal(res.logits, rt.run(codes).astype(np.int64))
    for k, losses in enumerate(res.losses):
        xb, yb = x[k * batch : (k + 1) * batch].numpy(), y[k * batch : (k + 1) * batch].numpy()
        assert trainer.step(xb, yb) == sum(float(v) / (batch * 2.0**EL.LOSS_BITS) for v in losses) / len(
            losses
        )
    name = bundle.training["tensors"][0]["name"]
    assert np.array_equal(res.weights[0], trained.arrays[f"{name}.weight"].reshape(-1).astype(np.int64))
    assert len(res.infer_instructions) == n and len(res.step_instructions) == steps
    assert min(res.infer_instructions) > 0 and min(res.step_instructions) > max(res.infer_instructions)
    tick = mcu.TICK_INSTRUCTIONS[board]
    assert all(c == mcu.ticks_to_instructions(round(c / tick), board) for c in res.infer_instructions)


@needs_qemu
def test_device_fit_at_link_time(tmp_path):
    """The small CNN fits mcu_m7 (flash and SRAM of the linker map, stack reservation included); a profile
    too small in SRAM, in flash, or both, fails the link with one line naming what needs how much."""
    q, x, _ = _small_cnn()
    export_bundle(q, tmp_path / "b.npz", ["_8"], eps=1e-2, lr=1e-2, m=2, seed=7)
    bundle = load_bundle(tmp_path / "b.npz")
    (tmp_path / "m7").mkdir()
    info = mcu.build(bundle, tmp_path / "m7", x.shape[1:], 8, "mps2-an500", device="mcu_m7")
    mem, objs = info["memory"], info["memory"]["objects"]
    assert (mem["flash_region_bytes"], mem["ram_region_bytes"], mem["stack_bytes"]) == (
        2 << 20,
        512 << 10,
        8192,
    )
    assert (tmp_path / "m7" / "app.map").is_file() and objs["app"]["stack"] == 8192
    assert (
        info["model_flash_bytes"] == objs["model.o"]["flash"]
        and info["sram_bytes_app"] == objs["app"]["sram"]
    )
    assert 0 < info["model_sram_bytes"] < info["sram_bytes_app"] and 10_000 < info["model_flash_bytes"]
    assert info["model_flash_bytes"] < info["flash_bytes_app"] < 2 << 20
    assert info["sram_bytes_app"] + 8192 < 512 << 10
    # the call graph's worst-case stack (gcc -fcallgraph-info=su): well inside the reservation
    assert 100 < mem["stack_static_bytes"] < 8192 and mem["stack_path"][:2] == ["reset_handler", "main"]
    assert "train_step" in mem["stack_path"]
    sram = info["sram_bytes_app"]
    num = r"[\d,]+ B"
    cases = {
        "sram": (
            {"sram_bytes": 4096, "flash_bytes": 1 << 20},
            [("SRAM", "data \\+ bss \\+ 8,192 B stack", 4096)],
        ),
        "flash": (
            {"sram_bytes": 1 << 20, "flash_bytes": 8192},
            [("flash", "code \\+ constants \\+ data", 8192)],
        ),
        "both": (
            {"sram_bytes": 4096, "flash_bytes": 8192},
            [
                ("flash", "code \\+ constants \\+ data", 8192),
                ("SRAM", "data \\+ bss \\+ 8,192 B stack", 4096),
            ],
        ),
    }
    for case, (sizes, parts) in cases.items():
        (tmp_path / case).mkdir()
        with pytest.raises(mcu.MCUError) as err:
            mcu.build(bundle, tmp_path / case, x.shape[1:], 8, "mps2-an385", device={"name": "tiny", **sizes})
        msg = str(err.value)
        want = "; ".join(
            f"{what} needs ({num}) \\({parts_of}\\), the profile tiny has {have:,} B \\(over by ({num})\\)"
            for what, parts_of, have in parts
        )
        m = re.fullmatch(f"model does not fit tiny: {want}", msg)
        assert m and "\n" not in msg, msg
        needs = [int(v.replace(",", "")[:-2]) for v in m.groups()[::2]]
        overs = [int(v.replace(",", "")[:-2]) for v in m.groups()[1::2]]
        assert [n - h for n, (_, _, h) in zip(needs, parts, strict=True)] == overs
        if parts[-1][0] == "SRAM":  # the linked data + bss + stack, to within alignment padding
            assert 0 <= needs[-1] - (sram + 8192) < 16
    # the board's memory binds when the profile is larger: AN547's 512 KiB DTCM
    (tmp_path / "stack").mkdir()
    with pytest.raises(
        mcu.MCUError, match=r"^model does not fit big: SRAM needs .* the board mps3-an547 has 524,288 B"
    ):
        big = {"name": "big", "sram_bytes": 1 << 30, "flash_bytes": 1 << 30}
        mcu.build(bundle, tmp_path / "stack", x.shape[1:], 8, "mps3-an547", device=big, stack_bytes=600_000)
