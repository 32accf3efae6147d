"""`QModel`: an ordered list of `QNode`s interpreted in `integer` or `fake` mode."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..quant import dequantize
from .intops import AccumulatorSpec, OverflowStats
from .nodes import ExecContext, QNode, QWeighted

MODES = ("integer", "fake")

#: Input elements per chunk when many examples go through a model without autograd (evaluation,
#: calibration). Fresh multi-MB activation buffers are served by mmap and page-faulted in on every call;
#: chunks this small are recycled by the allocator instead. Measured per example (integer w16a8 / float32,
#: 1 thread): DS-CNN on 40x101 log-mel 10 / 2 ms at batch 8 vs 42 / 11 ms at 128-512; ResNet-8 on 28x28
#: 1.6 / 0.5 ms at 64 vs 5.3 / 0.9 ms at 512. 2^15 gives 8 and 41 rows for those inputs.
CHUNK_ELEMENTS = 2**15


def chunk_rows(x: torch.Tensor, max_rows: int = 512) -> int:
    """Rows per chunk for a batch like `x`: about CHUNK_ELEMENTS input elements, 1..max_rows."""
    return min(max_rows, max(1, CHUNK_ELEMENTS // max(1, x[0].numel()))) if len(x) else 1


class QModel(nn.Module):
    """A converted model. The integer weights live in each `QWeighted` node's `weight_q` buffer.

    forward(x) takes float inputs and returns float (dequantized) logits. `weight_fn(name, node)`, when
    given, returns the integer weights a node should use for this pass — how forward-gradient training
    perturbs weights on the fly without touching the stored ones.
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
        self.stats = OverflowStats()
        self._last_use = self._liveness()
        self._weight_fn: Callable | None = None
        self._prefix_start: int | None = None
        self._prefix: tuple | None = None

    def set_prefix_cache(self, first_varying: str | None) -> None:
        """Reuse the frozen prefix (DeepZero): while a `weight_fn` is active, the outputs of the nodes before
        `first_varying` are computed once per input tensor and reused by every further pass on that same
        tensor object (e.g. the 2m perturbed passes of one forward-gradient step). None disables it."""
        names = [n.name for n in self.nodes]
        self._prefix_start = None if first_varying is None else names.index(first_varying)
        self._prefix = None

    @contextmanager
    def using_weights(self, weight_fn: Callable):
        """Within the block, every forward takes its integer weights from `weight_fn(name, node)` — how an
        optimizer perturbs weights on the fly inside a closure without touching the stored integers."""
        previous, self._weight_fn = self._weight_fn, weight_fn
        try:
            yield self
        finally:
            self._weight_fn = previous

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"execution mode {mode!r} is invalid; allowed: {MODES}")
        self._mode = mode

    def _liveness(self) -> dict[str, int]:
        """Index of the last node reading each value, so buffers are freed as soon as possible."""
        last = {}
        for i, node in enumerate(self.nodes):
            for name in node.inputs:
                last[name] = i
        return last

    def weight_nodes(self) -> OrderedDict[str, QWeighted]:
        """Conv/linear nodes (the trainable integer tensors) in forward order."""
        return OrderedDict((n.name, n) for n in self.nodes if isinstance(n, QWeighted))

    def run(
        self, x: torch.Tensor, mode: str | None = None, weight_fn: Callable | None = None, keep: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Execute the graph. Returns the raw output value (integers in integer mode), or with keep=True a
        dict of every node's output."""
        ctx = ExecContext(mode or self.mode, weight_fn or self._weight_fn, self.acc, self.requant, self.stats)
        if ctx.mode not in MODES:
            raise ValueError(f"execution mode {ctx.mode!r} is invalid; allowed: {MODES}")
        env: dict[str, object] = {}
        start, b = 0, self._prefix_start
        cache = b is not None and ctx.weight_fn is not None and not keep
        key = (x, x._version, ctx.mode) if cache else None
        if cache and self._prefix is not None and self._prefix[0][0] is x and self._prefix[0][1:] == key[1:]:
            env, start = dict(self._prefix[1]), b
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if cache and i == b and start == 0:
                self._prefix = (key, dict(env))
            args = [x] if node.kind == "input" else [env[name] for name in node.inputs]
            env[node.name] = node(*args, ctx=ctx)
            if not keep:
                for name in node.inputs:
                    if self._last_use.get(name) == i and name != self.output:
                        del env[name]
        return env if keep else env[self.output]

    def output_qparams(self):
        return next(n.out_qp for n in self.nodes if n.name == self.output)

    def forward(
        self, x: torch.Tensor, mode: str | None = None, weight_fn: Callable | None = None
    ) -> torch.Tensor:
        out = self.run(x, mode, weight_fn)
        if (mode or self.mode) == "integer":
            return dequantize(out, self.output_qparams())
        return out

    def extra_repr(self) -> str:
        return (
            f"scheme={self.scheme}, mode={self.mode}, acc={self.acc.bits}b/{self.acc.overflow}, "
            f"requant={self.requant}"
        )
