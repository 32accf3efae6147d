"""`fwdgrad report SWEEP_DIR`: aggregate every metrics.json below a sweep directory.

Runs are grouped by (dataset, model, mode, quant, method, variant) plus any `--by` keys (metrics fields or
dotted config paths such as lr or train.batch_size); each group shows mean ± std over its
seeds; "quantized zero-shot" is the source model after quantization, before adaptation (= zero-shot for
fp32). "FF − BP" is the group's mean test accuracy minus that of the `bp` runs with the same dataset, model
and mode (whatever their format: the paper compares quantized FF with float BP), in percentage points.
Writes report.md, report.csv and report.png (test accuracy bars with std error bars, the zero-shot accuracy
each group started from as a dashed tick).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .analysis.memory import fmt_bytes
from .files import atomic_open, write_text
from .plots import plot_bars
from .provenance import provenance, provenance_line

KEYS = ("dataset", "model", "mode", "quant", "method", "variant")
FIELDS = (
    "zero_shot_acc",
    "zero_shot_acc_quant",
    "test_acc",
    "steps",
    "forward_passes",
    "wall_s",
    "peak_mem_bytes",
    "train_mem_bytes_model",
)
#: What a metrics.json must hold to be reported (the other FIELDS show as "–" when missing).
REQUIRED = (*KEYS, "seed", "test_acc")


def collect(sweep_dir: str | Path) -> list[dict]:
    """Every metrics.json below sweep_dir (sorted by path)."""
    runs = []
    for path in sorted(Path(sweep_dir).rglob("metrics.json")):
        runs.append(read_metrics(path) | {"path": str(path.parent)})
    return runs


def read_metrics(path: Path) -> dict:
    """One run's metrics.json, checked for the fields a report needs (one-line ValueError naming the file)."""
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{str(path)!r} cannot be read as metrics.json ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED if not isinstance(m, dict) or k not in m]
    if missing:
        raise ValueError(
            f"{str(path)!r} lacks {', '.join(missing)}; allowed: a metrics.json that `fwdgrad run` wrote "
            "(delete or move the file to report the others)"
        )
    return m


def _mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0


def _value(run: dict, key: str):
    """A metrics field, or a dotted path into the resolved config (e.g. train.batch_size)."""
    if key in run:
        return run[key]
    node = run.get("config", {})
    for part in key.split("."):
        node = node.get(part, "") if isinstance(node, dict) else ""
    return node


def aggregate(runs: list[dict], by: tuple[str, ...] = ()) -> list[dict]:
    """One row per group (KEYS + `by`): n, seeds, `<field>_mean`/`<field>_std` and `gap_vs_bp` (points)."""
    keys = KEYS + tuple(by)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(str(_value(r, k)) for k in keys), []).append(r)
    rows = []
    for key, members in sorted(groups.items()):
        row = dict(zip(keys, key)) | {
            "n": len(members),
            "seeds": sorted(m.get("seed") for m in members),
            "synthetic": any(m.get("synthetic") for m in members),
        }
        for f in FIELDS:
            vals = [float(m[f]) for m in members if m.get(f) is not None]
            row[f"{f}_mean"], row[f"{f}_std"] = _mean_std(vals) if vals else (math.nan, math.nan)
        rows.append(row)
    for row in rows:  # BP of the same dataset/model/mode, preferring equal `by` values, fp32, no variant
        bp = [b for b in rows if b["method"] == "bp" and all(b[k] == row[k] for k in KEYS[:3])]
        bp.sort(key=lambda b: (sum(b[k] != row[k] for k in by), b["quant"] != "fp32", b["variant"] != ""))
        gap = bool(bp) and row["method"] != "bp"
        row["gap_vs_bp"] = 100 * (row["test_acc_mean"] - bp[0]["test_acc_mean"]) if gap else math.nan
    return rows


def _pm(mean: float, std: float, scale: float = 100, digits: int = 1) -> str:
    return "–" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown(rows: list[dict], by: tuple[str, ...] = ()) -> str:
    head = (
        "| dataset | model | mode | quant | method | variant | "
        + "".join(f"{k} | " for k in by)
        + "n | zero-shot % | quantized zero-shot % | test % | FF − BP (pts) | forward passes | wall s "
        "| peak mem (measured) | train mem (model) |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        gap = "" if math.isnan(r["gap_vs_bp"]) else f"{r['gap_vs_bp']:+.1f}"
        mem = [
            "–" if math.isnan(r[f"{k}_mean"]) else fmt_bytes(r[f"{k}_mean"])
            for k in ("peak_mem_bytes", "train_mem_bytes_model")
        ]
        dataset = r["dataset"] + (" (synthetic)" if r["synthetic"] else "")
        extra = "".join(f" | {r[k]}" for k in by)
        lines.append(
            f"| {dataset} | {r['model']} | {r['mode']} | {r['quant']} | {r['method']} "
            f"| {r['variant']}{extra} | {r['n']} "
            f"| {_pm(r['zero_shot_acc_mean'], r['zero_shot_acc_std'])} "
            f"| {_pm(r['zero_shot_acc_quant_mean'], r['zero_shot_acc_quant_std'])} "
            f"| {_pm(r['test_acc_mean'], r['test_acc_std'])} | {gap} "
            f"| {r['forward_passes_mean']:,.0f} | {_pm(r['wall_s_mean'], r['wall_s_std'], 1)} "
            f"| {mem[0]} | {mem[1]} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: str | Path) -> None:
    with atomic_open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path: str | Path, by: tuple[str, ...] = ()) -> None:
    """Test accuracy (mean ± std) per (dataset, model, mode), one bar series per method/quant/variant."""
    groups = sorted({(r["dataset"], r["model"], r["mode"]) for r in rows})
    series: dict[str, list] = {}
    start: dict[str, list] = {}
    for r in rows:
        name = " ".join(str(r[k]) for k in ("method", "quant", "variant", *by) if r[k] != "")
        vals = series.setdefault(name, [(math.nan, 0.0)] * len(groups))
        refs = start.setdefault(name, [math.nan] * len(groups))
        i = groups.index((r["dataset"], r["model"], r["mode"]))
        vals[i] = (r["test_acc_mean"], r["test_acc_std"])
        refs[i] = (
            r["zero_shot_acc_quant_mean"]
            if not math.isnan(r["zero_shot_acc_quant_mean"])
            else r["zero_shot_acc_mean"]
        )
    plot_bars(
        ["/".join(g) for g in groups],
        series,
        path,
        reference=start,
        title="test accuracy, mean ± std over seeds (dashes: zero-shot)",
    )


def per_seed(runs: list[dict], by: tuple[str, ...] = ()) -> str:
    """Test accuracy (%) of every run: one row per seed, one column per group (its keys joined by /)."""
    keys = KEYS + tuple(by)
    cells: dict[str, dict] = {}
    for r in runs:
        group = "/".join(str(v) for v in (_value(r, k) for k in keys) if v != "")
        cells.setdefault(group, {})[r.get("seed")] = r.get("test_acc")
    groups = sorted(cells)
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    lines = ["| seed | " + " | ".join(groups) + " |", "|" + "---|" * (len(groups) + 1)]
    for s in seeds:
        vals = ["–" if cells[g].get(s) is None else f"{100 * cells[g][s]:.1f}" for g in groups]
        lines.append(f"| {s} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def sources(runs: list[dict]) -> str:
    """Which code and CPU measured the runs (their metrics.json provenance)."""
    prov = [r.get("provenance") or {} for r in runs]
    commits = sorted({p.get("commit") or "unknown" for p in prov})
    cpus = sorted({p.get("cpu") or "unknown" for p in prov})
    return f"Runs measured at commit {', '.join(commits)} on {', '.join(cpus)}."


def report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    by: tuple[str, ...] = (),
    title: str | None = None,
    command: str | None = None,
) -> str:
    """Aggregate a sweep; write report.md, report.csv and report.png to out (default: sweep_dir).
    `by`: extra grouping keys, metrics fields or dotted config paths (e.g. ("lr", "train.batch_size"));
    `title`: the report's heading; `command`: the command line recorded with the commit and CPU."""
    runs = collect(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no metrics.json below {str(sweep_dir)!r}; allowed: a run or sweep folder")
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs, tuple(by))
    table = markdown(rows, tuple(by))
    text = (
        f"# Report: {title or sweep_dir}\n\n{provenance_line(provenance(command))}\n{sources(runs)}\n\n"
        f"{len(runs)} runs.\n\n{table}\n\n## Per seed (test %)\n\n{per_seed(runs, tuple(by))}\n"
    )
    write_text(out / "report.md", text)
    write_csv(rows, out / "report.csv")
    plot(rows, out / "report.png", tuple(by))
    return table


def main_table(runs: list[dict]) -> str:
    """The main job's comparison table, one row per run."""
    lines = [
        "| run | method | quant | zero-shot % | test % | steps | forward passes | wall s "
        "| peak mem (measured) | train mem (modelled, on device) |",
        "|---" * 10 + "|",
    ]
    for r in runs:
        lines.append(
            f"| {r.get('label', r['method'])} | {r['method']} | {r['quant']} "
            f"| {100 * r['zero_shot_acc']:.1f} | {100 * r['test_acc']:.1f} | {r['steps']} "
            f"| {r['forward_passes']:,} | {r['wall_s']:.1f} | {fmt_bytes(r['peak_mem_bytes'])} "
            f"| {fmt_bytes(r['train_mem_bytes_model'])} |"
        )
    return "\n".join(lines)
