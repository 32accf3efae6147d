"""Integer-only transformer ops: LayerNorm, softmax, activation × activation matmul, and learned tokens.

Every op is exact integer arithmetic on the stored codes (int64 intermediates, bounds checked at
conversion), so the numpy edge runtime reproduces it bit for bit (`fwdgrad.edge.ops`). Formulas, with
q = x_q − zp_in over the D channels of one token (docs/engine.md#transformers):

LayerNorm (γ, β trainable; γ_q symmetric on Δ_γ, β_q int32 on Δ_γ·2^-F):
    μ_q = ⌊(2·Σq + D) / 2D⌋,  c = q − μ_q,  V = Σc² + V_ε,  V_ε = max(1, round(ε·D / s_in²))
    r = ⌊√(V·D)⌋ (exact integer square root),  x̂ = ⌊(2·c·D·2^F + r) / 2r⌋      (x̂ ≈ 2^F·(x−μ)/σ)
    acc = γ_q·x̂ + β_q,  y = sat(round(acc · Δ_γ·2^-F / s_out) + zp_out)          (the usual requantizer)
softmax over the last axis (probabilities on the fixed scale 1/(2^b − 1), b = activation bits):
    d = max(q) − q,  e = T[min(d, L)],  T[k] = round(2^P · exp(−k·s_in)) (T[L] = 0),  P = b + 14
    p = ⌊(2·e·(2^b − 1) + Σe) / 2Σe⌋
matmul of two activations (QKᵀ, attention·V):
    acc = Σ_k (a_q − zp_a)(b_q − zp_b)  (float32 / float64 where every partial sum is certified exact, else
    int64),  y = sat(round(acc · s_a·s_b / s_out) + zp_out)
tokens (class token, deep prompts; trainable, symmetric on Δ_t): inserted as sat(round(t_q · Δ_t / s_out) +
    zp_out) into the input sequence rescaled to the output format (as a one-input `QRescaleSum`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant import QFormat, QParams, dequantize, fake_quantize, quantize
from . import kernels
from .intops import accumulate
from .nodes import ExecContext, QNode, QRescaleSum, QTrainable, Requantizer, act_range, fake_out, x_bound

SOFTMAX_EXTRA_BITS = 14  # exp table precision P = probability bits + this


def isqrt(n: torch.Tensor) -> torch.Tensor:
    """⌊√n⌋ of non-negative int64 integers below 2^52, exactly: the float64 root corrected by ±1."""
    r = torch.sqrt(n.double()).floor().to(torch.int64)
    r = r - (r * r > n).to(torch.int64)
    return r + ((r + 1) * (r + 1) <= n).to(torch.int64)


def _scalar(t: torch.Tensor) -> float:
    return float(t.reshape(-1)[0])


def _round_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """⌊(2·num + den) / 2·den⌋: num/den rounded half up (den > 0), int64."""
    return torch.div(2 * num + den, 2 * den, rounding_mode="floor")


def _real_weight(w: torch.Tensor, w_qp: QParams) -> torch.Tensor:
    """Fake mode's weights: integer codes dequantized, or float (already fake-quantized) weights as given
    (quantization-aware training's master weights)."""
    return w if w.is_floating_point() else dequantize(w, w_qp)


def probability_qparams(bits: int) -> QParams:
    """The fixed output format of the integer softmax: unsigned `bits`, scale 1/(2^bits − 1), zero point 0."""
    return QParams(QFormat(bits=bits, signed=False, symmetric=False), 1.0 / (2**bits - 1))


class QLayerNorm(QTrainable):
    """LayerNorm over the last axis in integers (module docstring); γ is `weight_q`, β is `bias_q`."""

    def __init__(self, name, inputs, in_qp: QParams, out_qp: QParams, ln: nn.LayerNorm, w_fmt: QFormat):
        super().__init__(name, inputs, out_qp)
        (d,) = ln.normalized_shape
        self.in_qp, self.dim, self.eps = in_qp, d, ln.eps
        gamma = ln.weight.detach().double() if ln.weight is not None else torch.ones(d, dtype=torch.float64)
        beta = ln.bias.detach().double() if ln.bias is not None else torch.zeros(d, dtype=torch.float64)
        amax = gamma.abs().clamp_min(1e-12)
        w_scale = (amax if w_fmt.axis is not None else amax.max()) / w_fmt.qmax
        self.w_qp = QParams(w_fmt, w_scale)
        self.register_buffer(
            "weight_q", torch.round(gamma / w_scale).clamp(w_fmt.qmin, w_fmt.qmax).to(w_fmt.dtype)
        )
        # x̂'s fraction bits: |γ_q·x̂| <= qmax_w·√D·2^F stays below 2^30 (half the 32-bit accumulator for β)
        self.frac = min(14, int(math.floor(math.log2(2**30 / (w_fmt.qmax * math.sqrt(d))))))
        if self.frac < 4:
            raise ValueError(f"LayerNorm {name!r} over {d} channels leaves {self.frac} < 4 fraction bits")
        self.register_buffer(
            "bias_q",
            torch.round(beta / (w_scale * 2.0**-self.frac)).clamp(-(2**31), 2**31 - 1).to(torch.int32),
        )
        s_in = _scalar(in_qp.scale)
        self.zp_in = int(in_qp.zero_point.reshape(-1)[0])
        self.v_eps = max(1, round(self.eps * d / s_in**2))
        span = in_qp.fmt.qmax - in_qp.fmt.qmin
        if (d * span * span + self.v_eps) * d >= 2**52 or 2 * span * d * 2**self.frac + math.isqrt(
            (d * span * span + self.v_eps) * d
        ) >= 2**52:  # the statistics and x̂'s numerator are exact in float64 (the C kernel) and int64
            raise ValueError(
                f"LayerNorm {name!r}: {in_qp.fmt.bits}-bit inputs over {d} channels overflow int64 statistics"
            )
        self.lo, self.hi = act_range(out_qp, None)
        self._derive_scales()

    def _derive_scales(self) -> None:
        real = self.w_qp.scale.reshape(-1) * 2.0**-self.frac / _scalar(self.out_qp.scale)
        self.requant = Requantizer(real, self.out_qp, self.lo, self.hi, channel_dim=-1, channels=self.dim)

    def describe(self) -> str:
        return f"integer LayerNorm over {self.dim} channels, x̂ with {self.frac} fraction bits"

    def normalized(self, x: torch.Tensor) -> torch.Tensor:
        """x̂ = round(2^F·(x − μ)/σ) per token (int64), from the integer statistics."""
        q = x.to(torch.int64) - self.zp_in
        d = self.dim
        mu = torch.div(2 * q.sum(-1, keepdim=True) + d, 2 * d, rounding_mode="floor")
        c = q - mu
        r = isqrt(((c * c).sum(-1, keepdim=True) + self.v_eps) * d)
        return _round_div(c * (d << self.frac), r)

    def int_forward(self, x, ctx: ExecContext):
        w = self.weight(ctx)
        if kernels.library() is not None and x.dtype == torch.float32:  # x̂ in C, then the C epilogue
            gamma = w.double().contiguous()  # γ_q·x̂ in the same pass, exact: < 2^31
            acc = kernels.ln_normalize(x, self.zp_in, self.frac, self.v_eps, gamma)
            bias = self.bias_q.to(torch.int64).expand(self.dim).contiguous()
            if ctx.requant == "float":  # the integer bias joins the accumulator, as on the torch path
                acc.add_(bias.double())
                bias = None
            out, bad = kernels.epilogue(
                acc, -1, (1, 1, self.dim, 0, 1), self.requant, bias, ctx.acc.bits,
                ctx.acc.overflow == "wrap", ctx.requant,
            )  # fmt: skip
            ctx.stats.add(self.name, bad)
            return out
        acc = w.to(torch.int64) * self.normalized(x) + self.bias_q.to(torch.int64)
        acc, bad, amax = accumulate(acc, ctx.acc)
        ctx.stats.add(self.name, bad)
        return self.requant(acc, ctx.requant)

    def fake_forward(self, x, ctx: ExecContext):
        w = _real_weight(self.weight(ctx), self.w_qp)
        b = self.bias_q.double() * (self.w_qp.scale.reshape(-1) * 2.0**-self.frac)
        y = F.layer_norm(x, (self.dim,), w.to(x.dtype), b.to(x.dtype), self.eps)
        return fake_out(y, self.out_qp, self.lo, self.hi, fresh=True)


class QSoftmax(QNode):
    """Softmax over the last axis in integers (module docstring): an exp table over max-subtracted codes,
    normalized by an exact rounded division. Output on `probability_qparams(bits)`."""

    def __init__(self, name, inputs, in_qp: QParams, bits: int):
        super().__init__(name, inputs, probability_qparams(bits))
        self.in_qp, self.levels = in_qp, 2**bits - 1
        self.precision = bits + SOFTMAX_EXTRA_BITS
        s = _scalar(in_qp.scale)
        span = in_qp.fmt.qmax - in_qp.fmt.qmin
        k = torch.arange(span + 1, dtype=torch.float64)
        table = torch.round(torch.exp(-k * s) * 2.0**self.precision).to(torch.int64)
        length = int((table > 0).sum())  # exp(−k·s) is decreasing: the non-zero entries come first
        self.register_buffer("table", torch.cat([table[:length], table.new_zeros(1)]))

    def describe(self) -> str:
        return f"integer softmax, exp table of {len(self.table)} entries, {self.precision} bits"

    def int_forward(self, x, ctx: ExecContext):
        if kernels.library() is not None and x.dtype == torch.float32:
            return kernels.softmax(x, self.table, self.levels)
        q = x.to(torch.int64)
        d = (q.amax(-1, keepdim=True) - q).clamp_(max=len(self.table) - 1)
        e = self.table[d]
        total = e.sum(-1, keepdim=True)
        return _round_div(e * self.levels, total).to(torch.float32)

    def fake_forward(self, x, ctx: ExecContext):
        return fake_quantize(torch.softmax(x, -1), self.out_qp)


class QMatmul(QNode):
    """a @ b of two activations (module docstring), exact, then one requantization by s_a·s_b / s_out."""

    def __init__(self, name, inputs, in_qps: list[QParams], out_qp: QParams):
        super().__init__(name, inputs, out_qp)
        self.in_qps = in_qps
        self.zps = [float(q.zero_point.reshape(-1)[0]) for q in in_qps]
        self.bound = x_bound(in_qps[0]) * x_bound(in_qps[1])  # per product
        self.lo, self.hi = act_range(out_qp, None)
        self.real = _scalar(in_qps[0].scale) * _scalar(in_qps[1].scale) / _scalar(out_qp.scale)
        self.requant = Requantizer(self.real, out_qp, self.lo, self.hi)
        self._per_column: dict[int, Requantizer] = {}  # the C epilogue's constants, per output width

    def describe(self) -> str:
        return "integer matmul of two activations"

    def macs(self, out, a, b) -> int:
        return out.numel() * a.shape[-1]

    def int_forward(self, a, b, ctx: ExecContext):
        amax = a.shape[-1] * self.bound
        dtype = torch.float32 if amax < 2**24 else torch.float64 if amax < 2**53 else torch.int64
        a, b = (t if z == 0 else t - z for t, z in zip((a, b), self.zps))  # softmax's probabilities: zp 0
        acc = torch.matmul(a.to(dtype), b.to(dtype))
        if kernels.library() is not None and dtype is not torch.int64:  # one C pass to output codes
            cols = acc.shape[-1]
            if cols not in self._per_column:
                self._per_column[cols] = Requantizer(self.real, self.out_qp, self.lo, self.hi, channels=cols)
            out, bad = kernels.epilogue(
                acc, -1, (1, 1, cols, 0, 1), self._per_column[cols], None, ctx.acc.bits,
                ctx.acc.overflow == "wrap", ctx.requant,
            )  # fmt: skip
            ctx.stats.add(self.name, bad)
            return out
        acc, bad, amax = accumulate(acc if dtype is torch.int64 else acc.double(), ctx.acc, amax)
        ctx.stats.add(self.name, bad)
        return self.requant(acc, ctx.requant, amax)

    def fake_forward(self, a, b, ctx: ExecContext):
        return fake_out(torch.matmul(a, b), self.out_qp, self.lo, self.hi, fresh=True)


class QTokens(QTrainable):
    """Learned tokens (1, T, D) spliced into the sequence: y = cat(x'[:, :at], tokens, x'[:, at+drop:]), x'
    the input rescaled to the output format. The tokens are `weight_q` (trainable), symmetric with 2^(w−a)
    times the output's resolution (w weight bits, a activation bits), inserted by one requantization."""

    def __init__(self, name, inputs, in_qp: QParams, out_qp: QParams, tokens: nn.Module, w_fmt: QFormat):
        super().__init__(name, inputs, out_qp)
        self.in_qp, self.at, self.drop, self.prompt = in_qp, tokens.at, tokens.drop, tokens.prompt
        w_fmt = QFormat(bits=w_fmt.bits, signed=True, symmetric=True)  # one scale for the whole tensor
        self.w_qp = QParams(w_fmt, _scalar(out_qp.scale) * 2.0 ** (out_qp.fmt.bits - w_fmt.bits))
        self.register_buffer("weight_q", quantize(tokens.tokens.detach().double(), self.w_qp).to(w_fmt.dtype))
        self.bias_q = None
        self.rescale = QRescaleSum(name, inputs, [in_qp], out_qp)
        self.lo, self.hi = act_range(out_qp, None)
        self._derive_scales()

    def _derive_scales(self) -> None:
        real = self.w_qp.scale.reshape(-1) / _scalar(self.out_qp.scale)
        self.requant = Requantizer(real, self.out_qp, self.lo, self.hi)

    def describe(self) -> str:
        return f"{self.weight_q.shape[1]} integer tokens at position {self.at}"

    def _splice(self, x, t):
        return torch.cat([x[:, : self.at], t.expand(x.shape[0], -1, -1), x[:, self.at + self.drop :]], 1)

    def int_forward(self, x, ctx: ExecContext):
        t = self.requant(self.weight(ctx).to(torch.int64), ctx.requant, self.w_qp.fmt.qmax)
        return self._splice(self.rescale.int_forward(x, ctx=ctx), t)

    def fake_forward(self, x, ctx: ExecContext):
        t = _real_weight(self.weight(ctx), self.w_qp).to(x.dtype)
        return fake_out(self._splice(x, t), self.out_qp, self.lo, self.hi, fresh=True)
