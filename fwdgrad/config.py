"""Structured configs (Hydra ConfigStore) and their start-up validation.

The schema `fwdgrad_config` is the first entry of `fwdgrad/conf/config.yaml`'s defaults list, so every group file
and every override is type-checked by OmegaConf while Hydra composes (unknown keys, wrong types). Range and
choice checks live in the dataclasses' `check()` methods and run in :func:`validate`, which turns the composed
config into these objects before anything else happens; each failure is a one-line `ValueError` that names
the key, the bad value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from .conf import CONF_DIR

# Choices, spelled out so that validating a config imports no torch (a bad value fails in about a second);
# tests/test_config.py checks them against fwdgrad.data.DATASETS, fwdgrad.models.MODELS, fwdgrad.train and
# the signatures of fwdgrad.ff.optim.qzo_ff / zo_sgd.
DATASETS = ("digits", "fashion_mnist", "fashion_mnist_c", "synth_keywords", "cifar10", "cifar100",
            "cifar10_c", "svhn", "omniglot", "speechcommands", "esc50")
MODELS = ("resnet8", "resnet18", "mobilenet_v2", "vit_tiny", "ds_cnn", "crnn", "small_cnn")
METHODS = ("bp", "bp_fp16", "bp_bf16", "bp_qat", "zo_fp32", "sign_spsa_fp32", "qzo_ff", "jvp")
TRAIN_MODES = ("ft", "lp", "sparse")
LR_SCHEDULES = ("constant", "cosine", "linear")
FF_OPTIONS = {
    "qzo_ff": ("distribution", "z_max", "rounding", "perturb_scale", "eps_min_q", "momentum", "kernel_norm",
               "sharpness_rho", "weight_headroom"),
    "zo_sgd": ("momentum", "kernel_norm", "sharpness_rho", "difference", "distribution", "z_max"),
}
QUANTS = ("auto", "fp32", "w16a8", "w8a8", "w8a16", "w16a16")
BITS = (8, 16)
FLOAT_METHODS = ("bp", "bp_fp16", "bp_bf16", "zo_fp32", "sign_spsa_fp32", "jvp")
HEADS = ("protonet", "simpleshot")


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


@dataclass
class FewShotConfig:
    """N-way K-shot episodes on the novel classes (data.target), SPEC §2.5."""

    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 100
    head: str = "protonet"  # protonet | simpleshot: how the episode's linear head is initialised

    def check(self) -> None:
        for k in ("n_way", "k_shot", "episodes"):
            _check(getattr(self, k) >= 1, f"data.fewshot.{k}", getattr(self, k), "integers >= 1")
        _check(self.n_query >= 1, "data.fewshot.n_query", self.n_query, "integers >= 1")
        _check(self.head in HEADS, "data.fewshot.head", self.head, ", ".join(HEADS))


@dataclass
class DataConfig:
    """Source task (pretraining) and target task (adaptation); `source`/`target` are `build_dataset` calls."""

    name: str = MISSING  # the `dataset` label of the results
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    severity: Any = None  # fashion_mnist_c: easy | medium | hard | 1..5 (interpolated into target)
    max_train: int | None = None  # subsample the target train / test sets (quick runs, tests)
    max_test: int | None = None
    fewshot: FewShotConfig | None = None

    def check(self) -> None:
        for part in ("source", "target"):
            spec = getattr(self, part)
            _check(spec.get("name") in DATASETS, f"data.{part}.name", spec.get("name"), ", ".join(DATASETS))
        for k in ("max_train", "max_test"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"data.{k}", v, "null or integers >= 1")
        if self.fewshot is not None:
            self.fewshot.check()


@dataclass
class MethodConfig:
    name: str = "qzo_ff"
    lr: float = 0.02
    eps: float = 1e-3
    m: int = 3
    default_quant: str = "w16a8"  # the format quant=auto picks for this method
    ff: dict[str, Any] = field(default_factory=dict)  # extra options of qzo_ff / zo_sgd

    def check(self) -> None:
        _check(self.name in METHODS, "method", self.name, ", ".join(METHODS))
        _check(self.lr > 0, "method.lr", self.lr, "> 0")
        _check(self.eps > 0, "method.eps", self.eps, "> 0")
        _check(self.m >= 1, "method.m", self.m, "integers >= 1")
        allowed = ", ".join(QUANTS[1:])
        _check(self.default_quant in QUANTS[1:], "method.default_quant", self.default_quant, allowed)
        if self.ff and self.name in ("qzo_ff", "zo_fp32", "sign_spsa_fp32"):
            allowed = FF_OPTIONS["qzo_ff" if self.name == "qzo_ff" else "zo_sgd"]
            for k in self.ff:
                _check(k in allowed, f"method.ff.{k}", self.ff[k], f"keys {', '.join(allowed)}")
        elif self.ff:
            raise ValueError(f"method.ff={dict(self.ff)!r} is invalid for method {self.name!r}; "
                             "allowed: {} (only qzo_ff, zo_fp32 and sign_spsa_fp32 take ff options)")


@dataclass
class QuantConfig:
    """Fixed-point format (`fwdgrad.engine.convert`); `auto` = the method's own (`method.default_quant`)."""

    name: str = "auto"
    weight_bits: int | None = None
    act_bits: int | None = None
    observer: str = "minmax"
    per_channel: bool = False
    acc_bits: int = 32
    overflow: str = "saturate"
    requant: str = "single"
    engine_mode: str = "integer"  # integer | fake
    calib: str = "source"  # calibrate activation scales on source (deployed model) or target train data
    calib_size: int = 256

    def check(self) -> None:
        _check(self.name in QUANTS or self.name.startswith("w"), "quant", self.name, ", ".join(QUANTS))
        if self.name not in ("auto", "fp32"):
            _check(self.weight_bits in BITS, "quant.weight_bits", self.weight_bits, "8, 16")
            _check(self.act_bits in BITS, "quant.act_bits", self.act_bits, "8, 16")
        _check(16 <= self.acc_bits <= 48, "quant.acc_bits", self.acc_bits, "integers 16..48")
        _check(self.engine_mode in ("integer", "fake"), "quant.engine_mode", self.engine_mode, "integer/fake")
        _check(self.calib in ("source", "target"), "quant.calib", self.calib, "source, target")
        _check(self.calib_size >= 1, "quant.calib_size", self.calib_size, "integers >= 1")


@dataclass
class ModeConfig:
    name: str = "lp"
    lp_layers: int = 1
    sparse_kind: str = "topk"
    sparse_density: float = 0.1

    def check(self) -> None:
        _check(self.name in TRAIN_MODES, "mode", self.name, ", ".join(TRAIN_MODES))
        _check(self.lp_layers >= 1, "mode.lp_layers", self.lp_layers, "integers >= 1")
        _check(0 < self.sparse_density <= 1, "mode.sparse_density", self.sparse_density, "(0, 1]")


@dataclass
class TrainSettings:
    steps: int | None = 300
    forward_budget: int | None = None
    lr_schedule: str = "constant"  # constant | cosine | linear (to 0 at the end of the budget)
    batch_size: int = 64
    eval_every: int = 50
    checkpoint_every: int = 0

    def check(self) -> None:
        if (self.steps is None) == (self.forward_budget is None):
            raise ValueError(f"train.steps={self.steps!r}, train.forward_budget={self.forward_budget!r} are "
                             "invalid; allowed: exactly one of them set (the other null)")
        for k in ("steps", "forward_budget", "batch_size", "eval_every"):
            v = getattr(self, k)
            _check(v is None or v >= 1, f"train.{k}", v, "integers >= 1")
        _check(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "integers >= 0")
        schedules = ", ".join(LR_SCHEDULES)
        _check(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule, schedules)


@dataclass
class PretrainSettings:
    """Source-task pretraining (Adam, BatchNorm in train mode); the result is cached by its config."""

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = II("seed")

    def check(self) -> None:
        _check(self.steps >= 0, "pretrain.steps", self.steps, "integers >= 0")
        _check(self.lr > 0, "pretrain.lr", self.lr, "> 0")
        _check(self.batch_size >= 1, "pretrain.batch_size", self.batch_size, "integers >= 1")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # _target_: fwdgrad.models.build_model, name, kwargs
    method: MethodConfig = field(default_factory=MethodConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    mode: ModeConfig = field(default_factory=ModeConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    device: dict[str, Any] | None = None  # a fwdgrad/conf/device profile: check the memory model fits before training
    method_lr: dict[str, float] = field(default_factory=dict)  # per-method lr for presets comparing methods
    variant: str = ""  # free label separating ablation arms in reports (e.g. "m1", "momentum")
    seed: int = 0
    data_root: str | None = None  # default $FWDGRAD_DATA or ~/.cache/fwdgrad/data
    cache_dir: str | None = None  # default $FWDGRAD_CACHE or ~/.cache/fwdgrad (models/<hash>.pt under it)
    out_dir: str | None = None  # default: the Hydra output directory
    threads: int = 1  # torch.set_num_threads (1 is fastest for these small models on 2 cores)
    progress: bool = True

    def check(self) -> None:
        for part in (self.data, self.method, self.quant, self.mode, self.train, self.pretrain):
            part.check()
        _check(self.model.get("name") in MODELS, "model", self.model.get("name"), ", ".join(MODELS))
        _check(self.seed >= 0, "seed", self.seed, "integers >= 0")
        for name, lr in self.method_lr.items():
            _check(name in METHODS, "method_lr key", name, ", ".join(METHODS))
            _check(lr > 0, f"method_lr.{name}", lr, "> 0")
        _check(self.threads >= 1, "threads", self.threads, "integers >= 1")
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise FileNotFoundError(f"data_root={self.data_root!r} does not exist; allowed: an existing "
                                    "directory, or null for $FWDGRAD_DATA / ~/.cache/fwdgrad/data")
        q = self.quant
        if q.name not in ("auto", "fp32"):
            expect = f"w{q.weight_bits}a{q.act_bits}"
            _check(q.name == expect, "quant", q.name, f"{expect} (the name must match the bits)")
        scheme = self.scheme
        if self.method.name in FLOAT_METHODS and scheme != "fp32":
            raise ValueError(f"quant={scheme!r} is invalid for method {self.method.name!r}, which trains a "
                             "float model; allowed: fp32 or auto (use qzo_ff or bp_qat for fixed point)")
        if self.method.name in ("qzo_ff", "bp_qat") and scheme == "fp32":
            raise ValueError(f"quant='fp32' is invalid for method {self.method.name!r}, which trains a "
                             "quantized model; allowed: auto, w16a8, w8a8, w8a16, w16a16")

    @property
    def lr(self) -> float:
        """The learning rate used: method_lr[method] if the preset sets one, else method.lr."""
        return self.method_lr.get(self.method.name, self.method.lr)

    @property
    def scheme(self) -> str:
        """The resolved number format: 'fp32' or a fixed-point scheme such as 'w16a8'."""
        return self.method.default_quant if self.quant.name == "auto" else self.quant.name


def register() -> None:
    """The schema, and `${fwdgrad_or:value,default}` (default when value is null; used for output dirs)."""
    ConfigStore.instance().store(name="fwdgrad_config", node=Config)
    if not OmegaConf.has_resolver("fwdgrad_or"):
        OmegaConf.register_new_resolver("fwdgrad_or", lambda v, default: default if v is None else v)


def validate(cfg: DictConfig) -> Config:
    """The composed config as checked dataclasses (raises a one-line ValueError on a bad value)."""
    c = OmegaConf.to_object(cfg)
    c.check()
    return c


register()
