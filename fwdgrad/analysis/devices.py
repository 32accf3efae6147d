"""Device profiles (``fwdgrad/conf/device/*.yaml``) and whether a training configuration fits one.

Placement (:func:`check_fit`):

- SRAM (fast, writable) = trainable weights + scratch + gradients + optimizer state + perturbation + masks.
  Training writes the trainable weights, so they are copied into SRAM (sparse updates: only the selected
  weights, see :mod:`fwdgrad.analysis.memory`).
- flash (read-only) = all weights: the deployed model image stays there; frozen layers run from it.

Step latency is an **estimate**: forward MACs x forward passes per step / ``macs_per_s``, with 2m passes
for FF (m perturbations, two evaluations each), 3 forward-equivalents for BP (forward + backward) and 4 for
BP with activation checkpointing (bp_ckpt: the checkpointed segments run again in the backward).
Weight perturbation, updates, memory traffic and non-MAC ops are ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from ..conf import CONF_DIR
from ..methods import BP_FORWARD_EQUIVALENTS, CKPT_FORWARD_EQUIVALENTS
from .memory import FORMATS, MemoryBreakdown, fmt_bytes, trace_model

DEVICE_DIR = CONF_DIR / "device"
_FIELDS = ("name", "sram_bytes", "flash_bytes", "formats", "accumulator_bits", "macs_per_s")
_OPTIONAL = ("clock_hz", "notes")


class DeviceDoesNotFit(ValueError):
    """A training configuration needs more SRAM or flash than the device has."""


class UnsupportedFormat(ValueError):
    """The device cannot run the number format."""


@dataclass(frozen=True)
class DeviceProfile:
    """An edge device: memories in bytes, supported number formats, accumulator width, MAC throughput."""

    name: str
    sram_bytes: int
    flash_bytes: int
    formats: tuple[str, ...]
    accumulator_bits: int
    macs_per_s: float
    notes: str = ""
    clock_hz: float | None = None  # the CPU clock, for latency estimates from instruction counts


def list_devices() -> list[str]:
    """Names of the profiles in ``fwdgrad/conf/device``."""
    return sorted(p.stem for p in DEVICE_DIR.glob("*.yaml"))


def load_device(source: str | Path | Mapping) -> DeviceProfile:
    """Load a profile by name (``fwdgrad/conf/device/<name>.yaml``), from a yaml path, or from a mapping
    (e.g. the ``device`` node of a composed Hydra config)."""
    if isinstance(source, Mapping):
        where, cfg = "mapping", OmegaConf.to_container(OmegaConf.create(dict(source)), resolve=True)
    else:
        path = Path(source)
        if path.suffix not in (".yaml", ".yml"):
            path = DEVICE_DIR / f"{source}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown device {str(source)!r}; allowed: {list_devices()} or a yaml path")
        where, cfg = str(path), OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    missing = [f for f in _FIELDS if f not in cfg]
    extra = sorted(set(cfg) - set(_FIELDS) - set(_OPTIONAL))
    if missing or extra:
        raise ValueError(f"device profile {where}: missing fields {missing}, unknown fields {extra}")
    bad = [f for f in cfg["formats"] if f not in FORMATS]
    if bad:
        raise ValueError(f"device profile {where}: unknown formats {bad}; allowed: {list(FORMATS)}")
    return DeviceProfile(
        name=str(cfg["name"]),
        sram_bytes=int(cfg["sram_bytes"]),
        flash_bytes=int(cfg["flash_bytes"]),
        formats=tuple(cfg["formats"]),
        accumulator_bits=int(cfg["accumulator_bits"]),
        macs_per_s=float(cfg["macs_per_s"]),
        notes=str(cfg.get("notes", "")),
        clock_hz=None if cfg.get("clock_hz") is None else float(cfg["clock_hz"]),
    )


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Forward multiply-accumulates per layer (module name -> MACs) for one batch of ``input_shape``.

    From the real op shapes of a meta-device forward: matmul = n*k*m, conv = out.numel() * (C_in/groups
    * kernel area), attention = 2 matmuls; ops are charged to the innermost module running them.
    """
    return trace_model(model, input_shape).macs_by_layer()


@dataclass(frozen=True)
class FitReport:
    """Whether a :class:`MemoryBreakdown` fits a :class:`DeviceProfile`, and the estimated step latency."""

    device: DeviceProfile
    breakdown: MemoryBreakdown
    sram_needed: int
    flash_needed: int
    passes_per_step: int
    est_step_latency_s: float

    @property
    def fits(self) -> bool:
        return self.sram_needed <= self.device.sram_bytes and self.flash_needed <= self.device.flash_bytes

    def summary(self) -> str:
        """One line: verdict, SRAM and flash use, the breakdown, and the latency estimate."""
        b, d = self.breakdown, self.device
        verdict = "fits" if self.fits else "does not fit"
        return (
            f"{b.model} {b.method}/{b.mode}/{b.fmt} {verdict} on {d.name}: "
            f"SRAM {fmt_bytes(self.sram_needed)} of {fmt_bytes(d.sram_bytes)}, "
            f"flash {fmt_bytes(self.flash_needed)} of {fmt_bytes(d.flash_bytes)} "
            f"[{b.summary()} trainable_weights={fmt_bytes(b.trainable_weights)}]; "
            f"estimated step latency {self.est_step_latency_s * 1e3:.3g} ms "
            f"({self.passes_per_step} forward passes x {b.forward_macs:,} MACs / {d.macs_per_s:.3g} MAC/s)"
        )


def _profile(device: DeviceProfile | str) -> DeviceProfile:
    return device if isinstance(device, DeviceProfile) else load_device(device)


def check_fit(device: DeviceProfile | str, breakdown: MemoryBreakdown) -> FitReport:
    """Place ``breakdown`` on ``device`` (SRAM/flash as in the module docstring) and estimate latency.

    Raises :class:`UnsupportedFormat` if the device cannot run ``breakdown.fmt``.
    """
    d, b = _profile(device), breakdown
    if b.fmt not in d.formats:
        raise UnsupportedFormat(
            f"device {d.name} does not support format {b.fmt!r}; supported: {list(d.formats)}"
        )
    sram = b.trainable_weights + b.scratch + b.gradients + b.optimizer_state + b.perturbation + b.masks
    passes = {"ff": 2 * b.m, "bp": BP_FORWARD_EQUIVALENTS, "bp_ckpt": CKPT_FORWARD_EQUIVALENTS}[b.method]
    return FitReport(d, b, sram, b.weights, passes, b.forward_macs * passes / d.macs_per_s)


def assert_fits(device: DeviceProfile | str, breakdown: MemoryBreakdown) -> FitReport:
    """:func:`check_fit`; raises :class:`DeviceDoesNotFit` with the one-line summary if it does not fit."""
    report = check_fit(device, breakdown)
    if not report.fits:
        raise DeviceDoesNotFit(report.summary())
    return report
