import pytest
from torch import nn

from fwdgrad.analysis.devices import (
    DeviceDoesNotFit,
    DeviceProfile,
    UnsupportedFormat,
    assert_fits,
    check_fit,
    count_macs,
    list_devices,
    load_device,
)
from fwdgrad.analysis.memory import memory_breakdown
from fwdgrad.models import build_model


def test_profiles_load():
    assert {"mcu_m7", "dsp", "npu", "rpi4"} <= set(list_devices())
    for name in list_devices():
        d = load_device(name)
        assert isinstance(d, DeviceProfile) and d.name == name
        assert d.sram_bytes > 0 and d.flash_bytes > 0 and d.macs_per_s > 0 and d.formats
    mcu = load_device("mcu_m7")
    assert mcu.sram_bytes == 512 * 1024 and "w8a8" in mcu.formats and mcu.accumulator_bits == 32


def test_unknown_and_malformed_profiles(tmp_path):
    with pytest.raises(ValueError, match=r"'tpu'.*mcu_m7"):
        load_device("tpu")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nsram_bytes: 1\nformats: [int3]\n")
    with pytest.raises(ValueError, match="missing fields"):
        load_device(bad)
    mapping = {"name": "x", "sram_bytes": 1, "flash_bytes": 2, "formats": ["w8a8"], "accumulator_bits": 32}
    assert load_device(mapping | {"macs_per_s": 1e6}).flash_bytes == 2
    with pytest.raises(ValueError, match=r"unknown formats \['int3'\]"):
        load_device(mapping | {"macs_per_s": 1e6, "formats": ["int3"]})


def test_tiny_configuration_fits_mcu():
    b = memory_breakdown(build_model("small_cnn", 10, 1), (1, 1, 8, 8), "ff", "sparse", "w16a8", m=3)
    report = assert_fits("mcu_m7", b)
    assert report.fits and report.passes_per_step == 6
    assert (
        report.sram_needed == b.total - b.weights + b.trainable_weights and report.flash_needed == b.weights
    )
    assert report.est_step_latency_s == pytest.approx(b.forward_macs * 6 / 9.6e8)


def test_configuration_exceeding_mcu_sram_is_rejected_with_breakdown():
    b = memory_breakdown(build_model("resnet8", 10, 3), (32, 3, 32, 32), "bp", "ft", "w8a8")
    assert b.weights < load_device("mcu_m7").flash_bytes  # it is the SRAM that overflows
    with pytest.raises(DeviceDoesNotFit) as err:
        assert_fits("mcu_m7", b)
    msg = str(err.value)
    assert "does not fit on mcu_m7" in msg and "SRAM" in msg and "\n" not in msg
    assert "scratch=" in msg and "weights=" in msg and "gradients=" in msg
    assert check_fit("mcu_m7", b).passes_per_step == 3


def test_unsupported_format_is_clear():
    b = memory_breakdown(build_model("small_cnn", 10, 1), (1, 1, 8, 8), "ff", "ft", "w16a8")
    with pytest.raises(UnsupportedFormat, match=r"npu does not support format 'w16a8'; supported: \['w8a8'"):
        check_fit("npu", b)


def test_count_macs_from_real_shapes():
    stack = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 30), nn.Linear(30, 5))
    assert count_macs(stack, (4, 10)) == {"0": 4 * 10 * 20, "2": 4 * 20 * 30, "3": 4 * 30 * 5}
    macs = count_macs(build_model("small_cnn", 10, 1, width=16), (2, 1, 8, 8))
    assert macs["0"] == 2 * 8 * 8 * 16 * 9 and macs["3"] == 2 * 4 * 4 * 32 * 16 * 9
