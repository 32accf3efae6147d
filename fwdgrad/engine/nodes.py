"""The ops of a converted model. Each node runs in two modes on the same stored integers:

* ``integer`` — values are integer-valued float32 tensors holding q (zero point included); arithmetic is
  exact (see `intops`), accumulators are checked against their width, requantization is integer.
* ``fake`` — values are dequantized floats; every node output is quantize-dequantized (quantsim).

Activations are per-tensor (scale, zero point). Weights are symmetric (per-tensor or per-channel),
biases are int32 at scale s_in·s_w. ReLU/ReLU6 that follow a conv/linear/add are fused into its output
clamp, as integer accelerators do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QParams, dequantize, fake_quantize, quantize, quantize_multiplier, requantize
from . import intmm, kernels, onednn
from .intops import (
    AccumulatorSpec,
    ExactWeights,
    OverflowStats,
    accumulate,
    combine,
    exact_conv2d,
    exact_linear,
    prepare,
)

ADD_SHIFT = 30  # fixed-point fraction bits of the add/concat rescaling multipliers


@dataclass
class ExecContext:
    """How one forward pass runs: mode, perturbation hook, accumulator semantics, counters."""

    mode: str = "integer"
    weight_fn: Callable[[str, QWeighted], torch.Tensor] | None = None
    acc: AccumulatorSpec = field(default_factory=AccumulatorSpec)
    requant: str = "single"
    stats: OverflowStats = field(default_factory=OverflowStats)
    kernel: str = "auto"  # KERNELS: which exact kernel conv/linear layers use
    stack: int = 1  # P > 1: P passes stacked along the batch; weight_fn may return [P, *shape] weights
    u8: frozenset[str] = frozenset()  # the nodes whose output codes this pass stores as bytes


#: "auto": per layer and input shape the fastest of the certified paths (timed once); "float": float32 digit
#: planes (of fan-in chunks where they save planes; float64 past MAX_PLANES); "float_whole": the same
#: without fan-in chunks; "onednn": oneDNN's u8 x s8 kernels where certified, else "float"; "int16": the C
#: int16 GEMM with int32 accumulators (`kernels.gemm_s16`) for linear layers and patchify convs where
#: certified, else "float"; "int_mm": int8 planes through `torch._int_mm` with int32 accumulators (im2col for
#: convs; `intmm`) where certified, else "float".
KERNELS = ("auto", "float", "float_whole", "onednn", "int16", "int_mm")


class Ref:
    """Placeholder for the i-th runtime input inside a stored argument template."""

    def __init__(self, i: int):
        self.i = i

    def __repr__(self):
        return f"Ref({self.i})"


def materialize(template, xs):
    """Replace Ref placeholders in a nested args structure by the runtime values."""
    if isinstance(template, Ref):
        return xs[template.i]
    if isinstance(template, tuple | list):
        return type(template)(materialize(t, xs) for t in template)
    if isinstance(template, dict):
        return {k: materialize(v, xs) for k, v in template.items()}
    if isinstance(template, slice):
        return slice(
            materialize(template.start, xs), materialize(template.stop, xs), materialize(template.step, xs)
        )
    return template


def x_bound(qp: QParams) -> int:
    """Largest |q - zp| the format allows (the operand bound used to certify exact float sums)."""
    zp = int(qp.zero_point.reshape(-1)[0])
    return max(qp.fmt.qmax - zp, zp - qp.fmt.qmin)


class QNode(nn.Module):
    """One op of the converted graph. `inputs` name the nodes it reads; `out_qp` its output format."""

    kind = "node"
    #: In integer mode with the C kernels: it reads codes stored as bytes (torch.uint8) as well as float32
    #: codes; `writes_u8`: it can write its output codes as bytes (`ExecContext.u8`); `passes_dtype`: its
    #: output has its input's storage whatever it is asked (ops that only move values).
    takes_u8 = writes_u8 = passes_dtype = False

    def __init__(self, name: str, inputs: list[str], out_qp: QParams | None):
        super().__init__()
        self.name, self.inputs, self.out_qp = name, inputs, out_qp

    def forward(self, *xs, ctx: ExecContext):
        return self.int_forward(*xs, ctx=ctx) if ctx.mode == "integer" else self.fake_forward(*xs, ctx=ctx)

    def macs(self, out: torch.Tensor, *xs: torch.Tensor) -> int:
        """Multiply-accumulates of one call that produced `out` from `xs` (0: no products)."""
        return 0


class Requantizer:
    """acc (int64, scale s_acc) → output integers at `out_qp`: sat(round(acc · r) + zp_out, lo, hi).

    r = s_acc / s_out is applied as integer multiplier + shift (see `fwdgrad.quant.requantize`); lo/hi carry
    a fused ReLU/ReLU6. The `c_*` attributes are the same constants per channel for the C epilogue
    (`kernels.epilogue`); `float_stage` = (s_acc, s_out) is the "float" mode's float32(acc)·s_acc / s_out
    (default (r, 1)).
    """

    def __init__(
        self,
        real: torch.Tensor,
        out_qp: QParams,
        lo: int,
        hi: int,
        channel_dim: int = 1,
        channels: int | None = None,
        float_stage: tuple[torch.Tensor, float] | None = None,
    ):
        real = torch.as_tensor(real, dtype=torch.float64).reshape(-1)
        self.real = real
        self.mult, self.shift = quantize_multiplier(real)
        self.zp, self.lo, self.hi = int(out_qp.zero_point.reshape(-1)[0]), lo, hi
        self.channel_dim = channel_dim
        # constants of `single_float64`, fixed with M and n (a new weight scale builds a new Requantizer)
        n = 31 + self.shift
        self._n_min, self._n_max, self._m_max = int(n.min()), int(n.max()), int(self.mult.max())
        self._m, self._half = self.mult.double(), torch.exp2((n - 1).double())
        self._inv, self._inv_split = torch.exp2(-n.double()), torch.exp2(-(n - 16).double())
        self._m_hi, self._m_lo = (self.mult >> 16).double(), (self.mult & 0xFFFF).double()
        s_acc, s_out = float_stage if float_stage is not None else (real, 1.0)
        per_channel = (channels or real.numel(),)
        self.c_mult = self.mult.expand(per_channel).contiguous()
        self.c_n = (31 + self.shift).to(torch.int32).expand(per_channel).contiguous()
        self.c_fscale = torch.as_tensor(s_acc).reshape(-1).float().expand(per_channel).contiguous()
        self.c_fout = float(torch.tensor(float(s_out), dtype=torch.float32))
        # the split form of `single_float64`, per channel
        self.c_mhi, self.c_mlo, self.c_half, self.c_inv = (
            t.expand(per_channel).contiguous() for t in (self._m_hi, self._m_lo, self._half, self._inv_split)
        )

    def split_exact(self, amax: int) -> bool:
        """The float64 "single" rounding with M split 15 + 16 bits (see `single_float64`) is exact for every
        channel and every |acc| <= amax: n >= 16 and amax·2^16 + 2^(n-1) < 2^52."""
        return self._n_min >= 16 and amax * (1 << 16) + (1 << (self._n_max - 1)) < 2**52

    def f64_exact(self, acc_bits: int) -> bool:
        """`split_exact` for any accumulator that fits `acc_bits` (the C epilogue's float64 path)."""
        return self.split_exact(1 << (acc_bits - 1))

    def _shaped(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return t.reshape(shape)

    def __call__(self, acc: torch.Tensor, mode: str, amax: int | None = None) -> torch.Tensor:
        """Requantize an exact accumulator (float64 or int64 integers; consumed). `amax` bounds |acc|."""
        y = self.single_float64(acc, amax) if mode == "single" and amax is not None else None
        if y is not None:
            return y.add_(self.zp).clamp_(self.lo, self.hi).to(torch.float32)
        m, s, r = (self._shaped(t, acc.dim()) for t in (self.mult, self.shift, self.real))
        y = requantize(acc.to(torch.int64), m, s, mode, real=r)
        return y.add_(self.zp).clamp_(self.lo, self.hi).to(torch.float32)

    def single_float64(self, acc: torch.Tensor, amax: int) -> torch.Tensor | None:
        """ "single" rounding floor((acc·M + 2^(n-1)) / 2^n), n = 31 + shift, in float64 (acc consumed), or
        None where float64 cannot be exact for |acc| <= amax.

        Exact whenever every intermediate is an integer below 2^53; then it gives the int64 path's integers,
        2-10x faster. Directly while |acc|·M < 2^53 (|acc| < ~2^22), else with M split into 15 + 16 bits,
        which holds to |acc| < ~2^36 (16-bit weights routinely pass 2^22):
          acc·M = acc·M_hi·2^16 + acc·M_lo,  q = floor((acc·M_lo + 2^(n-1)) / 2^16),
          result = floor((acc·M_hi + q) / 2^(n-16))   (n >= 16: the dropped remainder is < 2^16).
        """
        n_min, n_max = self._n_min, self._n_max
        if n_min >= 1 and amax * self._m_max + (1 << (n_max - 1)) < 2**53:
            m, half, inv = (self._shaped(t, acc.dim()) for t in (self._m, self._half, self._inv))
            return acc.double().mul_(m).add_(half).mul_(inv).floor_()
        if self.split_exact(amax):
            m_hi, m_lo, half, inv = (
                self._shaped(t, acc.dim()) for t in (self._m_hi, self._m_lo, self._half, self._inv_split)
            )
            a = acc.double()
            q = torch.mul(a, m_lo).add_(half).mul_(2.0**-16).floor_()
            return a.mul_(m_hi).add_(q).mul_(inv).floor_()
        return None


def act_range(out_qp: QParams, act: str | None) -> tuple[int, int]:
    """Output clamp [lo, hi] for a fused activation (None, 'relu', 'relu6')."""
    fmt, zp, s = out_qp.fmt, int(out_qp.zero_point.reshape(-1)[0]), float(out_qp.scale.reshape(-1)[0])
    lo, hi = fmt.qmin, fmt.qmax
    if act in ("relu", "relu6"):
        lo = max(lo, zp)
    if act == "relu6":
        hi = min(hi, zp + round(6.0 / s))
    return lo, hi


def ste(y: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: forward yq, gradient of y (only when autograd is tracking y)."""
    return y + (yq - y).detach() if y.requires_grad else yq


def fake_out(y: torch.Tensor, qp: QParams, lo: int, hi: int, fresh: bool = False) -> torch.Tensor:
    """Quantize-dequantize a float output with clamp [lo, hi] (fused activation); STE under autograd. A
    `fresh` y (a temporary the caller just made and nothing else holds) is quantized in place: no second
    buffer of the output's size to allocate and fault in."""
    s, z = float(qp.scale.reshape(-1)[0]), float(qp.zero_point.reshape(-1)[0])
    if not y.requires_grad and y.dtype == torch.float32 and kernels.library() is not None:
        return kernels.fake_quant(y, s, z, lo, hi, inplace=fresh)
    return ste(y, (torch.round(y.detach() / s) + z).clamp_(lo, hi).sub_(z).mul_(s))


# -------------------------------------------------------------------------------------- weighted layers
class QTrainable(QNode):
    """A node holding integer weights `weight_q` (symmetric format and scale `w_qp`, optionally an int32 bias
    `bias_q` on a scale proportional to Δ_w): what training perturbs (`weight` under `ExecContext.weight_fn`)
    and updates in place. Subclasses derive their requantization constants in `_derive_scales`."""

    kind = "weighted"

    @torch.no_grad()
    def set_weight_scale(self, scale: torch.Tensor | float) -> None:
        """Re-express the stored weights (and int32 bias) on a new weight scale Δ_w' (e.g. headroom for
        training): w_q ← sat(round(w_q·Δ_w/Δ_w')), b_q ← round(b_q·Δ_w/Δ_w'); requantizers follow."""
        new = torch.as_tensor(scale, dtype=torch.float64).expand_as(self.w_qp.scale).clone()
        ratio = self.w_qp.scale / new
        fmt = self.w_qp.fmt
        shape = [-1] + [1] * (self.weight_q.dim() - 1) if ratio.numel() > 1 else []
        w = torch.round(self.weight_q.double() * ratio.reshape(shape)).clamp(fmt.qmin, fmt.qmax)
        self.weight_q.copy_(w.to(self.weight_q.dtype))
        if self.bias_q is not None:
            self.bias_q.copy_(torch.round(self.bias_q.double() * ratio.reshape(-1)).to(self.bias_q.dtype))
        self.w_qp = QParams(fmt, new, self.w_qp.zero_point)
        self._derive_scales()

    def use_weight_qparams(self, w_qp: QParams) -> None:
        """Take `w_qp` as the weight format and scale, leaving the stored integers as they are: how a model
        rebuilt from its saved state (`fwdgrad.engine.state`) gets back the scale training left."""
        self.w_qp = w_qp
        self._derive_scales()

    def weight(self, ctx: ExecContext) -> torch.Tensor:
        return ctx.weight_fn(self.name, self) if ctx.weight_fn is not None else self.weight_q

    def prepare_ahead(self, ws: list[torch.Tensor]) -> None:
        """Prepare perturbed weights `ws` before the forwards that take them (`QWeighted`; nothing here)."""

    def forget_ahead(self) -> None:
        """Drop weights prepared ahead and not used (`QWeighted`)."""

    def _derive_scales(self) -> None:
        raise NotImplementedError


class QWeighted(QTrainable):
    """Conv2d / Linear with integer weights `weight_q` (the storage training updates in place).

    acc = Σ (x_q - zp_in) · w_q + b_q   (exact, width-checked)
    y_q = sat(round(acc · s_in·s_w / s_out) + zp)
    """

    takes_u8 = writes_u8 = True
    BYTE_KERNELS = ("onednn", "int_mm")  # the kernels that read codes stored as bytes as they are

    def macs(self, out, *xs) -> int:  # every output element is one dot product over the fan-in
        return out.numel() * self.weight_q[0].numel()

    def __init__(
        self,
        name,
        inputs,
        in_qp: QParams,
        w_qp: QParams,
        out_qp: QParams,
        weight_q: torch.Tensor,
        bias_q: torch.Tensor | None,
        act: str | None,
        bias_float: torch.Tensor | None = None,
    ):
        super().__init__(name, inputs, out_qp)
        self.in_qp, self.w_qp, self.act = in_qp, w_qp, act
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("bias_q", bias_q)
        # the float bias the x86 engine adds (requant='float'); defaults to the dequantized int32 bias
        self.register_buffer(
            "bias_float", None if bias_q is None else (bias_float.float() if bias_float is not None else None)
        )
        self.lo, self.hi = act_range(out_qp, act)
        self.zp_in = float(in_qp.zero_point.reshape(-1)[0])
        self.xb = x_bound(in_qp)
        self._derive_scales()

    def _derive_scales(self) -> None:
        s_in = float(self.in_qp.scale.reshape(-1)[0])
        self.acc_scale = s_in * self.w_qp.scale.reshape(-1)  # per output channel (or scalar)
        s_out = self.out_qp.scale.reshape(-1)
        self.requant = Requantizer(
            self.acc_scale / s_out,
            self.out_qp,
            self.lo,
            self.hi,
            channel_dim=self.channel_dim,
            channels=self.weight_q.shape[0],
            float_stage=(self.acc_scale, float(s_out[0])),
        )
        self._prepared: dict[str, tuple[torch.Tensor, int, ExactWeights | None]] = {}
        self._timed: dict[tuple, str] = {}  # (input shape, per-call weights) -> the faster kind ("auto")
        self._last = self._fresh_last()
        self._stacks: dict[tuple, QWeighted] = {}  # this layer with its output channels repeated (`stacked`)

    channel_dim = 1

    def _bias_shape(self, ndim: int) -> list[int]:
        shape = [1] * ndim
        shape[self.channel_dim] = -1
        return shape

    def float_bias(self) -> torch.Tensor | None:
        if self.bias_q is None:
            return None
        if self.bias_float is not None:
            return self.bias_float
        return (self.bias_q.double() * self.acc_scale.expand(self.bias_q.shape)).float()

    def __getstate__(self):
        """Copies and pickles leave the caches behind (packed oneDNN weights cannot be copied; a copy
        prepares its own weights and times its own kernels)."""
        state = dict(self.__dict__)
        state["_prepared"], state["_timed"], state["_stacks"] = {}, {}, {}
        state["_last"] = self._fresh_last()
        return state

    @staticmethod
    def _fresh_last() -> dict:
        """What the last calls used, in one dict (assigning an nn.Module attribute costs microseconds):
        "kind": the kernel the last forward ran; "ahead": perturbed weights prepared by `prepare_ahead`,
        id(w) -> (w, version, kind, prepared); "ahead_kind", "ahead_shape": the kernel and input shape
        perturbed weights were last prepared for; "like": per kernel, the split (planes, digit bits, offset)
        of the last per-call weights; "pools": the buffers they were written into (`onednn.buffers`)."""
        return {
            "kind": "float",
            "ahead": {},
            "ahead_kind": None,
            "ahead_shape": None,
            "like": {},
            "pools": {},
        }

    def exact_weights(self, w: torch.Tensor, kind: str = "float", shape=None) -> ExactWeights | None:
        """`w` prepared for the exact kernel `kind` ("float": `intops.prepare`; "onednn": `onednn`, None
        where its certificate fails; "dequantized": fake mode's float weights), for inputs of `shape` where
        given (oneDNN packs for it; any shape runs, the same integers). The stored weights are prepared once
        per version (an in-place update bumps it); perturbed weights (`weight_fn`) are prepared per call."""
        if w is self.weight_q:
            cached = self._prepared.get(kind)
            if cached is not None and cached[0] is w and cached[1] == w._version:
                return cached[2]
            ew = self._prepare(w, kind, shape)
            self._prepared[kind] = (w, w._version, ew)
            return ew
        last = self._last
        last["ahead_kind"], last["ahead_shape"] = kind, shape
        ahead = last["ahead"].pop(id(w), None)
        if ahead is not None and ahead[0] is w and ahead[1] == w._version and ahead[2] == kind:
            return ahead[3]
        return self._prepare_per_call([w], kind, shape)[0]

    def prepare_ahead(self, ws: list[torch.Tensor]) -> None:
        """Prepare perturbed weights `ws` (a step's passes; not the stored ones) now for the kernel this
        layer's last perturbed forward ran on (nothing before one ran), where the forwards that take them
        find them (`exact_weights`, once each): preparation then runs before the forwards, with warm caches,
        instead of between their layers (`forget_ahead` drops those not taken)."""
        last = self._last
        kind, ws = last["ahead_kind"], [w for w in ws if w is not self.weight_q]
        if kind is not None and ws:
            for w, ew in zip(ws, self._prepare_per_call(ws, kind, last["ahead_shape"])):
                last["ahead"][id(w)] = (w, w._version, kind, ew)

    def _prepare_per_call(self, ws: list[torch.Tensor], kind: str, shape) -> list[ExactWeights | None]:
        """`_prepare` of per-call weights `ws` (one shape): for oneDNN and `_int_mm` all split at once as this
        layer's last per-call weights were, straight into the kernel's layout, where that split
        certifies (`write_split`); the others split and packed one by one."""
        likes = self._last["like"]
        done = [None] * len(ws)
        if kind in likes:
            done = self.write_split(ws, kind, shape, likes[kind])
        done = [ew if ew is not None else self._prepare(w, kind, shape) for w, ew in zip(ws, done)]
        if kind in ("onednn", "int_mm") and done[-1] is not None and done[-1].planes in (1, 2):
            likes[kind] = (done[-1].planes, done[-1].digit_bits, done[-1].offset)
        return done

    def write_split(self, ws, kind, shape, like) -> list[ExactWeights | None]:
        """Per-call weights `ws` split as `like` = (planes, digit bits, offset) straight into the layout of
        kernel `kind` ("onednn": `onednn.write_split`; "int_mm": `intmm.write_split`), None where it does not
        apply or certify."""
        if kind == "int_mm":
            return intmm.write_split(ws, like, int(self.zp_in), self._last["pools"])
        return self.onednn_write_split(ws, shape, like)

    def forget_ahead(self) -> None:
        """Drop perturbed weights prepared ahead and not used."""
        self._last["ahead"] = {}

    def _prepare(self, w, kind, shape=None):
        if kind == "onednn":
            return self.onednn_prepare(w, shape)
        if kind == "int16":
            return self.int16_prepare(w)
        if kind == "int_mm":
            ok = onednn.supports(self.in_qp.fmt) and getattr(self, "groups", 1) == 1
            ok = ok and not isinstance(getattr(self, "padding", ()), str) and intmm.available()
            return intmm.prepare(w, int(self.zp_in)) if ok else None
        if kind == "dequantized":  # fake mode's float weights
            fast = kernels.dequantize(w, self.w_qp)
            return dequantize(w, self.w_qp) if fast is None else fast
        return prepare(w, self.xb, getattr(self, "groups", 1), chunk=kind != "float_whole")

    def kernel_for(self, x: torch.Tensor, choice: str, w: torch.Tensor | None = None) -> str:
        """The kernel kind this layer runs on input `x` under the setting `choice` (see KERNELS): with
        "auto", the fastest of "float" (fan-in chunks where they save planes), "float_whole" (the same
        without chunks, where that differs: small batches), "onednn", "int_mm" and "int16" (where available),
        timed once per input shape (kernel and C epilogue), on the stored weights or, for weights `w` other
        than them (perturbed per call), including their per-call preparation."""
        per_call = w is not None and w is not self.weight_q
        key = (tuple(x.shape), per_call)
        if choice == "auto" and key in self._timed:  # the hot path
            return self._timed[key]
        usable = onednn.supports(self.in_qp.fmt) and onednn.available()
        if choice != "auto":
            return "float" if choice == "onednn" and not usable else choice
        chunked = self.exact_weights(self.weight_q).chunks > 1
        kinds = ["float"] + ["float_whole"] * chunked
        kinds += ["onednn"] * usable + ["int16"] * self.int16 + ["int_mm"]
        if len(kinds) == 1:
            return "float"
        if key not in self._timed:
            scratch = ExecContext()  # the epilogue's counters go to a throw-away context

            def run(kind) -> float:
                t0 = time.perf_counter()
                ew = (
                    self._prepare_per_call([w], kind, x.shape)[0]
                    if per_call
                    else self.exact_weights(self.weight_q, kind, x.shape)
                )
                if ew is None:
                    return float("inf")
                self._fused_epilogue(self.exact_op(self._operand(x, kind), ew), ew, scratch)
                return time.perf_counter() - t0

            certified = [k for k in kinds if self.exact_weights(self.weight_q, k, x.shape) is not None]
            for kind in certified:
                run(kind)  # warms up (and prepares the stored weights)
            best = {kind: run(kind) for kind in certified}
            for _ in range(4):  # the best of five, for the kinds within 1.5x of the fastest so far
                fastest = min(best.values())
                for kind in [k for k in certified if best[k] <= 1.5 * fastest]:
                    best[kind] = min(best[kind], run(kind))
            self._timed[key] = min(best, key=best.get)
        return self._timed[key]

    int16 = False  # the int16 GEMM applies (linear layers, patchify convs)

    def int16_prepare(self, w):
        """`w` packed for the int16 GEMM (`kernels.pack_s16`, fan-in flattened), or None where it does not
        apply or is not certified."""
        if not self.int16 or kernels.library() is None:
            return None
        packed = kernels.pack_s16(w.reshape(w.shape[0], -1), self.xb)
        return (
            None if packed is None else ExactWeights(packed[0], 1, 0, 1, w.shape[0], packed[1], kind="int16")
        )

    def describe(self) -> str:
        """The exact kernel the stored weights ran on last (or would run on) and the epilogue that
        finishes it."""
        epilogue = "C epilogue" if kernels.library() is not None else "torch epilogue"
        kind = self._last["kind"] if kernels.library() is not None else "float"
        ew = self.exact_weights(self.weight_q, kind) or self.exact_weights(self.weight_q)
        return f"{ew.kernel} + {epilogue}"

    def int_forward(self, x, ctx):
        w = self.weight(ctx)
        kind = self.kernel_for(x, ctx.kernel, w) if kernels.library() is not None else "float"
        ew = self.exact_weights(w, kind, x.shape) if kind != "float" else None
        if ew is None:
            kind, ew = "float", self.exact_weights(w)
        self._last["kind"] = kind
        raw = self.exact_op(self._operand(x, kind), ew)
        if kernels.library() is not None:
            return self._fused_epilogue(raw, ew, ctx)
        acc = combine(raw, ew, self.channel_dim)
        if ctx.requant == "float":
            return self._float_requant(acc, ctx)
        bound = ew.bound
        if self.bias_q is not None:
            acc += self.bias_q.to(acc.dtype).reshape(self._bias_shape(acc.dim()))
            bound += int(self.bias_q.abs().max())
        acc, n, amax = accumulate(acc, ctx.acc, bound)
        ctx.stats.add(self.name, n)
        return self.requant(acc, ctx.requant, amax)

    def _operand(self, x, kind: str):
        """`x` as the kernel `kind` reads it: codes stored as bytes become float32 codes (exactly) for the
        kernels that take floats."""
        return x.float() if x.dtype == torch.uint8 and kind not in self.BYTE_KERNELS else x

    def _float_requant(self, acc, ctx):
        """PyTorch x86 (fbgemm) output stage: float32(acc)·float32(s_in·s_w) + float bias, / s_out, round half
        to even. Reproduces `torch.ao.nn.quantized` bit-for-bit."""
        acc, n, _ = accumulate(acc, ctx.acc)
        ctx.stats.add(self.name, n)
        shape = self._bias_shape(acc.dim())
        y = acc.to(torch.float32) * self.acc_scale.float().reshape(
            shape if self.acc_scale.numel() > 1 else ()
        )
        if self.bias_q is not None:
            y = y + self.float_bias().reshape(shape)
        y = torch.round(y / torch.tensor(float(self.out_qp.scale.reshape(-1)[0]), dtype=torch.float32))
        return (y + self.requant.zp).clamp_(self.lo, self.hi)

    def _fused_epilogue(self, raw, ew: ExactWeights, ctx):
        """The C epilogue's one pass (see `kernels.epilogue`): same integers as the torch path."""
        if self.bias_q is None:
            bias = None
        elif ctx.requant == "float":  # PyTorch x86 adds the float bias after scaling
            bias = self.float_bias().float().contiguous()
        else:
            bias = self.bias_q.to(torch.int64).contiguous()
        stack = (ew.groups, ew.planes, ew.channels, ew.digit_bits, ew.chunks)
        out, n = kernels.epilogue(
            raw, self.channel_dim, stack, self.requant, bias, ctx.acc.bits, ctx.acc.overflow == "wrap",
            ctx.requant, ew.offset, ew.shift, self.name in ctx.u8, ew.bound < 2 ** (ctx.acc.bits - 1),
        )  # fmt: skip
        ctx.stats.add(self.name, n)
        return out

    def fake_forward(self, x, ctx):
        w = self.weight(ctx)  # integer codes, or float (already fake-quantized) weights for QAT
        w = w if w.is_floating_point() else self.exact_weights(w, "dequantized")  # cached per version
        return fake_out(self.float_op(x, w, self.float_bias()), self.out_qp, self.lo, self.hi, fresh=True)


class QConv2d(QWeighted):
    def __init__(self, name, inputs, conv: nn.Conv2d, **kw):
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )
        if conv.padding_mode != "zeros":
            raise NotImplementedError(f"{name}: padding_mode={conv.padding_mode!r} is not supported")
        # a patchify conv (stride = kernel, no padding: a ViT's patch embedding) is a GEMM over its patches
        self.int16 = (
            conv.stride == conv.kernel_size
            and conv.padding in ((0, 0), "valid")
            and conv.dilation == (1, 1)
            and conv.groups == 1
        )
        super().__init__(name, inputs, **kw)

    def exact_op(self, x, ew):
        """Σ (x - zp_in)·w with the prepared weights: raw kernel output, planes stacked."""
        if ew.kind == "onednn":
            return onednn.conv(x, ew, int(self.zp_in), self.stride, self.padding, self.dilation)
        if ew.kind == "int_mm":
            k = self.weight_q.shape[2:]
            return intmm.conv(x, ew, int(self.zp_in), k, self.stride, self.padding, self.dilation)
        if ew.kind == "int16":  # the patches as rows, then channels-last (B, C, OH, OW) int32
            (kh, kw), (b, c, h, w) = self.weight_q.shape[2:], x.shape
            oh, ow = h // kh, w // kw
            patches = x[:, :, : oh * kh, : ow * kw].reshape(b, c, oh, kh, ow, kw).permute(0, 2, 4, 1, 3, 5)
            acc = kernels.gemm_s16(patches.reshape(b, oh, ow, -1), int(self.zp_in), ew.weight, ew.channels)
            return acc.permute(0, 3, 1, 2)
        return exact_conv2d(
            x if self.zp_in == 0 else x - self.zp_in, ew, self.stride, self.padding, self.dilation
        )

    def onednn_prepare(self, w, shape=None):
        zp, args = int(self.zp_in), (self.groups, self.stride, self.padding, self.dilation)
        return onednn.prepare_conv(w, zp, *args, x_shape=shape, per_call=w is not self.weight_q)

    def onednn_write_split(self, ws, shape, like):
        conv = (tuple(self.stride), tuple(self.padding), tuple(self.dilation), self.groups)
        return onednn.write_split(ws, like, int(self.zp_in), conv, shape, None, self._last["pools"])

    def float_op(self, x, w, b):
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups)


class QLinear(QWeighted):
    channel_dim = -1
    int16 = True

    def exact_op(self, x, ew):
        if ew.kind == "onednn":
            return onednn.linear(x, ew, int(self.zp_in))
        if ew.kind == "int16":
            return kernels.gemm_s16(x, int(self.zp_in), ew.weight, ew.channels)
        if ew.kind == "int_mm":
            return intmm.linear(x, ew)
        return exact_linear(x if self.zp_in == 0 else x - self.zp_in, ew)

    def onednn_prepare(self, w, shape=None):
        return onednn.prepare_linear(
            w, int(self.zp_in), x_shape=self._rows(shape), per_call=w is not self.weight_q
        )

    def onednn_write_split(self, ws, shape, like):
        return onednn.write_split(
            ws, like, int(self.zp_in), None, self._rows(shape), None, self._last["pools"]
        )

    @staticmethod
    def _rows(shape):
        """The rows [N, K] `onednn.linear` runs for inputs of `shape`."""
        return None if shape is None else [math.prod(shape[:-1]), shape[-1]]

    def float_op(self, x, w, b):
        return F.linear(x, w, b)

    def forward(self, x, ctx: ExecContext):
        """One pass, or P passes at once when `ctx.weight_fn` gives this layer P stacked weights
        [P, N, K] (`ExecContext.stack`): integer mode runs them as one layer of P·N output channels (one
        GEMM, one epilogue; `stacked`), fake mode one float pass each; the outputs come back stacked along
        the batch, pass p in rows p·B..p·B+B−1, each equal to its own pass bit for bit."""
        w = self.weight(ctx) if ctx.stack > 1 else None
        if w is None or w.dim() == self.weight_q.dim():
            return super().forward(x, ctx=ctx)
        if ctx.mode != "integer":  # float GEMMs of different widths may sum in different orders
            ys = [
                super(QLinear, self).forward(x, ctx=replace(ctx, weight_fn=lambda n, _, v=v: v, stack=1))
                for v in w
            ]
            return torch.cat(ys)
        p, n = w.shape[:2]
        flat = w.reshape(p * n, -1)
        y = self.stacked(p)(x, ctx=replace(ctx, weight_fn=lambda name, node: flat, stack=1))
        y = y.unflatten(-1, (p, n)).movedim(-2, 0)
        return y.reshape(-1, *y.shape[2:])

    def stacked(self, p: int) -> QLinear:
        """This layer with its output channels (weights, bias, scales, requantization) repeated p times,
        built once per weight scale and bias version: P perturbed copies of the weights run through it as
        one layer."""
        key = (p, None if self.bias_q is None else self.bias_q._version)
        if key not in self._stacks:
            tile = lambda t: None if t is None else (t if t.numel() == 1 else t.repeat(p))  # noqa: E731
            w_qp = QParams(self.w_qp.fmt, tile(self.w_qp.scale), tile(self.w_qp.zero_point))
            self._stacks = {k: v for k, v in self._stacks.items() if k[1] == key[1]}  # drop a changed bias's
            self._stacks[key] = QLinear(
                self.name, self.inputs, self.in_qp, w_qp, self.out_qp, self.weight_q.repeat(p, 1),
                tile(self.bias_q), self.act, tile(self.bias_float),
            )  # fmt: skip
        return self._stacks[key]


# ------------------------------------------------------------------------------------------ other ops
class QInput(QNode):
    """Quantizes the float model input with its calibrated format."""

    kind = "input"

    def int_forward(self, x, ctx):
        qp = self.out_qp
        if (
            kernels.library() is not None
            and x.dtype == torch.float32
            and qp.is_scalar
            and qp.fmt.rounding == "nearest_even"
            and qp.fmt.saturate
        ):
            zp = int(qp.zero_point.reshape(-1)[0])
            return kernels.quantize(x, float(qp.scale.reshape(-1)[0]), zp, qp.fmt.qmin, qp.fmt.qmax)
        return quantize(x, qp).to(torch.float32)

    def fake_forward(self, x, ctx):
        return fake_quantize(x.float(), self.out_qp)  # the input needs no gradient


class QConst(QNode):
    """A constant tensor of the float model (e.g. a ViT position embedding), quantized."""

    def __init__(self, name, value: torch.Tensor, out_qp: QParams):
        super().__init__(name, [], out_qp)
        self.register_buffer("q", quantize(value.detach(), out_qp).to(torch.float32))

    def int_forward(self, ctx):
        return self.q

    def fake_forward(self, ctx):
        return dequantize(self.q, self.out_qp)


class QRescaleSum(QNode):
    """Residual add (sum of inputs) or concatenation, each input rescaled to the output format.

    y = sat(Σ_i ((q_i - zp_i) · M_i + 2^(S-1)) >> S + zp_out), M_i = round(s_i / s_out · 2^S), S = 30 - e.
    """

    takes_u8 = writes_u8 = True

    def __init__(
        self,
        name,
        inputs,
        in_qps: list[QParams],
        out_qp: QParams,
        act: str | None = None,
        cat_dim: int | None = None,
    ):
        super().__init__(name, inputs, out_qp)
        self.in_qps, self.cat_dim = in_qps, cat_dim
        self.lo, self.hi = act_range(out_qp, act)
        ratios = [float(q.scale.reshape(-1)[0] / out_qp.scale.reshape(-1)[0]) for q in in_qps]
        self.shift = ADD_SHIFT - max(0, math.ceil(math.log2(max(ratios))))
        self.mults = [round(r * 2**self.shift) for r in ratios]
        self.zps = [float(q.zero_point.reshape(-1)[0]) for q in in_qps]
        self.zp_out = int(out_qp.zero_point.reshape(-1)[0])
        self.xb = max(x_bound(q) for q in in_qps)

    def _rescale(self, x, i):
        return (x - self.zps[i]).to(torch.int64) * self.mults[i]

    def _finish(self, acc):
        y = ((acc + (1 << (self.shift - 1))) >> self.shift) + self.zp_out
        return y.clamp_(self.lo, self.hi).to(torch.float32)

    def int_forward(self, *xs, ctx):
        if kernels.library() is not None and all(x.dtype in (torch.float32, torch.uint8) for x in xs):
            zps = [int(z) for z in self.zps]
            out = (self.xb, self.shift, self.zp_out, self.lo, self.hi, self.name in ctx.u8)
            if self.cat_dim is None:  # inputs broadcast together (a ViT's position embedding)
                return kernels.rescale_sum(list(xs), zps, self.mults, *out)
            if self.cat_dim is not None:
                parts = [kernels.rescale_sum([x], [z], [m], *out) for x, z, m in zip(xs, zps, self.mults)]
                return torch.cat(parts, self.cat_dim)
        if self.cat_dim is None:
            acc = self._rescale(xs[0], 0)
            for i, x in enumerate(xs[1:], 1):
                acc += self._rescale(x, i)
            return self._finish(acc)
        return torch.cat([self._finish(self._rescale(x, i)) for i, x in enumerate(xs)], self.cat_dim)

    def fake_forward(self, *xs, ctx):
        if self.cat_dim is not None:
            y = torch.cat(xs, self.cat_dim)
        else:  # a residual add: one pass (sum() would start with 0 + xs[1])
            y = xs[0] + (xs[1] if len(xs) == 2 else sum(xs[1:]))
        return fake_out(y, self.out_qp, self.lo, self.hi, fresh=True)


class QAvgPool(QNode):
    """Average pooling: exact window sums, then one requantization by s_in / (n · s_out)."""

    takes_u8 = writes_u8 = True

    def __init__(self, name, inputs, in_qp: QParams, out_qp: QParams, pool: nn.Module):
        super().__init__(name, inputs, out_qp)
        self.in_qp, self.pool = in_qp, pool
        self.zp_in = float(in_qp.zero_point.reshape(-1)[0])
        self.xb = x_bound(in_qp)
        self.lo, self.hi = act_range(out_qp, None)
        self._requant: dict[tuple[int, int], Requantizer] = {}

    def _window(self, x):
        if isinstance(self.pool, nn.AdaptiveAvgPool2d):
            osz = self.pool.output_size
            osz = (osz, osz) if isinstance(osz, int) else osz
            h, w = x.shape[-2:]
            oh, ow = osz[0] or h, osz[1] or w
            if h % oh or w % ow:
                raise NotImplementedError(
                    f"{self.name}: adaptive pool {h}x{w}->{oh}x{ow} needs equal windows"
                )
            return (h // oh, w // ow), (h // oh, w // ow), 0
        p = self.pool
        return p.kernel_size, p.stride, p.padding

    def int_forward(self, x, ctx):
        k, s, p = self._window(x)
        n = math.prod(k) if isinstance(k, tuple) else k * k
        xz = x - self.zp_in  # float32 (bytes promote)
        if n * self.xb >= 2**24:
            xz = xz.double()
        acc = F.avg_pool2d(xz, k, s, p, divisor_override=1)
        channels = acc.shape[1]
        if (n, channels) not in self._requant:  # one requantizer per window size: r = s_in / (n · s_out)
            real = self.in_qp.scale.reshape(-1) / (n * self.out_qp.scale.reshape(-1))
            self._requant[n, channels] = Requantizer(real, self.out_qp, self.lo, self.hi, channels=channels)
        rq = self._requant[n, channels]
        if kernels.library() is not None and acc.dim() == 4:
            stack, u8 = (1, 1, channels, 0, 1), self.name in ctx.u8
            return kernels.epilogue(acc, 1, stack, rq, None, 48, False, ctx.requant, out_u8=u8)[0]
        return rq(acc.double(), ctx.requant, n * self.xb)

    def fake_forward(self, x, ctx):
        return fake_out(self.pool(x), self.out_qp, self.lo, self.hi, fresh=True)


class QClamp(QNode):
    """Standalone ReLU / ReLU6 / Hardtanh on the input's own scale (no requantization)."""

    takes_u8 = writes_u8 = passes_dtype = True

    def __init__(self, name, inputs, in_qp: QParams, lo_real: float | None, hi_real: float | None):
        super().__init__(name, inputs, in_qp)
        s, zp = float(in_qp.scale.reshape(-1)[0]), int(in_qp.zero_point.reshape(-1)[0])
        self.lo = in_qp.fmt.qmin if lo_real is None else max(in_qp.fmt.qmin, zp + round(lo_real / s))
        self.hi = in_qp.fmt.qmax if hi_real is None else min(in_qp.fmt.qmax, zp + round(hi_real / s))

    def int_forward(self, x, ctx):
        return x.clamp(self.lo, self.hi)

    def fake_forward(self, x, ctx):
        return fake_out(x, self.out_qp, self.lo, self.hi)


class QLut(QNode):
    """Elementwise nonlinearity (Hardswish, Sigmoid, GELU, ...) as a lookup table over all input codes,
    as NPUs do for <= 16-bit activations. table[q - qmin] = sat(round(f((q - zp)·s_in) / s_out) + zp_out)."""

    def __init__(self, name, inputs, in_qp: QParams, out_qp: QParams, fn: Callable):
        super().__init__(name, inputs, out_qp)
        self.in_qp, self.fn = in_qp, fn
        codes = torch.arange(in_qp.fmt.qmin, in_qp.fmt.qmax + 1, dtype=torch.int64)
        self.register_buffer("table", quantize(fn(dequantize(codes, in_qp)), out_qp).to(torch.float32))
        self.qmin = in_qp.fmt.qmin

    def int_forward(self, x, ctx):
        if kernels.library() is not None and x.dtype == torch.float32:
            return kernels.lut(x, self.table, self.qmin)
        return self.table[(x - self.qmin).to(torch.int64)]

    def fake_forward(self, x, ctx):
        return fake_quantize(self.fn(x), self.out_qp)


class QLayout(QNode):
    """Ops that only move or select values (flatten, reshape, permute, max-pool, dropout, getitem):
    the same call on integers and on floats, output format = input format."""

    passes_dtype = True

    def __init__(self, name, inputs, out_qp, call: Callable, args, kwargs):
        super().__init__(name, inputs, out_qp)
        self.call, self.args_t, self.kwargs_t = call, args, kwargs
        # torch's uint8 max-pool refuses channels-last inputs and is 10x slower than float32 on NCHW ones
        max_pool = isinstance(call, nn.MaxPool2d) or call is F.max_pool2d
        self.takes_u8 = self.writes_u8 = not max_pool

    def _run(self, *xs, ctx):
        return self.call(*materialize(self.args_t, xs), **materialize(self.kwargs_t, xs))

    int_forward = fake_forward = _run


class QFallback(QLayout):
    """Any other op: runs in float on dequantized inputs, output re-quantized (fake-quant in both modes).
    Non-tensor results (shapes, sizes) pass through unchanged."""

    passes_dtype = False

    def __init__(self, name, inputs, in_qps: list[QParams | None], out_qp, call, args, kwargs):
        super().__init__(name, inputs, out_qp, call, args, kwargs)
        self.in_qps = in_qps
        self.takes_u8 = self.writes_u8 = False

    def describe(self) -> str:
        """What runs in float: the tensor method's name, the function's name or the module's type."""
        call = self.call
        return getattr(call, "method", None) or getattr(call, "__name__", type(call).__name__)

    def int_forward(self, *xs, ctx):
        xs = [
            dequantize(x, qp) if qp is not None and torch.is_tensor(x) else x
            for x, qp in zip(xs, self.in_qps)
        ]
        y = self._run(*xs, ctx=ctx)
        return quantize(y, self.out_qp).to(torch.float32) if self.out_qp is not None else y

    def fake_forward(self, *xs, ctx):
        y = self._run(*xs, ctx=ctx)
        return fake_quantize(y.float(), self.out_qp) if self.out_qp is not None else y
