"""Plots (matplotlib, Agg backend, PNG): training curves and method comparisons."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter  # noqa: E402

from .files import save_figure  # noqa: E402


def plot_curves(logs: dict[str, list[dict]], path: str | Path, title: str = "", x: str = "step") -> None:
    """Loss and test accuracy against `x` ("step" or "forward_passes"), one line per named log."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, log in logs.items():
        ax_loss.plot([r[x] for r in log], [r["loss"] for r in log], label=name, lw=1)
        evals = [r for r in log if r.get("test_acc") not in (None, "")]
        ax_acc.plot([r[x] for r in evals], [r["test_acc"] for r in evals], marker="o", ms=3, label=name)
    label = x.replace("_", " ")
    ax_loss.set(xlabel=label, ylabel="training loss", title="loss")
    ax_acc.set(xlabel=label, ylabel="test accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_bars(
    groups: list[str],
    series: dict[str, list[tuple[float, float]]],
    path: str | Path,
    ylabel: str = "test accuracy",
    title: str = "",
    reference: dict[str, list[float]] | None = None,
) -> None:
    """Grouped bar chart with error bars: `series[name][i]` = (mean, std) of that series in groups[i]
    (NaN mean: no bar). `reference[name][i]`, when given, is drawn as a black tick across that bar (e.g.
    the zero-shot accuracy the run started from)."""
    n = max(1, len(series))
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, n / 2)), 4.5))
    for j, (name, values) in enumerate(series.items()):
        xs = [i + (j - (n - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, [v[0] for v in values], width, yerr=[v[1] for v in values], capsize=3, label=name)
        for x, r in zip(xs, (reference or {}).get(name, [])):
            ax.hlines(
                r,
                x - width / 2,
                x + width / 2,
                colors="black",
                linestyles="--",
                linewidth=1.5,
                label="zero-shot" if j == 0 and x == xs[0] else None,
            )
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def plot_memory_accuracy(
    labels: list[str],
    memory: list[float],
    acc: list[tuple[float, float]],
    front: list[int],
    path: str | Path,
    title: str = "",
) -> None:
    """Accuracy against modelled on-device training memory (log x): one labelled point per group,
    `acc[i]` = (mean, std) drawn as an error bar; the points whose indices are in `front` (the Pareto
    front) are ringed and joined in order of memory."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (label, x, (mean, std)) in enumerate(zip(labels, memory, acc)):
        ax.errorbar(x, mean, yerr=std, fmt="o", capsize=3, ms=5)
        below = sum(memory[j] == x for j in range(i))  # labels of points at the same memory stack downwards
        ax.annotate(label, (x, mean), textcoords="offset points", xytext=(5, 4 - 11 * below), fontsize=8)
    order = sorted(front, key=lambda i: memory[i])
    if order:
        xs, ys = [memory[i] for i in order], [acc[i][0] for i in order]
        ax.plot(xs, ys, "--", color="black", lw=1, zorder=0)
        ax.scatter(xs, ys, s=160, facecolors="none", edgecolors="red", lw=1.5, label="Pareto front")
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.15)
    ax.set(xlabel="training memory (modelled, on device)", ylabel="test accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)
