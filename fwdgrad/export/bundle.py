"""Export a converted `QModel` plus QZO-FF training settings as one bundle file for `fwdgrad.edge`.

The bundle (format in `fwdgrad.edge.bundle` and ``docs/edge.md``) carries everything the numpy runtime
needs to run and fine-tune the model bit-for-bit with the PyTorch engine: the op graph, integer weights
and biases, requantization multipliers/shifts, and the fixed-point training constants, all computed here
with the same pure functions the engine's fixed-point space uses (`fwdgrad.ff.spaces`):

    ε_q = max(round(ε/Δ_w), eps_min_q)   (per tensor, or per channel)     1_q = round(127/z_max)
    (M_p, n_p):  r_p = 1/1_q ("one") or Δ_z ("delta_z") ≈ M_p·2^-n_p
    (M_u, s_u):  η·Δ_z/Δ_w ≈ M_u·2^-(31+s_u)   (per trainable tensor, per channel if Δ_w is)

Call `export_bundle` after anything that rescales weights (e.g. `qzo_ff(..., weight_headroom=...)`).

The command `fwdgrad export` (defaults from a run's settings) is `fwdgrad.export.command`.
"""

from __future__ import annotations

import operator
from dataclasses import fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..edge.bundle import FORMAT, LOSS_NAMES, VERSION, Bundle, save_bundle
from ..edge.train import output_eps_q
from ..engine.convert import MethodCall
from ..engine.model import QModel
from ..engine.nodes import (
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
    QTrainable,
    Ref,
)
from ..engine.transformer import QLayerNorm, QMatmul, QSoftmax, QTokens
from ..ff.estimators import make_distribution
from ..ff.spaces import perturb_requant, size_lsb, update_requant
from ..fixed_point import INTEGER_DIFFERENCES, FixedPointSettings
from ..methods import check_hyper
from ..quant import QParams

EXPORT_REQUANT = ("single", "gemmlowp")
#: qzo_ff options the edge runtime cannot reproduce (it runs plain sign-m-SPSA): export refuses a run that
#: used one unless told --ignore-unsupported
UNSUPPORTED_FF = ("momentum", "kernel_norm", "sharpness_rho")
FIXED_POINT_FIELDS = tuple(f.name for f in fields(FixedPointSettings))
#: the fixed-point options a bundle carries (not weight_headroom: a run applied it to the weight scales)
BUNDLE_FIXED_POINT = tuple(f for f in FIXED_POINT_FIELDS if f != "weight_headroom")


def _np(t: torch.Tensor, dtype=None) -> np.ndarray:
    """A numpy copy of a tensor (in `dtype` if given)."""
    a = t.detach().cpu().numpy()
    return a.astype(a.dtype if dtype is None else dtype)


def _fmt(qp: QParams) -> dict:
    """A per-tensor activation format as header fields."""
    return {
        "scale": float(qp.scale.reshape(-1)[0]),
        "zero_point": int(qp.zero_point.reshape(-1)[0]),
        "bits": qp.fmt.bits,
        "signed": qp.fmt.signed,
        "qmin": qp.fmt.qmin,
        "qmax": qp.fmt.qmax,
    }


def _pair(v) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


class _Exporter:
    """Turns the nodes of a QModel into header ops and named arrays."""

    def __init__(self, qmodel: QModel):
        self.q, self.arrays = qmodel, {}

    def add(self, op: dict, role: str, value: np.ndarray) -> None:
        name = f"{op['name']}.{role}"
        self.arrays[name] = value
        op["arrays"][role] = name

    def op(self, node) -> dict:
        kind, attrs = self.kind_attrs(node)
        op = {"kind": kind, "name": node.name, "inputs": list(node.inputs), "attrs": attrs, "arrays": {}}
        if node.out_qp is not None:
            op["out"] = _fmt(node.out_qp)
        if isinstance(node, QTrainable):  # conv2d, linear, layernorm, tokens: what training can update
            self.add(op, "weight", _np(node.weight_q))
            if node.bias_q is not None:
                self.add(op, "bias", _np(node.bias_q, np.int32))
            op["scales"] = {
                "in": float(node.in_qp.scale.reshape(-1)[0]),
                "weight": node.w_qp.scale.reshape(-1).tolist(),
                "out": op["out"]["scale"],
            }
        if isinstance(node, QTrainable | QMatmul):
            self.add(op, "mult", _np(node.requant.mult, np.int64))
            self.add(op, "shift", _np(node.requant.shift, np.int64))
        elif isinstance(node, QRescaleSum):
            self.add(op, "mult", np.array(node.mults, dtype=np.int64))
        elif isinstance(node, QLut | QSoftmax):
            self.add(op, "table", _np(node.table, np.int32))
        elif isinstance(node, QConst):
            self.add(op, "value", _np(node.q, np.int32))
        return op

    def kind_attrs(self, node) -> tuple[str, dict]:
        if isinstance(node, QInput):
            fmt = node.out_qp.fmt
            if fmt.rounding != "nearest_even" or not fmt.saturate or not node.out_qp.is_scalar:
                raise ValueError(
                    f"input node {node.name!r}: only per-tensor, round-half-even, saturating input "
                    f"quantization can be exported, got {fmt}"
                )
            return "input", {}
        if isinstance(node, QConst):
            return "const", {"lo": node.out_qp.fmt.qmin, "hi": node.out_qp.fmt.qmax}
        if isinstance(node, QConv2d | QLinear):
            attrs = {
                "zp_in": int(node.zp_in),
                "zp_out": node.requant.zp,
                "lo": node.lo,
                "hi": node.hi,
                "act": node.act,
                "w_qmin": node.w_qp.fmt.qmin,
                "w_qmax": node.w_qp.fmt.qmax,
                "channel_dim": node.channel_dim,
            }
            if isinstance(node, QLinear):
                return "linear", attrs
            attrs.update(
                stride=_pair(node.stride),
                padding=_conv_padding(node),
                dilation=_pair(node.dilation),
                groups=int(node.groups),
            )
            return "conv2d", attrs
        if isinstance(node, QLayerNorm):
            return "layernorm", {
                "zp_in": node.zp_in,
                "dim": node.dim,
                "frac": node.frac,
                "v_eps": node.v_eps,
                "eps": node.eps,
                "zp_out": node.requant.zp,
                "lo": node.lo,
                "hi": node.hi,
                "w_qmin": node.w_qp.fmt.qmin,
                "w_qmax": node.w_qp.fmt.qmax,
            }
        if isinstance(node, QTokens):
            rs = node.rescale  # the input, rescaled to the output format: a one-input add
            if (rs.zp_out, rs.lo, rs.hi) != (node.requant.zp, node.lo, node.hi):
                raise ValueError(f"tokens {node.name!r}: its input rescale and its tokens differ in format")
            return "tokens", {
                "at": int(node.at),
                "drop": int(node.drop),
                "prompt": bool(node.prompt),
                "zp_in": _integer(rs.zps[0], node.name),
                "in_mult": int(rs.mults[0]),
                "in_shift": int(rs.shift),
                "zp_out": node.requant.zp,
                "lo": node.lo,
                "hi": node.hi,
                "w_qmin": node.w_qp.fmt.qmin,
                "w_qmax": node.w_qp.fmt.qmax,
            }
        if isinstance(node, QSoftmax):
            return "softmax", {"levels": int(node.levels)}
        if isinstance(node, QMatmul):
            return "matmul", {
                "zp_in": [_integer(z, node.name) for z in node.zps],
                "zp_out": node.requant.zp,
                "lo": node.lo,
                "hi": node.hi,
            }
        if isinstance(node, QRescaleSum):
            attrs = {
                "zp_in": [int(z) for z in node.zps],
                "shift": node.shift,
                "zp_out": node.zp_out,
                "lo": node.lo,
                "hi": node.hi,
            }
            return ("add", attrs) if node.cat_dim is None else ("concat", dict(attrs, dim=int(node.cat_dim)))
        if isinstance(node, QAvgPool):
            attrs = {
                "zp_in": int(node.zp_in),
                "zp_out": int(node.out_qp.zero_point.reshape(-1)[0]),
                "lo": node.lo,
                "hi": node.hi,
                "scale_in": float(node.in_qp.scale.reshape(-1)[0]),
                "scale_out": float(node.out_qp.scale.reshape(-1)[0]),
            }
            p = node.pool
            if isinstance(p, nn.AdaptiveAvgPool2d):
                osz = p.output_size
                osz = [osz, osz] if isinstance(osz, int) else list(osz)
                return "avgpool", dict(attrs, adaptive=True, output_size=osz)
            return "avgpool", dict(
                attrs,
                adaptive=False,
                kernel=_pair(p.kernel_size),
                stride=_pair(p.stride or p.kernel_size),
                padding=_pair(p.padding),
            )
        if isinstance(node, QClamp):
            return "clamp", {"lo": node.lo, "hi": node.hi}
        if isinstance(node, QLut):
            return "lut", {"qmin": node.qmin, "lo": node.out_qp.fmt.qmin, "hi": node.out_qp.fmt.qmax}
        if isinstance(node, QLayout):
            return _layout(node)
        raise ValueError(f"node {node.name!r} ({type(node).__name__}) has no edge-runtime kernel")


def _integer(v: float, name: str) -> int:
    if v != int(v):
        raise ValueError(f"node {name!r}: zero point {v!r} is not an integer; not exportable")
    return int(v)


def _index(node: QLayout, index) -> list:
    """A basic index (integers, slices of integers, None, ...) as its header form (`edge.runtime.index_of`);
    anything else (tensors, lists, booleans) is a one-line error."""
    items = index if isinstance(index, tuple) else (index,)
    out = []
    for item in items:
        bounds = (item.start, item.stop, item.step) if isinstance(item, slice) else ()
        if isinstance(item, slice) and all(v is None or _is_int(v) for v in bounds):
            out.append({"slice": list(bounds)})
        elif item is None or _is_int(item):
            out.append(item)
        elif item is Ellipsis:
            out.append("...")
        else:
            raise ValueError(
                f"node {node.name!r}: index {index!r} is not supported by the edge runtime; allowed: "
                "integers, slices of integers, None and ..."
            )
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _conv_padding(node: QConv2d) -> list[int]:
    p = node.padding
    if p == "valid":
        return [0, 0]
    if p == "same":
        kh, kw = node.weight_q.shape[-2:]
        eff = [d * (k - 1) for d, k in zip(_pair(node.dilation), (kh, kw))]
        if any(e % 2 for e in eff):
            raise ValueError(
                f"{node.name}: padding='same' with an even kernel extent pads asymmetrically; not exportable"
            )
        return [e // 2 for e in eff]
    return _pair(p)


def _layout(node: QLayout) -> tuple[str, dict]:
    """Map a data-movement call (module, function or tensor method) to an edge op kind and attributes."""
    call, args, kw = node.call, list(node.args_t[1:]), dict(node.kwargs_t)
    if any(isinstance(a, Ref) for a in args + list(kw.values())):
        raise ValueError(f"node {node.name!r}: its arguments depend on runtime values; not exportable")
    method = call.method if isinstance(call, MethodCall) else None

    def arg(i, key, default):
        return args[i] if len(args) > i else kw.get(key, default)

    if isinstance(call, nn.Flatten):
        return "flatten", {"start_dim": call.start_dim, "end_dim": call.end_dim}
    if call is torch.flatten or method == "flatten":
        return "flatten", {"start_dim": arg(0, "start_dim", 0), "end_dim": arg(1, "end_dim", -1)}
    if isinstance(call, nn.Dropout | nn.Identity) or call is F.dropout or method == "contiguous":
        return "identity", {}
    if isinstance(call, nn.MaxPool2d) or call is F.max_pool2d:
        if isinstance(call, nn.MaxPool2d):
            k, s, p, d, ceil = call.kernel_size, call.stride, call.padding, call.dilation, call.ceil_mode
        else:
            k, s, p, d = (
                arg(0, "kernel_size", None),
                arg(1, "stride", None),
                arg(2, "padding", 0),
                arg(3, "dilation", 1),
            )
            ceil = arg(4, "ceil_mode", False)
        if ceil:
            raise ValueError(f"node {node.name!r}: max pooling with ceil_mode=True is not exportable")
        return "maxpool", {
            "kernel": _pair(k),
            "stride": _pair(s or k),
            "padding": _pair(p),
            "dilation": _pair(d),
        }
    if call is torch.reshape or method in ("view", "reshape"):
        shape = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args or kw.get("shape")
        return "reshape", {"shape": [int(s) for s in shape]}
    if call is torch.permute or method == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], tuple | list) else args or kw.get("dims")
        return "permute", {"dims": [int(d) for d in dims]}
    if call is torch.transpose or method == "transpose":
        return "transpose", {"dim0": int(arg(0, "dim0", None)), "dim1": int(arg(1, "dim1", None))}
    if isinstance(call, nn.Unflatten):
        return "unflatten", {"dim": int(call.dim), "sizes": [int(s) for s in call.unflattened_size]}
    if method == "unflatten":
        sizes = [int(s) for s in arg(1, "sizes", None)]
        return "unflatten", {"dim": int(arg(0, "dim", None)), "sizes": sizes}
    if call is operator.getitem or method == "__getitem__":
        return "getitem", {"index": _index(node, arg(0, "idx", None))}
    what = method or getattr(call, "__name__", type(call).__name__)
    raise ValueError(
        f"node {node.name!r}: layout op {what!r} is not supported by the edge runtime; allowed: "
        "flatten, unflatten, reshape/view, permute, transpose, basic indexing, max pooling, dropout/identity"
    )


def _preprocessing(pre: dict | None) -> dict | None:
    if pre is None:
        return None
    unknown = set(pre) - {"mean", "std", "shape"}
    if unknown:
        raise ValueError(f"input_preprocessing has unknown keys {sorted(unknown)}; allowed: mean, std, shape")
    out = {k: [float(v) for v in np.atleast_1d(pre[k])] for k in ("mean", "std") if pre.get(k) is not None}
    if ("mean" in out) != ("std" in out) or len(out.get("mean", [])) != len(out.get("std", [])):
        raise ValueError("input_preprocessing needs mean and std of the same length (one per channel)")
    if any(s <= 0 for s in out.get("std", [])):
        raise ValueError(f"input_preprocessing std must be > 0, got {out['std']}")
    if pre.get("shape") is not None:
        out["shape"] = [int(s) for s in pre["shape"]]
    return out


def _training(
    qmodel: QModel,
    exporter: _Exporter,
    names: list[str],
    hp: dict,
    fp: FixedPointSettings,
    masks: dict | None,
    perturb: str = "weights",
) -> dict:
    """The header's training section: the constants of `fwdgrad.ff.spaces` (the same pure functions the
    fixed-point space uses); with perturb="outputs" (`fwdgrad.ff.activity`) also the trained layer's input
    and output formats and ε in output LSBs, under "outputs"."""
    eps, lr, m = hp["eps"], hp["lr"], hp["m"]
    check_hyper("qzo_ff", lr, eps, m)
    nodes = qmodel.weight_nodes()
    missing = [n for n in names if n not in nodes]
    if missing:
        raise ValueError(
            f"trainable layers {missing} are not conv/linear layers, LayerNorms or tokens of the model; "
            f"allowed: {list(nodes)}"
        )
    dist = make_distribution(fp.distribution, fp.z_max)
    p_mult, p_n = perturb_requant(dist, fp.perturb_scale)
    tensors = []
    for t, name in enumerate(names):
        node = nodes[name]
        delta_w = node.w_qp.scale
        op = {"name": name, "arrays": {}}
        exporter.add(op, "eps_q", _np(size_lsb(eps, delta_w, fp.eps_min_q), np.int64))
        mult, shift = update_requant(lr, dist.delta, delta_w)
        if int((31 + shift).min()) < 1 or int((31 + shift).max()) > 62:
            raise ValueError(
                f"{name}: update factor lr·Δ_z/Δ_w = {lr * dist.delta / delta_w.max():.3g} "
                "is outside the representable range [2^-32, 2^30); change lr"
            )
        exporter.add(op, "update_mult", _np(mult, np.int64))
        exporter.add(op, "update_shift", _np(shift, np.int64))
        if masks and name in masks:
            exporter.add(op, "mask", _np(masks[name], bool))
        tensors.append(
            {
                "name": name,
                "id": t,
                "eps_q": op["arrays"]["eps_q"],
                "update_mult": op["arrays"]["update_mult"],
                "update_shift": op["arrays"]["update_shift"],
                "mask": op["arrays"].get("mask"),
                "qmin": node.w_qp.fmt.qmin,
                "qmax": node.w_qp.fmt.qmax,
                "weight_scale": node.w_qp.scale.reshape(-1).tolist(),
            }
        )
    outputs = _outputs(qmodel, names, eps, fp) if perturb == "outputs" else None
    if perturb not in ("weights", "outputs"):
        raise ValueError(f"perturb={perturb!r} is invalid; allowed: weights, outputs")
    if perturb == "weights" and fp.difference not in INTEGER_DIFFERENCES:
        raise ValueError(
            f"difference={fp.difference!r} needs perturb=outputs; allowed: {', '.join(INTEGER_DIFFERENCES)}"
        )
    return {
        "method": "qzo_ff",
        "target": perturb,
        **({"outputs": outputs} if outputs else {}),
        "difference": fp.difference,
        "distribution": fp.distribution,
        "loss": hp["loss"],
        "trainable": names,
        "eps": float(eps),
        "lr": float(lr),
        "m": m,
        "seed": int(hp["seed"]),
        "z_max": dist.z_max,
        "delta_z": dist.delta,
        "one_q": dist.one_q,
        "rounding": fp.rounding,
        "perturb_scale": fp.perturb_scale,
        "eps_min_q": int(fp.eps_min_q),
        "layerwise": fp.layerwise,
        "perturb": {"mult": int(p_mult), "shift": int(p_n) - 31, "n": int(p_n)},
        "step": int(hp["step"]),
        "tensors": tensors,
    }


def _outputs(qmodel: QModel, names: list[str], eps: float, fp: FixedPointSettings) -> dict:
    """The "outputs" section of perturbed outputs: the one trained layer, which must be a linear layer whose
    output is the model's, its input and output formats, and ε in output LSBs."""
    node = qmodel.weight_nodes().get(names[0]) if len(names) == 1 else None
    if node is None or names[0] != qmodel.output or not qmodel.stackable(names[0]):
        raise ValueError(
            f"perturb=outputs trains one linear layer whose output is the model's ({qmodel.output!r}); got "
            f"{names}; allowed: --trainable {qmodel.output}"
        )
    out_scale = float(node.out_qp.scale.reshape(-1)[0])
    return {
        "eps_q": output_eps_q(eps, out_scale, int(node.hi - node.lo), fp.eps_min_q),
        "in_scale": float(node.in_qp.scale.reshape(-1)[0]),
        "in_zp": int(node.zp_in),
        "out_scale": out_scale,
        "out_zp": int(node.out_qp.zero_point.reshape(-1)[0]),
        "lo": int(node.lo),
        "hi": int(node.hi),
    }


def export_bundle(
    qmodel: QModel,
    path,
    trainable: list[str] | None,
    eps: float,
    lr: float,
    m: int,
    seed: int,
    settings: FixedPointSettings | None = None,
    *,
    input_preprocessing: dict | None = None,
    meta: dict | None = None,
    masks: dict | None = None,
    step: int = 0,
    loss: str = "float",
    perturb: str = "weights",
    **fixed_point,
) -> Bundle:
    """Write `qmodel` and its QZO-FF settings to one bundle file at `path`; returns the `Bundle`.

    settings: the fixed-point options (or give its fields as keywords, e.g. rounding=...);
    trainable: names of weighted nodes (conv/linear, LayerNorm, tokens: `qmodel.weight_nodes()`) to fine-tune
    (None: all), in the order that defines tensor ids (as `qzo_ff(trainable=...)`); masks: {name: bool tensor}
    sparse-update masks (e.g. from `make_masks`);
    input_preprocessing: {"mean": [...], "std": [...], "shape": [C, H, W]} applied by the runtime to float
    inputs; step: the optimizer step the run continues from; loss: "float" or "integer", the cross-entropy
    the device decides each step's signs on (header ``training.loss``: LOSS_NAMES); perturb: "weights" or
    "outputs" (the trained layer's outputs, `fwdgrad.ff.activity`; header ``training.target``); meta: free
    JSON-serializable metadata.
    """
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss={loss!r} is invalid; allowed: {', '.join(LOSS_NAMES)}")
    fallbacks = [f"{n.name} ({n.describe()})" for n in qmodel.nodes if isinstance(n, QFallback)]
    if fallbacks:
        raise ValueError(
            "cannot export: these nodes have no integer kernel (QFallback): " + ", ".join(fallbacks)
        )
    if qmodel.requant not in EXPORT_REQUANT:
        raise ValueError(f"requant={qmodel.requant!r} cannot be exported; allowed: {EXPORT_REQUANT}")
    exporter = _Exporter(qmodel)
    ops = [exporter.op(node) for node in qmodel.nodes]
    names = list(qmodel.weight_nodes()) if trainable is None else list(trainable)
    fp = settings or FixedPointSettings(**fixed_point)
    hp = {"eps": eps, "lr": lr, "m": m, "seed": seed, "step": step, "loss": LOSS_NAMES[loss]}
    training = _training(qmodel, exporter, names, hp, fp, masks, perturb)
    first = next(op for op in ops if op["kind"] == "input")
    header = {
        "format": FORMAT,
        "version": VERSION,
        "producer": f"fwdgrad {__version__} (torch {torch.__version__})",
        "engine": {
            "scheme": qmodel.scheme,
            "requant": qmodel.requant,
            "acc_bits": qmodel.acc.bits,
            "overflow": qmodel.acc.overflow,
        },
        "input": {"name": first["name"], "rounding": "nearest_even", **first["out"]},
        "output": {"name": qmodel.output, **next(op["out"] for op in ops if op["name"] == qmodel.output)},
        "preprocessing": _preprocessing(input_preprocessing),
        "ops": ops,
        "arrays": {},
        "training": training,
        "meta": dict(meta or {}),
    }
    bundle = Bundle(header, exporter.arrays)
    save_bundle(bundle, path)
    return bundle
