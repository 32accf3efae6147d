"""Float `nn.Module` → integer-simulated `QModel`.

Steps: trace with torch.fx → fold BatchNorm into the preceding conv/linear → calibrate static activation
scales on data (one observer per tensor-valued node) → map every graph node to a `QNode`, fusing a
ReLU/ReLU6 into the conv/linear/add before it. Transformers convert too: every nn.MultiheadAttention is
decomposed first (`blocks.decompose_attention`), and LayerNorm, softmax, activation matmuls and learned
tokens map to the integer ops of `transformer`. Ops without an integer kernel run in fake-quant mode and
are named in a warning.
"""

from __future__ import annotations

import operator
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..quant import QParams, activation_format, compute_qparams, make_observer, quantize, weight_format
from .blocks import Tokens, decompose_attention
from .intops import AccumulatorSpec
from .model import QModel, chunk_rows
from .nodes import (
    QAvgPool,
    QClamp,
    QConst,
    QConv2d,
    QFallback,
    QInput,
    QLayout,
    QLinear,
    QLut,
    QRescaleSum,
    Ref,
)
from .transformer import QLayerNorm, QMatmul, QSoftmax, QTokens

SCHEMES = ("w16a8", "w8a8", "w8a16", "w16a16", "w4a8", "w8a4")


@dataclass(frozen=True)
class Scheme:
    """Bit widths of a fixed-point scheme, parsed from names like 'w16a8'."""

    weight_bits: int
    act_bits: int

    @classmethod
    def parse(cls, name: str) -> Scheme:
        m = re.fullmatch(r"w(\d+)a(\d+)", str(name))
        if not m:
            raise ValueError(
                f"quantization scheme {name!r} is invalid; expected 'w<bits>a<bits>', e.g. {SCHEMES}"
            )
        w, a = int(m[1]), int(m[2])
        for what, b in (("weight", w), ("activation", a)):
            if not 2 <= b <= 16:
                raise ValueError(f"{what} bits {b} in scheme {name!r} are invalid; allowed: 2..16")
        return cls(w, a)

    @property
    def name(self) -> str:
        return f"w{self.weight_bits}a{self.act_bits}"


LAYOUT_MODULES = (nn.Flatten, nn.Dropout, nn.Identity, nn.MaxPool2d, nn.Unflatten)
LAYOUT_FUNCTIONS = {
    torch.flatten,
    torch.reshape,
    torch.permute,
    torch.transpose,
    F.max_pool2d,
    F.dropout,
    torch.squeeze,
    torch.unsqueeze,
    operator.getitem,
}
LAYOUT_METHODS = {
    "flatten",
    "view",
    "reshape",
    "permute",
    "transpose",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "unflatten",
    "__getitem__",
}
LUT_MODULES = (nn.Hardswish, nn.Sigmoid, nn.Tanh, nn.GELU, nn.SiLU, nn.Hardsigmoid)
LUT_FUNCTIONS = {
    F.hardswish: F.hardswish,
    torch.sigmoid: torch.sigmoid,
    F.gelu: F.gelu,
    torch.tanh: torch.tanh,
    F.silu: F.silu,
}
RELU_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6"}
RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6"}
ADD_FUNCTIONS = {operator.add, torch.add, operator.iadd}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.bmm}
SOFTMAX_FUNCTIONS = {F.softmax, torch.softmax}
STRUCTURAL = {getattr, torch._assert, "size", "dim"}


def _relu_kind(node: fx.Node, modules: dict) -> str | None:
    if node.op == "call_module":
        return RELU_MODULES.get(type(modules[node.target]))
    if node.op == "call_function":
        return RELU_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target == "relu":
        return "relu"
    return None


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold every BatchNorm that directly follows a conv/linear used only by it (eval statistics)."""
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d | nn.BatchNorm1d):
            continue
        prev = node.args[0]
        if not (isinstance(prev, fx.Node) and prev.op == "call_module" and len(prev.users) == 1):
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if isinstance(layer, nn.Conv2d):
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        elif isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            continue
        parent, _, attr = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


class _Calibrator(fx.Interpreter):
    """Runs the float graph and feeds every floating tensor a node produces into its observer."""

    def __init__(self, gm, observers: dict, make):
        super().__init__(gm)
        self.observers, self.make = observers, make

    def run_node(self, n):
        out = super().run_node(n)
        if torch.is_tensor(out) and out.is_floating_point():
            if n.name not in self.observers:
                self.observers[n.name] = self.make()
            self.observers[n.name].observe(out)
        return out


def _is_add(n: fx.Node) -> bool:
    """A sum of two tensors (a residual add): the op `QRescaleSum` takes."""
    return (
        n.op == "call_function" and n.target in ADD_FUNCTIONS and all(isinstance(a, fx.Node) for a in n.args)
    )


def _is_softmax(n: fx.Node, mod: nn.Module | None) -> bool:
    """A softmax over the last axis, given as dim=-1 (the trace knows no ranks)."""
    if isinstance(mod, nn.Softmax):
        dim = mod.dim
    elif (n.op == "call_function" and n.target in SOFTMAX_FUNCTIONS) or (
        n.op == "call_method" and n.target == "softmax"
    ):
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    else:
        return False
    return dim == -1


def _batches(data) -> Iterable[torch.Tensor]:
    if torch.is_tensor(data):
        yield data
        return
    for b in data:
        yield b[0] if isinstance(b, tuple | list) else b


def convert(
    model: nn.Module,
    scheme: str | Scheme,
    calib_data,
    observer: str = "minmax",
    per_channel: bool = False,
    acc_bits: int = 32,
    overflow: str = "saturate",
    requant: str = "single",
    mode: str = "integer",
    max_calib_batches: int = 16,
    act_qparams: Mapping[str, QParams | None] | None = None,
    residual_bits: int | None = None,
) -> QModel:
    """Convert a float model to a `QModel` under `scheme` (e.g. 'w16a8').

    calib_data: a tensor batch or an iterable of batches / (x, y) pairs used to set the static activation
    scales. per_channel: per-output-channel weight scales. acc_bits/overflow: accumulator semantics;
    requant: 'single' | 'gemmlowp' | 'float' (see `fwdgrad.quant`). act_qparams: every node's output format
    by node name, as a converted model had them (`fwdgrad.engine.state`), taken instead of calibrating
    (calib_data and observer are then unused): how a saved model is rebuilt without its data.
    residual_bits: the width of the residual stream (the outputs of residual adds and of spliced tokens,
    which LayerNorms read), default the activation width; transformers keep more accuracy at 16.
    """
    scheme = scheme if isinstance(scheme, Scheme) else Scheme.parse(scheme)
    model = model.eval()
    gm = fold_batchnorm(trace(decompose_attention(_copy(model))))
    modules = dict(gm.named_modules())
    w_fmt = weight_format(scheme.weight_bits, per_channel=per_channel)
    if act_qparams is None:
        builder = _Builder(
            gm,
            modules,
            _calibrate(gm, scheme, calib_data, observer, max_calib_batches, residual_bits),
            w_fmt,
            scheme.act_bits,
        )
    else:
        builder = _Builder(gm, modules, act_qparams, w_fmt, scheme.act_bits, by_node=True)
    nodes, output = builder.build()
    if builder.fallbacks:
        warnings.warn(
            "fwdgrad: no integer kernel for "
            + ", ".join(builder.fallbacks)
            + "; these run in fake-quant (float) mode",
            stacklevel=2,
        )
    return QModel(nodes, output, scheme.name, AccumulatorSpec(acc_bits, overflow), requant, mode)


def _calibrate(
    gm: fx.GraphModule, scheme: Scheme, calib_data, observer: str, max_batches: int, residual_bits: int | None
) -> dict:
    """The static activation format of every floating tensor the graph computes on `calib_data`, by fx
    node name (`residual_bits` wide on the residual stream)."""
    act_fmt = activation_format(scheme.act_bits)
    observers: dict = {}
    if residual_bits is not None:
        if not 2 <= residual_bits <= 16:
            raise ValueError(f"residual_bits={residual_bits!r} is invalid; allowed: 2..16 or None")
        wide = activation_format(residual_bits)
        modules = dict(gm.named_modules())
        for n in gm.graph.nodes:
            if _is_add(n) or (n.op == "call_module" and isinstance(modules[n.target], Tokens)):
                observers[n.name] = make_observer(observer, wide)
    cal = _Calibrator(gm, observers, lambda: make_observer(observer, act_fmt))
    # a batch-invariant observer (minmax) sees the same values in page-fault-friendly chunks
    chunked = make_observer(observer, act_fmt).batch_invariant
    with torch.no_grad():
        seen = 0
        for i, xb in enumerate(_batches(calib_data)):
            if i >= max_batches:
                break
            for xc in xb.split(max(1, chunk_rows(xb) if chunked else len(xb))):
                cal.run(xc.float())
            seen += 1
    if not seen:
        raise ValueError("calib_data is empty; give at least one batch to calibrate activation scales")
    return {name: obs.qparams() for name, obs in observers.items()}


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping `Tokens` as one op (the engine stores its tokens as integers)."""

    def is_leaf_module(self, m, qualname):
        return isinstance(m, Tokens) or super().is_leaf_module(m, qualname)


class _WhereTracer(_Tracer):
    """The tracer, remembering the innermost module whose forward failed to trace."""

    failed_at: tuple[str, nn.Module] | None = None

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                try:
                    self.failed_at = (self.path_of_module(m), m)
                except NameError:  # a module that is not a registered submodule
                    self.failed_at = (type(m).__name__, m)
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """`torch.fx.symbolic_trace(model)`; a model it cannot trace is a one-line ValueError naming the module
    whose forward failed (data-dependent Python control flow, calls on tensor values, ...)."""
    try:
        return fx.GraphModule(model, _Tracer().trace(model), model.__class__.__name__)
    except Exception as e:  # noqa: BLE001 - whatever the trace trips over, the same one-line message
        tracer = _WhereTracer()
        try:
            tracer.trace(model)
        except Exception:  # noqa: BLE001 - the same failure, now with the module it happened in
            pass
        name, module = tracer.failed_at or ("", model)
        where = f"module {name!r} ({type(module).__name__})" if name else f"{type(module).__name__}.forward"
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"the integer engine cannot trace {type(model).__name__}: torch.fx fails in {where}: {why}; "
            "allowed: models torch.fx.symbolic_trace can trace (no Python control flow on tensor values), "
            "or a float method (quant=fp32, e.g. method=bp), which needs no conversion"
        ) from e


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


class _Builder:
    """Maps fx nodes to QNodes; tracks name aliases created by fusion.

    act_qp: the calibrated formats by fx node name (a conv/add fused with the ReLU after it takes the
    ReLU's), or, with by_node, the output formats of a converted model's QNodes by name (`convert`'s
    act_qparams).
    """

    def __init__(self, gm, modules, act_qp, w_fmt, act_bits: int, by_node: bool = False):
        self.gm, self.modules, self.act_qp, self.w_fmt, self.by_node = gm, modules, act_qp, w_fmt, by_node
        self.act_bits = act_bits
        self.alias: dict[str, str] = {}
        self.qp: dict[str, QParams | None] = {}
        self.fallbacks: list[str] = []

    def name(self, n: fx.Node) -> str:
        return self.alias.get(n.name, n.name)

    def out_qp(self, n: fx.Node, last: fx.Node | None = None) -> QParams:
        """The output format of the QNode made of fx node `n` through `last` (a fused activation)."""
        key = n.name if self.by_node else (last or n).name
        if self.by_node and key not in self.act_qp:
            raise ValueError(f"node {key!r} has no stored activation format: the model is not the one saved")
        return self.act_qp[key]

    def maybe_qp(self, n: fx.Node) -> QParams | None:
        """The output format of fx node `n`, None where it computes no floating tensor."""
        return self.act_qp.get(n.name)

    def fused_act(self, n: fx.Node) -> tuple[str | None, fx.Node]:
        """If n's only user is a ReLU/ReLU6, return (kind, that user) so it can be fused."""
        if len(n.users) == 1:
            user = next(iter(n.users))
            kind = _relu_kind(user, self.modules)
            if kind is not None and user.args[0] is n:
                return kind, user
        return None, n

    def template(self, n: fx.Node):
        """Args/kwargs with fx nodes replaced by Ref(i); returns (inputs, args, kwargs)."""
        inputs: list[str] = []

        def ref(a):
            nm = self.name(a)
            if nm not in inputs:
                inputs.append(nm)
            return Ref(inputs.index(nm))

        args = fx.node.map_arg(n.args, ref)
        kwargs = fx.node.map_arg(n.kwargs, ref)
        return inputs, args, kwargs

    def build(self):
        nodes, output = [], None
        for n in self.gm.graph.nodes:
            if n.name in self.alias:
                continue
            if n.op == "output":
                out = n.args[0]
                if not isinstance(out, fx.Node):
                    raise NotImplementedError("only models with a single tensor output are supported")
                output = self.name(out)
                continue
            q = self.node(n)
            self.qp[q.name] = q.out_qp
            nodes.append(q)
        return nodes, output

    def in_qps(self, inputs):
        return [self.qp.get(i) for i in inputs]

    def node(self, n: fx.Node):
        mods, qp = self.modules, self.out_qp
        mod = mods.get(n.target) if n.op == "call_module" else None
        if n.op == "placeholder":
            return QInput(n.name, [], qp(n))
        if n.op == "get_attr":
            return QConst(n.name, _attr(self.gm, n.target), qp(n))
        inputs, args, kwargs = self.template(n)
        if isinstance(mod, nn.Conv2d | nn.Linear):
            act, last = self.fused_act(n)
            self.alias[last.name] = n.name
            return self.weighted(n.name, inputs, mod, self.qp[inputs[0]], qp(n, last), act)
        if isinstance(mod, nn.LayerNorm) and len(mod.normalized_shape) == 1:
            return QLayerNorm(n.name, inputs, self.qp[inputs[0]], qp(n), mod, self.w_fmt)
        if isinstance(mod, Tokens):
            return QTokens(n.name, inputs, self.qp[inputs[0]], qp(n), mod, self.w_fmt)
        if n.op == "call_function" and n.target in MATMUL_FUNCTIONS and len(inputs) == 2:
            return QMatmul(n.name, inputs, self.in_qps(inputs), qp(n))
        if _is_softmax(n, mod) and self.qp[inputs[0]].fmt.bits <= 16:
            return QSoftmax(n.name, inputs, self.qp[inputs[0]], self.act_bits)
        if _is_add(n):
            act, last = self.fused_act(n)
            self.alias[last.name] = n.name
            return QRescaleSum(n.name, inputs, self.in_qps(inputs), qp(n, last), act)
        if n.op == "call_function" and n.target is torch.cat and len(n.args[0]) > 1:
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            return QRescaleSum(n.name, inputs, self.in_qps(inputs), qp(n), cat_dim=dim)
        relu = _relu_kind(n, mods)
        if relu is not None:
            return QClamp(n.name, inputs, self.qp[inputs[0]], 0.0, 6.0 if relu == "relu6" else None)
        if isinstance(mod, nn.AvgPool2d | nn.AdaptiveAvgPool2d) and _plain_avgpool(mod):
            return QAvgPool(n.name, inputs, self.qp[inputs[0]], qp(n), mod)
        if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
            return QAvgPool(n.name, inputs, self.qp[inputs[0]], qp(n), nn.AdaptiveAvgPool2d(n.args[1]))
        lut = (
            mod
            if isinstance(mod, LUT_MODULES)
            else LUT_FUNCTIONS.get(n.target)
            if n.op == "call_function"
            else None
        )
        if lut is not None and self.qp[inputs[0]].fmt.bits <= 16 and len(inputs) == 1:
            return QLut(n.name, inputs, self.qp[inputs[0]], qp(n), lut)
        call = mod if mod is not None else n.target if n.op == "call_function" else MethodCall(n.target)
        first_qp = self.qp.get(inputs[0]) if inputs else None
        if (
            isinstance(mod, LAYOUT_MODULES)
            or (n.op == "call_function" and n.target in LAYOUT_FUNCTIONS)
            or (n.op == "call_method" and n.target in LAYOUT_METHODS)
        ) and first_qp is not None:
            return QLayout(n.name, inputs, first_qp, call, args, kwargs)
        out_qp = self.maybe_qp(n)
        node = QFallback(n.name, inputs, self.in_qps(inputs), out_qp, call, args, kwargs)
        computes = mod is not None or (out_qp is not None and n.target is not operator.getitem)
        if computes and n.target not in STRUCTURAL:
            self.fallbacks.append(f"{n.name} ({node.describe()})")
        return node

    def weighted(self, name, inputs, mod, in_qp, out_qp, act):
        w = mod.weight.detach().double()
        lo = w.reshape(w.shape[0], -1).min(1).values if self.w_fmt.axis is not None else w.min()
        hi = w.reshape(w.shape[0], -1).max(1).values if self.w_fmt.axis is not None else w.max()
        w_qp = compute_qparams(lo, hi, self.w_fmt)
        weight_q = quantize(w, w_qp).to(self.w_fmt.dtype)
        bias_q = None
        if mod.bias is not None:
            s_acc = float(in_qp.scale.reshape(-1)[0]) * w_qp.scale.reshape(-1)
            bias_q = (
                torch.round(mod.bias.detach().double() / s_acc).clamp(-(2**31), 2**31 - 1).to(torch.int32)
            )
        cls = QConv2d if isinstance(mod, nn.Conv2d) else QLinear
        extra = {"conv": mod} if cls is QConv2d else {}
        return cls(
            name,
            inputs,
            in_qp=in_qp,
            w_qp=w_qp,
            out_qp=out_qp,
            weight_q=weight_q,
            bias_q=bias_q,
            act=act,
            bias_float=None if mod.bias is None else mod.bias.detach(),
            **extra,
        )


class MethodCall(nn.Module):
    """Calls a tensor method by name (fx call_method)."""

    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def forward(self, obj, *args, **kwargs):
        return getattr(obj, self.method)(*args, **kwargs)


def _attr(gm, target):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _plain_avgpool(mod) -> bool:
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        return True
    return mod.count_include_pad and not mod.ceil_mode and mod.divisor_override is None
