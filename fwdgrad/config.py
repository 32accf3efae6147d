"""Structured configs (Hydra ConfigStore) and their start-up validation.

The schema `fwdgrad_config` is the first entry of `fwdgrad/conf/config.yaml`'s defaults list, so every
group file and every override is type-checked by OmegaConf while Hydra composes (unknown keys, wrong types).
Range and choice checks live in the dataclasses' `check()` methods and run in :func:`validate`, which turns
the composed config into these objects before anything else happens; each failure is a one-line
`ValueError` that names the key, the bad value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .methods import (
    METHOD_NAMES,
    PERTURB_TARGETS,
    QZO_FF_OPTIONS,
    SCOPES,
    ZO_SGD_OPTIONS,
    check_hyper,
    check_scope,
    spec,
)
from .methods import METHODS as REGISTRY

# Choices, spelled out so that validating a config imports no torch (a bad value fails in about a second);
# tests/test_config.py checks them against fwdgrad.data.DATASETS, fwdgrad.models.MODELS and
# fwdgrad.engine.ENGINE_MODES. Methods and training scopes come from the torch-free registry fwdgrad.methods.
DATASETS = (
    "digits",
    "fashion_mnist",
    "fashion_mnist_c",
    "synth_keywords",
    "cifar10",
    "cifar100",
    "cifar10_c",
    "svhn",
    "omniglot",
    "speechcommands",
    "esc50",
)
MODELS = ("resnet8", "resnet18", "mobilenet_v2", "vit_tiny", "ast_tiny", "ds_cnn", "crnn", "small_cnn")
BUILD_MODEL = "fwdgrad.models.build_model"  # the zoo's builder: model.name picks one of MODELS
METHODS = METHOD_NAMES
LR_SCHEDULES = ("constant", "cosine", "linear")
#: auto: resume from out_dir's checkpoint when there is one; must: fail without one; never: start fresh
RESUME_MODES = ("auto", "must", "never")
#: the training loss: float cross-entropy of the logits, or the integer one (qzo_ff; fwdgrad.ff.intloss)
LOSSES = ("float", "integer")
#: the target head before training: the source model's (a fresh random one when the class count differs), or
#: imprinted from the target training set's class means (fwdgrad.pipeline.steps.imprint_head)
HEAD_INITS = ("source", "imprint")
FF_OPTIONS = {"qzo_ff": QZO_FF_OPTIONS, "zo_sgd": ZO_SGD_OPTIONS}
ENGINE_MODES = ("integer", "fake")  # how the engine computes (fwdgrad.engine.ENGINE_MODES)
QUANTS = ("auto", "fp32", "w16a8", "w8a8", "w8a16", "w16a16")
BITS = (8, 16)
HEADS = ("protonet", "simpleshot")
LOGGERS = ("csv", "tensorboard", "mlflow")  # experiment trackers (fwdgrad.tracking.BACKENDS)


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """A one-line ValueError `key=value is invalid; allowed: ...` unless ok."""
    if not ok:
        raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


# ------------------------------------------------------------------------------------------ model
def locate(path: str) -> Any:
    """The object at dotted `path` (module path, then attributes), or None where there is none."""
    import importlib

    parts = str(path).split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def check_model(model: dict) -> None:
    """`model`: the zoo (`_target_: fwdgrad.models.build_model` with `name` one of MODELS) or a callable of
    your own (`_target_` any importable callable returning an nn.Module; importing it may import torch)."""
    target = model.get("_target_", BUILD_MODEL)
    if target == BUILD_MODEL:
        own = "or model._target_=<an importable callable returning an nn.Module>"
        require(model.get("name") in MODELS, "model", model.get("name"), f"{', '.join(MODELS)} ({own})")
        return
    allowed = "an importable callable returning an nn.Module, e.g. torchvision.models.resnet18"
    require(isinstance(target, str) and callable(locate(target)), "model._target_", target, allowed)


def model_label(model: dict) -> str:
    """The `model` label of the results: `model.name`, or the callable's name for a `_target_` of your own
    (a zoo name there is a leftover of the model group's default, not a label)."""
    target, name = model.get("_target_", BUILD_MODEL), model.get("name")
    if target == BUILD_MODEL or (name and name not in MODELS):
        return name
    return str(target).rpartition(".")[2]


def zoo_options() -> dict[str, set]:
    """Option -> the values the zoo's model files (fwdgrad/conf/model/*.yaml) give it."""
    from .conf import CONF_DIR

    options: dict[str, set] = {}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        for k, v in OmegaConf.to_container(OmegaConf.load(path)).items():
            options.setdefault(k, set()).add(repr(v))
    return options


def model_options(model: dict) -> dict[str, Any]:
    """The keyword options of a `model._target_` of your own: the model node without `_target_` and `name`
    (the label), and without options a zoo model file gives the same value (left there by the model group's
    default when `model._target_` replaced it on the command line, e.g. small_cnn's width: 32)."""
    zoo = zoo_options()
    return {
        k: v
        for k, v in model.items()
        if k not in ("_target_", "name") and repr(_plain(v)) not in zoo.get(k, ())
    }


def _plain(v: Any) -> Any:
    return OmegaConf.to_container(v) if isinstance(v, DictConfig | ListConfig) else v


@dataclass
class FewShotConfig:
    """N-way K-shot episodes on the novel classes (data.target);
    docs/method.md#benchmarks-and-offline-data."""

    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 100
    head: str = "protonet"  # protonet | simpleshot: how the episode's linear head is initialised

    def check(self) -> None:
        for k in ("n_way", "k_shot", "episodes"):
            require(getattr(self, k) >= 1, f"data.fewshot.{k}", getattr(self, k), "integers >= 1")
        require(self.n_query >= 1, "data.fewshot.n_query", self.n_query, "integers >= 1")
        require(self.head in HEADS, "data.fewshot.head", self.head, ", ".join(HEADS))


@dataclass
class DataConfig:
    """Source task (pretraining) and target task (adaptation); `source`/`target` are `build_dataset` calls."""

    name: str = MISSING  # the `dataset` label of the results
    source: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    severity: Any = None  # fashion_mnist_c: easy | medium | hard | 1..5 (interpolated into target)
    max_train: int | None = None  # subsample the target train / test sets (quick runs, tests)
    max_test: int | None = None
    # choose settings without the test split: hold out this fraction of the target's training set (seeded),
    # train on the rest and report the held-out accuracy as test_acc (metrics.json: eval_split=validation)
    validation: float | None = None
    fewshot: FewShotConfig | None = None

    def check(self) -> None:
        for part in ("source", "target"):
            spec = getattr(self, part)
            require(spec.get("name") in DATASETS, f"data.{part}.name", spec.get("name"), ", ".join(DATASETS))
        for k in ("max_train", "max_test"):
            v = getattr(self, k)
            require(v is None or v >= 1, f"data.{k}", v, "null or integers >= 1")
        v = self.validation
        require(v is None or 0 < v < 1, "data.validation", v, "null or a fraction in (0, 1)")
        require(v is None or self.fewshot is None, "data.validation", v, "null with few-shot episodes")
        if self.fewshot is not None:
            self.fewshot.check()


@dataclass
class MethodConfig:
    """The training method (fwdgrad.methods) and its hyperparameters; a method reads only the ones its spec
    lists (`hyper`), and metrics.json records only those."""

    name: str = "qzo_ff"
    lr: float = 0.02
    eps: float = 1e-3
    m: int = 3
    ff: dict[str, Any] = field(default_factory=dict)  # extra options of qzo_ff / zo_sgd
    # bp_ckpt: checkpointed segments of the model's blocks (fwdgrad.models.checkpoint_segments); null: about
    # sqrt(blocks). The model's block count bounds it when the model is built.
    segments: int | None = None

    def check(self) -> None:
        require(self.name in METHODS, "method", self.name, ", ".join(METHODS))
        s = spec(self.name)
        check_hyper(self.name, self.lr, self.eps, self.m, where="method.")
        seg = self.segments
        require(seg is None or seg >= 2, "method.segments", seg, "null or integers >= 2 (bp_ckpt)")
        if (self.ff or {}).get("difference") == "median" and "m" in s.hyper and "m" not in s.fixed:
            require(self.m >= 2, "method.m", self.m, "integers >= 2 with method.ff.difference=median")
        if self.ff and s.ff_options:
            for k in self.ff:
                require(k in s.ff_options, f"method.ff.{k}", self.ff[k], f"keys {', '.join(s.ff_options)}")
            perturb = self.ff.get("perturb", "weights")
            require(perturb in PERTURB_TARGETS, "method.ff.perturb", perturb, ", ".join(PERTURB_TARGETS))
        elif self.ff:
            takes = ", ".join(n for n, x in REGISTRY.items() if x.ff_options)
            raise ValueError(
                f"method.ff={dict(self.ff)!r} is invalid for method {self.name!r}; "
                f"allowed: {{}} (only {takes} take ff options)"
            )


@dataclass
class QuantConfig:
    """Fixed-point format (`fwdgrad.engine.convert`); `auto` = the method's own (its spec's default_quant)."""

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
    residual_bits: int | None = None  # a transformer's residual stream; None: act_bits

    def check(self) -> None:
        require(self.name in QUANTS or self.name.startswith("w"), "quant", self.name, ", ".join(QUANTS))
        if self.name not in ("auto", "fp32"):
            require(self.weight_bits in BITS, "quant.weight_bits", self.weight_bits, "8, 16")
            require(self.act_bits in BITS, "quant.act_bits", self.act_bits, "8, 16")
        require(16 <= self.acc_bits <= 48, "quant.acc_bits", self.acc_bits, "integers 16..48")
        modes = ", ".join(ENGINE_MODES)
        require(self.engine_mode in ENGINE_MODES, "quant.engine_mode", self.engine_mode, modes)
        require(self.calib in ("source", "target"), "quant.calib", self.calib, "source, target")
        require(self.calib_size >= 1, "quant.calib_size", self.calib_size, "integers >= 1")
        require(self.residual_bits in (None, *BITS), "quant.residual_bits", self.residual_bits, "null, 8, 16")


@dataclass
class ScopeConfig:
    """The training scope, the `mode` group: ft (all layers) | lp (the last lp_layers) | sparse (a mask) |
    dvpt (`prompts` deep prompt tokens per encoder layer, and the head) | ln (LayerNorms and the head) |
    bias (the biases and the head; float methods only)."""

    name: str = "lp"
    lp_layers: int = 1
    sparse_kind: str = "topk"
    sparse_density: float = 0.1
    prompts: int = 10
    prompt_init: str = "uniform"

    def check(self) -> None:
        require(self.name in SCOPES, "mode", self.name, ", ".join(SCOPES))
        require(self.lp_layers >= 1, "mode.lp_layers", self.lp_layers, "integers >= 1")
        require(0 < self.sparse_density <= 1, "mode.sparse_density", self.sparse_density, "(0, 1]")
        require(self.prompts >= 1, "mode.prompts", self.prompts, "integers >= 1")
        require(
            self.prompt_init in ("uniform", "zeros"), "mode.prompt_init", self.prompt_init, "uniform, zeros"
        )


@dataclass
class TrainSettings:
    steps: int | None = 300
    forward_budget: int | None = None
    lr_schedule: str = "constant"  # constant | cosine | linear (to 0 at the end of the budget)
    batch_size: int = 64
    eval_every: int = 50
    checkpoint_every: int = 0
    resume: str = "auto"  # auto | must | never (fwdgrad.train.RESUME_MODES)
    strict: bool = False  # faults (accumulator overflows, saturated weights) stop the run
    loss: str = "float"  # float | integer (qzo_ff: the integer cross-entropy, fwdgrad.ff.intloss)
    head_init: str = "source"  # source | imprint (HEAD_INITS)

    def check(self) -> None:
        if (self.steps is None) == (self.forward_budget is None):
            raise ValueError(
                f"train.steps={self.steps!r}, train.forward_budget={self.forward_budget!r} are "
                "invalid; allowed: exactly one of them set (the other null)"
            )
        for k in ("steps", "forward_budget", "batch_size", "eval_every"):
            v = getattr(self, k)
            require(v is None or v >= 1, f"train.{k}", v, "integers >= 1")
        require(self.checkpoint_every >= 0, "train.checkpoint_every", self.checkpoint_every, "integers >= 0")
        schedules = ", ".join(LR_SCHEDULES)
        require(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule, schedules)
        require(self.resume in RESUME_MODES, "train.resume", self.resume, ", ".join(RESUME_MODES))
        require(self.loss in LOSSES, "train.loss", self.loss, ", ".join(LOSSES))
        require(self.head_init in HEAD_INITS, "train.head_init", self.head_init, ", ".join(HEAD_INITS))


@dataclass
class PretrainSettings:
    """Source-task pretraining (Adam, BatchNorm in train mode); the result is cached by its config."""

    steps: int = 300
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = II("seed")

    def check(self) -> None:
        require(self.steps >= 0, "pretrain.steps", self.steps, "integers >= 0")
        require(self.lr > 0, "pretrain.lr", self.lr, "> 0")
        require(self.batch_size >= 1, "pretrain.batch_size", self.batch_size, "integers >= 1")


@dataclass
class LoggerConfig:
    """The experiment tracker, the `logger` group (fwdgrad.tracking): csv = the run's own log.csv and
    metrics.json only; tensorboard / mlflow also record the run under the output directory."""

    name: str = "csv"
    tracking_uri: str | None = None  # mlflow: default sqlite:///<out>/mlflow.db (artifacts in <out>/mlruns)
    experiment_name: str = "fwdgrad"  # mlflow experiment the run goes into

    def check(self) -> None:
        require(self.name in LOGGERS, "logger", self.name, ", ".join(LOGGERS))
        if self.name != "mlflow":
            require(self.tracking_uri is None, "logger.tracking_uri", self.tracking_uri, "null (mlflow only)")
        name = self.experiment_name
        require(bool(name), "logger.experiment_name", name, "a non-empty name")


@dataclass
class TaskConfig:
    """What every experiment shares: the task, the model, its number format, the training scope, the source
    model's pretraining, and where and how it runs. `Config` (one training run) and the landscape's config
    extend it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=dict)  # _target_: fwdgrad.models.build_model, name, kwargs
    quant: QuantConfig = field(default_factory=QuantConfig)
    mode: ScopeConfig = field(default_factory=ScopeConfig)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    seed: int = 0
    data_root: str | None = None  # default $FWDGRAD_DATA or ~/.cache/fwdgrad/data
    cache_dir: str | None = None  # default $FWDGRAD_CACHE or ~/.cache/fwdgrad (models/<hash>.pt under it)
    out_dir: str | None = None  # default: the Hydra output directory
    threads: int = 1  # torch.set_num_threads (1 is fastest for these small models on 2 cores)
    progress: bool = True  # tqdm bars on a terminal
    # when stdout is not a terminal: a progress line (logging, fwdgrad.pipeline.progress) every N steps / T s
    log_every_steps: int = 0  # 0: not by steps
    log_every_s: float = 30.0  # 0: not by time

    def check(self) -> None:
        for part in (self.data, self.quant, self.mode, self.pretrain):
            part.check()
        check_model(self.model)
        require(self.seed >= 0, "seed", self.seed, "integers >= 0")
        require(self.threads >= 1, "threads", self.threads, "integers >= 1")
        require(self.log_every_steps >= 0, "log_every_steps", self.log_every_steps, "integers >= 0 (0: off)")
        require(self.log_every_s >= 0, "log_every_s", self.log_every_s, ">= 0 (0: off)")
        if self.data_root is not None and not Path(self.data_root).expanduser().is_dir():
            raise FileNotFoundError(
                f"data_root={self.data_root!r} does not exist; allowed: an existing "
                "directory, or null for $FWDGRAD_DATA / ~/.cache/fwdgrad/data"
            )
        q = self.quant
        if q.name not in ("auto", "fp32"):
            expect = f"w{q.weight_bits}a{q.act_bits}"
            require(q.name == expect, "quant", q.name, f"{expect} (the name must match the bits)")


@dataclass
class Config(TaskConfig):
    """One training run: the task plus the method, its budget and the labels of its results."""

    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    device: dict[str, Any] | None = None  # a fwdgrad/conf/device profile: the memory model must fit it
    method_lr: dict[str, float] = field(default_factory=dict)  # per-method lr for presets comparing methods
    variant: str = ""  # free label separating ablation arms in reports (e.g. "m1", "momentum")
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # experiment tracker (fwdgrad.tracking)

    def check(self) -> None:
        super().check()
        self.method.check()
        self.train.check()
        self.logger.check()
        for name, lr in self.method_lr.items():
            require(name in METHODS, "method_lr key", name, ", ".join(METHODS))
            require(lr > 0, f"method_lr.{name}", lr, "> 0")
        check_scope(self.method.name, self.mode.name, where="mode=")
        if self.data.fewshot and self.train.head_init != "source":
            raise ValueError(
                f"train.head_init={self.train.head_init!r} is invalid with few-shot data (each episode's "
                "head is built from its support set); allowed: source"
            )
        scheme = self.scheme
        trains = spec(self.method.name).trains
        if trains == "float" and scheme != "fp32":
            raise ValueError(
                f"quant={scheme!r} is invalid for method {self.method.name!r}, which trains a "
                "float model; allowed: fp32 or auto (use qzo_ff or bp_qat for fixed point)"
            )
        if trains == "qmodel" and scheme == "fp32":
            raise ValueError(
                f"quant='fp32' is invalid for method {self.method.name!r}, which trains a "
                "quantized model; allowed: auto, w16a8, w8a8, w8a16, w16a16"
            )

    @property
    def lr(self) -> float:
        """The learning rate used: method_lr[method] if the preset sets one, else method.lr."""
        return self.method_lr.get(self.method.name, self.method.lr)

    @property
    def scheme(self) -> str:
        """The resolved number format: 'fp32' or a fixed-point scheme such as 'w16a8'."""
        return spec(self.method.name).default_quant if self.quant.name == "auto" else self.quant.name


# ---------------------------------------------------------------------------------------- landscape
PLANES = ("pca", "random")
EVAL_MODES = ("integer", "fake", "float")
EVAL_SPLITS = ("train", "test")
PCA_WEIGHTINGS = ("equal", "none")
NORMS = ("filter", "layer", "none")  # random directions (fwdgrad.analysis.landscape.NORMS)
#: Methods a trajectory can follow step by step (bp_qat's float master weights are not observable).
RUN_METHODS = tuple(name for name, s in REGISTRY.items() if s.trajectory)


@dataclass
class RunConfig:
    """One trajectory: `fwdgrad.train.TrainConfig` fields (the scope, batch size and seed are shared)."""

    method: str = MISSING
    steps: int = MISSING
    lr: float = 0.01
    eps: float = 1e-3
    m: int | None = None  # None: 3, or the value the method pins (zo_fp32: 1)
    lr_schedule: str = "constant"
    ff: dict[str, Any] = field(default_factory=dict)  # qzo_ff / zo_sgd options (headroom: weight_headroom)

    @property
    def samples(self) -> int:
        return self.m if self.m is not None else spec(self.method).fixed.get("m", 3)

    def check(self, label: str) -> None:
        key = f"runs.{label}"
        require(self.method in RUN_METHODS, f"{key}.method", self.method, ", ".join(RUN_METHODS))
        require(self.steps >= 1, f"{key}.steps", self.steps, "integers >= 1")
        check_hyper(self.method, self.lr, self.eps, self.samples, where=f"{key}.")
        schedules = ", ".join(LR_SCHEDULES)
        require(self.lr_schedule in LR_SCHEDULES, f"{key}.lr_schedule", self.lr_schedule, schedules)
        if "weight_headroom" in self.ff:
            raise ValueError(
                f"{key}.ff.weight_headroom={self.ff['weight_headroom']!r} is invalid; allowed: unset (set "
                "weight_headroom: applied once to the common start, for every run and the evaluator)"
            )
        opts = spec(self.method).ff_options
        allowed = f"keys {', '.join(opts)}" if opts else "none for this method"
        for k, v in self.ff.items():
            require(k in opts, f"{key}.ff.{k}", v, allowed)


@dataclass
class LandscapeSettings:
    plane: str = "pca"  # pca: top-2 PCA directions of the trajectories | random: filter-normalized
    center: str = "start"  # plane origin: start | <run label> (that run's final point)
    pca_weighting: str = "equal"  # equal: every run's snapshots weigh the same | none: raw displacements
    grid: int = 21  # grid points per axis
    margin: float = 0.25  # pca: room around the trajectories, as a fraction of their extent
    span: float = 1.0  # random: coordinates in [-span, span]
    norm: str = "filter"  # random directions: filter | layer | none
    eval_mode: str = "integer"  # integer | fake (the QModel at re-quantized weights) | float (folded model)
    eval_examples: int = 512
    eval_split: str = "train"  # train | test (target task)
    line_points: int = 41
    seed: int = 0  # random directions

    def check(self, runs: Sequence[str]) -> None:
        choices = {"plane": PLANES, "eval_mode": EVAL_MODES, "eval_split": EVAL_SPLITS, "norm": NORMS}
        choices |= {"pca_weighting": PCA_WEIGHTINGS, "center": ("start", *runs)}
        for key, allowed in choices.items():
            require(getattr(self, key) in allowed, f"landscape.{key}", getattr(self, key), ", ".join(allowed))
        require(self.grid >= 2, "landscape.grid", self.grid, "integers >= 2")
        for key in ("eval_examples", "line_points"):
            require(getattr(self, key) >= 1, f"landscape.{key}", getattr(self, key), "integers >= 1")
        require(self.margin >= 0, "landscape.margin", self.margin, ">= 0")
        require(self.span > 0, "landscape.span", self.span, "> 0")


@dataclass
class SharpnessSettings:
    enabled: bool = True
    power_iters: int = 30  # top Hessian eigenvalue (float model, double backward)
    rho: float = 0.02  # forward-only estimate: step rho * ||w_start|| along unit directions
    directions: int = 32  # forward-only directions, and Hutchinson samples of the float trace
    subspace: int = 6  # Ritz estimate of the max curvature over the first k directions

    def check(self) -> None:
        for key in ("power_iters", "directions", "subspace"):
            require(getattr(self, key) >= 1, f"sharpness.{key}", getattr(self, key), "integers >= 1")
        require(self.rho > 0, "sharpness.rho", self.rho, "> 0")


@dataclass
class LandscapeConfig(TaskConfig):
    """The experiment's config: the task (`fwdgrad.config.TaskConfig`: data, model, quant = the common
    start's format, mode = the training scope and so the landscape's tensors, pretrain, run settings), plus
    the runs (label -> RunConfig, null drops one) and the landscape settings."""

    runs: dict[str, Any] = field(default_factory=dict)  # label -> RunConfig fields, or null (no such run)
    landscape: LandscapeSettings = field(default_factory=LandscapeSettings)
    sharpness: SharpnessSettings = field(default_factory=SharpnessSettings)
    snapshots: int = 20  # trajectory points per run: every steps/snapshots steps, plus start and end
    batch_size: int = 64
    weight_headroom: float = 4.0  # Δ_w of the landscape layers x this, once, at the start

    def __post_init__(self):
        self.runs = {label: _run_config(label, r) for label, r in self.runs.items()}

    @property
    def scheme(self) -> str:
        return "w16a8" if self.quant.name == "auto" else self.quant.name

    @property
    def active_runs(self) -> dict[str, RunConfig]:
        return {label: r for label, r in self.runs.items() if r is not None}

    def check(self) -> None:
        super().check()
        self.sharpness.check()
        transfer = "a source -> target transfer config such as digits (few-shot episodes are not supported)"
        require(self.data.fewshot is None, "data", self.data.name, transfer)
        fixed = "a fixed-point scheme such as w16a8 (landscape.eval_mode=float gives a float surface)"
        require(self.scheme != "fp32", "quant", self.scheme, fixed)
        require(bool(self.active_runs), "runs", {}, "at least one run, e.g. runs.bp={method:bp,steps:150}")
        for label, r in self.active_runs.items():
            r.check(label)
        self.landscape.check(list(self.active_runs))
        for key in ("snapshots", "batch_size"):
            require(getattr(self, key) >= 1, key, getattr(self, key), "integers >= 1")
        require(self.weight_headroom >= 1, "weight_headroom", self.weight_headroom, ">= 1")

    def scope(self) -> dict:
        """TrainConfig fields of the training scope (the `mode` group)."""
        return {"scope": self.mode.name} | {k: v for k, v in vars(self.mode).items() if k != "name"}


def _run_config(label: str, r) -> RunConfig | None:
    """A `runs` entry as a checked-type RunConfig (a dict, not a typed node, so `+runs.x={...}` works)."""
    if r is None or isinstance(r, RunConfig):
        return r
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), r))
    except OmegaConfBaseException as e:
        keys = ", ".join(f.name for f in fields(RunConfig))
        raise ValueError(
            f"runs.{label}={r!r} is invalid; allowed: a mapping of {keys} with method and steps set "
            f"({str(e).splitlines()[0]})"
        ) from e


def validate_landscape(cfg: DictConfig) -> LandscapeConfig:
    """The composed config as checked dataclasses (raises a one-line ValueError on a bad value)."""
    c = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LandscapeConfig), cfg))
    c.check()
    return c


def register() -> None:
    """The schema, and `${fwdgrad_or:value,default}` (default when value is null; used for output dirs)."""
    ConfigStore.instance().store(name="fwdgrad_config", node=Config)
    ConfigStore.instance().store(name="fwdgrad_landscape", node=LandscapeConfig)  # landscape.yaml
    if not OmegaConf.has_resolver("fwdgrad_or"):
        OmegaConf.register_new_resolver("fwdgrad_or", lambda v, default: default if v is None else v)


def validate(cfg: DictConfig) -> Config:
    """The composed config as checked dataclasses (raises a one-line ValueError on a bad value)."""
    c = OmegaConf.to_object(cfg)
    c.check()
    return c


register()
