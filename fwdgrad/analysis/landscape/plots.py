"""Figures of the landscape experiment: the 2-D surface with projected trajectories (loss and accuracy
contours) and the 1-D lines (interpolations, random directions). matplotlib is imported on first use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ...files import save_figure
from .surfaces import Line, Surface

RUN_COLORS = {"bp": "tab:red", "ff": "tab:blue"}
_EXTRA_COLORS = ["tab:green", "tab:purple", "tab:orange", "tab:brown"]


def run_color(label: str, i: int) -> str:
    """The colour of run `label` (the i-th run): bp red, ff blue, others from a fixed cycle."""
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
            c = run_color(lab, i)
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_lines(path: str, lines: Sequence[Line], title: str) -> None:
    """Loss (log) and accuracy along each line; one column per kind (interpolation, direction)."""
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
    save_figure(fig, path, dpi=110)
    plt.close(fig)
