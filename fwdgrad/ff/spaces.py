"""Where forward-gradient training perturbs and updates weights: float parameters or fixed-point integers.

A *space* owns the trainable tensors (ids 0..T-1, in forward order) and knows how to

* apply a perturbation Σ_j s_j·a_j·z_j (terms: sample index j, real size a_j (ε or ρ), sign s_j) for the
  duration of one forward pass, and
* apply the update ĝ = (1/m) Σ_i c_i·z_i, regenerating each z_i one tensor at a time (never stored).

`FloatSpace` perturbs nn.Parameters in place (MeZO); `FixedPointSpace` perturbs the integer weights of a
`QModel` on the fly inside its forward pass (the stored integers change only at the update), in the exact
fixed-point arithmetic of QZO-FF (docs/method.md#the-fixed-point-formulation):

    1_q = round(1/Δ_z),  ε_q = round(ε/Δ_w)
    w_q± = sat_b( round( (w_q·1_q ± ε_q·z_q) · r_p ) )         r_p = 1/1_q (default) or Δ_z (paper literal)
    g_q  = round( (1/m) Σ_i sign(L_i+ − L_i−) · z_q,i )          8 bits, scale Δ_z
    w_q ← sat_b( w_q − round( (η·Δ_z/Δ_w) · g_q ) )

Every real factor r is applied as an integer multiplier and right shift (M·2^-n, `quantize_multiplier`);
the accumulator w_q·1_q ± ε_q·z_q fits in 32 bits for 16-bit weights (|w_q|·36 + ε_q·127 < 2^31).

Layer-wise forward gradients (`layerwise` cycle | sample; Zhao et al., "Poor Man's Training on MCUs", 2025):
step k perturbs and updates only tensor t_k = `fwdgrad.rng.active_tensor(layerwise, seed, k, T)`, with the
same z as the full step would draw for it, so a step's passes share the prefix before t_k.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..engine import kernels
from ..engine.model import QModel
from ..fixed_point import INTEGER_DIFFERENCES, ROUNDINGS, FixedPointSettings
from ..quant import quantize_multiplier
from ..rng import torch_port
from ..rng.streams import LAYERWISE, SR_STREAM, active_tensor
from .estimators import Distribution, Key, QuantDistribution, make_distribution

#: The step's perturbations a fixed-point step keeps for its update instead of sampling them again, at most
#: this many elements (16 MB of 8-bit z); a device regenerates them (`Space.z`).
KEEP_Z_ELEMENTS = 1 << 24

#: A fixed-point step computes the perturbed weights of its passes before the first forward up to this many
#: weights in all (32 MB of int16); later passes compute theirs when they run (`FixedPointSpace.plan`).
PLAN_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Term:
    """One perturbation term: s · a · z(sample), a in real (float-weight) units."""

    sample: int
    size: float
    sign: int


@dataclass
class MomentumGuided:
    """Momentum-guided sampling (docs/method.md#momentum-guided-sampling): z = β·z₁ + (1−β)·z₂,
    z₁ ~ N(0, α), z₂ ~ N(h, 1−α), with h the previous step's gradient estimate rescaled to unit RMS.
    β = 1 for the first `warmup` steps."""

    alpha: float = 0.5
    beta: float = 0.5
    warmup: int = 10

    def coefficients(self, step: int) -> tuple[float, float, float]:
        """(weight of fresh noise n1, weight of history h, weight of noise n2 around h)."""
        beta = 1.0 if step < self.warmup else self.beta
        return beta * math.sqrt(self.alpha), 1.0 - beta, (1.0 - beta) * math.sqrt(1.0 - self.alpha)


class Space:
    """Common bookkeeping: tensor ids, masks, momentum history, counters."""

    def __init__(
        self,
        names: list[str],
        distribution: Distribution,
        seed: int,
        masks: dict | None,
        momentum: MomentumGuided | None,
        kernel_norm: bool,
        layerwise: str = "off",
    ):
        if not names:
            raise ValueError("nothing to train: the trainable set is empty")
        if layerwise not in LAYERWISE:
            raise ValueError(f"layerwise={layerwise!r} is invalid; allowed: {', '.join(LAYERWISE)}")
        self.names, self.dist, self.seed, self.layerwise = names, distribution, seed, layerwise
        self.masks = {names.index(n): m for n, m in (masks or {}).items()}  # keyed by tensor id
        self.momentum, self.kernel_norm = momentum, kernel_norm
        self.history: dict[int, torch.Tensor] = {}
        self._last_z: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}  # t: ((step, sample), z)
        self._step_z: dict[tuple[int, int, int], torch.Tensor] = {}  # (step, sample, t): the step's z
        self._kept = 0  # elements in _step_z

    def active(self, step: int) -> list[int]:
        """The tensor ids step `step` perturbs and updates: all, or the layer-wise one."""
        t = active_tensor(self.layerwise, self.seed, step, len(self.names))
        return list(range(len(self.names))) if t is None else [t]

    def can_stack(self, step: int) -> bool:
        """Whether the passes of step `step` can run as one stacked pass (`FixedPointSpace.stacked`)."""
        return False

    def plan(self, step: int, passes: list[list[Term]]) -> None:
        """The passes step `step` will run next, in order (`FixedPointSpace.plan`; nothing to do here)."""

    def key(self, step: int, sample: int, t: int) -> Key:
        return Key(self.seed, step, sample, t)

    def _noise(self, step, sample, t, shape, device) -> torch.Tensor:
        raise NotImplementedError

    def z(self, step: int, sample: int, t: int, shape, device, keep: bool = False) -> torch.Tensor:
        """The perturbation of tensor t for (step, sample): base noise, momentum mix, sparse mask. The last z
        of each tensor is kept (one tensor's worth per trained tensor, never written to by the callers): the
        + and - passes of a sample, and the update's last sample, reuse it instead of sampling it again.
        With keep, every sample's z of the step is kept for the update (up to KEEP_Z_ELEMENTS elements in all;
        past them the update samples z again, the same integers)."""
        last = self._last_z.get(t)
        if last is not None and last[0] == (step, sample):
            return last[1]
        kept = self._step_z.get((step, sample, t))
        if kept is not None:
            return kept
        z = self._noise(step, sample, t, shape, device)
        if self.momentum is not None and t in self.history and step >= self.momentum.warmup:
            z = self._mix(z, self._noise(step, sample + (1 << 19), t, shape, device), self.history[t], step)
        if t in self.masks:
            z = z * self.masks[t].to(z.dtype)
        self._last_z[t] = ((step, sample), z)
        if keep and self._kept + z.numel() <= KEEP_Z_ELEMENTS:
            self._step_z[(step, sample, t)] = z
            self._kept += z.numel()
        return z

    def forget_step_z(self) -> None:
        """Drop the z kept for the update (after it, or before a stacked step)."""
        self._step_z, self._kept = {}, 0

    def state_dict(self) -> dict:
        return {
            "history": {k: v.clone() for k, v in self.history.items()},
            "masks": {k: v.clone() for k, v in self.masks.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.history = {int(k): v.clone() for k, v in state["history"].items()}
        self.masks = {int(k): v.clone() for k, v in state["masks"].items()}
        self._last_z = {}
        self.forget_step_z()


# ------------------------------------------------------------------------------------------ float
class FloatSpace(Space):
    """nn.Parameters perturbed in place (MeZO). The restore w + εz − εz is exact only up to float rounding
    (≈1 ulp per step); the fixed-point space has no such drift."""

    def __init__(
        self,
        params: list[tuple[str, torch.nn.Parameter]],
        distribution: Distribution,
        seed: int = 0,
        masks=None,
        momentum=None,
        kernel_norm=False,
        layerwise="off",
    ):
        names = [n for n, _ in params]
        super().__init__(names, distribution, seed, masks, momentum, kernel_norm, layerwise)
        self.params = [p for _, p in params]

    def _noise(self, step, sample, t, shape, device):
        return self.dist.sample(self.key(step, sample, t), shape, device, self.params[t].dtype)

    def _mix(self, n1, n2, h, step):
        a, b, c = self.momentum.coefficients(step)
        return a * n1 + b * h + c * n2

    def _add(self, step, terms, sign):
        with torch.no_grad():
            for t in self.active(step):
                p = self.params[t]
                for term in terms:
                    p.add_(
                        self.z(step, term.sample, t, p.shape, p.device), alpha=sign * term.sign * term.size
                    )

    @contextmanager
    def perturbed(self, step: int, terms: list[Term]):
        self._add(step, terms, +1)
        try:
            yield
        finally:
            self._add(step, terms, -1)

    def update(self, step: int, coeffs: list[float], lr: float) -> None:
        m = len(coeffs)
        with torch.no_grad():
            for t in self.active(step):
                p = self.params[t]
                g = torch.zeros_like(p)
                for i, c in enumerate(coeffs):
                    if c:
                        z = self.z(step, i, t, p.shape, p.device)
                        if self.kernel_norm:
                            z = _kernel_normalized(z, p)
                        g.add_(z, alpha=c / m)
                p.sub_(g, alpha=lr)
                if self.momentum is not None:
                    self.history[t] = _unit_rms(g)


def _kernel_normalized(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """z^i/‖z^i‖·‖w^i‖ per kernel i (output channel); docs/method.md#kernel-wise-normalisation."""
    zn = z.reshape(z.shape[0], -1).norm(dim=1).clamp_min(1e-12)
    wn = w.reshape(w.shape[0], -1).norm(dim=1)
    return z * (wn / zn).reshape([-1] + [1] * (z.dim() - 1))


def _unit_rms(g: torch.Tensor) -> torch.Tensor:
    rms = g.pow(2).mean().sqrt()
    return g / rms if rms > 0 else g


# ------------------------------------------------------------------------------------ fixed point
def shift_round(
    x: torch.Tensor, mult: torch.Tensor, n: torch.Tensor, rounding: str, words: torch.Tensor | None = None
) -> torch.Tensor:
    """round(x · M / 2^n) in int64 with the given rounding: nearest (half up), floor, or stochastic
    (adds a uniform integer in [0, 2^n) drawn from 32-bit hash `words`)."""
    prod = x * mult
    if rounding == "nearest":
        return (prod + (torch.ones_like(n) << (n - 1))) >> n
    if rounding == "floor":
        return prod >> n
    if rounding == "stochastic":
        r = torch.where(n <= 32, words >> (32 - n).clamp_min(0), words << (n - 32).clamp_min(0))
        return (prod + r) >> n
    raise ValueError(f"rounding {rounding!r} is invalid; allowed: {ROUNDINGS}")


def perturb_requant(dist: QuantDistribution, perturb_scale: str) -> tuple[int, int]:
    """(M_p, n_p) with r_p ≈ M_p·2^-n_p: r_p = 1/1_q ("one") or Δ_z ("delta_z") brings w_q·1_q ± ε_q·z_q back
    to the weight scale."""
    r_p = 1.0 / dist.one_q if perturb_scale == "one" else dist.delta
    mult, shift = quantize_multiplier(r_p)
    return mult, 31 + shift


def size_lsb(size: float, delta_w: torch.Tensor, eps_min_q: int = 0) -> torch.Tensor:
    """A real perturbation size (ε or ρ) in weight LSBs: round(size/Δ_w), at least eps_min_q."""
    q = torch.round(size / delta_w).to(torch.int64)
    return q.clamp_min(eps_min_q) if eps_min_q else q


def update_requant(lr: float, delta_z: float, delta_w: torch.Tensor):
    """(M_u, s_u) with η·Δ_z/Δ_w ≈ M_u·2^-(31+s_u) (per channel when Δ_w is)."""
    return quantize_multiplier(lr * delta_z / delta_w)


class FixedPointSpace(Space):
    """The integer weights of a QModel, perturbed on the fly and updated in fixed point (module docstring).

    settings: the fixed-point options (`fwdgrad.fixed_point.FixedPointSettings`); the weight headroom in it
    is applied by `qzo_ff` before the space is built."""

    def __init__(
        self,
        model: QModel,
        names: list[str],
        settings: FixedPointSettings | None = None,
        seed: int = 0,
        masks=None,
        momentum=None,
        kernel_norm=False,
    ):
        settings = settings or FixedPointSettings()
        if settings.difference not in INTEGER_DIFFERENCES:
            raise ValueError(
                f"difference {settings.difference!r} is invalid for perturbed weights (the integer update "
                f"takes coefficients -1, 0, 1); allowed: {', '.join(INTEGER_DIFFERENCES)}, or "
                "method.ff.perturb=outputs for central"
            )
        distribution = make_distribution(settings.distribution, settings.z_max)
        super().__init__(names, distribution, seed, masks, momentum, kernel_norm, settings.layerwise)
        nodes = model.weight_nodes()
        missing = [n for n in names if n not in nodes]
        if missing:
            raise ValueError(
                f"trainable layers {missing} are not conv/linear layers, LayerNorms or tokens of the model; "
                f"allowed: {list(nodes)}"
            )
        self.model, self.nodes = model, [nodes[n] for n in names]
        self.index = {n: t for t, n in enumerate(names)}
        self.settings, self.rounding = settings, settings.rounding
        self.p_mult, self.p_n = perturb_requant(distribution, settings.perturb_scale)
        # weights clamped at the format's limits, per layer: by a perturbation, by an update
        self.saturations: dict[str, dict[str, int]] = {"perturb": {}, "update": {}}
        self.weights_seen = {"perturb": 0, "update": 0}  # weights perturbed / updated (the rates' base)
        self._consts: dict[tuple, tuple] = {}  # per-tensor constants (`_const`)
        self._planned: dict[tuple, dict[int, torch.Tensor]] = {}  # (step, terms): weights (`plan`)

    # -- per-tensor constants ---------------------------------------------------------------------
    def _channel_view(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        return v.reshape(()) if v.numel() == 1 else v.reshape([-1] + [1] * (ndim - 1))

    def delta_w(self, t: int) -> torch.Tensor:
        return self.nodes[t].w_qp.scale

    def _const(self, key: tuple, make):
        """`make()`, a constant of tensor t = key[1] (the key holds what it depends on besides Δ_w), kept
        while t's Δ_w is the same tensor; all are dropped when many accumulate (an ε or η schedule makes
        new ones)."""
        delta_w, hit = self.delta_w(key[1]), self._consts.get(key)
        if hit is None or hit[0] is not delta_w:
            if len(self._consts) > 8 * len(self.names):
                self._consts = {}
            hit = self._consts[key] = (delta_w, make())
        return hit[1]

    def size_q(self, t: int, size: float) -> torch.Tensor:
        """A real perturbation size (ε or ρ) in tensor t's weight LSBs (`size_lsb`)."""
        eps_min_q = self.settings.eps_min_q
        return self._const(("size", t, size), lambda: size_lsb(size, self.delta_w(t), eps_min_q))

    def size_table(self, t: int, terms: list[Term]) -> torch.Tensor:
        """The signed sizes s·a_q of `terms` for tensor t, int64 [terms, channels or 1]."""

        def make():
            sizes = [term.sign * self.size_q(t, term.size).reshape(-1) for term in terms]
            c = max(s.numel() for s in sizes)
            return torch.stack([s.expand(c) for s in sizes]).to(torch.int64).contiguous()

        return self._const(("table", t, tuple((term.size, term.sign) for term in terms)), make)

    def update_multiplier(self, t: int, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """`update_requant(η, Δ_z, Δ_w)` of tensor t."""
        return self._const(("update", t, lr), lambda: update_requant(lr, self.dist.delta, self.delta_w(t)))

    def check_size(self, key: str, size: float) -> None:
        """One-line ValueError unless `size` in weight LSBs fits every trained tensor's weight range (a larger
        integer ε saturates every perturbed weight, or overflows the int64 it is computed in)."""
        for node in self.nodes:
            lsb = float((size / node.w_qp.scale.double()).max())
            if not lsb <= node.w_qp.fmt.qmax:
                fmt = node.w_qp.fmt
                limit = float(node.w_qp.scale.double().min()) * fmt.qmax
                raise ValueError(
                    f"{key}={size!r} is {lsb:.3g} weight LSBs of layer {node.name!r}, beyond its "
                    f"{fmt.bits}-bit range; allowed: {key} <= {limit:.3g}"
                )

    def _saturated(self, kind: str, t: int, n: int, tensors: int = 1) -> None:
        """Count `n` saturated weights of tensor t, out of `tensors` copies of it (a step's passes)."""
        self.weights_seen[kind] += tensors * self.nodes[t].weight_q.numel()
        if n:
            counts = self.saturations[kind]
            name = self.nodes[t].name
            counts[name] = counts.get(name, 0) + n

    def _noise(self, step, sample, t, shape, device):
        return self.dist.sample_q(self.key(step, sample, t), shape, device)  # int8

    def _mix(self, n1, n2, h, step):
        a, b, c = (round(v * 2**15) for v in self.momentum.coefficients(step))
        n1, n2, h = n1.to(torch.int64), n2.to(torch.int64), h.to(torch.int64)
        return ((a * n1 + b * h + c * n2 + (1 << 14)) >> 15).clamp(-127, 127).to(torch.int8)

    def _words(self, step: int, stream: int, t: int) -> torch.Tensor | None:
        """The 32-bit hash words of stochastic rounding for tensor t's weights (shaped like them), from
        stream 2t (perturbation) or 2t + 1 (update); None with another rounding."""
        if self.rounding != "stochastic":
            return None
        w = self.nodes[t].weight_q
        return torch_port.hash_words(
            self.seed, step, SR_STREAM + stream, t, w.numel(), device=w.device
        ).reshape(w.shape)

    # -- perturbation -----------------------------------------------------------------------------
    def perturbed_weights(self, step: int, t: int, passes: list[list[Term]]) -> list[torch.Tensor]:
        """w_q± of tensor t for each of `passes`: sat_b(round((w_q·1_q + Σ s·a_q·z_q) · r_p)), the terms' z
        sampled once for all passes; in C all passes in one call (`kernels.perturb`), else in torch."""
        node, fmt = self.nodes[t], self.nodes[t].w_qp.fmt
        shape, device = node.weight_q.shape, node.weight_q.device
        words = self._words(step, 2 * t, t)
        if kernels.library() is not None and device.type == "cpu":
            zs = {
                s: self.z(step, s, t, shape, device, keep=True)
                for s in {tm.sample for p in passes for tm in p}
            }
            done = kernels.perturb(
                node.weight_q, self.dist.one_q,
                [([zs[term.sample] for term in terms], self.size_table(t, terms)) for terms in passes],
                self.p_mult, self.p_n, self.rounding, words, fmt.qmin, fmt.qmax,
            )  # fmt: skip
            if done is not None:
                self._saturated("perturb", t, sum(n for _, n in done), len(done))
                return [w for w, _ in done]
        return list(self._perturbed_torch(step, t, passes, words))

    def _perturbed_torch(self, step: int, t: int, passes: list[list[Term]], words) -> torch.Tensor:
        """`perturbed_weights` in torch int64, all passes in one [P, *shape] tensor."""
        node, fmt = self.nodes[t], self.nodes[t].w_qp.fmt
        w = node.weight_q.to(torch.int64)
        base = w * self.dist.one_q
        zs: dict[int, torch.Tensor] = {}  # sample -> z (int64)
        accs = []
        for terms in passes:
            acc = base
            for term in terms:
                if term.sample not in zs:
                    z = self.z(step, term.sample, t, w.shape, w.device, keep=len(passes) > 1)
                    zs[term.sample] = z.to(torch.int64)
                size = self._channel_view(term.sign * self.size_q(t, term.size), w.dim())
                acc = acc + size * zs[term.sample]
            accs.append(acc)
        out = shift_round(torch.stack(accs), self.p_mult, torch.as_tensor(self.p_n), self.rounding, words)
        for n in ((out < fmt.qmin) | (out > fmt.qmax)).flatten(1).sum(1).tolist():
            self._saturated("perturb", t, n)
        return out.clamp(fmt.qmin, fmt.qmax).to(node.weight_q.dtype)

    def plan(self, step: int, passes: list[list[Term]]) -> None:
        """Compute the perturbed weights of the passes step `step` runs next, all at once before its first
        forward, up to PLAN_ELEMENTS weights (`perturbed` takes them; the rest are computed as their pass
        runs): one burst on warm caches, where between forwards the same work runs about twice as slow."""
        size = sum(self.nodes[t].weight_q.numel() for t in self.active(step))
        planned = passes[: PLAN_ELEMENTS // max(size, 1)]
        self._planned = {
            (step, tuple(terms)): w for terms, w in zip(planned, self._passes_weights(step, planned))
        }

    def _passes_weights(self, step: int, passes: list[list[Term]]) -> list[dict[int, torch.Tensor]]:
        """Every active tensor's perturbed weights for each of `passes`, prepared for their kernels: tensor
        by tensor, all passes at once (`perturbed_weights`, `QWeighted.prepare_ahead`)."""
        weights = [{} for _ in passes]
        for t in self.active(step) if passes else []:
            ws = self.perturbed_weights(step, t, passes)
            self.nodes[t].prepare_ahead(ws)
            for pass_weights, w in zip(weights, ws):
                pass_weights[t] = w
        return weights

    @contextmanager
    def perturbed(self, step: int, terms: list[Term]):
        """The pass with `terms`, on its perturbed weights (`plan`ned, or computed and prepared now): all of
        them before the forward (inside it, between layers, the same work runs several times slower on cold
        caches)."""
        weights = self._planned.pop((step, tuple(terms)), None)
        if weights is None:
            weights = self._passes_weights(step, [terms])[0]

        def weight_fn(name, node):
            w = weights.get(self.index.get(name))
            return node.weight_q if w is None else w

        with self.model.using_weights(weight_fn):
            yield

    def can_stack(self, step: int) -> bool:
        active = self.active(step)
        return len(active) == 1 and self.model.stackable(self.names[active[0]])

    @contextmanager
    def stacked(self, step: int, passes: list[list[Term]]):
        """All passes of a step at once (`can_stack`: one tensor t is active, a linear layer whose output
        alone feeds the rest of the model): its P perturbed weights [P, *shape], each exactly
        `perturbed_weights(step, t, passes)`, run as one layer of P·N outputs, and a forward
        returns the P passes' outputs stacked along the batch (`QModel.using_weights`). Costs P copies of
        that one layer's weights (and keeps the step's m perturbations of it for the update)."""
        (t,) = self.active(step)
        name = self.names[t]
        self.forget_step_z()
        w = torch.stack(self.perturbed_weights(step, t, passes))  # in C or in torch, all passes in one call

        def weight_fn(n, node):
            return w if n == name else node.weight_q

        with self.model.using_weights(weight_fn, stack=len(passes)):
            yield

    # -- update -----------------------------------------------------------------------------------
    def coefficient_sum(self, step: int, t: int, coeffs: list[float], shape, device) -> torch.Tensor:
        """s = Σ_i c_i z_q,i (int16: |s| <= 127·m); z regenerated one sample at a time, the last sample first
        (the one `z` still holds; integer sums do not depend on the order)."""
        s = torch.zeros(shape, dtype=torch.int16, device=device)
        for i, c in reversed(list(enumerate(coeffs))):
            if c:
                z = self.z(step, i, t, shape, device)
                s.add_(z) if c > 0 else s.sub_(z)
        return s

    def gradient_q(self, step: int, t: int, coeffs: list[float], shape, device) -> torch.Tensor:
        """g_q = round_half_away((1/m) Σ_i c_i z_q,i), 8 bits on Δ_z (int64)."""
        s = self.coefficient_sum(step, t, coeffs, shape, device).to(torch.int64)
        m = len(coeffs)
        return (torch.sign(s) * ((s.abs() * 2 + m) // (2 * m))).clamp(-127, 127)

    def update(self, step: int, coeffs: list[float], lr: float) -> None:
        if any(c not in (-1.0, 0.0, 1.0) for c in coeffs):
            raise ValueError("the fixed-point update takes sign coefficients; use the 'sign' difference")
        for t in self.active(step):
            node = self.nodes[t]
            words = self._words(step, 2 * t + 1, t)
            if self._update_in_c(step, t, coeffs, lr, words):
                continue
            w = node.weight_q.to(torch.int64)
            if self.kernel_norm:
                upd, g = self._kernel_norm_update(step, t, coeffs, lr, w, words)
            else:
                g = self.gradient_q(step, t, coeffs, w.shape, w.device)
                mult, shift = self.update_multiplier(t, lr)
                upd = shift_round(
                    g,
                    self._channel_view(mult, w.dim()),
                    self._channel_view(31 + shift, w.dim()),
                    self.rounding,
                    words,
                )
            fmt = node.w_qp.fmt
            new = w - upd
            self._saturated("update", t, int(((new < fmt.qmin) | (new > fmt.qmax)).sum()))
            node.weight_q.copy_(new.clamp(fmt.qmin, fmt.qmax).to(node.weight_q.dtype))
            if self.momentum is not None:
                self.history[t] = self._rescale_history(g)
        self.forget_step_z()
        self._planned = {}  # what the step planned and did not run (a closure that skipped passes)
        for node in self.nodes:
            node.forget_ahead()

    def _update_in_c(self, step: int, t: int, coeffs: list[float], lr: float, words) -> bool:
        """The plain update (no kernel-wise normalisation, no momentum history) of tensor t in one C pass
        (`kernels.update`, the same integers); False where it does not apply."""
        w = self.nodes[t].weight_q
        plain = not self.kernel_norm and self.momentum is None
        if not plain or w.device.type != "cpu" or kernels.library() is None:
            return False
        mult, shift = self.update_multiplier(t, lr)
        used = [(i, int(c)) for i, c in reversed(list(enumerate(coeffs))) if c]  # the last sample first
        zs = [self.z(step, i, t, w.shape, w.device) for i, _ in used]
        signs = [c for _, c in used]
        fmt = self.nodes[t].w_qp.fmt
        sat = kernels.update(
            w, zs, signs, len(coeffs), mult, 31 + shift, self.rounding, words, fmt.qmin, fmt.qmax
        )
        if sat is None:
            return False
        torch.autograd.graph.increment_version(w)  # written through its pointer: prepared copies are stale
        self._saturated("update", t, sat)
        return True

    def _kernel_norm_update(self, step, t, coeffs, lr, w, words):
        """upd_q = round(η/m · Σ_i c_i · z_q,i · ‖w_q^k‖/‖z_q,i^k‖) per kernel k: per-kernel multipliers on a
        common 2^-S scale, one rounding."""
        m, S = len(coeffs), 40
        wn = w.reshape(w.shape[0], -1).double().norm(dim=1)
        acc = torch.zeros_like(w)
        g = torch.zeros_like(w)
        for i, c in reversed(list(enumerate(coeffs))):  # the last sample first, as `gradient_q`
            if not c:
                continue
            z = self.z(step, i, t, w.shape, w.device)
            zn = z.reshape(z.shape[0], -1).double().norm(dim=1).clamp_min(1.0)
            mult = torch.round(lr * wn / (m * zn) * 2**S).to(torch.int64)
            acc += int(c) * z * self._channel_view(mult, w.dim())
            g += int(c) * z
        if self.rounding == "nearest":
            upd = (acc + (1 << (S - 1))) >> S
        elif self.rounding == "floor":
            upd = acc >> S
        else:
            upd = (acc + (words << (S - 32))) >> S
        return upd, g

    def _rescale_history(self, g: torch.Tensor) -> torch.Tensor:
        """History in z codes with unit RMS on the z scale (RMS = 1_q)."""
        rms = g.double().pow(2).mean().sqrt()
        if rms == 0:
            return g
        return torch.round(g.double() * (self.dist.one_q / rms)).clamp(-127, 127).to(torch.int64)
