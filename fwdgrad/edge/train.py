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
from .runtime import Prefix, Runtime

#: z samplers by name: the distributions `bundle.DISTRIBUTIONS` allows
SAMPLERS = {"qgaussian": rng.gaussian_q, "qrademacher": rng.rademacher_q}


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy in float64: mean_n( log Σ_c exp(l_nc − max_n) − (l_ny − max_n) )."""
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}) (the model's classes), got {y.min()}..{y.max()}"
        )
    z = logits - logits.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(z)), y]))


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
