"""The training methods: one `MethodSpec` per method, the only place a method name is decoded.

Everything else derives from this table: the config's allowed values and `method.ff` keys
(fwdgrad.config), the trainer's optimizer and closure (a builder in `fwdgrad.train.BUILDERS`), the memory
model's format and sample count (fwdgrad.pipeline.steps), the landscape's runnable methods. Adding a method
is one entry here plus its builder. Torch-free, so validating a config imports no torch.

Forward passes per step (docs/method.md, estimators): a BP step counts as `BP_FORWARD_EQUIVALENTS` = 3
forward passes (forward + backward ≈ 2 forwards); sign-m-SPSA and SPSA cost 2 per sample (2m), the
median difference 1 per sample (m), plus 2 for a sharpness-aware probe and 1 for the shared centre of a
one-sided difference; a JVP costs one dual-number forward per tangent; hybrid costs QZO-FF's passes + 3; BP
with activation checkpointing (bp_ckpt) recomputes its checkpointed segments in the backward, one forward
more: `CKPT_FORWARD_EQUIVALENTS` = 4 (an upper bound: the last segment is not recomputed).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .fixed_point import FixedPointSettings

BP_FORWARD_EQUIVALENTS = 3
#: differences that evaluate one perturbed point per sample (fwdgrad.ff.estimators)
ONE_PASS_DIFFERENCES = ("one_sided", "median")
CKPT_FORWARD_EQUIVALENTS = BP_FORWARD_EQUIVALENTS + 1
#: what trains: everything (ft), the last layers (lp, linear probing), a mask (sparse), a transformer's deep
#: prompts and head (dvpt, deep visual prompt tuning), its LayerNorm affine parameters and head (ln), the
#: biases and the head (bias; TinyTL, Cai et al., NeurIPS 2020)
SCOPES = ("ft", "lp", "sparse", "dvpt", "ln", "bias")
#: scopes of float models only: a QModel's optimizers perturb and update weight nodes, not its int32 biases
FLOAT_SCOPES = ("bias",)

#: `method.ff` keys of the fixed-point optimizer (fwdgrad.ff.optim.qzo_ff) and of the float one (zo_sgd).
QZO_FF_OPTIONS = (
    *(f.name for f in fields(FixedPointSettings)),
    "momentum",
    "kernel_norm",
    "sharpness_rho",
    "perturb",
)
#: what QZO-FF perturbs: its weights (the paper's) or a linear layer's outputs (`fwdgrad.ff.activity`)
PERTURB_TARGETS = ("weights", "outputs")
#: hybrid: QZO-FF's keys plus how many of the top trained layers backprop trains, and their learning rate
HYBRID_OPTIONS = (*QZO_FF_OPTIONS, "bp_layers", "bp_lr")
ZO_SGD_OPTIONS = (
    "momentum",
    "kernel_norm",
    "sharpness_rho",
    "difference",
    "distribution",
    "z_max",
    "layerwise",
)


@dataclass(frozen=True)
class MethodSpec:
    """What a method trains and how.

    trains: "float" (an nn.Module) or "qmodel" (a converted `QModel`); forward_only: never calls backward;
    default_quant: the format `quant=auto` resolves to; memory_format: the memory model's number format
    (None: the run's format); hyper: which of lr/eps/m the method reads (metrics.json records only these);
    fixed: hyperparameters pinned to one value (a different one is rejected); ff_options: the accepted
    `method.ff` keys; builder: its entry in `fwdgrad.train.BUILDERS`; estimator: the `fwdgrad.ff` estimator
    preset of the float zeroth-order methods; autocast: the BP autocast dtype name; trajectory: whether the
    landscape can follow it step by step; checkpointed: BP with activation checkpointing in `method.segments`
    segments (Chen et al. 2016), recomputed in the backward.
    """

    name: str
    summary: str
    trains: str
    forward_only: bool
    default_quant: str
    builder: str
    hyper: tuple[str, ...] = ("lr",)
    fixed: dict = field(default_factory=dict)
    ff_options: tuple[str, ...] = ()
    memory_format: str | None = None
    estimator: str | None = None
    autocast: str | None = None
    trajectory: bool = True
    checkpointed: bool = False

    def forwards_per_step(self, m: int = 1, ff: dict | None = None) -> int:
        """Forward passes one step costs (the compute budget unit)."""
        if self.builder == "hybrid":  # QZO-FF's passes for the lower layers, then one BP step
            return METHODS["qzo_ff"].forwards_per_step(m, ff) + BP_FORWARD_EQUIVALENTS
        if not self.forward_only:
            return CKPT_FORWARD_EQUIVALENTS if self.checkpointed else BP_FORWARD_EQUIVALENTS
        m = self.fixed.get("m", m)
        if self.builder == "jvp":
            return m
        ff = ff or {}
        difference = ff.get("difference", "sign")
        per_sample = 1 if difference in ONE_PASS_DIFFERENCES else 2
        center = 1 if difference == "one_sided" else 0
        return per_sample * m + center + (2 if ff.get("sharpness_rho") else 0)

    def memory_samples(self, m: int) -> int:
        """The m the memory model sees (a gradient-sum buffer exists only for m > 1)."""
        return self.fixed.get("m", m) if "m" in self.hyper else 1


METHODS: dict[str, MethodSpec] = {
    s.name: s
    for s in (
        MethodSpec("bp", "SGD on autograd gradients, fp32", "float", False, "fp32", "sgd"),
        MethodSpec(
            "bp_fp16",
            "SGD, forward/backward under fp16 autocast, fp32 master weights",
            "float",
            False,
            "fp32",
            "sgd",
            memory_format="fp16",
            autocast="float16",
        ),
        MethodSpec(
            "bp_bf16",
            "SGD, forward/backward under bf16 autocast, fp32 master weights",
            "float",
            False,
            "fp32",
            "sgd",
            memory_format="bf16",
            autocast="bfloat16",
        ),
        MethodSpec(
            "bp_ckpt",
            "SGD on autograd gradients, fp32, activation checkpointing (recomputed segments)",
            "float",
            False,
            "fp32",
            "sgd",
            checkpointed=True,
        ),
        MethodSpec(
            "bp_qat",
            "SGD on float master weights through STE fake-quantized QModel weights",
            "qmodel",
            False,
            "w16a8",
            "qat",
            ff_options=("weight_headroom",),  # as qzo_ff's: the trained layers' Δ_w x this, once
            trajectory=False,
        ),
        MethodSpec(
            "zo_fp32",
            "SPSA central difference in float, one sample per step (MeZO-style)",
            "float",
            True,
            "fp32",
            "zo",
            hyper=("lr", "eps", "m"),
            fixed={"m": 1},
            ff_options=ZO_SGD_OPTIONS,
            estimator="spsa",
        ),
        MethodSpec(
            "sign_spsa_fp32",
            "sign-m-SPSA in float (the paper's estimator, fp32)",
            "float",
            True,
            "fp32",
            "zo",
            hyper=("lr", "eps", "m"),
            ff_options=ZO_SGD_OPTIONS,
            estimator="sign_spsa",
        ),
        MethodSpec(
            "qzo_ff",
            "QZO-FF: sign-m-SPSA in fixed point, integer perturbation and update",
            "qmodel",
            True,
            "w16a8",
            "qzo",
            hyper=("lr", "eps", "m"),
            ff_options=QZO_FF_OPTIONS,
        ),
        MethodSpec(
            "hybrid",
            "backprop for the top method.ff.bp_layers trained layers, QZO-FF below, in one step (ElasticZO)",
            "qmodel",
            False,
            "w16a8",
            "hybrid",
            hyper=("lr", "eps", "m"),
            ff_options=HYBRID_OPTIONS,
            trajectory=False,
        ),
        MethodSpec(
            "jvp",
            "forward-mode forward gradient (∇L·z) z over m tangents",
            "float",
            True,
            "fp32",
            "jvp",
            hyper=("lr", "m"),
        ),
    )
}
METHOD_NAMES = tuple(METHODS)


def spec(name: str) -> MethodSpec:
    """The spec of method `name` (one-line ValueError naming the allowed ones)."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is invalid; allowed: {', '.join(METHODS)}")
    return METHODS[name]


#: Upper bounds of the hyperparameters (beyond them a run only saturates its weights or wastes its budget):
#: a learning rate; a perturbation size in real weight units (the integer ε is also checked against each
#: trained layer's weight range when the optimizer is built); perturbations per step (2 forward passes each).
UPPER = {"lr": 100.0, "eps": 1.0, "m": 1024}


def check_scope(method: str, scope: str, where: str = "") -> None:
    """One-line ValueError unless `scope` is a training scope (SCOPES) that method `method` can train: the
    QModel methods train weight nodes, so not the float-only scopes (FLOAT_SCOPES)."""
    trains = spec(method).trains
    if scope not in SCOPES:
        raise ValueError(f"{where}{scope!r} is invalid; allowed: {', '.join(SCOPES)}")
    if scope in FLOAT_SCOPES and trains == "qmodel":
        floats = ", ".join(n for n, s in METHODS.items() if s.trains == "float")
        qscopes = ", ".join(s for s in SCOPES if s not in FLOAT_SCOPES)
        raise ValueError(
            f"{where}{scope!r} is invalid for method {method!r} (a QModel); allowed: {qscopes}, or a float "
            f"method for {scope!r}: {floats}"
        )


def check_positive(key: str, value, upper: float | None = None) -> None:
    """One-line ValueError unless 0 < value (<= upper when given): a learning rate, a perturbation size."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(
            f"{key}={value!r} is invalid; allowed: > 0" + (f" and <= {upper:g}" if upper else "")
        )
    if upper is not None and not value <= upper:
        raise ValueError(f"{key}={value!r} is out of range; allowed: > 0 and <= {upper:g}")


def check_count(key: str, value, upper: int | None = None) -> None:
    """One-line ValueError unless value is an integer >= 1 (<= upper when given): a number of samples."""
    allowed = f"integers 1..{upper}" if upper else "integers >= 1"
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (upper and value > upper):
        raise ValueError(f"{key}={value!r} is invalid; allowed: {allowed}")


def check_hyper(name: str, lr: float, eps: float | None, m: int | None, where: str = "") -> None:
    """One-line ValueErrors for the hyperparameters method `name` reads out of range (`UPPER`), or for one
    differing from a value the method pins."""
    s = spec(name)
    values = {"lr": lr, "eps": eps, "m": m}
    for k in s.hyper:
        (check_count if k == "m" else check_positive)(where + k, values[k], UPPER[k])
    for k, v in s.fixed.items():
        if values[k] is not None and values[k] != v:
            raise ValueError(
                f"{where}{k}={values[k]!r} is invalid for method {name!r}; allowed: {v} ({s.summary})"
            )
