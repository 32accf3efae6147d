"""`QModel`: an ordered list of `QNode`s interpreted in `integer` or `fake` mode."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..quant import dequantize
from . import kernels
from .intops import AccumulatorSpec, OverflowStats
from .nodes import KERNELS, ExecContext, QLinear, QNode, QTrainable

ENGINE_MODES = ("integer", "fake")  # how the engine computes: exact integers, or fake-quant float

#: Input elements per chunk when many examples go through a model without autograd (evaluation,
#: calibration). Fresh multi-MB activation buffers are served by mmap and page-faulted in on every call;
#: chunks this small are recycled by the allocator instead. Measured per example (integer w16a8 / float32,
#: 1 thread): DS-CNN on 40x101 log-mel 10 / 2 ms at batch 8 vs 42 / 11 ms at 128-512; ResNet-8 on 28x28
#: 1.6 / 0.5 ms at 64 vs 5.3 / 0.9 ms at 512. 2^15 gives 8 and 41 rows for those inputs.
CHUNK_ELEMENTS = 2**15


def chunk_rows(x: torch.Tensor, max_rows: int = 512) -> int:
    """Rows per chunk for a batch like `x`: about CHUNK_ELEMENTS input elements, 1..max_rows."""
    return min(max_rows, max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))) if len(x) else 1


@dataclass(frozen=True)
class Prefix:
    """What `QModel.run_prefix` computed once: the live values (by node name) that the nodes from index
    `start` on read (integer codes as float32, or as torch.uint8 for `QModel.byte_values`), and the
    execution mode they were computed in."""

    values: dict[str, torch.Tensor]
    start: int
    mode: str


class QModel(nn.Module):
    """A converted model. The integer weights live in each `QTrainable` node's `weight_q` buffer.

    forward(x) takes float inputs and returns float (dequantized) logits. `weight_fn(name, node)`, when
    given, returns the integer weights a node should use for this pass — how forward-gradient training
    perturbs weights on the fly without touching the stored ones. `run_prefix(x, upto)` runs the frozen
    nodes before `upto` once; `run`/`forward(x, prefix=...)` resume from that `Prefix` (DeepZero's reuse).
    """

    def __init__(
        self,
        nodes: list[QNode],
        output: str,
        scheme: str,
        acc: AccumulatorSpec,
        requant: str,
        mode: str = "integer",
    ):
        super().__init__()
        self.nodes = nn.ModuleList(nodes)
        self.output, self.scheme, self.acc, self.requant = output, scheme, acc, requant
        self.mode = mode
        self.kernel = "auto"  # see KERNELS
        self.stats = OverflowStats()
        self._last_use = self._liveness()
        self.byte_values = self._byte_values()
        self._weight_fn: Callable | None = None
        self._stack = 1

    @contextmanager
    def using_weights(self, weight_fn: Callable, stack: int = 1):
        """Within the block, every forward takes its integer weights from `weight_fn(name, node)` — how an
        optimizer perturbs weights on the fly inside a closure without touching the stored integers. With
        stack = P > 1, `weight_fn` gives one layer P weights [P, *shape] (a linear layer `stackable` names)
        and a forward returns the P passes' outputs stacked along the batch (pass p in rows p·B..p·B+B−1)."""
        previous, self._weight_fn, self._stack = (self._weight_fn, self._stack), weight_fn, stack
        try:
            yield self
        finally:
            self._weight_fn, self._stack = previous

    def stackable(self, name: str) -> bool:
        """Whether P perturbations of node `name` alone can run as one stacked pass (`using_weights`): it is
        a linear layer and every node after it reads only values computed from its output, so the passes'
        rows never meet a value shared by all passes."""
        names = [n.name for n in self.nodes]
        if name not in names or not isinstance(self.nodes[names.index(name)], QLinear):
            return False
        derived = {name}
        for node in list(self.nodes)[names.index(name) + 1 :]:
            if not set(node.inputs) <= derived:
                return False
            derived.add(node.name)
        return self.output in derived

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in ENGINE_MODES:
            raise ValueError(f"execution mode {mode!r} is invalid; allowed: {ENGINE_MODES}")
        self._mode = mode

    def _liveness(self) -> dict[str, int]:
        """Index of the last node reading each value, so buffers are freed as soon as possible."""
        last = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last[name] = i
        return last

    def _byte_values(self) -> frozenset[str]:
        """Values an integer pass with the C kernels may store as bytes (torch.uint8) instead of float32
        codes: outputs in an unsigned format of at most 8 bits, of nodes that can write bytes, whose every
        reader takes bytes (a reader that passes its input's storage on counts only if its own output may
        be bytes too), never the model's output. The epilogue then writes 1 byte per code instead of 4 and
        oneDNN reads them as they are."""
        readers: dict[str, list[QNode]] = {}
        for node in self.nodes:
            for name in node.inputs:
                readers.setdefault(name, []).append(node)
        u8: set[str] = set()
        for node in reversed(list(self.nodes)):
            fmt = node.out_qp.fmt if node.out_qp is not None else None
            if node.name == self.output or not node.writes_u8 or fmt is None or fmt.signed or fmt.bits > 8:
                continue
            if all(r.takes_u8 and (not r.passes_dtype or r.name in u8) for r in readers.get(node.name, [])):
                u8.add(node.name)
        return frozenset(u8)

    @torch.no_grad()
    def macs(self, x: torch.Tensor) -> OrderedDict[str, int]:
        """Multiply-accumulates per example of every node, in forward order (conv/linear: output elements ×
        fan-in; matmul of two activations: output elements × the inner dimension; others 0), from one
        pass on x[:1]."""
        stats, self.stats = self.stats, OverflowStats()  # not a pass of the run: its faults are not counted
        try:
            env = self.run(x[:1], keep=True)
        finally:
            self.stats = stats
        return OrderedDict(
            (n.name, n.macs(env[n.name], *(env[i] for i in n.inputs)) if n.kind != "input" else 0)
            for n in self.nodes
        )

    def weight_nodes(self) -> OrderedDict[str, QTrainable]:
        """Nodes with trainable integer tensors (conv, linear, LayerNorm, tokens) in forward order."""
        return OrderedDict((n.name, n) for n in self.nodes if isinstance(n, QTrainable))

    def run(
        self,
        x: torch.Tensor,
        mode: str | None = None,
        weight_fn: Callable | None = None,
        keep: bool = False,
        prefix: Prefix | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Execute the graph. Returns the raw output value (integers in integer mode), or with keep=True a
        dict of every node's output (from `prefix.start` on, with a prefix). With `prefix` (from
        `run_prefix` on the same input, in the same mode), execution resumes from its saved values."""
        ctx = self._context(mode, weight_fn, bytes_ok=not keep)
        if prefix is None:
            env, start = {}, 0
        else:
            if prefix.mode != ctx.mode:
                raise ValueError(f"prefix computed in {prefix.mode!r} mode cannot resume a {ctx.mode!r} pass")
            env, start = dict(prefix.values), prefix.start
        env = self._execute(env, x, ctx, start, len(self.nodes), keep)
        return env if keep else env[self.output]

    def run_prefix(
        self, x: torch.Tensor, upto: str, mode: str | None = None, weight_fn: Callable | None = None
    ) -> Prefix:
        """The frozen prefix (DeepZero): the live values that the nodes from `upto` on read, computed once
        by running the nodes before it. Every pass on `x` whose weights differ only from `upto` on (e.g. the
        2m perturbed passes of a forward-gradient step that trains `upto` and later layers) can resume from
        it with `run(x, prefix=...)` / `forward(x, prefix=...)`, bit-identically."""
        names = [n.name for n in self.nodes]
        if upto not in names:
            raise ValueError(f"node {upto!r} is not in the model; allowed: {names}")
        ctx = self._context(mode, weight_fn, bytes_ok=True)
        stop = names.index(upto)
        return Prefix(self._execute({}, x, ctx, 0, stop, keep=False), stop, ctx.mode)

    def run_node(self, x: torch.Tensor, prefix: Prefix) -> torch.Tensor:
        """The output of the node `prefix` stops at (`run_prefix(x, upto)`: node `upto`), from that prefix."""
        ctx = self._context(prefix.mode, None)
        env = self._execute(dict(prefix.values), x, ctx, prefix.start, prefix.start + 1, keep=True)
        return env[self.nodes[prefix.start].name]

    def _context(self, mode: str | None, weight_fn: Callable | None, bytes_ok: bool = False) -> ExecContext:
        """A pass's context; with `bytes_ok` (values the caller does not see) `byte_values` are stored as
        bytes where the C kernels are built."""
        u8 = self.byte_values if bytes_ok and kernels.library() is not None else frozenset()
        ctx = ExecContext(
            mode or self.mode, weight_fn or self._weight_fn, self.acc, self.requant, self.stats, self.kernel,
            self._stack if weight_fn is None else 1, u8,
        )  # fmt: skip
        if ctx.mode not in ENGINE_MODES:
            raise ValueError(f"execution mode {ctx.mode!r} is invalid; allowed: {ENGINE_MODES}")
        if ctx.kernel not in KERNELS:
            raise ValueError(f"kernel {ctx.kernel!r} is invalid; allowed: {KERNELS}")
        return ctx

    def _execute(self, env: dict, x: torch.Tensor, ctx: ExecContext, start: int, stop: int, keep: bool):
        """Run nodes [start, stop) on `env`; without keep, a value is freed after its last reader."""
        nodes = list(self.nodes)  # plain list indexing: ModuleList's costs microseconds per node
        for i in range(start, stop):
            node = nodes[i]
            args = [x] if node.kind == "input" else [env[name] for name in node.inputs]
            env[node.name] = node(*args, ctx=ctx)
            if not keep:
                for name in node.inputs:
                    if self._last_use.get(name) == i and name != self.output:
                        del env[name]
        return env

    def describe(self) -> dict[str, str]:
        """The kernel each trainable node (conv/linear, LayerNorm, tokens) runs on, by name (e.g.
        ``"float32 x2 planes of 9 bits + C epilogue"``; see `intops.prepare` and `kernels`)."""
        return {name: node.describe() for name, node in self.weight_nodes().items()}

    def output_qparams(self):
        return next(n.out_qp for n in self.nodes if n.name == self.output)

    def forward(
        self,
        x: torch.Tensor,
        mode: str | None = None,
        weight_fn: Callable | None = None,
        prefix: Prefix | None = None,
    ) -> torch.Tensor:
        out = self.run(x, mode, weight_fn, prefix=prefix)
        if (mode or self.mode) == "integer":
            return dequantize(out, self.output_qparams())
        return out

    def extra_repr(self) -> str:
        return (
            f"scheme={self.scheme}, mode={self.mode}, acc={self.acc.bits}b/{self.acc.overflow}, "
            f"requant={self.requant}"
        )
