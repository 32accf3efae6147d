"""`fwdgrad report SWEEP_DIR`: aggregate every metrics.json below a sweep directory.

Runs are grouped by (dataset, model, mode, quant, method, variant) plus any `--by` keys (metrics fields or
dotted config paths such as lr or train.batch_size); each group shows mean ± std over its
seeds; "quantized zero-shot" is the source model after quantization, before adaptation (= zero-shot for
fp32). "FF − BP" is the group's mean test accuracy minus that of the `bp` runs with the same dataset, model
and mode (whatever their format: the paper compares quantized FF with float BP), in percentage points.
Writes report.md, report.csv and report.png (test accuracy bars with std error bars, the zero-shot accuracy
each group started from as a dashed tick).

Each dataset/model/mode with a `bp` group also gets a "Comparison with BP" section (`compare`): every group's
accuracy at that BP's steps, forward passes and training wall time (from each run's log.csv), the
memory-matched BP (the most accurate BP-family group whose modelled training memory fits in the group's), and
the Pareto front of accuracy against modelled memory; its numbers go to report_compare.csv and one plot per
task to report_memory_<dataset>_<model>_<mode>.png.
"""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

from .analysis.memory import fmt_bytes
from .files import atomic_open, write_text
from .plots import plot_bars, plot_memory_accuracy
from .provenance import provenance, provenance_line

KEYS = ("dataset", "model", "mode", "quant", "method", "variant")
FIELDS = (
    "zero_shot_acc",
    "zero_shot_acc_quant",
    "test_acc",
    "steps",
    "forward_passes",
    "compute",
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


def _group_key(run: dict, keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(str(_value(run, k)) for k in keys)


def aggregate(runs: list[dict], by: tuple[str, ...] = ()) -> list[dict]:
    """One row per group (KEYS + `by`): n, seeds, `<field>_mean`/`<field>_std` and `gap_vs_bp` (points)."""
    keys = KEYS + tuple(by)
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(_group_key(r, keys), []).append(r)
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
    for row in rows:
        bp = reference_bp(row, rows, by)
        gap = bp is not None and row["method"] != "bp"
        row["gap_vs_bp"] = 100 * (row["test_acc_mean"] - bp["test_acc_mean"]) if gap else math.nan
    return rows


def reference_bp(row: dict, rows: list[dict], by: tuple[str, ...] = ()) -> dict | None:
    """The `bp` group row is compared with: same dataset/model/mode, preferring equal `by` values, then
    fp32, then no variant; None when the task has no `bp` group."""
    bp = [b for b in rows if b["method"] == "bp" and all(b[k] == row[k] for k in KEYS[:3])]
    bp.sort(key=lambda b: (sum(b[k] != row[k] for k in by), b["quant"] != "fp32", b["variant"] != ""))
    return bp[0] if bp else None


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


#: The equal-budget views: log.csv column -> the metrics.json field holding a run's total of it.
BUDGETS = {"step": "steps", "forward_passes": "forward_passes", "compute": "compute", "wall_s": "wall_s"}
BUDGET_NAMES = {
    "step": "steps",
    "forward_passes": "forward passes",
    "compute": "compute",  # MAC-weighted forward-pass equivalents (fwdgrad.train)
    "wall_s": "wall time",
}


def read_log(path: str | Path) -> list[dict] | None:
    """A run's log.csv as rows of floats (empty cells dropped); None when there is none (older runs)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        return [{k: float(v) for k, v in r.items() if k and v not in ("", None)} for r in rows]
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, csv.Error, ValueError, TypeError) as e:
        raise ValueError(f"{str(path)!r} cannot be read as log.csv ({type(e).__name__}: {e})") from None


def eval_curve(log: list[dict], x: str, start: float | None = None) -> list[tuple[float, float]]:
    """(x, test accuracy) at each evaluation in a log (rows with test_acc), preceded by (0, start) when the
    accuracy before training is given; [] when the log is empty or has no column x."""
    if not log or x not in log[-1]:
        return []
    points = [(r[x], r["test_acc"]) for r in log if "test_acc" in r and x in r]
    return ([(0.0, start)] if start is not None else []) + points


def value_at(curve: list[tuple[float, float]], budget: float) -> tuple[float, bool]:
    """The accuracy at `budget` on an eval curve (x ascending): that of the last point with x ≤ budget (NaN
    when there is none), and whether the run stopped short of the budget (its last x < budget)."""
    within = [acc for x, acc in curve if x <= budget]
    return (within[-1] if within else math.nan), bool(curve) and curve[-1][0] < budget


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (memory, accuracy) points on the Pareto front, by increasing memory: those that no
    other point dominates (memory ≤ and accuracy ≥, one of them strictly); a point with a NaN is not on it."""
    ok = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]

    def dominated(i: int) -> bool:
        (m, a) = points[i]
        return any(points[j][0] <= m and points[j][1] >= a and points[j] != points[i] for j in ok)

    return sorted((i for i in ok if not dominated(i)), key=lambda i: points[i])


def memory_matched_bp(row: dict, rows: list[dict]) -> dict | None:
    """The most accurate BP-family group (method name starting with "bp": bp, bp_ckpt, bp_qat, ...) of
    row's dataset/model/mode, row itself excluded, whose modelled training memory is ≤ row's; None when none
    fits."""
    mem = row["train_mem_bytes_model_mean"]
    fits = [
        b
        for b in rows
        if b is not row
        and b["method"].startswith("bp")
        and all(b[k] == row[k] for k in KEYS[:3])
        and b["train_mem_bytes_model_mean"] <= mem
    ]
    return max(fits, key=lambda b: b["test_acc_mean"], default=None)


def _label(row: dict, by: tuple[str, ...] = ()) -> str:
    return " ".join(str(row[k]) for k in ("method", "quant", "variant", *by) if row[k] != "")


def _start(run: dict) -> float | None:
    """The run's accuracy before training: quantized zero-shot, else zero-shot, else None."""
    for k in ("zero_shot_acc_quant", "zero_shot_acc"):
        if run.get(k) is not None:
            return float(run[k])
    return None


def compare(runs: list[dict], rows: list[dict], by: tuple[str, ...] = ()) -> list[dict]:
    """One record per group of each dataset/model/mode that has a `bp` group: the group's accuracy at its
    reference BP's (`reference_bp`) mean steps, forward passes and wall time (per run `value_at` on its
    log.csv, then mean ± std over runs; NaN when a run has no log; the reference's own value is its final
    accuracy), the gap to that BP's final accuracy, the memory-matched BP, and whether it is on the task's
    Pareto front of (modelled training memory, test accuracy)."""
    keys = KEYS + tuple(by)
    members: dict[tuple, list[dict]] = {}
    for r in runs:
        members.setdefault(_group_key(r, keys), []).append(r)
    logs = {r["path"]: read_log(Path(r["path"]) / "log.csv") for r in runs}
    records = []
    for task in sorted({tuple(r[k] for k in KEYS[:3]) for r in rows}):
        group = [r for r in rows if tuple(r[k] for k in KEYS[:3]) == task]
        if not any(r["method"] == "bp" for r in group):
            continue
        front = pareto_front([(r["train_mem_bytes_model_mean"], r["test_acc_mean"]) for r in group])
        for i, row in enumerate(group):
            ref = reference_bp(row, rows, by)
            rec = {k: row[k] for k in keys} | {
                "label": _label(row, by),
                "n": row["n"],
                "reference": _label(ref, by),
                "test_acc_mean": row["test_acc_mean"],
                "test_acc_std": row["test_acc_std"],
            }
            for x, field in BUDGETS.items():
                budget = ref[f"{field}_mean"]
                if row is ref:
                    mean, std, short = row["test_acc_mean"], row["test_acc_std"], False
                else:
                    got = [
                        value_at(eval_curve(logs[m["path"]] or [], x, _start(m)), budget)
                        for m in members[tuple(row[k] for k in keys)]
                    ]
                    accs = [a for a, _ in got]
                    mean, std = (math.nan, math.nan) if any(map(math.isnan, accs)) else _mean_std(accs)
                    short = any(s for _, s in got)
                rec |= {
                    f"budget_{x}": budget,
                    f"acc_at_{x}_mean": mean,
                    f"acc_at_{x}_std": std,
                    f"short_{x}": short,
                    f"gap_at_{x}": 100 * (mean - ref["test_acc_mean"]),
                }
            matched = memory_matched_bp(row, rows)
            rec |= {
                "train_mem_bytes_model": row["train_mem_bytes_model_mean"],
                "memory_matched_bp": _label(matched, by) if matched else "",
                "memory_matched_bp_mem": matched["train_mem_bytes_model_mean"] if matched else math.nan,
                "memory_matched_bp_acc": matched["test_acc_mean"] if matched else math.nan,
                "gap_vs_memory_matched_bp": (
                    100 * (row["test_acc_mean"] - matched["test_acc_mean"]) if matched else math.nan
                ),
                "pareto": i in front,
            }
            records.append(rec)
    return records


def _task(rec: dict) -> tuple[str, str, str]:
    return tuple(rec[k] for k in KEYS[:3])


def memory_plot_name(task: tuple[str, ...]) -> str:
    """The file name of a task's accuracy-against-memory plot, e.g. report_memory_digits_small_cnn_lp.png."""
    return "report_memory_" + re.sub(r"[^A-Za-z0-9._-]+", "_", "_".join(task)) + ".png"


def _budget_text(x: str, value: float) -> str:
    if math.isnan(value):
        return f"– {BUDGET_NAMES[x]}"
    if x == "compute":
        return f"compute {value:,.0f}"
    return f"{value:.3g} s" if x == "wall_s" else f"{value:,.0f} {BUDGET_NAMES[x]}"


COMPARE_INTRO = """\
## Comparison with BP

Every group of a dataset / model / mode that has a `bp` group, against BP (the `bp` group of the FF − BP
column). **At BP's steps / forward passes / compute / wall time**: each run's test accuracy at its last
evaluation in log.csv within that BP's mean training steps, forward passes, compute (forward-pass equivalents
weighted by multiply-accumulates: a pass over the head alone costs the head's share) or training wall time
(before its first evaluation: its accuracy before training), then mean ± std over seeds; in brackets the
difference from BP's final test accuracy (points); † a run stopped before the budget (its final accuracy
counts); – a run has no log.csv. BP's own row is its final accuracy. **Memory-matched BP**: the most
accurate BP-family group (method bp, bp_ckpt, bp_qat, bp_fp16, ...) whose modelled on-device training memory
is at most the group's; "none fits" when none is that small. **Pareto**: ◆ when no other group has less or
equal memory and higher or equal accuracy (one of them strictly).
"""


def compare_markdown(records: list[dict]) -> str:
    """The comparison section of report.md: per task, its references, a table and its memory plot's link."""
    parts = [COMPARE_INTRO.strip()]
    for task in sorted({_task(r) for r in records}):
        recs = [r for r in records if _task(r) == task]
        refs = {r["reference"]: r for r in recs}
        budgets = "; ".join(
            f"{name} ({', '.join(_budget_text(x, r[f'budget_{x}']) for x in BUDGETS)})"
            for name, r in refs.items()
        )
        many = len(refs) > 1
        head = (
            f"| group | {'BP reference | ' if many else ''}n | test % | "
            + "".join(f"at BP's {name} | " for name in BUDGET_NAMES.values())
            + "train mem (model) | memory-matched BP | its test % | − it (pts) | Pareto |"
        )
        lines = [head, "|" + "---|" * (head.count("|") - 1)]
        for r in recs:
            cells = []
            for x in BUDGETS:
                cell = _pm(r[f"acc_at_{x}_mean"], r[f"acc_at_{x}_std"])
                if r["label"] != r["reference"] and not math.isnan(r[f"gap_at_{x}"]):
                    cell += f" ({r[f'gap_at_{x}']:+.1f})"
                cells.append(cell + (" †" if r[f"short_{x}"] else ""))
            mem = r["train_mem_bytes_model"]
            matched = r["memory_matched_bp"]
            lines.append(
                f"| {r['label']} | " + (f"{r['reference']} | " if many else "") + f"{r['n']} "
                f"| {_pm(r['test_acc_mean'], r['test_acc_std'])} | {' | '.join(cells)} "
                f"| {'–' if math.isnan(mem) else fmt_bytes(mem)} "
                + (
                    f"| {matched} ({fmt_bytes(r['memory_matched_bp_mem'])}) "
                    f"| {100 * r['memory_matched_bp_acc']:.1f} | {r['gap_vs_memory_matched_bp']:+.1f} "
                    if matched
                    else f"| {'–' if math.isnan(mem) else 'none fits'} | – | – "
                )
                + f"| {'◆' if r['pareto'] else ''} |"
            )
        parts += [
            f"### {' / '.join(task)}",
            f"BP reference{'s' if many else ''}: {budgets}.",
            "\n".join(lines),
            f"![test accuracy against modelled training memory, {'/'.join(task)}]({memory_plot_name(task)})",
        ]
    return "\n\n".join(parts) + "\n"


def plot_memory(records: list[dict], out: str | Path) -> list[Path]:
    """One accuracy-against-memory plot per task (`memory_plot_name`) in out; the paths written."""
    paths = []
    for task in sorted({_task(r) for r in records}):
        recs = [r for r in records if _task(r) == task and not math.isnan(r["train_mem_bytes_model"])]
        path = Path(out) / memory_plot_name(task)
        plot_memory_accuracy(
            [r["label"] for r in recs],
            [r["train_mem_bytes_model"] for r in recs],
            [(r["test_acc_mean"], r["test_acc_std"]) for r in recs],
            [i for i, r in enumerate(recs) if r["pareto"]],
            path,
            f"{'/'.join(task)}: test accuracy (mean ± std) against modelled training memory",
        )
        paths.append(path)
    return paths


def with_head_init(runs: list[dict], by: tuple[str, ...]) -> tuple[str, ...]:
    """`by` plus train.head_init when any run started from an imprinted head: runs from different starting
    heads are different groups, and each is compared with the BP group that started from its head."""
    imprinted = any(_value(r, "train.head_init") not in ("", "source") for r in runs)
    return (*by, "train.head_init") if imprinted and "train.head_init" not in by else by


def report(
    sweep_dir: str | Path,
    out: str | Path | None = None,
    by: tuple[str, ...] = (),
    title: str | None = None,
    command: str | None = None,
) -> str:
    """Aggregate a sweep; write report.md, report.csv and report.png to out (default: sweep_dir).
    `by`: extra grouping keys, metrics fields or dotted config paths (e.g. ("lr", "train.batch_size"); with
    runs from an imprinted head, train.head_init joins them, `with_head_init`);
    `title`: the report's heading; `command`: the command line recorded with the commit and CPU."""
    runs = collect(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no metrics.json below {str(sweep_dir)!r}; allowed: a run or sweep folder")
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    by = with_head_init(runs, tuple(by))
    rows = aggregate(runs, by)
    table = markdown(rows, tuple(by))
    text = (
        f"# Report: {title or sweep_dir}\n\n{provenance_line(provenance(command))}\n{sources(runs)}\n\n"
        f"{len(runs)} runs.\n\n{table}\n\n## Per seed (test %)\n\n{per_seed(runs, tuple(by))}\n"
    )
    records = compare(runs, rows, tuple(by))
    if records:
        text += "\n" + compare_markdown(records)
    write_text(out / "report.md", text)
    write_csv(rows, out / "report.csv")
    plot(rows, out / "report.png", tuple(by))
    if records:
        write_csv(records, out / "report_compare.csv")
        plot_memory(records, out)
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
