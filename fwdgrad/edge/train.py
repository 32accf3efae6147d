"""QZO-FF fine-tuning of a bundle in integer numpy arithmetic, bit-for-bit with `fwdgrad.ff`'s
`FixedPointSpace` + `ForwardGradient.step` (sign difference, m samples, optional sparse masks).

Step k; trainable tensor t (its index in the header's trainable list); sample i < m:

    z_q   = gaussian_q(seed, k, i, t, shape, z_max) · mask                  int8 on Δ_z = z_max/127
    w_q±  = sat_b( round( (w_q·1_q ± ε_q·z_q) · M_p·2^-n_p ) )              made layer by layer, then freed
    c_i   = sign( L(w_q+) − L(w_q−) )        L: float64 cross-entropy of the dequantized logits
            (header ``difference`` median: only w_q+ is evaluated, c_i = sign(L(w_q+,i) − median_j L(w_q+,j)))
    s     = Σ_i c_i·z_q,i,    g_q = clamp( sign(s)·⌊(2|s| + m) / 2m⌋, ±127 )   (1/m, half away from zero)
    w_q  ← sat_b( w_q − round( g_q · M_u·2^-(31+shift_u) ) )                 M_u·2^-(31+shift_u) ≈ η·Δ_z/Δ_w

round: nearest (+2^(n−1), then >> n), floor (>> n) or stochastic (+ a uniform integer in [0, 2^n) from
``hash_words(seed, k, SR_STREAM + 2t (+1 for the update), t, numel)``). z is regenerated from its key
whenever it is needed and never stored for the whole model. Layer-wise (header ``layerwise`` cycle |
sample): step k perturbs and updates only t_k = ``rng.active_tensor(layerwise, seed, k, T)``, and its
passes resume from the outputs of the layers before t_k.
"""

from __future__ import annotations

import numpy as np

from .. import rng
from ..rng.streams import SR_STREAM
from .bundle import Bundle
from .ops import quantize_multiplier
from .runtime import Prefix, Runtime

#: z samplers by name: the distributions `bundle.DISTRIBUTIONS` allows
SAMPLERS = {"qgaussian": rng.gaussian_q, "qrademacher": rng.rademacher_q}


def example_cross_entropy(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Each example's cross-entropy in float64: log Σ_c exp(l_nc − max_n) − (l_ny − max_n)."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}) (the model's classes), got {y.min()}..{y.max()}"
        )
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return lse - z[np.arange(len(z)), y]


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy in float64 (`example_cross_entropy` averaged)."""
    return float(np.mean(example_cross_entropy(logits, y)))


def median_signs(losses) -> list[int]:
    """c_i = sign(L_i − median_j L_j) for the m one-sided losses L_i = L(w + εz_i) of a step (the `median`
    difference): the directions on the worse half are pushed back, those on the better half followed, and a
    loss equal to the median gives 0. With m even the median is the mean of the two middle losses; the test
    is 2·L_i against their sum, exact for integer losses. Pure Python, so the engine and the numpy edge
    runtime decide the same signs."""
    ls = [float(v) for v in losses]
    if not ls:
        return []
    s, n = sorted(ls), len(ls)
    twice = 2 * s[n // 2] if n % 2 else s[n // 2 - 1] + s[n // 2]
    return [(2 * v > twice) - (2 * v < twice) for v in ls]


def shift_round(x: np.ndarray, mult, n, rounding: str, words: np.ndarray | None = None) -> np.ndarray:
    """round(x·M / 2^n) in int64: nearest (half up), floor, or stochastic (32-bit `words`)."""
    prod = x * mult
    n = np.asarray(n, dtype=np.int64)
    if rounding == "nearest":
        return (prod + np.left_shift(np.int64(1), n - 1)) >> n
    if rounding == "floor":
        return prod >> n
    if rounding == "stochastic":
        r = np.where(n <= 32, words >> np.maximum(32 - n, 0), words << np.maximum(n - 32, 0))
        return (prod + r) >> n
    raise ValueError(f"rounding {rounding!r} is invalid; allowed: nearest, floor, stochastic")


# --------------------------------------------------------------------------- perturbed outputs
def loss_bits() -> int:
    """Q of the integer loss (2^-Q nats), the grid central coefficients are counted on."""
    from .loss import LOSS_BITS  # here: fwdgrad.edge.loss builds on this module's Trainer

    return LOSS_BITS


def output_eps_q(eps: float, out_scale: float, span: int, eps_min_q: int = 0) -> int:
    """ε in output LSBs for perturbed outputs: max(1, eps_min_q, round(ε/Δ_y)); one-line ValueError beyond the
    output's `span` codes."""
    q = max(1, int(eps_min_q), round(eps / out_scale))
    if q > span:
        raise ValueError(
            f"eps={eps!r} is {q} output LSBs, beyond the {span}-code output range; allowed: eps <= "
            f"{span * out_scale:.3g}"
        )
    return q


def output_update_factor(
    lr: float, difference: str, m: int, batch: int, dx: float, dy: float, eps_q: int, one_q: int,
    delta_z: float, weight_scale: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """r per output channel (float64): η·2^-Q·Δ_x/(2·ε_q·Δ_y·1_q·m·B·Δ_w) for the central difference,
    η·Δ_z·Δ_x/(m·B·Δ_w) for sign and median coefficients (`fwdgrad.ff.activity`)."""
    per_g = 2.0 ** -loss_bits() * dx / (2 * eps_q * dy * one_q) if difference == "central" else delta_z * dx
    return lr * per_g / (m * batch * np.asarray(weight_scale, dtype=np.float64))


def output_update(
    w: np.ndarray,
    g: np.ndarray,
    real: np.ndarray,
    rounding: str,
    words: np.ndarray | None,
    qmin: int,
    qmax: int,
) -> tuple[np.ndarray, int]:
    """(sat(w − round(G·r)), saturated count) for G [N, K] int64 and r per output channel: r as M·2^-n
    (`quantize_multiplier`), G first shifted right (rounding half up) until it fits 31 bits so that G·M plus
    the rounding term fits 63, and a shift past 62 moved into M (whose bits it drops). The engine's
    `ActivityGradient` calls this too, so both runtimes update alike."""
    mult, shift = quantize_multiplier(np.asarray(real, dtype=np.float64).reshape(-1))
    k = max(0, int(np.abs(g).max(initial=0)).bit_length() - 31)
    if k:
        g = (g + (1 << (k - 1))) >> k
    n = 31 + shift - k
    over = np.maximum(n - 62, 0)
    mult, n = mult >> over, n - over
    if int(n.min()) < 1:
        raise ValueError(
            f"lr moves the layer by {float(np.max(real)):.3g} weight LSBs per unit of G, beyond the update's "
            "multiplier; allowed: a smaller lr"
        )
    col = (lambda v: v.reshape(-1, 1)) if mult.size > 1 else (lambda v: v.reshape(()))
    new = w.astype(np.int64) - shift_round(g, col(mult), col(n), rounding, words)
    return np.clip(new, qmin, qmax), int(((new < qmin) | (new > qmax)).sum())


def output_step(u: np.ndarray, eps_q: int, one_q: int) -> np.ndarray:
    """δ = round(ε_q·u_q/1_q), half away from zero."""
    u = np.asarray(u, dtype=np.int64)
    return np.sign(u) * ((np.abs(u) * eps_q * 2 + one_q) // (2 * one_q))


def output_coefficients(losses: np.ndarray, difference: str) -> np.ndarray:
    """c_i,b (int64 [m, B]) from the per-example losses of the P passes (rows: +1, −1 per sample, or +1
    only for the median): central, the loss difference on the integer loss's grid (a float loss rounded
    onto it, half to even); sign, its sign; median, `median_signs` of each example's m losses."""
    losses = np.asarray(losses)
    if difference == "central":
        lq = losses if losses.dtype == np.int64 else np.round(losses * 2.0 ** loss_bits())
        return (lq[0::2] - lq[1::2]).astype(np.int64)
    if difference == "sign":
        return np.sign(losses[0::2] - losses[1::2]).astype(np.int64)
    return np.array([median_signs(losses[:, b]) for b in range(losses.shape[1])], dtype=np.int64).T


def output_gradient(coeffs: np.ndarray, u: np.ndarray, x_q: np.ndarray, zp_in: int) -> np.ndarray:
    """G = Σ_i Σ_b c_i,b · u_q,i,b ⊗ (x_q,b − zp_x), int64 [N, K] (rows of x and of u beyond the batch,
    e.g. a sequence, count as examples)."""
    u = np.asarray(u, dtype=np.int64)
    n_out, k_in = u.shape[-1], x_q.shape[-1]
    cu = (coeffs.reshape(*coeffs.shape, *[1] * (u.ndim - 2)) * u).sum(0).reshape(-1, n_out)
    return cu.T @ (np.asarray(x_q, dtype=np.int64) - zp_in).reshape(-1, k_in)


def _channel_view(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(()) if v.size == 1 else v.reshape([-1] + [1] * (ndim - 1))


class Trainer:
    """QZO-FF on a loaded bundle: `step(x, y)` perturbs, evaluates 2m forwards, updates the bundle's integer
    weights in place and advances the header's step counter."""

    def __init__(self, bundle: Bundle, runtime: Runtime | None = None):
        tr = bundle.training
        self.bundle, self.runtime, self.arrays = bundle, runtime or Runtime(bundle), bundle.arrays
        self.sample_q = SAMPLERS[tr["distribution"]]
        self.seed, self.m, self.z_max, self.one_q = tr["seed"], tr["m"], tr["z_max"], tr["one_q"]
        self.rounding = tr["rounding"]
        self.p_mult, self.p_n = tr["perturb"]["mult"], tr["perturb"]["n"]
        self.tensors = tr["tensors"]
        self.index = {t["name"]: i for i, t in enumerate(self.tensors)}
        ops = {op["name"]: op for op in bundle.ops}
        self.weight_names = [ops[t["name"]]["arrays"]["weight"] for t in self.tensors]
        self.layerwise = tr.get("layerwise", "off")  # bundles written before layer-wise training: off
        self.difference = tr.get("difference", "sign")  # bundles written before the median difference: sign
        self.op_index = {op["name"]: i for i, op in enumerate(bundle.ops)}
        self.target = tr.get("target", "weights")  # bundles written before perturbed outputs: weights

    @property
    def step_count(self) -> int:
        return self.bundle.training["step"]

    def z(self, step: int, sample: int, t: int, shape) -> np.ndarray:
        """z_q of tensor t for (step, sample) as int64, masked for sparse training."""
        z = self.sample_q(self.seed, step, sample, t, shape, z_max=self.z_max).astype(np.int64)
        mask = self.tensors[t].get("mask")
        return z * self.arrays[mask] if mask else z

    def _words(self, step: int, stream: int, t: int, w: np.ndarray) -> np.ndarray | None:
        if self.rounding != "stochastic":
            return None
        words = rng.hash_words(self.seed, step, SR_STREAM + stream, t, w.size)
        return words.astype(np.int64).reshape(w.shape)

    def perturbed_weight(self, step: int, t: int, sample: int, sign: int) -> np.ndarray:
        """w_q± of tensor t: sat_b(round((w_q·1_q + sign·ε_q·z_q)·r_p)), in the weight dtype."""
        spec, w = self.tensors[t], self.arrays[self.weight_names[t]]
        eps_q = _channel_view(self.arrays[spec["eps_q"]], w.ndim)
        acc = w.astype(np.int64) * self.one_q + sign * eps_q * self.z(step, sample, t, w.shape)
        out = shift_round(acc, self.p_mult, self.p_n, self.rounding, self._words(step, 2 * t, t, w))
        return np.clip(out, spec["qmin"], spec["qmax"]).astype(w.dtype)

    def active(self, step: int) -> list[int]:
        """The tensor ids step `step` perturbs and updates: all, or the layer-wise one."""
        t = rng.active_tensor(self.layerwise, self.seed, step, len(self.tensors))
        return list(range(len(self.tensors))) if t is None else [t]

    def weights_at(self, step: int, sample: int, sign: int):
        """The runtime's weight_fn for w± of (step, sample, sign): the step's trainable ops perturbed, others
        stored."""
        active = set(self.active(step))

        def weight_fn(op):
            t = self.index.get(op["name"])
            return (
                self.arrays[op["arrays"]["weight"]]
                if t not in active
                else self.perturbed_weight(step, t, sample, sign)
            )

        return weight_fn

    def loss(self, x, y, step: int, sample: int, sign: int, prefix: Prefix | None = None) -> float:
        """L(w±) of (step, sample, sign); `prefix`: the frozen layers' outputs, computed once per step."""
        return cross_entropy(self.runtime.logits(x, self.weights_at(step, sample, sign), prefix)[1], y)

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One QZO-FF step on batch (x, y); returns the mean of the perturbed losses (2m, or m for median)."""
        if self.target == "outputs":
            return self.outputs_step(x, y)
        k = self.step_count
        first = min(self.op_index[self.tensors[t]["name"]] for t in self.active(k))
        prefix = self.runtime.run_prefix(x, first)  # the layers before the first one this step perturbs
        if self.difference == "median":
            losses = [self.loss(x, y, k, i, +1, prefix) for i in range(self.m)]
            coeffs = median_signs(losses)
        else:
            coeffs, losses = [], []
            for i in range(self.m):
                plus, minus = self.loss(x, y, k, i, +1, prefix), self.loss(x, y, k, i, -1, prefix)
                coeffs.append(int(plus > minus) - int(plus < minus))
                losses += [plus, minus]
        self.update(k, coeffs)
        self.bundle.training["step"] = k + 1
        return sum(losses) / len(losses)

    def example_losses(self, codes: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each example's float64 cross-entropy of its output codes, dequantized through float32 as the
        engine's closure does."""
        out = self.bundle.header["output"]
        logits = ((codes.astype(np.int64) - out["zero_point"]) * out["scale"]).astype(np.float32)
        return example_cross_entropy(logits, y)

    def outputs_step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One step with perturbed outputs (header ``target: outputs``, `fwdgrad.ff.activity`): the trained
        layer (the model's output) runs once, each example's outputs are perturbed by ±δ_i, and the update
        comes from G = Σ_i Σ_b c_i,b·u_i,b ⊗ (x_b − zp_x)."""
        k, tr, o = self.step_count, self.bundle.training, self.bundle.training["outputs"]
        y = np.asarray(y, dtype=np.int64)
        index = self.op_index[self.tensors[0]["name"]]
        env, _ = self.runtime.run_prefix(x, index)
        x_q = env[self.bundle.ops[index]["inputs"][0]].astype(np.int64)
        y_q = self.runtime.run(x, prefix=(env, index)).astype(np.int64)
        u = np.stack([self.sample_q(self.seed, k, i, 0, y_q.shape, z_max=self.z_max) for i in range(self.m)])
        delta = output_step(u, o["eps_q"], self.one_q)
        signs = (+1,) if self.difference == "median" else (+1, -1)
        losses = np.stack(
            [self.example_losses(np.clip(y_q + s * d, o["lo"], o["hi"]), y) for d in delta for s in signs]
        )
        g = output_gradient(output_coefficients(losses, self.difference), u, x_q, o["in_zp"])
        spec, w = self.tensors[0], self.arrays[self.weight_names[0]]
        real = output_update_factor(
            tr["lr"], self.difference, self.m, len(y), o["in_scale"], o["out_scale"], o["eps_q"], self.one_q,
            tr["delta_z"], spec["weight_scale"],
        )  # fmt: skip
        new, _ = output_update(w, g, real, self.rounding, self._words(k, 1, 0, w), spec["qmin"], spec["qmax"])
        w[...] = new
        self.bundle.training["step"] = k + 1
        unit = 2.0 ** -loss_bits() if losses.dtype == np.int64 else 1.0
        return float(losses.astype(np.float64).mean()) * unit

    def gradient_q(self, step: int, t: int, coeffs: list[int], shape) -> np.ndarray:
        """g_q = clamp(round_half_away((1/m) Σ_i c_i z_q,i), ±127), z regenerated one sample at a time."""
        s = np.zeros(shape, dtype=np.int64)
        for i, c in enumerate(coeffs):
            if c:
                s += c * self.z(step, i, t, shape)
        m = len(coeffs)
        return np.clip(np.sign(s) * ((np.abs(s) * 2 + m) // (2 * m)), -127, 127)

    def update(self, step: int, coeffs: list[int]) -> None:
        """w_q ← sat_b(w_q − round(g_q·η·Δ_z/Δ_w)) for the step's trainable tensors, in place."""
        for t in self.active(step):
            spec = self.tensors[t]
            w = self.arrays[self.weight_names[t]]
            g = self.gradient_q(step, t, coeffs, w.shape)
            mult = _channel_view(self.arrays[spec["update_mult"]], w.ndim)
            n = 31 + _channel_view(self.arrays[spec["update_shift"]], w.ndim)
            upd = shift_round(g, mult, n, self.rounding, self._words(step, 2 * t + 1, t, w))
            w[...] = np.clip(w.astype(np.int64) - upd, spec["qmin"], spec["qmax"])


def evaluate(runtime: Runtime, x: np.ndarray, y: np.ndarray, batch: int = 64) -> tuple[float, float]:
    """(accuracy, mean float64 cross-entropy) of the bundle's current weights on (x, y)."""
    correct, loss_sum = 0, 0.0
    for i in range(0, len(x), batch):
        _, logits = runtime.logits(x[i : i + batch])
        yb = y[i : i + batch]
        correct += int((logits.argmax(1) == yb).sum())
        loss_sum += cross_entropy(logits, yb) * len(yb)
    return correct / max(1, len(x)), loss_sum / max(1, len(x))
