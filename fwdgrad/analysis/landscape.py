"""Loss landscapes (Li et al. 2018) for float and quantized models, with BP and forward-gradient trajectories.

A point of the landscape is a set of named tensors (``Params = dict[str, Tensor]``): the weights that vary.
Everything else in the model stays at its stored value. An *evaluator* turns a point into (loss, accuracy)
on a fixed evaluation batch:

* :class:`FloatEvaluator` — any float ``nn.Module``; the named tensors are parameter/buffer paths
  (``"0.weight"``), optionally under other names (a ``{landscape name: parameter path}`` mapping).
* :class:`QuantEvaluator` — a :class:`~fwdgrad.engine.QModel` in ``integer`` or ``fake`` mode; the names are
  its conv/linear node names and a point holds **dequantized (float) weights**. Each evaluation
  re-quantizes them to the node's weight grid (``quantize(w, node.w_qp)``: round to nearest even, saturate)
  and runs the integer (or fake-quant) graph on those codes. Consequences: the surface is piecewise constant
  at the scale of one weight LSB Δ_w — two points whose every weight differs by less than Δ_w/2 collapse to
  the same codes and the same loss (a weight moves to the next code only once its displacement crosses a
  rounding boundary); weights pushed beyond ±qmax·Δ_w saturate (counted per point in ``saturated``).
  At 16 bits Δ_w ≈ max|w|/32767, far below the grid spacing of any plot here; at 8 bits it is not.

Both evaluators reuse the prefix of the network that no varied tensor touches: its activations are
computed once on the evaluation batch and every later evaluation runs only the layers from the first varied
one on (a large saving for linear probing, none for full fine-tuning).

Directions (:func:`random_direction`, :func:`normalize_direction`) are filter-normalized as in Li et al.:
each filter (slice along dim 0: a conv output channel, a linear output row) of a random Gaussian direction
is rescaled to the norm of the same filter of the weights. 1-D tensors (biases, BatchNorm) get a zero
direction by default (``ignore="biasbn"``), or the weights themselves (``ignore="none"``), as in Li et al.'s
code. PCA directions (:func:`pca_directions`) are the top right-singular vectors of the stacked differences
``snapshot − center`` (uncentered: the least-squares best plane *through the center*), not filter-normalized.
Trajectories are placed on a plane by least squares (:func:`project`); ``in_plane`` reports how much of each
displacement the plane captures.

The experiment behind ``experiments/landscape.py`` / ``fwdgrad landscape`` (:func:`run`, :func:`main`) is
described in docs/landscape.md.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ..engine.intops import OverflowStats
from ..engine.model import QModel
from ..engine.nodes import ExecContext
from ..quant import dequantize, quantize

Params = dict[str, torch.Tensor]

NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")


# ------------------------------------------------------------------------------------ named-tensor algebra
def clone(p: Params) -> Params:
    return {k: v.detach().clone() for k, v in p.items()}


def flatten(p: Params, names: Sequence[str] | None = None) -> torch.Tensor:
    """All tensors of ``p`` (in ``names`` order, default insertion order) as one float64 vector."""
    names = list(p) if names is None else names
    return torch.cat([p[n].detach().reshape(-1).double() for n in names])


def unflatten(v: torch.Tensor, like: Params) -> Params:
    """Inverse of :func:`flatten` for the shapes/dtypes (and order) of ``like``."""
    out, i = {}, 0
    for n, t in like.items():
        out[n] = v[i : i + t.numel()].reshape(t.shape).to(t.dtype)
        i += t.numel()
    if i != v.numel():
        raise ValueError(f"vector has {v.numel()} entries but the parameters have {i}")
    return out


def combine(center: Params, directions: Sequence[Params], coeffs: Sequence[float]) -> Params:
    """center + Σ coeffs[i] · directions[i]."""
    out = {}
    for n, c in center.items():
        t = c.detach().clone()
        for d, a in zip(directions, coeffs):
            if a:
                t.add_(d[n].to(t.dtype), alpha=float(a))
        out[n] = t
    return out


def subtract(a: Params, b: Params) -> Params:
    return {n: a[n].detach() - b[n].detach() for n in a}


def _check_same_keys(a: Params, b: Params, what: str) -> None:
    if list(a) != list(b):
        raise ValueError(f"{what}: tensor names differ: {list(a)} vs {list(b)}")


# -------------------------------------------------------------------------------------------- directions
def filter_norms(t: torch.Tensor) -> torch.Tensor:
    """Norm of each filter (slice along dim 0) of a ≥2-D tensor; the whole norm for 0/1-D tensors."""
    if t.dim() <= 1:
        return t.detach().double().norm().reshape(1)
    return t.detach().double().reshape(t.shape[0], -1).norm(dim=1)


def normalize_direction(
    direction: Params, weights: Params, norm: str = "filter", ignore: str = "biasbn"
) -> Params:
    """Rescale ``direction`` to the scale of ``weights`` (Li et al. 2018).

    norm: ``filter`` — each filter d_i ← d_i · ‖w_i‖/‖d_i‖; ``layer`` — each tensor d ← d · ‖w‖/‖d‖;
    ``none`` — unchanged. ignore: ``biasbn`` zeroes the direction of 0/1-D tensors (biases, BatchNorm),
    ``none`` sets it to the weights themselves (Li et al.'s choice when biases are not ignored).
    """
    if norm not in NORMS:
        raise ValueError(f"direction normalization {norm!r} is invalid; allowed: {NORMS}")
    if ignore not in IGNORES:
        raise ValueError(f"ignore={ignore!r} is invalid; allowed: {IGNORES}")
    _check_same_keys(direction, weights, "normalize_direction")
    out = {}
    for n, d in direction.items():
        w = weights[n].detach()
        if w.dim() <= 1:
            out[n] = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
            continue
        dd = d.detach().double()
        if norm == "filter":
            dn = dd.reshape(dd.shape[0], -1).norm(dim=1).clamp_min(1e-300)
            dd = dd * (filter_norms(w) / dn).reshape([-1] + [1] * (dd.dim() - 1))
        elif norm == "layer":
            dd = dd * (w.double().norm() / dd.norm().clamp_min(1e-300))
        out[n] = dd.to(w.dtype)
    return out


def random_direction(weights: Params, seed: int = 0, norm: str = "filter", ignore: str = "biasbn") -> Params:
    """A Gaussian direction with the shapes of ``weights``, normalized by :func:`normalize_direction`."""
    g = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in weights.items()}
    return normalize_direction(raw, weights, norm, ignore)


def random_plane(center: Params, seed: int = 0, norm: str = "filter", ignore: str = "biasbn") -> list[Params]:
    """Two independent filter-normalized random directions through ``center`` (seeds ``seed``, ``seed+1``)."""
    return [random_direction(center, seed, norm, ignore), random_direction(center, seed + 1, norm, ignore)]


def pca_directions(
    center: Params, snapshots: Sequence[Params], k: int = 2, weights: Sequence[float] | None = None
) -> tuple[list[Params], np.ndarray]:
    """Top-``k`` principal directions of the differences ``snapshot − center`` (unit vectors).

    Uncentered SVD of the difference matrix: the span of the result is the k-dimensional subspace through
    ``center`` closest (least squares) to all snapshots. ``weights`` scale each snapshot's row (e.g. to give
    two trajectories of very different lengths an equal say). Returns (directions, fraction of the total
    (weighted) squared displacement each direction explains). With fewer than k independent differences, the
    missing directions are filled by arbitrary orthonormal vectors with explained fraction 0.
    """
    if not snapshots:
        raise ValueError("pca_directions needs at least one snapshot")
    c = flatten(center)
    rows = torch.stack([flatten(s, list(center)) - c for s in snapshots])
    if weights is not None:
        if len(weights) != len(snapshots):
            raise ValueError(f"{len(weights)} weights for {len(snapshots)} snapshots")
        rows = rows * torch.as_tensor(weights, dtype=rows.dtype).unsqueeze(1)
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    total = float((s**2).sum())
    dirs, ratios = [], []
    for i in range(k):
        if i < len(s) and s[i] > 1e-12 * max(1.0, float(s[0])):
            v, r = vh[i], float(s[i] ** 2) / total
        else:  # rank-deficient: any unit vector orthogonal to the previous ones
            g = torch.Generator().manual_seed(1234 + i)
            v = torch.randn(c.numel(), generator=g, dtype=torch.float64)
            for d in dirs:
                v -= (v @ d) * d
            v, r = v / v.norm(), 0.0
        # sign convention: the last snapshot has a non-negative coordinate
        if float(rows[-1] @ v) < 0:
            v = -v
        dirs.append(v)
        ratios.append(r)
    return [unflatten(v, center) for v in dirs], np.array(ratios)


def project(
    points: Sequence[Params], center: Params, directions: Sequence[Params]
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares coordinates of each point on the plane ``center + span(directions)``.

    Returns (coords (n, k), in_plane (n,)): in_plane = ‖projection‖ / ‖point − center‖ (1: on the plane;
    1 for the center itself).
    """
    c = flatten(center)
    a = torch.stack([flatten(d, list(center)) for d in directions], 1)  # (D, k)
    coords, frac = [], []
    for p in points:
        diff = flatten(p, list(center)) - c
        x = torch.linalg.lstsq(a, diff.unsqueeze(1)).solution.squeeze(1)
        coords.append(x.numpy())
        dn = float(diff.norm())
        frac.append(1.0 if dn == 0 else float((a @ x).norm()) / dn)
    return np.array(coords).reshape(len(points), len(directions)), np.array(frac)


# -------------------------------------------------------------------------------------------- evaluators
class Evaluator:
    """(loss, accuracy) of the model at a point, on a fixed evaluation batch (``x``, ``y``).

    criterion: loss of (logits, y); default cross-entropy. Accuracy (argmax) is reported for integer labels,
    NaN otherwise (e.g. a regression target).
    """

    names: list[str]

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        self.x, self.y = x, y
        self.criterion = criterion or F.cross_entropy
        self.calls = 0

    def center(self) -> Params:
        """The point the model currently stores."""
        raise NotImplementedError

    def logits(self, params: Params) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, params: Params) -> tuple[float, float]:
        self.calls += 1
        out = self.logits(params).float()
        acc = float((out.argmax(1) == self.y).float().mean()) if not self.y.is_floating_point() else math.nan
        return float(self.criterion(out, self.y)), acc

    def __call__(self, params: Params) -> tuple[float, float]:
        return self.evaluate(params)

    def loss(self, params: Params) -> float:
        return self.evaluate(params)[0]


class _PartialInterpreter(fx.Interpreter):
    """Runs a graph with some module tensors overridden; nodes found in ``initial_env`` are not re-run."""

    def __init__(self, gm: fx.GraphModule, varied: dict[str, list[tuple[str, str]]]):
        super().__init__(gm)
        self.varied = varied  # module target -> list of (landscape name, path relative to the module)
        self.params: Params = {}
        self.record: dict | None = None

    def run_node(self, n):
        out = super().run_node(n)
        if self.record is not None:
            self.record[n] = out
        return out

    def call_module(self, target, args, kwargs):
        over = self.varied.get(target)
        if over is None:
            return super().call_module(target, args, kwargs)
        mod = self.fetch_attr(target)
        return functional_call(mod, {rel: self.params[name] for name, rel in over}, args, kwargs)

    def get_attr(self, target, args, kwargs):
        for name, rel in self.varied.get("", ()):
            if rel == target:
                return self.params[name]
        return super().get_attr(target, args, kwargs)


class FunctionEvaluator(Evaluator):
    """Any function of a point, ``fn(params) -> loss`` (accuracy NaN): analytic tests, custom losses."""

    def __init__(self, fn: Callable[[Params], float | torch.Tensor], center: Params):
        super().__init__(torch.zeros(0), torch.zeros(0))
        self.fn, self._center, self.names = fn, clone(center), list(center)

    def center(self) -> Params:
        return clone(self._center)

    @torch.no_grad()
    def evaluate(self, params: Params) -> tuple[float, float]:
        self.calls += 1
        return float(self.fn(params)), math.nan


class FloatEvaluator(Evaluator):
    """A float model evaluated with some of its tensors replaced.

    params: parameter/buffer paths to vary (default: every parameter), or a mapping
    ``{landscape name: path}``. reuse_prefix: compute the activations that no varied tensor influences once
    (needs an fx-traceable model; otherwise every evaluation runs the whole model).
    """

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        params: Sequence[str] | Mapping[str, str] | None = None,
        reuse_prefix: bool = True,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(x, y, criterion)
        self.model = model.eval()
        if params is None:
            params = [n for n, _ in model.named_parameters()]
        self.paths = dict(params) if isinstance(params, Mapping) else {p: p for p in params}
        self.names = list(self.paths)
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        missing = [p for p in self.paths.values() if p not in tensors]
        if missing:
            raise ValueError(f"model has no parameter/buffer {missing}; allowed: {sorted(tensors)}")
        self._tensors = tensors
        self._interp, self._cache = None, None
        if reuse_prefix:
            self._setup_prefix()

    def center(self) -> Params:
        return {n: self._tensors[p].detach().clone() for n, p in self.paths.items()}

    def _setup_prefix(self) -> None:
        try:
            gm = self.model if isinstance(self.model, fx.GraphModule) else fx.symbolic_trace(self.model)
        except Exception:  # untraceable: plain functional_call of the whole model
            return
        targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
        varied: dict[str, list] = {}
        for name, path in self.paths.items():
            owner = next((t for t in targets if path.startswith(t + ".")), None)
            if owner is None:  # a get_attr tensor (or a parameter used outside call_module)
                varied.setdefault("", []).append((name, path))
            else:
                varied.setdefault(owner, []).append((name, path[len(owner) + 1 :]))
        dependent = set()
        for n in gm.graph.nodes:
            hit = (n.op == "call_module" and n.target in varied) or (
                n.op == "get_attr" and any(rel == n.target for _, rel in varied.get("", ()))
            )
            if hit or any(a in dependent for a in n.all_input_nodes):
                dependent.add(n)
        interp = _PartialInterpreter(gm, varied)
        interp.garbage_collect_values = False
        interp.params, interp.record = self.center(), {}
        with torch.no_grad():
            interp.run(self.x)
        keep = {a for n in dependent for a in n.all_input_nodes if a not in dependent}
        self._cache = {n: v for n, v in interp.record.items() if n in keep}
        interp.record = None
        interp.garbage_collect_values = True
        self._interp = interp

    def logits(self, params: Params) -> torch.Tensor:
        if self._interp is not None:
            self._interp.params = params
            return self._interp.run(self.x, initial_env=dict(self._cache))
        return functional_call(self.model, {self.paths[n]: t for n, t in params.items()}, (self.x,))

    def loss_tensor(self, params: Params) -> torch.Tensor:
        """Differentiable loss (for Hessian-vector products)."""
        return self.criterion(self.logits(params).float(), self.y)


class QuantEvaluator(Evaluator):
    """A QModel evaluated at dequantized weights ``params`` (re-quantized to each node's grid per call).

    names: conv/linear node names to vary (default: all). mode: ``integer`` (bit-exact engine) or ``fake``.
    ``last_saturated`` is the number of weights clamped at ±qmax in the last evaluation.
    """

    def __init__(
        self,
        qmodel: QModel,
        x: torch.Tensor,
        y: torch.Tensor,
        names: Sequence[str] | None = None,
        mode: str = "integer",
        reuse_prefix: bool = True,
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(x, y, criterion)
        if mode not in ("integer", "fake"):
            raise ValueError(f"quantized evaluation mode {mode!r} is invalid; allowed: ('integer', 'fake')")
        self.q, self.mode = qmodel.eval(), mode
        nodes = qmodel.weight_nodes()
        self.names = list(nodes) if names is None else list(names)
        bad = [n for n in self.names if n not in nodes]
        if bad:
            raise ValueError(f"QModel has no conv/linear node {bad}; allowed: {list(nodes)}")
        self.nodes = {n: nodes[n] for n in self.names}
        self.last_saturated = 0
        self._codes: dict[str, torch.Tensor] = {}
        self._cache: dict | None = None
        self._dependent = {n.name for n in qmodel.nodes}
        if reuse_prefix:
            self._setup_prefix()

    def center(self) -> Params:
        return {n: dequantize(node.weight_q, node.w_qp) for n, node in self.nodes.items()}

    def _weight_fn(self, name, node):
        return self._codes.get(name, node.weight_q)

    def _ctx(self) -> ExecContext:
        return ExecContext(self.mode, self._weight_fn, self.q.acc, self.q.requant, OverflowStats())

    def _setup_prefix(self) -> None:
        dep = set()
        for node in self.q.nodes:
            if node.name in self.nodes or any(i in dep for i in node.inputs):
                dep.add(node.name)
        self._dependent = dep
        self._codes = {}
        with torch.no_grad():
            env = self.q.run(self.x, mode=self.mode, keep=True)
        keep = {i for node in self.q.nodes if node.name in dep for i in node.inputs if i not in dep}
        self._cache = {k: v for k, v in env.items() if k in keep}

    def quantize_point(self, params: Params) -> dict[str, torch.Tensor]:
        """Integer codes of a point (what the engine runs), and the saturation count in ``last_saturated``."""
        codes, sat = {}, 0
        for n, node in self.nodes.items():
            w = params[n].detach()
            scale, _ = node.w_qp.view_for(w)
            sat += int((w.double().abs() / scale > node.w_qp.fmt.qmax + 0.5).sum())
            codes[n] = quantize(w, node.w_qp).to(node.weight_q.dtype)
        self.last_saturated = sat
        return codes

    def logits(self, params: Params) -> torch.Tensor:
        self._codes = self.quantize_point(params)
        try:
            if self._cache is None:
                return self.q(self.x, mode=self.mode, weight_fn=self._weight_fn)
            ctx = self._ctx()
            env = dict(self._cache)
            for node in self.q.nodes:
                if node.name in self._dependent:
                    env[node.name] = node(*[env[i] for i in node.inputs], ctx=ctx)
            out = env[self.q.output]
            return dequantize(out, self.q.output_qparams()) if self.mode == "integer" else out
        finally:
            self._codes = {}


# ------------------------------------------------------------------------------------ lines and surfaces
@dataclass
class Line:
    """Loss/accuracy along a 1-D path; ``kind`` is ``interpolation`` or ``direction``."""

    name: str
    kind: str
    alphas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    saturated: np.ndarray = field(default_factory=lambda: np.zeros(0))
    color: str | None = None  # for plots


def _sat(ev: Evaluator) -> int:
    return getattr(ev, "last_saturated", 0)


def interpolate(
    evaluator: Evaluator,
    a: Params,
    b: Params,
    alphas: Sequence[float] | None = None,
    name: str = "interpolation",
) -> Line:
    """Loss along (1 − α)·a + α·b (default α ∈ [−0.5, 1.5], 41 points)."""
    _check_same_keys(a, b, "interpolate")
    alphas = np.linspace(-0.5, 1.5, 41) if alphas is None else np.asarray(alphas, dtype=float)
    d = subtract(b, a)
    return along(evaluator, a, d, alphas, name, kind="interpolation")


def along(
    evaluator: Evaluator,
    center: Params,
    direction: Params,
    alphas: Sequence[float] | None = None,
    name: str = "direction",
    kind: str = "direction",
) -> Line:
    """Loss along center + α·direction (default α ∈ [−1, 1], 41 points)."""
    alphas = np.linspace(-1.0, 1.0, 41) if alphas is None else np.asarray(alphas, dtype=float)
    loss, acc, sat = [], [], []
    for a in alphas:
        lo, ac = evaluator(combine(center, [direction], [a]))
        loss.append(lo)
        acc.append(ac)
        sat.append(_sat(evaluator))
    return Line(name, kind, alphas, np.array(loss), np.array(acc), np.array(sat))


@dataclass
class Surface:
    """Loss/accuracy on the grid center + x·d1 + y·d2; arrays are indexed [iy, ix]."""

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    saturated: np.ndarray
    wall_s: float
    cpu_s: float

    def argmin(self) -> tuple[float, float]:
        iy, ix = np.unravel_index(np.argmin(self.loss), self.loss.shape)
        return float(self.xs[ix]), float(self.ys[iy])

    def at(self, x: float, y: float, what: str = "loss") -> float:
        """Bilinear interpolation of the grid at (x, y) (clamped to the grid)."""
        z = getattr(self, what)
        fx_ = np.interp(x, self.xs, np.arange(len(self.xs)))
        fy_ = np.interp(y, self.ys, np.arange(len(self.ys)))
        x0, y0 = min(int(fx_), len(self.xs) - 2), min(int(fy_), len(self.ys) - 2)
        tx, ty = fx_ - x0, fy_ - y0
        return float(
            (1 - ty) * ((1 - tx) * z[y0, x0] + tx * z[y0, x0 + 1])
            + ty * ((1 - tx) * z[y0 + 1, x0] + tx * z[y0 + 1, x0 + 1])
        )


def surface(
    evaluator: Evaluator,
    center: Params,
    directions: Sequence[Params],
    xs: Sequence[float],
    ys: Sequence[float],
    progress: Callable[[int, int], None] | None = None,
) -> Surface:
    """Evaluate the 2-D slice center + x·d1 + y·d2 on the grid xs × ys."""
    if len(directions) != 2:
        raise ValueError(f"a surface needs exactly 2 directions, got {len(directions)}")
    for d in directions:
        _check_same_keys(center, d, "surface")
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    loss = np.zeros((len(ys), len(xs)))
    acc, sat = np.zeros_like(loss), np.zeros_like(loss, dtype=np.int64)
    t0, c0 = time.perf_counter(), time.process_time()
    total, k = loss.size, 0
    for iy, b in enumerate(ys):
        for ix, a in enumerate(xs):
            loss[iy, ix], acc[iy, ix] = evaluator(combine(center, directions, [a, b]))
            sat[iy, ix] = _sat(evaluator)
            k += 1
            if progress:
                progress(k, total)
    return Surface(xs, ys, loss, acc, sat, time.perf_counter() - t0, time.process_time() - c0)


def grid_axis(lo: float, hi: float, n: int, margin: float) -> np.ndarray:
    """n points over [lo, hi] widened by ``margin`` × extent on each side (a minimum extent if flat)."""
    ext = hi - lo
    if ext <= 0:
        ext = max(abs(lo), abs(hi), 1e-3)
    return np.linspace(lo - margin * ext, hi + margin * ext, n)


# ------------------------------------------------------------------------------------ models and runs
def folded_float_model(model: nn.Module, freeze_bias: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
    """The float model the integer engine sees: fx-traced with BatchNorm folded into its conv/linear.

    Returns (graph module, {QModel node name: weight path}) — the node names are those `convert` gives the
    same model (same trace). freeze_bias turns the folded biases into buffers, so the module's parameters
    are exactly the conv/linear weights QZO-FF trains (it never updates the int32 biases).
    """
    from ..engine.convert import fold_batchnorm

    gm = fold_batchnorm(fx.symbolic_trace(copy.deepcopy(model).eval()))
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    modules = dict(gm.named_modules())
    names = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d | nn.Linear):
            names[n.name] = f"{n.target}.weight"
            mod = modules[n.target]
            if freeze_bias and isinstance(mod.bias, nn.Parameter):
                b = mod.bias.detach().clone()
                del mod.bias
                mod.register_buffer("bias", b)
    for p in [n for n, _ in gm.named_parameters() if n not in names.values()]:
        raise ValueError(f"folded model keeps a parameter outside conv/linear ({p}); not supported here")
    return gm.eval(), names


def float_weights(model: nn.Module, paths: Mapping[str, str]) -> Params:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: tensors[p].detach().clone() for n, p in paths.items()}


def load_weights(model: nn.Module, paths: Mapping[str, str], params: Params) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for n, p in paths.items():
            tensors[p].copy_(params[n])


def quant_weights(q: QModel, names: Sequence[str]) -> Params:
    nodes = q.weight_nodes()
    return {n: dequantize(nodes[n].weight_q, nodes[n].w_qp) for n in names}


def pretrain(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int
) -> nn.Module:
    """Source-task pretraining with Adam (BatchNorm in train mode), seeded; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


QUANT_METHODS = ("qzo_ff",)
UNSUPPORTED_METHODS = ("bp_qat",)  # its float master weights are not observable step by step


@dataclass
class Trajectory:
    label: str
    method: str
    steps: list[int]
    points: list[Params]
    test_acc: float
    wall_s: float
    forward_passes: int


def run_trajectory(
    label: str,
    run_cfg: Mapping,
    start_float: nn.Module,
    start_q: QModel,
    paths: Mapping[str, str],
    names: Sequence[str],
    train_xy,
    test_xy,
    *,
    mode: Mapping,
    batch_size: int,
    seed: int,
    snapshots: int,
) -> Trajectory:
    """Train one run from the common start, snapshotting the landscape weights every steps/snapshots steps.

    Float methods train a copy of the folded float model (weights = ``paths``); qzo_ff trains a copy of the
    start QModel and its snapshots are the dequantized integer weights. mode: TrainConfig fields (mode,
    lp_layers, sparse_kind, sparse_density).
    """
    from ..train import TrainConfig, train

    rc = dict(run_cfg)
    method = rc.pop("method", None)
    if method in UNSUPPORTED_METHODS:
        raise ValueError(
            f"runs.{label}.method={method!r} is not supported for trajectories; allowed: any "
            f"other training method (float methods and {QUANT_METHODS})"
        )
    if "weight_headroom" in dict(rc.get("ff") or {}):
        raise ValueError(
            f"runs.{label}.ff.weight_headroom: set quant.weight_headroom instead (it is applied "
            "once to the common start so every run and the evaluator share the weight grid)"
        )
    steps = int(rc.pop("steps"))
    rc.setdefault("eval_every", max(1, steps))
    cfg = TrainConfig(method=method, steps=steps, batch_size=batch_size, seed=seed, **dict(mode), **rc)
    quant = method in QUANT_METHODS
    model = copy.deepcopy(start_q if quant else start_float)
    get = (
        (lambda: quant_weights(model, names))
        if quant
        else (lambda: float_weights(model, {n: paths[n] for n in names}))
    )
    every = max(1, steps // max(1, snapshots))
    pts, at = [get()], [0]

    def progress(row):
        if row["step"] % every == 0 and row["step"] != steps:
            pts.append(get())
            at.append(row["step"])

    res = train(model, cfg, train_xy, test_xy, progress=progress)
    pts.append(get())
    at.append(res.steps)
    return Trajectory(label, method, at, pts, res.test_acc, res.wall_s, res.forward_passes)


# ------------------------------------------------------------------------------------------- plotting
RUN_COLORS = {"bp": "tab:red", "ff": "tab:blue"}
_EXTRA_COLORS = ["tab:green", "tab:purple", "tab:orange", "tab:brown"]


def _color(label: str, i: int) -> str:
    return RUN_COLORS.get(label, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def plot_surface(
    path: str,
    surf: Surface,
    trajs: Mapping[str, np.ndarray],
    axis_labels: tuple[str, str],
    title: str,
    labels: Mapping[str, str] | None = None,
    equal_aspect: bool = True,
) -> None:
    """Loss contour (log-spaced levels) and accuracy contour with the projected trajectories on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    X, Y = np.meshgrid(surf.xs, surf.ys)
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    lo = max(float(np.nanmin(surf.loss)), 1e-4)
    hi = max(float(np.nanmax(surf.loss)), lo * 1.01)
    levels = np.geomspace(lo, hi, 30)
    cs = axes[0].contourf(
        X, Y, np.clip(surf.loss, lo, hi), levels=levels, norm=LogNorm(lo, hi), cmap="viridis"
    )
    axes[0].contour(
        X, Y, np.clip(surf.loss, lo, hi), levels=levels[::3], colors="white", linewidths=0.4, alpha=0.6
    )
    fig.colorbar(cs, ax=axes[0], label="loss (log scale)", format="%.2g")
    ca = axes[1].contourf(X, Y, surf.acc * 100, levels=np.linspace(0, 100, 21), cmap="magma")
    fig.colorbar(ca, ax=axes[1], label="accuracy (%)")
    for ax, what in zip(axes, ("loss", "accuracy")):
        for i, (lab, xy) in enumerate(trajs.items()):
            c = _color(lab, i)
            name = (labels or {}).get(lab, lab)
            ax.plot(xy[:, 0], xy[:, 1], "-o", color=c, ms=3, lw=1.5, label=name, mec="white", mew=0.4)
            ax.plot(xy[-1, 0], xy[-1, 1], "s", color=c, ms=8, mec="white")
        if trajs:
            first = next(iter(trajs.values()))
            ax.plot(first[0, 0], first[0, 1], "*", color="white", ms=14, mec="black", label="start")
        ax.plot(0, 0, "+", color="black", ms=10)
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
        ax.set_title(what)
        ratio = (surf.ys[-1] - surf.ys[0]) / max(surf.xs[-1] - surf.xs[0], 1e-300)
        if equal_aspect and 1 / 3 <= ratio <= 3:  # both axes are distances in weight space
            ax.set_aspect("equal", adjustable="box")
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lines(path: str, lines: Sequence[Line], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("interpolation", "direction") if any(line.kind == k for line in lines)]
    fig, axes = plt.subplots(2, len(kinds), figsize=(5.5 * len(kinds), 6.5), squeeze=False)
    for j, kind in enumerate(kinds):
        for line in (ln for ln in lines if ln.kind == kind):
            kw = {"color": line.color} if line.color else {}
            axes[0, j].plot(line.alphas, line.loss, label=line.name, **kw)
            axes[1, j].plot(line.alphas, line.acc * 100, label=line.name, **kw)
        xl = (
            "α  (point = (1−α)·a + α·b)"
            if kind == "interpolation"
            else "α  (point = w + α·d, filter-normalized d)"
        )
        axes[0, j].set_yscale("log")
        axes[0, j].set_ylabel("loss (log)")
        axes[1, j].set_ylabel("accuracy (%)")
        axes[1, j].set_xlabel(xl)
        axes[0, j].set_title(kind)
        for ax in axes[:, j]:
            if kind == "interpolation":
                for v in (0.0, 1.0):
                    ax.axvline(v, color="grey", lw=0.6, ls=":")
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ experiment
PLANES = ("pca", "random")
EVAL_MODES = ("integer", "fake", "float")


def _get(cfg: Mapping, dotted: str, default=None):
    cur = cfg
    for part in dotted.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _to_dict(cfg) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - hydra-core is a dependency
        pass
    return copy.deepcopy(dict(cfg))


def _choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is invalid; allowed: {allowed}")
    return value


def scheme_of(cfg: Mapping) -> str:
    """The fixed-point scheme of the common start from the ``quant`` group (``auto`` means w16a8)."""
    name = str(_get(cfg, "quant.name", "w16a8"))
    return "w16a8" if name == "auto" else name


def mode_of(cfg: Mapping) -> dict:
    """TrainConfig fields of the ``mode`` group (name → mode, lp_layers, sparse_kind, sparse_density)."""
    m = _get(cfg, "mode")
    m = {"name": m} if isinstance(m, str) else dict(m or {})
    out = {"mode": m.get("name")}
    for k in ("lp_layers", "sparse_kind", "sparse_density"):
        if k in m:
            out[k] = m[k]
    return out


def validate(cfg: Mapping) -> None:
    """One-line ValueErrors for bad settings, before any work is done."""
    from ..engine.convert import SCHEMES, Scheme
    from ..models import MODELS
    from ..train import METHODS, TRAIN_MODES

    for part in ("source", "target"):
        if not isinstance(_get(cfg, f"data.{part}"), Mapping):
            raise ValueError(
                f"data.{part} is missing; the data group must give source and target "
                "build_dataset specs (e.g. data=digits)"
            )
    if _get(cfg, "data.fewshot"):
        raise ValueError(
            f"data={_get(cfg, 'data.name')!r} is a few-shot episode config; the landscape "
            "needs a source -> target transfer config such as data=digits"
        )
    _choice(_get(cfg, "model.name"), tuple(sorted(MODELS)), "model.name")
    _choice(mode_of(cfg)["mode"], TRAIN_MODES, "mode")
    scheme = scheme_of(cfg)
    if scheme == "fp32":
        raise ValueError(
            f"quant=fp32 is invalid here: the common start is a QModel (QZO-FF trains it); "
            f"allowed: a fixed-point scheme such as {SCHEMES} (landscape.eval_mode=float "
            "gives a float surface)"
        )
    Scheme.parse(scheme)
    _choice(_get(cfg, "landscape.plane"), PLANES, "landscape.plane")
    _choice(_get(cfg, "landscape.eval_mode"), EVAL_MODES, "landscape.eval_mode")
    _choice(_get(cfg, "landscape.eval_split"), ("train", "test"), "landscape.eval_split")
    _choice(_get(cfg, "landscape.norm"), NORMS, "landscape.norm")
    _choice(_get(cfg, "landscape.pca_weighting"), ("equal", "none"), "landscape.pca_weighting")
    runs = _get(cfg, "runs") or {}
    runs = {k: v for k, v in runs.items() if v}
    if not runs:
        raise ValueError("runs is empty; give at least one run, e.g. runs.bp={method:bp,lr:0.1,steps:150}")
    allowed = tuple(m for m in METHODS if m not in UNSUPPORTED_METHODS)
    for label, rc in runs.items():
        _choice(rc.get("method"), allowed, f"runs.{label}.method")
        if not isinstance(rc.get("steps"), int) or rc["steps"] < 1:
            raise ValueError(f"runs.{label}.steps={rc.get('steps')!r} is invalid; allowed: integers >= 1")
    center = _get(cfg, "landscape.center")
    _choice(center, ("start", *runs), "landscape.center")
    n = _get(cfg, "landscape.grid")
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"landscape.grid={n!r} is invalid; allowed: integers >= 2")
    for key in (
        "landscape.eval_examples",
        "snapshots",
        "landscape.line_points",
        "threads",
        "batch_size",
        "quant.calib_examples",
    ):
        v = _get(cfg, key)
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{key}={v!r} is invalid; allowed: integers >= 1")
    headroom = _get(cfg, "quant.weight_headroom", 1.0)
    if not float(headroom) >= 1.0:
        raise ValueError(f"quant.weight_headroom={headroom!r} is invalid; allowed: >= 1")


def run(cfg: Mapping, out_dir: str, log: Callable[[str], None] = print) -> dict:
    """The landscape experiment (docs/landscape.md): pretrain → convert → BP and QZO-FF runs from one start →
    plane → 21×21 surface, lines, sharpness → ``landscape.npz``, ``landscape.json``, ``landscape_2d.png``,
    ``landscape_1d.png`` in ``out_dir``. Returns the summary written to the JSON."""
    from hydra.utils import instantiate

    from ..engine import convert
    from ..train import TrainConfig, evaluate, trainable_names
    from .sharpness import forward_sharpness, hessian_trace, top_hessian_eigenvalue

    cfg = _to_dict(cfg)
    validate(cfg)
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(int(cfg["threads"]))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # data and source model
    d = cfg["data"]
    src, tgt = instantiate(d["source"], seed=seed), instantiate(d["target"], seed=seed)
    for part, splits in (("source", src), ("target", tgt)):
        if not hasattr(splits.train, "tensors"):
            raise ValueError(
                f"data.{part} ({d[part].get('name')!r}) yields raw clips; the landscape needs "
                "tensor datasets (image sets, or synth_keywords features)"
            )
    if len(src.classes) != len(tgt.classes):
        raise ValueError(
            f"data={d.get('name')!r}: the source task has {len(src.classes)} classes and the "
            f"target {len(tgt.classes)}; the landscape fine-tunes the source head, so they must "
            "match"
        )
    train_xy, test_xy = tgt.train.tensors, tgt.test.tensors
    in_ch = train_xy[0].shape[1]
    model = instantiate(cfg["model"], num_classes=len(src.classes), in_channels=in_ch)
    t = time.perf_counter()
    ckpt = cfg["pretrain"].get("checkpoint")
    if ckpt:
        model.load_state_dict(torch.load(ckpt, weights_only=True))
        model.eval()
    else:
        p = cfg["pretrain"]
        pretrain(model, *src.train.tensors, p["epochs"], p["lr"], p["batch_size"], seed)
    timings["pretrain_s"] = time.perf_counter() - t

    # common start: the converted model, headroom applied to the landscape layers; the float model gets the
    # same (dequantized) weights so every run starts from exactly one point
    q, scheme, mode = cfg["quant"], scheme_of(cfg), mode_of(cfg)
    q0 = convert(
        model,
        scheme,
        train_xy[0][: q["calib_examples"]],
        observer=q.get("observer", "minmax"),
        per_channel=bool(q.get("per_channel", False)),
    )
    names = trainable_names(q0, TrainConfig(method="qzo_ff", **mode))
    for n in names:
        node = q0.weight_nodes()[n]
        if q["weight_headroom"] != 1:
            node.set_weight_scale(node.w_qp.scale * float(q["weight_headroom"]))
    gm, paths = folded_float_model(model)
    if sorted(paths) != sorted(q0.weight_nodes()):
        raise RuntimeError(
            f"folded float model layers {sorted(paths)} do not match the QModel's {sorted(q0.weight_nodes())}"
        )
    load_weights(gm, paths, quant_weights(q0, list(paths)))
    start = quant_weights(q0, names)
    zero_shot = {"float": evaluate(model, *test_xy), "quant": evaluate(q0, *test_xy)}
    log(
        f"landscape: pretrained {cfg['model']['name']}; zero-shot target acc float {zero_shot['float']:.3f}, "
        f"{scheme} {zero_shot['quant']:.3f}; landscape over {len(names)} layers "
        f"({sum(v.numel() for v in start.values())} weights)"
    )

    # runs
    trajs: dict[str, Trajectory] = {}
    for label, rc in cfg["runs"].items():
        if not rc:
            continue
        t = time.perf_counter()
        trajs[label] = run_trajectory(
            label,
            rc,
            gm,
            q0,
            paths,
            names,
            train_xy,
            test_xy,
            mode=mode,
            batch_size=cfg["batch_size"],
            seed=seed,
            snapshots=cfg["snapshots"],
        )
        timings[f"train_{label}_s"] = time.perf_counter() - t
        log(
            f"landscape: run {label} ({trajs[label].method}, {trajs[label].steps[-1]} steps) test acc "
            f"{trajs[label].test_acc:.3f} in {timings[f'train_{label}_s']:.1f}s"
        )

    # evaluator on a fixed batch
    L = cfg["landscape"]
    ex, ey = train_xy if L["eval_split"] == "train" else test_xy
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ex), generator=g)[: L["eval_examples"]]
    ex, ey = ex[idx], ey[idx]
    if L["eval_mode"] == "float":
        ev: Evaluator = FloatEvaluator(gm, ex, ey, {n: paths[n] for n in names})
    else:
        ev = QuantEvaluator(copy.deepcopy(q0), ex, ey, names, mode=L["eval_mode"])
    float_ev = FloatEvaluator(gm, ex, ey, {n: paths[n] for n in names})

    # plane
    center = start if L["center"] == "start" else trajs[L["center"]].points[-1]
    if L["plane"] == "pca":
        snaps = [p for tr in trajs.values() for p in tr.points]
        weights = None
        if L["pca_weighting"] == "equal":  # every run gets the same total weight, whatever its length
            weights = []
            for tr in trajs.values():
                tot = math.sqrt(sum(float((flatten(p) - flatten(center)).square().sum()) for p in tr.points))
                weights += [1.0 / tot if tot > 0 else 0.0] * len(tr.points)
        dirs, explained = pca_directions(center, snaps, weights=weights)
        axis_labels = (
            f"PC1 ({100 * explained[0]:.1f}% of displacement²)",
            f"PC2 ({100 * explained[1]:.1f}%)",
        )
    else:
        dirs, explained = random_plane(center, L["seed"], L["norm"]), np.array([np.nan, np.nan])
        axis_labels = ("filter-normalized direction 1", "filter-normalized direction 2")
    coords = {}
    in_plane = {}
    for label, tr in trajs.items():
        coords[label], in_plane[label] = project(tr.points, center, dirs)
    if L["plane"] == "pca":
        allc = np.concatenate([c for c in coords.values()] + [np.zeros((1, 2))])
        xs = grid_axis(allc[:, 0].min(), allc[:, 0].max(), L["grid"], L["margin"])
        ys = grid_axis(allc[:, 1].min(), allc[:, 1].max(), L["grid"], L["margin"])
    else:
        xs = ys = np.linspace(-L["span"], L["span"], L["grid"])

    # surface
    log(
        f"landscape: evaluating a {L['grid']}x{L['grid']} {L['plane']} grid ({L['eval_mode']}, "
        f"{len(ey)} examples)"
    )
    surf = surface(ev, center, dirs, xs, ys)
    timings["grid_wall_s"], timings["grid_cpu_s"] = surf.wall_s, surf.cpu_s
    log(
        f"landscape: grid done in {surf.wall_s:.1f}s wall ({surf.cpu_s:.1f}s CPU, "
        f"{1e3 * surf.wall_s / surf.loss.size:.1f} ms/point)"
    )

    # losses at the actual snapshots (off-plane components included)
    traj_eval = {}
    for label, tr in trajs.items():
        traj_eval[label] = np.array([ev(p) for p in tr.points])

    # lines
    t = time.perf_counter()
    npts = L["line_points"]
    lines = []
    for i, (label, tr) in enumerate(trajs.items()):
        lines.append(
            interpolate(
                ev, tr.points[0], tr.points[-1], np.linspace(-0.5, 1.5, npts), f"start → {label} final"
            )
        )
        lines[-1].color = _color(label, i)
    labs = list(trajs)
    if len(labs) >= 2:
        lines.append(
            interpolate(
                ev,
                trajs[labs[0]].points[-1],
                trajs[labs[1]].points[-1],
                np.linspace(-0.5, 1.5, npts),
                f"{labs[0]} final → {labs[1]} final",
            )
        )
        lines[-1].color = "tab:green" if set(labs[:2]) == {"bp", "ff"} else "black"
    for i, (label, tr) in enumerate(trajs.items()):
        dvec = random_direction(tr.points[-1], L["seed"] + 100 + i, L["norm"])
        lines.append(along(ev, tr.points[-1], dvec, np.linspace(-1, 1, npts), f"{label} final ± random dir"))
        lines[-1].color = _color(label, i)
    timings["lines_s"] = time.perf_counter() - t

    # sharpness at the start and each final point; one absolute ρ (from the start's norm) for all points
    sharp = {}
    s = cfg.get("sharpness") or {}
    if s.get("enabled", False):
        t = time.perf_counter()
        pts = {"start": start} | {f"{label}_final": tr.points[-1] for label, tr in trajs.items()}
        rho = float(s["rho"]) * float(flatten(start).norm())
        for key, p in pts.items():
            eig = top_hessian_eigenvalue(float_ev.loss_tensor, p, iters=s["power_iters"], seed=seed)
            tr_f, tr_se = hessian_trace(float_ev.loss_tensor, p, samples=s["directions"], seed=seed)
            sharp[key] = {"top_eigenvalue_float": eig.as_dict()}
            for mode_name, e in {"float": float_ev, L["eval_mode"]: ev}.items():  # same directions for both
                fs = forward_sharpness(
                    e.loss, p, rho=rho, directions=s["directions"], subspace=s["subspace"], seed=seed
                )
                fsd = fs.as_dict()
                fsd.pop("curvatures")
                fsd["stderr"] = fs.std / math.sqrt(fs.directions)
                sharp[key][f"forward_{mode_name}"] = fsd
            sharp[key]["trace_float_hutchinson"] = {
                "trace": tr_f,
                "stderr": tr_se,
                "mean": tr_f / fs.dim,
                "stderr_mean": tr_se / fs.dim,
            }
        timings["sharpness_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_all

    # outputs
    files = {
        k: os.path.join(out_dir, v)
        for k, v in (
            ("npz", "landscape.npz"),
            ("json", "landscape.json"),
            ("surface_png", "landscape_2d.png"),
            ("lines_png", "landscape_1d.png"),
        )
    }
    arrays = {
        "xs": surf.xs,
        "ys": surf.ys,
        "loss": surf.loss,
        "acc": surf.acc,
        "saturated": surf.saturated,
        "explained": explained,
    }
    for label, tr in trajs.items():
        arrays[f"traj_{label}_coords"] = coords[label]
        arrays[f"traj_{label}_steps"] = np.array(tr.steps)
        arrays[f"traj_{label}_loss"] = traj_eval[label][:, 0]
        arrays[f"traj_{label}_acc"] = traj_eval[label][:, 1]
        arrays[f"traj_{label}_in_plane"] = in_plane[label]
    for i, line in enumerate(lines):
        for k in ("alphas", "loss", "acc"):
            arrays[f"line{i}_{k}"] = getattr(line, k)
    np.savez_compressed(files["npz"], **arrays)
    pretty = {"bp": "BP (float SGD)", "ff": f"QZO-FF ({scheme}, integer)"}
    run_names = {
        lab: f"{pretty.get(lab, lab)}: {tr.steps[-1]} steps, test acc {100 * tr.test_acc:.1f}%"
        for lab, tr in trajs.items()
    }
    where = f"{scheme} {L['eval_mode']} mode" if L["eval_mode"] != "float" else "float32"
    task = f"{d.get('name')} {'/'.join(src.classes)} → {'/'.join(tgt.classes)}"
    title = (
        f"{cfg['model']['name']}, {task}, mode={mode['mode']}; {L['plane']} plane through "
        f"{L['center']}; loss in {where} on {len(ey)} {L['eval_split']} examples"
    )
    plot_surface(files["surface_png"], surf, coords, axis_labels, title, run_names)
    plot_lines(files["lines_png"], lines, title)
    xmin, ymin = surf.argmin()
    summary = {
        "config": cfg,
        "files": {k: os.path.basename(v) for k, v in files.items()},
        "landscape_tensors": {n: list(start[n].shape) for n in names},
        "zero_shot_acc": zero_shot,
        "runs": {
            lab: {
                "method": tr.method,
                "steps": tr.steps[-1],
                "forward_passes": tr.forward_passes,
                "test_acc": tr.test_acc,
                "train_wall_s": tr.wall_s,
                "snapshot_steps": tr.steps,
                "final_coords": coords[lab][-1].tolist(),
                "final_eval_loss": float(traj_eval[lab][-1, 0]),
                "final_eval_acc": float(traj_eval[lab][-1, 1]),
                "final_surface_loss": surf.at(*coords[lab][-1]),
                "mean_in_plane": float(in_plane[lab].mean()),
                "distance_from_start": float((flatten(tr.points[-1]) - flatten(tr.points[0])).norm()),
            }
            for lab, tr in trajs.items()
        },
        "plane": {
            "kind": L["plane"],
            "center": L["center"],
            "explained": explained.tolist(),
            "xs": [float(xs[0]), float(xs[-1])],
            "ys": [float(ys[0]), float(ys[-1])],
        },
        "grid": {
            "n": L["grid"],
            "points": int(surf.loss.size),
            "min_loss": float(surf.loss.min()),
            "argmin": [xmin, ymin],
            "max_loss": float(surf.loss.max()),
            "max_saturated_weights": int(surf.saturated.max()),
            "wall_s": surf.wall_s,
            "cpu_s": surf.cpu_s,
            "ms_per_point": 1e3 * surf.wall_s / surf.loss.size,
            "threads": torch.get_num_threads(),
        },
        "lines": {
            line.name: {
                "kind": line.kind,
                "min_loss": float(line.loss.min()),
                "loss_at_0": float(np.interp(0.0, line.alphas, line.loss)),
                "loss_at_1": float(np.interp(1.0, line.alphas, line.loss)),
                "max_loss_in_0_1": float(line.loss[(line.alphas >= 0) & (line.alphas <= 1)].max()),
            }
            for line in lines
        },
        "sharpness": sharp,
        "timings": timings,
    }
    with open(files["json"], "w") as f:
        json.dump(summary, f, indent=2, default=float)
    log(
        f"landscape: wrote {', '.join(summary['files'].values())} to {out_dir} "
        f"(total {timings['total_s']:.1f}s)"
    )
    return summary


# ------------------------------------------------------------------------------------------ entry points
def conf_dir() -> str:
    """The repository's ``conf/`` folder (``$FWDGRAD_CONF`` overrides)."""
    from pathlib import Path

    env = os.environ.get("FWDGRAD_CONF")
    from ..conf import CONF_DIR

    path = Path(env) if env else CONF_DIR
    if not (path / "landscape.yaml").is_file():
        raise FileNotFoundError(
            f"no landscape.yaml in {path}; set FWDGRAD_CONF to the folder holding the fwdgrad Hydra configs"
        )
    return str(path)


def hydra_task(cfg) -> dict:
    """Body of the Hydra app: run in the job's output directory."""
    from hydra.core.hydra_config import HydraConfig

    try:
        out = HydraConfig.get().runtime.output_dir
    except ValueError:
        out = os.getcwd()
    return run(cfg, out)


def main(argv: Sequence[str] | None = None):
    """``fwdgrad landscape [hydra overrides...]``: the Hydra app on conf/landscape.yaml with ``argv`` as its
    command line (default ``sys.argv[1:]``); Hydra flags (``--multirun``, ``--cfg job``, ...) work."""
    import sys

    import hydra

    app = hydra.main(config_path=conf_dir(), config_name="landscape", version_base=None)(hydra_task)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "fwdgrad-landscape", *(sys.argv[1:] if argv is None else argv)]
    try:
        return app()
    finally:
        sys.argv = saved
