"""Training-memory model: bytes needed to fine-tune a model with backprop (BP) or forward gradients (FF).

Shapes are never entered by hand. :func:`trace_model` runs the model once on ``meta`` tensors (no data,
no compute) through ``torch.func.functional_call`` and records, from PyTorch itself:

- every ATen op (``TorchDispatchMode``) with the storages it reads and writes, its MACs and the module
  that ran it;
- every tensor autograd saves for the backward (``saved_tensors_hooks``), with only the trainable
  parameters requiring grad.

The model is traced in eval mode (BatchNorm on running statistics, dropout off), loss excluded.
``scaled_dot_product_attention`` on meta tensors takes the math path: the attention scores are
materialized, as on edge kernels (fused flash-style kernels would keep less).

Byte counts (n = element count, b_w/b_a = weight/activation bytes of the format, see :data:`FORMATS`):

- ``weights``       = n_params * b_w (parameters only; BN statistics are folded into convs on device).
- ``scratch``       BP: the peak of the training forward, where the activations autograd keeps for the
  backward live to its end. Those are the distinct non-parameter
  storages passed to ``saved_tensors_hooks``: the input of every trainable Conv/Linear (for its weight
  gradient) plus whatever the backward needs through the layers between the loss and the earliest
  trainable layer (inputs or outputs of nonlinearities, normalizations, attention scores, inputs of
  frozen layers whose weights are not needed ...). Ops before the first trainable layer keep nothing, so
  "lp" keeps only activations from the first trainable layer on (the frozen prefix still runs, so BP
  scratch is never below the FF forward peak); "sparse" keeps what "ft" keeps (each
  layer's weight gradient is computed densely, then masked). A frozen conv, linear or BatchNorm layer
  (:data:`WEIGHT_ONLY_BACKWARD`) keeps nothing: its input gradient needs only its weight ("bias" tuning
  backpropagates through frozen layers, keeping the ReLU outputs, not the conv inputs). Transient
  activation gradients during the backward are not counted.
  BP_CKPT (activation checkpointing in segments, :meth:`ModelTrace.checkpointed_peak`): the larger of the
  forward's peak keeping only the checkpointed segments' inputs and the last segment's saved tensors, and
  of each checkpointed segment's recomputation (the inputs held before it plus its forward with its saved
  tensors kept).
  FF: the peak of live activations during one inference forward with ideal freeing (a tensor lives
  from the op that writes it to the last op that reads it; the model output lives to the end). On a
  chain this is the largest input+output pair of a single op; residual branches add their skip tensor.
  Float tensors count b_a bytes per element, integer tensors (e.g. max-pool indices) their own size.
- ``gradients``     BP (and BP_CKPT): n_upd * b_w. FF: 0 for m = 1 (the update is +-z itself), else one
  layer's accumulated gradient sum_i sign_i z_i: max_layer_upd * b_acc (int16 for fixed point).
- ``optimizer_state`` = copies * n_upd * b_w (state kept in the weight format), copies = 0 (sgd),
  1 (momentum), 2 (adam).
- ``perturbation``  FF: z of the largest trainable layer, regenerated layer by layer from a seed and
  applied in place (exact restore in integer arithmetic): max_layer_upd * b_z (b_z = 1 for fixed
  point, b_w for float) + 16 bytes of counter-based RNG state. With ``z_storage="full"`` z is stored
  for every updated weight instead: n_upd * b_z (what the QZO-FF paper's FF figure counts, docs/memory.md).
  With perturbed outputs (``perturb="outputs"``, `fwdgrad.ff.activity`, one trained layer):
  ``perturbation`` = the layer's outputs over the batch * b_z (one pass's u) + 2 * batch * 8 (the examples'
  int64 losses of a ± pair) + 16; ``gradients`` = n_upd * 8 (the int64 sum G, for any m).
- ``masks``         sparse: a bitmap, 1 bit per candidate weight: ceil(n_trainable / 8) (an index list
  costs 4 bytes per selected weight, smaller only below a density of 1/32). ``mask_storage="seeded"``:
  0, a random mask regenerated from a seed like z (top-k or threshold masks need the bitmap).

n_trainable = parameters trained by the mode (`fwdgrad.models.scope_params`: "ft": all, "lp": those of the
last ``lp_layers`` parametrized layers, "sparse": all, of which a fraction ``density`` is selected, "dvpt":
a ViT's deep prompt tokens and the head, "ln": its LayerNorm affine parameters and the head, "bias": every
bias and the head);
n_upd = n_trainable, or ceil(density * n_trainable) when sparse; max_layer_upd = the same for the largest
trainable layer.
"trainable_weights" = n_upd * b_w are the bytes that must be writable (SRAM): sparse updates keep the
selected weights as a compact SRAM array beside the bitmap, the rest stay in flash.
For FF in "lp" mode the frozen prefix can be run once per example and its output reused (DeepZero
prefix reuse): the live-buffer peak is unchanged, the cache of prefix outputs is not counted here.

"dvpt" traces the model with its deep prompts: a ViT without them gets ``prompts`` per encoder layer on a
deep copy (:func:`scoped_model`), so the longer sequence (N + prompts tokens in every layer) is counted.
"""

from __future__ import annotations

import bisect
import copy
import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ..engine.blocks import Tokens
from ..methods import SCOPES, check_count
from ..models import add_prompts, checkpoint_segments, scope_params

METHODS = ("bp", "bp_ckpt", "ff")
OPTIMIZERS = {"sgd": 0, "momentum": 1, "adam": 2}
Z_STORAGE = ("layer", "full")
#: what FF perturbs: weights, or (activity perturbation, one linear layer) that layer's outputs
PERTURB = ("weights", "outputs")
MASK_STORAGE = ("bitmap", "seeded")
RNG_STATE_BYTES = 16
#: deep prompts per encoder layer when "dvpt" adds them (fwdgrad/conf/mode/dvpt.yaml's default)
DEFAULT_PROMPTS = 10
#: layers whose input gradient needs only their weight: a frozen one keeps no activation for the backward
#: (PyTorch's convolution and eval-mode batch_norm save their input anyway, for a weight gradient)
WEIGHT_ONLY_BACKWARD = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class NumberFormat:
    """Storage bytes of one number format; ``fixed_point`` formats store integer weights and activations."""

    name: str
    weight_bytes: int
    act_bytes: int
    fixed_point: bool

    @property
    def z_bytes(self) -> int:
        """Bytes per perturbation element: 8-bit z for fixed point, the weight type for float."""
        return 1 if self.fixed_point else self.weight_bytes

    @property
    def acc_bytes(self) -> int:
        """Bytes per element of the gradient sum over m perturbations: int16 for fixed point."""
        return 2 if self.fixed_point else self.weight_bytes


FORMATS = {
    f.name: f
    for f in (
        NumberFormat("fp32", 4, 4, False),
        NumberFormat("fp16", 2, 2, False),
        NumberFormat("bf16", 2, 2, False),
        NumberFormat("w16a16", 2, 2, True),
        NumberFormat("w16a8", 2, 1, True),
        NumberFormat("w8a16", 1, 2, True),
        NumberFormat("w8a8", 1, 1, True),
    )
}


def _check(name: str, value, allowed: Iterable) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {allowed}")


def get_format(name: str) -> NumberFormat:
    """The :class:`NumberFormat` called ``name`` (ValueError naming the allowed ones otherwise)."""
    _check("number format", name, FORMATS)
    return FORMATS[name]


def fmt_bytes(n: float) -> str:
    """Human-readable decimal bytes (1 MB = 10^6 B), e.g. ``11.43 MB``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class _Storage:
    nbytes: int
    itemsize: int
    is_float: bool

    def bytes(self, act_bytes: int) -> int:
        return self.nbytes // self.itemsize * act_bytes if self.is_float else self.nbytes


@dataclass(frozen=True)
class Op:
    """One ATen op of the traced forward: its module, MACs, and non-parameter storages read/written."""

    name: str
    module: str
    macs: int
    reads: tuple[int, ...]
    writes: tuple[int, ...]


@dataclass
class ModelTrace:
    """What one meta-device forward of a model recorded; see :func:`trace_model`."""

    params: dict[str, int]
    trainable: tuple[str, ...]
    backward: bool
    ops: list[Op] = field(default_factory=list)
    storages: dict[int, _Storage] = field(default_factory=dict)
    saved: set[int] = field(default_factory=set)
    inputs: set[int] = field(default_factory=set)
    outputs: set[int] = field(default_factory=set)
    #: (storage, the innermost module running, ops recorded so far) of every tensor autograd saved
    saved_by: list[tuple[int, str, int]] = field(default_factory=list)

    def peak_live_bytes(self, act_bytes: int, keep_saved: bool = False) -> int:
        """Peak over ops of the live activation bytes (tensor lives from first write/input to last read).

        ``keep_saved``: tensors saved for the backward live to the end: the peak of a BP forward.
        """
        return self._range_peak(act_bytes, 0, len(self.ops), self.saved if keep_saved else set())

    def _range_peak(self, act_bytes: int, start: int, stop: int, keep: Collection[int]) -> int:
        """Peak live bytes over ops[start:stop]: a tensor made before them (or a model input) lives from
        their start, one read after them (or a model output) or in ``keep`` to their end, any other from the
        op that writes it to the last op that reads it."""
        before = self.inputs | {s for op in self.ops[:start] for s in op.writes}
        after = self.outputs | {s for op in self.ops[stop:] for s in op.reads}
        first, last = {}, {}
        for i, op in enumerate(self.ops[start:stop]):
            for s in op.reads + op.writes:
                first.setdefault(s, -1 if s in before else i)
                last[s] = i
        n = stop - start
        delta = [0] * (n + 3)
        for s, i in first.items():
            b = self.storages[s].bytes(act_bytes)
            delta[i + 1] += b
            delta[(n if s in after or s in keep else last[s]) + 2] -= b
        peak = live = 0
        for d in delta:
            live += d
            peak = max(peak, live)
        return peak

    def checkpointed_peak(self, act_bytes: int, segments: Sequence[Sequence[str]]) -> int:
        """BP scratch with activation checkpointing (bp_ckpt) in ``segments`` (each the module names of its
        blocks, `fwdgrad.models.checkpoint_segments`): every segment but the last runs without keeping its
        saved tensors, holding only its input; the last keeps them as plain BP does. The peak of

        - the forward: live activations, with the inputs of the recomputed segments and what the last segment
          saves kept to its end;
        - the recomputation of each checkpointed segment k in the backward (last to first): the inputs held
          for segments before k, plus the peak of k's forward with what k saves kept to its end.

        A segment recomputes only when it saved something (nothing before the first trainable layer). Ops
        and saved tensors belong to the segment of their innermost module (ops outside every block's module,
        e.g. a top-level flatten, to the segment of the op before them); a module called by two segments is
        a one-line ValueError, as its ops could not be told apart."""
        owner = {name: k for k, names in enumerate(segments) for name in names}
        shared = [n for n in owner if sum(n in names for names in segments) > 1]
        if shared:
            raise ValueError(
                f"module {shared[0]!r} runs in more than one segment, so its ops cannot be told apart; "
                "allowed: models that call each block's module in one segment"
            )

        def segment_of(module: str, default: int) -> int:
            while module and module not in owner:
                module = module.rpartition(".")[0]
            return owner.get(module, default)

        op_seg: list[int] = []
        for op in self.ops:
            op_seg.append(segment_of(op.module, op_seg[-1] if op_seg else 0))
        starts = [bisect.bisect_left(op_seg, k) for k in range(len(segments))] + [len(self.ops)]
        saves: list[set[int]] = [set() for _ in segments]
        for sid, module, at in self.saved_by:
            saves[segment_of(module, op_seg[at - 1] if at else 0)].add(sid)
        made, last = dict.fromkeys(self.inputs, -1), dict.fromkeys(self.inputs, -1)
        for i, op in enumerate(self.ops):
            for s in op.writes:
                made.setdefault(s, i)
            last |= dict.fromkeys(op.reads + op.writes, i)
        recomputed = [k for k in range(len(segments) - 1) if saves[k]]
        held = {k: {s for s, i in made.items() if i < starts[k] <= last[s]} for k in recomputed}
        keep = set().union(saves[-1], *held.values())
        peaks = [self._range_peak(act_bytes, 0, len(self.ops), keep)]
        for k in recomputed:
            earlier = set().union(*(held[j] for j in recomputed if j < k)) - held[k]
            base = sum(self.storages[s].bytes(act_bytes) for s in earlier)
            peaks.append(base + self._range_peak(act_bytes, starts[k], starts[k + 1], saves[k]))
        return max(peaks)

    def macs_by_layer(self) -> dict[str, int]:
        """Forward MACs per module (the innermost module running each op), in forward order."""
        out: dict[str, int] = {}
        for op in self.ops:
            if op.macs:
                out[op.module] = out.get(op.module, 0) + op.macs
        return out

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)

    def layer_sizes(self, names: Iterable[str]) -> dict[str, int]:
        """Parameter count per owning module of the parameters ``names``."""
        out: dict[str, int] = {}
        for n in names:
            layer = n.rpartition(".")[0]
            out[layer] = out.get(layer, 0) + self.params[n]
        return out


def _op_macs(func, args, out) -> int:
    """Multiply-accumulates of matmul/conv/attention ATen ops (0 for everything else)."""
    name = func.overloadpacket.__name__
    if name in ("mm", "addmm"):
        a, b = args[-2], args[-1]
        return a.shape[0] * a.shape[1] * b.shape[1]
    if name in ("bmm", "baddbmm"):
        a, b = args[-2], args[-1]
        return a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    if name in ("convolution", "_convolution", "mkldnn_convolution"):
        return out.numel() * args[1][0].numel()
    return 0


class _Recorder(TorchDispatchMode):
    def __init__(self, trace: ModelTrace, skip: set[int], stack: list[str]):
        super().__init__()
        self.trace, self.skip, self.stack = trace, skip, stack
        self.keep: list[torch.Tensor] = []  # keeps storages alive so their ids stay unique

    def sids(self, tree) -> tuple[int, ...]:
        out = []
        for t in tree_flatten(tree)[0]:
            if isinstance(t, torch.Tensor):
                sid = t.untyped_storage()._cdata
                if sid in self.skip:
                    continue
                self.keep.append(t)
                if sid not in self.trace.storages:
                    nbytes = t.untyped_storage().nbytes()
                    self.trace.storages[sid] = _Storage(nbytes, t.element_size(), t.is_floating_point())
                out.append(sid)
        return tuple(dict.fromkeys(out))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        reads = self.sids((args, kwargs))
        writes = tuple(s for s in self.sids(out) if s not in reads)
        macs = _op_macs(func, args, out)
        self.trace.ops.append(Op(str(func), self.stack[-1], macs, reads, writes))
        return out


def trace_model(
    model: nn.Module,
    input_shape: tuple[int, ...],
    trainable: Collection[str] = (),
    backward: bool = False,
) -> ModelTrace:
    """Run ``model`` once on a meta input of ``input_shape`` and record ops, storages and saved tensors.

    ``trainable``: the trained parameter names. ``backward=True`` runs the forward with autograd, only
    these parameters requiring grad, and records what autograd saves for the backward (a BP forward);
    ``backward=False`` runs under ``no_grad`` like an FF (inference) forward.
    """
    params = dict(model.named_parameters())
    trainable = tuple(trainable)
    unknown = sorted(set(trainable) - set(params))
    if unknown:
        raise ValueError(f"unknown trainable parameters {unknown[:5]}; the model has e.g. {list(params)[:5]}")
    meta = {n: torch.empty_like(p, device="meta").requires_grad_(n in trainable) for n, p in params.items()}
    frozen = {
        name
        for name, mod in model.named_modules()
        if isinstance(mod, WEIGHT_ONLY_BACKWARD) and f"{name}.weight".lstrip(".") not in trainable
    }
    meta.update({n: torch.empty_like(b, device="meta") for n, b in model.named_buffers()})
    trace = ModelTrace({n: p.numel() for n, p in params.items()}, trainable, backward)
    stack = ["<model>"]

    def enter(name: str) -> Callable:
        return lambda *_: stack.append(name)

    def leave(*_) -> None:
        stack.pop()

    handles = []
    for name, mod in model.named_modules():
        handles += [mod.register_forward_pre_hook(enter(name)), mod.register_forward_hook(leave)]
    flags = {m: m.training for m in model.modules()}
    model.eval()
    skip = {t.untyped_storage()._cdata for t in meta.values()}
    x = torch.empty(input_shape, device="meta")
    recorder = _Recorder(trace, skip, stack)
    trace.inputs = set(recorder.sids(x))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if stack[-1] in frozen:  # the input of a frozen conv/linear/BatchNorm: its backward needs the weight
            return t
        sids = recorder.sids(t)
        trace.saved.update(sids)
        trace.saved_by.extend((s, stack[-1], len(trace.ops)) for s in sids)
        return t

    try:
        with (
            torch.set_grad_enabled(backward),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            recorder,
        ):
            y = functional_call(model, meta, (x,))
        trace.outputs = set(recorder.sids(y))
    finally:
        for h in handles:
            h.remove()
        for m, f in flags.items():
            m.train(f)
    return trace


@dataclass(frozen=True)
class MemoryBreakdown:
    """Training-memory bytes by category (formulas in the module docstring)."""

    model: str
    input_shape: tuple[int, ...]
    method: str
    mode: str
    fmt: str
    optimizer: str
    m: int
    forward_macs: int
    n_params: int
    n_updated: int
    weights: int
    trainable_weights: int
    scratch: int
    gradients: int
    optimizer_state: int
    perturbation: int
    masks: int
    segments: int = 1  # bp_ckpt: the checkpointed segments (1: none)

    @property
    def total(self) -> int:
        return self.weights + self.paper_scratch

    @property
    def paper_scratch(self) -> int:
        """The paper's "scratch buffer": everything but the weights."""
        return self.scratch + self.gradients + self.optimizer_state + self.perturbation + self.masks

    def as_dict(self) -> dict:
        return asdict(self) | {"total": self.total, "paper_scratch": self.paper_scratch}

    def summary(self) -> str:
        """One line: ``weights=.. scratch=.. gradients=.. optimizer=.. perturbation=.. masks=.. total=..``."""
        parts = ("weights", "scratch", "gradients", "optimizer_state", "perturbation", "masks", "total")
        return f"{self.method}/{self.mode}/{self.fmt}: " + " ".join(
            f"{p.replace('_state', '')}={fmt_bytes(getattr(self, p))}" for p in parts
        )


def scoped_model(model: nn.Module, mode: str, prompts: int = DEFAULT_PROMPTS) -> nn.Module:
    """The model that ``mode`` trains: for "dvpt", a ViT without deep prompts gets ``prompts`` per encoder
    layer (`fwdgrad.models.add_prompts`) on a deep copy, as the trainer adds them; otherwise ``model``
    itself (a model that carries prompts keeps its own count)."""
    _check("mode", mode, SCOPES)
    if mode != "dvpt" or any(isinstance(m, Tokens) and m.prompt for m in model.modules()):
        return model
    prompted = copy.deepcopy(model)
    add_prompts(prompted, prompts)
    return prompted


def trainable_for(
    model: nn.Module, mode: str, lp_layers: int = 1, prompts: int = DEFAULT_PROMPTS
) -> list[str]:
    """Parameter names trained in ``mode`` (`fwdgrad.models.scope_params`) of :func:`scoped_model`: all for
    "ft"/"sparse", the last ``lp_layers`` layers for "lp", deep prompts + head for "dvpt" (the prompts'
    names are those :func:`scoped_model` adds when ``model`` has none), LayerNorms + head for "ln"."""
    return scope_params(scoped_model(model, mode, prompts), mode, lp_layers)


def breakdown_from_trace(
    trace: ModelTrace,
    method: str,
    fmt: str,
    mode: str = "ft",
    density: float = 0.1,
    optimizer: str = "sgd",
    m: int = 1,
    z_storage: str = "layer",
    mask_storage: str = "bitmap",
    model_name: str = "model",
    input_shape: tuple[int, ...] = (),
    segments: Sequence[Sequence[str]] = (),
    perturb: str = "weights",
) -> MemoryBreakdown:
    """Byte breakdown for a trace: BP needs a ``backward=True`` trace, FF an inference one. bp_ckpt: BP with
    activation checkpointing in ``segments`` (the module names of each, `fwdgrad.models.checkpoint_segments`;
    scratch: `ModelTrace.checkpointed_peak`); perturb: FF's "weights" or "outputs" (module docstring)."""
    _check("method", method, METHODS)
    bp = method != "ff"
    if trace.backward != bp:
        raise ValueError(f"method {method!r} needs a trace with backward={bp}")
    if (method == "bp_ckpt") != bool(segments):
        raise ValueError(
            f"method {method!r} with {len(segments)} segments is invalid; allowed: segments for bp_ckpt only"
        )
    _check("mode", mode, SCOPES)
    _check("optimizer", optimizer, OPTIMIZERS)
    _check("z_storage", z_storage, Z_STORAGE)
    _check("mask_storage", mask_storage, MASK_STORAGE)
    _check("perturb", perturb, PERTURB)
    f = get_format(fmt)
    if mode == "sparse" and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    check_count("m", m)
    frac = density if mode == "sparse" else 1.0
    n_train = sum(trace.params[n] for n in trace.trainable)
    n_upd = math.ceil(frac * n_train)
    layer_upd = math.ceil(frac * max(trace.layer_sizes(trace.trainable).values(), default=0))
    if method == "bp":
        scratch, grads, pert = trace.peak_live_bytes(f.act_bytes, keep_saved=True), n_upd * f.weight_bytes, 0
    elif method == "bp_ckpt":
        scratch, grads, pert = trace.checkpointed_peak(f.act_bytes, segments), n_upd * f.weight_bytes, 0
    else:
        scratch = trace.peak_live_bytes(f.act_bytes)
        grads = 0 if m == 1 else layer_upd * f.acc_bytes
        pert = (n_upd if z_storage == "full" else layer_upd) * f.z_bytes + RNG_STATE_BYTES
        if perturb == "outputs":  # one pass's u over the layer's outputs, a ± pair's losses, the int64 G
            layers = {name.rpartition(".")[0] for name in trace.trainable}  # parameter -> module names
            outputs = max(
                (trace.storages[w].nbytes // trace.storages[w].itemsize for op in trace.ops
                 if op.module in layers for w in op.writes),
                default=0,
            )  # fmt: skip
            batch = input_shape[0] if input_shape else 1
            pert = outputs * f.z_bytes + 2 * batch * 8 + RNG_STATE_BYTES
            grads = n_upd * 8
    return MemoryBreakdown(
        model=model_name,
        input_shape=tuple(input_shape),
        method=method,
        mode=mode,
        fmt=fmt,
        optimizer=optimizer,
        m=m,
        forward_macs=trace.macs,
        n_params=sum(trace.params.values()),
        n_updated=n_upd,
        weights=sum(trace.params.values()) * f.weight_bytes,
        trainable_weights=n_upd * f.weight_bytes,
        scratch=scratch,
        gradients=grads,
        optimizer_state=OPTIMIZERS[optimizer] * n_upd * f.weight_bytes,
        perturbation=pert,
        masks=math.ceil(n_train / 8) if mode == "sparse" and mask_storage == "bitmap" else 0,
        segments=max(1, len(segments)),
    )


def memory_breakdown(
    model: nn.Module,
    input_shape: tuple[int, ...],
    method: str = "ff",
    mode: str = "ft",
    fmt: str = "fp32",
    *,
    density: float = 0.1,
    lp_layers: int = 1,
    optimizer: str = "sgd",
    m: int = 1,
    z_storage: str = "layer",
    mask_storage: str = "bitmap",
    trainable: Collection[str] | None = None,
    model_name: str | None = None,
    prompts: int = DEFAULT_PROMPTS,
    segments: int | None = None,
    perturb: str = "weights",
) -> MemoryBreakdown:
    """Training-memory breakdown of ``model`` on a batch of ``input_shape`` (formulas: module docstring).

    ``trainable`` overrides the parameter set implied by ``mode`` (e.g. the exact set a trainer uses);
    ``model_name`` labels the result (default: the model's class name); ``prompts``: deep prompts per
    encoder layer that "dvpt" adds to a ViT without them (:func:`scoped_model`); ``segments``: bp_ckpt's
    checkpointed segments (`fwdgrad.models.checkpoint_segments`, None: its default).
    """
    _check("method", method, METHODS)
    model = scoped_model(model, mode, prompts)
    names = trainable_for(model, mode, lp_layers) if trainable is None else list(trainable)
    groups = ckpt_groups(model, segments) if method == "bp_ckpt" else []
    trace = trace_model(model, input_shape, names, method != "ff")
    kw = dict(density=density, optimizer=optimizer, m=m, z_storage=z_storage, mask_storage=mask_storage)
    kw["segments"], kw["perturb"] = groups, perturb
    return breakdown_from_trace(
        trace, method, fmt, mode, model_name=model_name or type(model).__name__, input_shape=input_shape, **kw
    )


def ckpt_groups(model: nn.Module, segments: int | None = None) -> list[list[str]]:
    """The module names of each of bp_ckpt's segments (`fwdgrad.models.checkpoint_segments`)."""
    return [s.modules for s in checkpoint_segments(model, segments)]


def format_table(
    model: nn.Module,
    input_shape: tuple[int, ...],
    formats: Iterable[str] = ("fp32", "fp16", "w16a16", "w16a8", "w8a8"),
    mode: str = "ft",
    density: float = 0.1,
    lp_layers: int = 1,
    prompts: int = DEFAULT_PROMPTS,
    segments: int | None = None,
    **kw,
) -> str:
    """Markdown table of training memory, one row per format: BP, BP with activation checkpointing
    (bp_ckpt, ``segments``), bias-only BP (TinyTL), FF and FF + sparse (``density``); BP / FF of the mode.

    Cells are the paper's "scratch" (total - weights); ``prompts``: see :func:`memory_breakdown`; ``kw`` go
    to :func:`breakdown_from_trace`. The model must be one bp_ckpt can segment (every zoo model; else the
    one-line ValueError of `fwdgrad.models.model_blocks`).
    """
    model = scoped_model(model, mode, prompts)
    names = trainable_for(model, mode, lp_layers)
    groups = ckpt_groups(model, segments)
    bp_trace = trace_model(model, input_shape, names, backward=True)
    bias_trace = trace_model(model, input_shape, trainable_for(model, "bias", lp_layers), backward=True)
    ff_trace = trace_model(model, input_shape, names)
    rows = [
        f"| format | weights | BP ({mode}) | BP ckpt, {len(groups)} segments ({mode}) | BP (bias) "
        f"| FF ({mode}) | FF sparse {density:g} | BP / FF |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for fmt in formats:
        cols = [
            breakdown_from_trace(bp_trace, "bp", fmt, mode, density, **kw),
            breakdown_from_trace(bp_trace, "bp_ckpt", fmt, mode, density, segments=groups, **kw),
            breakdown_from_trace(bias_trace, "bp", fmt, "bias", density, **kw),
            breakdown_from_trace(ff_trace, "ff", fmt, mode, density, **kw),
            breakdown_from_trace(ff_trace, "ff", fmt, "sparse", density, **kw),
        ]
        cells = [fmt_bytes(x) for x in (cols[0].weights, *(b.paper_scratch for b in cols))]
        rows.append(f"| {fmt} | {' | '.join(cells)} | {cols[0].paper_scratch / cols[3].paper_scratch:.1f}x |")
    return "\n".join(rows)


#: The QZO-FF paper's ViT-tiny (DeiT-tiny) full fine-tuning scratch figures, bytes
#: (docs/method.md#memory-and-compute-model).
PAPER_VIT_SCRATCH = {"bp_fp16": 31.64e6, "ff_fp16": 11.43e6, "ff_sparse_fixed": 0.40e6}
#: The paper trains ViT-tiny with D-VPT but does not give its prompt count; the comparison uses
#: fwdgrad/conf/mode/dvpt.yaml's default.
PAPER_DVPT_PROMPTS = DEFAULT_PROMPTS
#: The scopes the comparison's second table sets side by side (fwdgrad ViT, fp16).
PAPER_SCOPES = ("ft", "lp", "dvpt", "ln")

REFERENCE_VIT = "torchvision ViT"
FWDGRAD_VIT = "fwdgrad ViT"


def reference_deit_tiny(num_classes: int = 1000) -> nn.Module:
    """DeiT-tiny as PyTorch model zoos build it: torchvision's ``VisionTransformer`` (224 px, patch 16, 12
    blocks, 3 heads, 192 wide, MLP 768; 5,717,416 parameters with 1000 classes), attention through
    ``nn.MultiheadAttention`` and ``scaled_dot_product_attention``. Its math path multiplies q and k each by
    d^-1/4 and autograd keeps both products: two (N, D) tensors per block more than fwdgrad's `ViT`, whose
    ``Attention`` folds the 1/sqrt(d) scale into the q projection (as the integer engine runs it)."""
    from torchvision.models import VisionTransformer

    return VisionTransformer(224, 16, 12, 3, 192, 768, num_classes=num_classes)


@dataclass(frozen=True)
class PaperRow:
    """One row of :func:`vit_paper_comparison`: the breakdown of each DeiT-tiny (:data:`REFERENCE_VIT`,
    :data:`FWDGRAD_VIT`) and the key of the paper's figure in :data:`PAPER_VIT_SCRATCH`."""

    label: str
    breakdowns: dict[str, MemoryBreakdown]
    paper_key: str
    count_activations: bool = True

    def activations(self, model: str) -> int:
        return self.breakdowns[model].scratch if self.count_activations else 0

    def scratch(self, model: str) -> int:
        """The paper's scratch (total - weights), activations left out when ``count_activations`` is off."""
        b = self.breakdowns[model]
        return b.paper_scratch - b.scratch + self.activations(model)


def vit_scope_traces(
    batch_size: int = 1, prompts: int = PAPER_DVPT_PROMPTS, scopes: Iterable[str] = PAPER_SCOPES
) -> dict[str, tuple[ModelTrace, ModelTrace]]:
    """(BP, FF) traces of fwdgrad's DeiT-tiny, ``vit_tiny(1000, image_size=224, patch_size=16)``, on a
    (``batch_size``, 3, 224, 224) input per training scope; "dvpt" with ``prompts`` deep prompts per encoder
    layer. The inference forward does not depend on what trains, so scopes on the same model share one FF
    trace (each with its own trainable set)."""
    from fwdgrad.models import vit_tiny

    model = vit_tiny(1000, image_size=224, patch_size=16)
    shape = (batch_size, 3, 224, 224)
    plain_ff = trace_model(model, shape)
    out = {}
    for scope in scopes:
        scoped = scoped_model(model, scope, prompts)
        names = tuple(trainable_for(scoped, scope))
        ff = plain_ff if scoped is model else trace_model(scoped, shape)
        out[scope] = trace_model(scoped, shape, names, backward=True), replace(ff, trainable=names)
    return out


def vit_scope_rows(
    batch_size: int = 1,
    prompts: int = PAPER_DVPT_PROMPTS,
    scopes: Iterable[str] = PAPER_SCOPES,
    traces: dict[str, tuple[ModelTrace, ModelTrace]] | None = None,
) -> dict[str, tuple[MemoryBreakdown, MemoryBreakdown]]:
    """(BP, FF) fp16 breakdowns of fwdgrad's DeiT-tiny at the paper's setting (224 px, patch 16, SGD,
    m = 1) per training scope (:func:`vit_scope_traces`, or ``traces`` made by it)."""
    traces = vit_scope_traces(batch_size, prompts, scopes) if traces is None else traces
    return {
        s: (breakdown_from_trace(bp, "bp", "fp16", s), breakdown_from_trace(ff, "ff", "fp16", s))
        for s, (bp, ff) in traces.items()
    }


def vit_paper_rows(
    batch_size: int = 1, traces: dict[str, tuple[ModelTrace, ModelTrace]] | None = None
) -> list[PaperRow]:
    """The rows held against the paper's ViT-tiny figures (full fine-tuning, SGD, m = 1), each for the
    reference DeiT-tiny (:func:`reference_deit_tiny`) and fwdgrad's ``vit_tiny(1000, image_size=224,
    patch_size=16)``: BP fp16; FF fp16 with our layer-wise z and with the paper's apparent convention (z for
    every weight, activations not counted); FF w16a8 with a 10 % sparse update, seeded and bitmap masks.
    ``traces``: :func:`vit_scope_traces` of the same batch size, whose "ft" entry is used."""
    shape = (batch_size, 3, 224, 224)
    ref = reference_deit_tiny()
    names = trainable_for(ref, "ft")
    models = {
        REFERENCE_VIT: (trace_model(ref, shape, names, backward=True), trace_model(ref, shape, names)),
        FWDGRAD_VIT: (traces or vit_scope_traces(batch_size, scopes=("ft",)))["ft"],
    }
    configs = [  # label, method, format, breakdown_from_trace options, paper figure, count activations
        ("BP, fp16, ft", "bp", "fp16", {}, "bp_fp16", True),
        ("FF, fp16, ft, layer-wise z", "ff", "fp16", {}, "ff_fp16", True),
        ("FF, fp16, ft, full z, no activations", "ff", "fp16", {"z_storage": "full"}, "ff_fp16", False),
        (
            "FF, w16a8, sparse 10 %, seeded mask",
            "ff",
            "w16a8",
            {"mask_storage": "seeded"},
            "ff_sparse_fixed",
            True,
        ),
        ("FF, w16a8, sparse 10 %, bitmap mask", "ff", "w16a8", {}, "ff_sparse_fixed", True),
    ]
    rows = []
    for label, method, fmt, kw, key, acts in configs:
        if "sparse" in label:
            kw = {**kw, "mode": "sparse", "density": 0.1}
        b = {m: breakdown_from_trace(t[method == "ff"], method, fmt, **kw) for m, t in models.items()}
        rows.append(PaperRow(label, b, key, acts))
    return rows


def vit_paper_comparison(
    batch_size: int = 1,
    prompts: int = PAPER_DVPT_PROMPTS,
    traces: dict[str, tuple[ModelTrace, ModelTrace]] | None = None,
) -> str:
    """Markdown: our model vs the paper's ViT-tiny scratch figures (:func:`vit_paper_rows`), then BP vs FF
    scratch per training scope, D-VPT next to FT and LP (:func:`vit_scope_rows`). ``traces``:
    :func:`vit_scope_traces` of the same batch size and prompts (made here if not given)."""
    if traces is None:
        traces = vit_scope_traces(batch_size, prompts, PAPER_SCOPES)
    rows = vit_paper_rows(batch_size, traces)
    scopes = vit_scope_rows(traces=traces)
    ref, ours = REFERENCE_VIT, FWDGRAD_VIT
    out = [
        f"DeiT-tiny ({rows[0].breakdowns[ref].n_params:,} parameters), 224 px, patch 16, batch {batch_size}, "
        f"SGD, m = 1. {ref} = `reference_deit_tiny()` (nn.MultiheadAttention); {ours} = "
        "`vit_tiny(1000, image_size=224, patch_size=16)`. Gradients, perturbation and masks are the same for "
        "both (same parameters, same largest layer).",
        "",
        f"| configuration | activations, {ref} | activations, {ours} | gradients | perturbation | masks "
        f"| scratch, {ref} | scratch, {ours} | paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r.breakdowns[ours]
        out.append(
            f"| {r.label} | {fmt_bytes(r.activations(ref))} | {fmt_bytes(r.activations(ours))} "
            f"| {fmt_bytes(b.gradients)} | {fmt_bytes(b.perturbation)} | {fmt_bytes(b.masks)} "
            f"| {fmt_bytes(r.scratch(ref))} | {fmt_bytes(r.scratch(ours))} "
            f"| {fmt_bytes(PAPER_VIT_SCRATCH[r.paper_key])} |"
        )
    out += [
        "",
        f"Training scopes, fwdgrad ViT, fp16 (dvpt: {prompts} prompts per encoder layer, "
        f"{(224 // 16) ** 2 + 1 + prompts} tokens instead of {(224 // 16) ** 2 + 1}). The paper gives no "
        "figure for these.",
        "",
        "| scope | trained parameters | BP activations | BP scratch | FF activations | FF scratch "
        "| BP / FF |",
        "|---|---|---|---|---|---|---|",
    ]
    for scope, (bp, ff) in scopes.items():
        out.append(
            f"| {scope} | {bp.n_updated:,} | {fmt_bytes(bp.scratch)} | {fmt_bytes(bp.paper_scratch)} "
            f"| {fmt_bytes(ff.scratch)} | {fmt_bytes(ff.paper_scratch)} "
            f"| {bp.paper_scratch / ff.paper_scratch:.1f}x |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    print(vit_paper_comparison())
