"""Loss along lines and over planes of the landscape: :func:`interpolate` between two points, :func:`along` a
direction, :func:`surface` on a 2-D grid ``center + x·d1 + y·d2`` (:func:`grid_axis` sizes a PCA grid)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from .evaluators import Evaluator
from .params import Params, check_same_keys, combine, subtract


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
    check_same_keys(a, b, "interpolate")
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
        check_same_keys(center, d, "surface")
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
