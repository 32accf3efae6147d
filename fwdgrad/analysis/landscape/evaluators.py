"""Evaluators: (loss, accuracy) of a model at a point of the landscape, on a fixed evaluation batch.

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
* :class:`FunctionEvaluator` — any function of a point (analytic tests).

Both model evaluators reuse the prefix of the network that no varied tensor touches: its activations are
computed once on the evaluation batch and every later evaluation runs only the layers from the first varied
one on (a large saving for linear probing, none for full fine-tuning). The float one does it with an fx
``Interpreter`` and a pre-filled environment, the quantized one with ``QModel.run_prefix``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ...engine.model import QModel
from ...quant import dequantize, quantize
from .params import Params, clone


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
    reuse_prefix: run the nodes before the first varied one once (``QModel.run_prefix``) and start every
    evaluation from there. ``last_saturated``: the number of weights clamped at ±qmax in the last evaluation.
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
        self._prefix = None
        if reuse_prefix and self.names:
            first = next(n.name for n in qmodel.nodes if n.name in self.nodes)
            with torch.no_grad():
                self._prefix = qmodel.run_prefix(x, first, mode=mode)

    def center(self) -> Params:
        return {n: dequantize(node.weight_q, node.w_qp) for n, node in self.nodes.items()}

    def _weight_fn(self, name, node):
        return self._codes.get(name, node.weight_q)

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
            return self.q(self.x, mode=self.mode, weight_fn=self._weight_fn, prefix=self._prefix)
        finally:
            self._codes = {}
