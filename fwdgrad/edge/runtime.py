"""Integer inference on a bundle, in numpy: the op graph interpreted exactly as `QModel.run(x, "integer")`.

Per op (scales s, zero points zp, clamp [lo, hi] carrying a fused ReLU/ReLU6):

* input:   q = sat(round_half_even(x / s) + zp)            (x float; integer inputs are taken as q)
* conv2d / linear:  acc = Σ (q − zp_in)·w + b  (exact, width-checked),  y = clamp(requant(acc) + zp_out)
* add / concat:     y = clamp((Σ_i (q_i − zp_i)·M_i + 2^(S−1)) >> S + zp_out)  (concat: per input)
* avgpool: acc = Σ_window (q − zp_in), y = clamp(requant(acc; s_in/(n·s_out)) + zp_out)
* maxpool, flatten, unflatten, reshape, permute, transpose, getitem, identity: move values; clamp: clip;
  lut: table[q − qmin]
* layernorm: acc = γ_q·x̂ + β_q (x̂ from `ops.normalized`), width-checked, y = clamp(requant(acc) + zp_out)
  per channel
* softmax:  p = `ops.softmax` (exp table over max(q) − q, rounded division), codes on 1/levels
* matmul:   acc = (a − zp_a) @ (b − zp_b) (exact, width-checked), y = clamp(requant(acc) + zp_out)
* tokens:   cat(x'[:, :at], t, x'[:, at+drop:]), x' the input rescaled as a one-input add (M_in, S_in) and
  t = clamp(requant(t_q) + zp_out) the tokens (no width check: |t_q| is at most the weight range)

conv2d, linear, layernorm and tokens read their `weight` array through `_weight`, the one place training
hands out perturbed weights.

Working memory: an op's output is freed as soon as its last reader has run; activations are stored in
the narrowest integer dtype of their range; weights are read from the bundle (or from `weight_fn`, which
training uses to hand out perturbed weights one layer at a time).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import ops as K
from .bundle import Bundle

WeightFn = Callable[[dict], np.ndarray]
Prefix = tuple[dict, int]  # (live values by op name, index of the next op to run)


class Runtime:
    """Runs a bundle's graph. `run` returns integer output codes; `logits` also the float64 logits."""

    def __init__(self, bundle: Bundle):
        self.bundle, self.arrays = bundle, bundle.arrays
        eng = bundle.header["engine"]
        self.requant, self.acc_bits, self.overflow = eng["requant"], eng["acc_bits"], eng["overflow"]
        self.ops = bundle.ops
        self.output = bundle.header["output"]["name"]
        self.last_use = {name: i for i, op in enumerate(self.ops) for name in op["inputs"]}
        self._pool_mult: dict[int, tuple] = {}

    # -- input ---------------------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """Float input → codes (after the bundle's preprocessing, if any); integer input is checked."""
        spec = self.bundle.header["input"]
        x = np.asarray(x)
        pre = self.bundle.header.get("preprocessing") or {}
        shape = pre.get("shape")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise ValueError(
                f"input shape {list(x.shape[1:])} (per sample) does not match the bundle's {shape}"
            )
        if x.dtype.kind in "iu":
            if x.size and (x.min() < spec["qmin"] or x.max() > spec["qmax"]):
                raise ValueError(f"integer input outside the input format [{spec['qmin']}, {spec['qmax']}]")
            return x.astype(K.storage(spec["qmin"], spec["qmax"]))
        if pre.get("mean") is not None:  # in the input's own float dtype, as a torch Normalize transform
            view = [1, -1] + [1] * (x.ndim - 2)
            mean = np.asarray(pre["mean"], x.dtype).reshape(view)
            x = (x - mean) / np.asarray(pre["std"], x.dtype).reshape(view)
        q = np.rint(x.astype(np.float64) / spec["scale"]) + spec["zero_point"]
        return np.clip(q, spec["qmin"], spec["qmax"]).astype(K.storage(spec["qmin"], spec["qmax"]))

    def check_input(self, x: np.ndarray) -> int:
        """Check a data set's inputs before any use and return the model's class count (its output width).

        x must be float or integer samples (N, ...), finite, integer codes inside the input format, of the
        bundle's declared per-sample shape (``preprocessing.shape``) if it has one, and one sample must run
        through the graph (this catches a wrong shape when none is declared). Failures: one-line ValueError.
        """
        if x.dtype.kind not in "iuf" or x.ndim < 2:
            raise ValueError(
                f"x has dtype {x.dtype} and shape {list(x.shape)}; allowed: float or integer samples (N, ...)"
            )
        if x.dtype.kind == "f":
            bad = ~np.isfinite(x).reshape(len(x), -1).all(axis=1)
            if bad.any():
                raise ValueError(
                    f"x has non-finite values (NaN/Inf) in {int(bad.sum())} sample(s), the first at index "
                    f"{int(np.argmax(bad))}; allowed: finite numbers"
                )
        shape = (self.bundle.header.get("preprocessing") or {}).get("shape")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise ValueError(
                f"x has per-sample shape {list(x.shape[1:])}; the bundle's input shape is {list(shape)}"
            )
        spec = self.bundle.header["input"]
        if x.dtype.kind in "iu" and (x.min() < spec["qmin"] or x.max() > spec["qmax"]):
            raise ValueError(
                f"x holds integer codes {x.min()}..{x.max()}; allowed: the input format "
                f"[{spec['qmin']}, {spec['qmax']}] (or float inputs)"
            )
        try:
            _, logits = self.logits(x[:1])
        except (ValueError, IndexError, KeyError, TypeError) as err:
            raise ValueError(
                f"x of per-sample shape {list(x.shape[1:])} does not run through the bundle's graph "
                f"({type(err).__name__}: {err}); allowed: the input shape the model was exported for"
                + (" (the bundle declares none)" if shape is None else "")
            ) from None
        if logits.ndim != 2:
            raise ValueError(
                f"the bundle's output has shape {list(logits.shape)} for one sample; training and evaluation "
                "need logits (N, classes)"
            )
        return logits.shape[1]

    # -- graph ---------------------------------------------------------------------------------------
    def run(
        self, x: np.ndarray, weight_fn: WeightFn | None = None, prefix: Prefix | None = None
    ) -> np.ndarray:
        """Integer output codes of the graph for input `x` (float, or already-quantized integers); with
        `prefix` (from `run_prefix`), execution resumes from its saved values instead of from `x`."""
        env, start = ({}, 0) if prefix is None else (dict(prefix[0]), prefix[1])
        return self._execute(env, x, weight_fn, start, len(self.ops))[self.output]

    def run_prefix(self, x: np.ndarray, stop: int) -> Prefix:
        """The live values before op `stop`: computed once, reused by every pass whose weights differ only
        from op `stop` on (the 2m perturbed passes of a step that trains only later layers)."""
        return self._execute({}, x, None, 0, stop), stop

    def _execute(self, env: dict, x, weight_fn: WeightFn | None, start: int, stop: int) -> dict:
        for i in range(start, stop):
            op = self.ops[i]
            xs = [env[name] for name in op["inputs"]]
            env[op["name"]] = (
                self.quantize_input(x)
                if op["kind"] == "input"
                else getattr(self, "_" + op["kind"])(op, *xs, weight_fn=weight_fn)
            )
            del xs
            for name in op["inputs"]:
                if self.last_use[name] == i and name != self.output:
                    del env[name]
        return env

    def logits(
        self, x: np.ndarray, weight_fn: WeightFn | None = None, prefix: Prefix | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(integer output codes, dequantized float64 logits (q − zp)·s)."""
        q = self.run(x, weight_fn, prefix)
        out = self.bundle.header["output"]
        return q, (q.astype(np.float64) - out["zero_point"]) * out["scale"]

    # -- ops -----------------------------------------------------------------------------------------
    def _finish(self, acc: np.ndarray, op: dict, mult, shift, channel_dim: int) -> np.ndarray:
        a = op["attrs"]
        if np.size(mult) > 1:
            view = [1] * acc.ndim
            view[channel_dim] = -1
            mult, shift = mult.reshape(view), shift.reshape(view)
        y = K.requantize(acc, mult, shift, self.requant, self.acc_bits) + a["zp_out"]
        return np.clip(y, a["lo"], a["hi"]).astype(K.storage(a["lo"], a["hi"]))

    def _weight(self, op: dict, weight_fn: WeightFn | None) -> np.ndarray:
        """The integer weights of a weighted op: the bundle's, or `weight_fn`'s (perturbed, in training)."""
        return weight_fn(op) if weight_fn is not None else self.arrays[op["arrays"]["weight"]]

    def _requant(self, acc: np.ndarray, op: dict, channel_dim: int = -1) -> np.ndarray:
        """`_finish` with the op's own `mult`/`shift` arrays."""
        names = op["arrays"]
        return self._finish(acc, op, self.arrays[names["mult"]], self.arrays[names["shift"]], channel_dim)

    def _weighted(self, op: dict, x: np.ndarray, weight_fn: WeightFn | None) -> np.ndarray:
        a, names = op["attrs"], op["arrays"]
        channel_dim = a["channel_dim"]
        w = self._weight(op, weight_fn)
        xz = x.astype(np.int64) - a["zp_in"]
        if op["kind"] == "conv2d":
            acc = K.conv2d(xz, w, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            acc = K.linear(xz, w)
        del xz, w
        if "bias" in names:
            view = [1] * acc.ndim
            view[channel_dim] = -1
            acc += self.arrays[names["bias"]].astype(np.int64).reshape(view)
        acc = K.accumulate(acc, self.acc_bits, self.overflow)
        return self._requant(acc, op, channel_dim)

    _conv2d = _linear = _weighted

    def _layernorm(self, op, x, weight_fn):
        a = op["attrs"]
        xhat = K.normalized(x, a["zp_in"], a["dim"], a["frac"], a["v_eps"])
        acc = self._weight(op, weight_fn).astype(np.int64) * xhat
        acc += self.arrays[op["arrays"]["bias"]].astype(np.int64)
        return self._requant(K.accumulate(acc, self.acc_bits, self.overflow), op, -1)

    def _softmax(self, op, x, weight_fn):
        levels = op["attrs"]["levels"]
        return K.softmax(x, self.arrays[op["arrays"]["table"]], levels).astype(K.storage(0, levels))

    def _matmul(self, op, a, b, weight_fn):
        za, zb = op["attrs"]["zp_in"]
        acc = K.matmul(a.astype(np.int64) - za, b.astype(np.int64) - zb)
        return self._requant(K.accumulate(acc, self.acc_bits, self.overflow), op)

    def _tokens(self, op, x, weight_fn):
        a = op["attrs"]
        xr = self._round_sum((x.astype(np.int64) - a["zp_in"]) * a["in_mult"], a, a["in_shift"])
        t = self._requant(self._weight(op, weight_fn).astype(np.int64), op)
        t = np.broadcast_to(t, (x.shape[0],) + t.shape[1:])
        at = a["at"]
        return np.concatenate([xr[:, :at], t, xr[:, at + a["drop"] :]], axis=1)

    def _rescale(self, op, xs) -> list[np.ndarray]:
        a, mults = op["attrs"], self.arrays[op["arrays"]["mult"]]
        return [(x.astype(np.int64) - zp) * int(m) for x, zp, m in zip(xs, a["zp_in"], mults)]

    def _round_sum(self, acc: np.ndarray, a: dict, shift: int | None = None) -> np.ndarray:
        s = a["shift"] if shift is None else shift
        y = ((acc + (1 << (s - 1))) >> s) + a["zp_out"]
        return np.clip(y, a["lo"], a["hi"]).astype(K.storage(a["lo"], a["hi"]))

    def _add(self, op, *xs, weight_fn):
        return self._round_sum(sum(self._rescale(op, xs)), op["attrs"])

    def _concat(self, op, *xs, weight_fn):
        return np.concatenate(
            [self._round_sum(r, op["attrs"]) for r in self._rescale(op, xs)], axis=op["attrs"]["dim"]
        )

    def _avgpool(self, op, x, weight_fn):
        a = op["attrs"]
        if a["adaptive"]:
            (h, w), (oh, ow) = x.shape[-2:], a["output_size"]
            oh, ow = oh or h, ow or w
            if h % oh or w % ow:
                raise ValueError(f"{op['name']}: adaptive pool {h}x{w}->{oh}x{ow} needs equal windows")
            kernel = stride = (h // oh, w // ow)
            padding = (0, 0)
        else:
            kernel, stride, padding = a["kernel"], a["stride"], a["padding"]
        n = kernel[0] * kernel[1]
        if n not in self._pool_mult:  # real = s_in / (n · s_out), as the engine computes it
            self._pool_mult[n] = K.quantize_multiplier(a["scale_in"] / (n * a["scale_out"]))
        acc = K.window_sum(x.astype(np.int64) - a["zp_in"], kernel, stride, padding)
        return self._finish(acc, op, *self._pool_mult[n], 1)

    def _maxpool(self, op, x, weight_fn):
        a = op["attrs"]
        return K.max_pool(x, a["kernel"], a["stride"], a["padding"], a["dilation"])

    def _clamp(self, op, x, weight_fn):
        a = op["attrs"]
        return np.clip(x, a["lo"], a["hi"]).astype(x.dtype)

    def _lut(self, op, x, weight_fn):
        table = self.arrays[op["arrays"]["table"]]
        a = op["attrs"]
        return table[x.astype(np.int64) - a["qmin"]].astype(K.storage(a["lo"], a["hi"]))

    def _const(self, op, weight_fn):
        a = op["attrs"]
        return self.arrays[op["arrays"]["value"]].astype(K.storage(a["lo"], a["hi"]))

    def _flatten(self, op, x, weight_fn):
        a = op["attrs"]
        start, end = a["start_dim"] % x.ndim, a["end_dim"] % x.ndim
        return x.reshape(x.shape[:start] + (-1,) + x.shape[end + 1 :])

    def _unflatten(self, op, x, weight_fn):
        a = op["attrs"]
        d = a["dim"] % x.ndim
        return x.reshape(x.shape[:d] + tuple(a["sizes"]) + x.shape[d + 1 :])

    def _getitem(self, op, x, weight_fn):
        return x[index_of(op["attrs"]["index"])]

    def _reshape(self, op, x, weight_fn):
        return x.reshape(op["attrs"]["shape"])

    def _permute(self, op, x, weight_fn):
        return np.ascontiguousarray(x.transpose(op["attrs"]["dims"]))

    def _transpose(self, op, x, weight_fn):
        a = op["attrs"]
        return np.ascontiguousarray(np.swapaxes(x, a["dim0"], a["dim1"]))

    def _identity(self, op, x, weight_fn):
        return x


def index_of(spec: list) -> tuple:
    """A basic numpy index from its header form: integers, null (a new axis), "..." and
    {"slice": [start, stop, step]} (null fields as in Python)."""
    out = []
    for item in spec:
        if isinstance(item, dict):
            out.append(slice(*item["slice"]))
        elif item == "...":
            out.append(Ellipsis)
        else:
            out.append(item)
    return tuple(out)
