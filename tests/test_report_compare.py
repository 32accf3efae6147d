"""`fwdgrad report`'s comparison with BP: accuracy at BP's steps / forward passes / wall time (from each
run's log.csv), the memory-matched BP, the Pareto front of accuracy against modelled training memory."""

import csv
import math
import re
from pathlib import Path

import pytest

from fwdgrad.cli import main
from fwdgrad.files import write_json
from fwdgrad.report import (
    aggregate,
    collect,
    compare,
    eval_curve,
    memory_matched_bp,
    pareto_front,
    read_log,
    value_at,
)
from fwdgrad.train import write_log

ROOT = Path(__file__).resolve().parents[1]
NAN = math.nan

# --- the pure helpers


def test_value_at_takes_the_last_evaluation_within_the_budget():
    curve = [(0, 0.2), (10, 0.5), (20, 0.7), (30, 0.8)]
    assert value_at(curve, 20) == (0.7, False)  # an evaluation exactly at the budget counts
    assert value_at(curve, 25) == (0.7, False)  # between evaluations: the last one before
    assert value_at(curve, 5) == (0.2, False)  # before the first evaluation: the starting accuracy
    assert value_at(curve, 30) == (0.8, False)
    assert value_at(curve, 45) == (0.8, True)  # stopped before the budget: its final accuracy, marked
    acc, short = value_at(curve[1:], 5)  # no starting accuracy and no evaluation yet
    assert math.isnan(acc) and not short
    acc, short = value_at([], 5)  # no log
    assert math.isnan(acc) and not short


def test_eval_curve_keeps_evaluation_rows_and_prepends_the_start():
    log = [
        {"step": 1.0, "forward_passes": 3.0, "loss": 2.0},
        {"step": 2.0, "forward_passes": 6.0, "loss": 1.5, "test_acc": 0.5},
    ]
    assert eval_curve(log, "forward_passes", start=0.25) == [(0.0, 0.25), (6.0, 0.5)]
    assert eval_curve(log, "step") == [(2.0, 0.5)]
    assert eval_curve(log, "wall_s", start=0.25) == []  # an older log without the column
    assert eval_curve([], "step", start=0.25) == []


def test_pareto_front():
    points = [(100, 0.5), (200, 0.8), (200, 0.7), (50, 0.4), (300, 0.8), (NAN, 0.99), (10, NAN)]
    # (200, 0.7) has more accuracy at the same memory above it; (300, 0.8) the same accuracy for less
    assert pareto_front(points) == [3, 0, 1]
    assert pareto_front([(1, 0.5), (1, 0.5)]) == [0, 1]  # equal points dominate neither
    assert pareto_front([]) == []


def _row(method, mem, acc, quant="fp32", mode="lp"):
    return {
        "dataset": "d",
        "model": "m",
        "mode": mode,
        "quant": quant,
        "method": method,
        "variant": "",
        "train_mem_bytes_model_mean": mem,
        "test_acc_mean": acc,
    }


def test_memory_matched_bp_is_the_best_bp_family_group_that_fits():
    bp, ckpt, fp16 = _row("bp", 2000, 0.9), _row("bp_ckpt", 1200, 0.85), _row("bp_fp16", 1000, 0.87)
    ff, tiny = _row("qzo_ff", 1100, 0.8, "w16a8"), _row("qzo_ff", 500, 0.7, "w8a8")
    other_task = _row("bp", 100, 0.99, mode="ft")
    rows = [bp, ckpt, fp16, ff, tiny, other_task, _row("bp", NAN, 0.95)]
    assert memory_matched_bp(ff, rows) is fp16  # bp_ckpt does not fit; bp_fp16 does
    assert memory_matched_bp(tiny, rows) is None  # none fits (the ft task's BP is not a candidate)
    assert memory_matched_bp(bp, rows) is fp16  # a BP group is matched against the others, not itself
    assert memory_matched_bp(_row("sign_spsa_fp32", 2000, 0.8), rows) is bp


def test_read_log(tmp_path):
    assert read_log(tmp_path / "log.csv") is None
    write_log(str(tmp_path / "log.csv"), [{"step": 1, "forward_passes": 2, "loss": 0.5, "wall_s": 0.1}])
    assert read_log(tmp_path / "log.csv") == [
        {"step": 1.0, "forward_passes": 2.0, "loss": 0.5, "wall_s": 0.1}
    ]
    (tmp_path / "log.csv").write_text("step,loss\n1,abc\n")
    with pytest.raises(ValueError, match=r"cannot be read as log.csv \(ValueError") as e:
        read_log(tmp_path / "log.csv")
    assert "\n" not in str(e.value)


# --- a fake sweep, written with the pipeline's writers (metrics.json: write_json, log.csv: write_log)

#: group -> (steps, forward passes per step, wall s per step, modelled memory, accuracy curves per seed)
GROUPS = {
    ("bp", "fp32"): (30, 3, 0.01, 2_200_000, [(0.6, 0.8, 0.9), (0.5, 0.7, 0.8)]),
    ("bp_ckpt", "fp32"): (30, 4, 0.015, 1_200_000, [(0.5, 0.7, 0.83), (0.5, 0.7, 0.83)]),
    ("qzo_ff", "w16a8"): (60, 6, 0.02, 600_000, [(0.3, 0.4, 0.5, 0.6, 0.7, 0.75)] * 2),
    ("qzo_ff", "w8a8"): (10, 6, 0.02, 300_000, [(0.5,), (0.5,)]),
}


def write_fake_run(
    folder: Path, method: str, quant: str, seed: int, mem: int, accs, steps, fwd, wall, log=True
):
    """One run folder as `fwdgrad run` leaves it: metrics.json and (log=True) log.csv, evaluated every
    steps / len(accs) steps."""
    every = steps // len(accs)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "forward_passes": step * fwd, "loss": 1 / step, "wall_s": round(step * wall, 4)}
        row["compute"] = step * (1 + fwd / 100)  # a linear probe: one pass to the head, the rest at 1% each
        if step % every == 0:
            row["test_acc"] = accs[step // every - 1]
        rows.append(row)
    metrics = {
        "method": method,
        "quant": quant,
        "dataset": "digits",
        "model": "small_cnn",
        "mode": "lp",
        "variant": "",
        "seed": seed,
        "steps": steps,
        "forward_passes": steps * fwd,
        "compute": steps * (1 + fwd / 100),
        "zero_shot_acc": 0.2,
        "zero_shot_acc_quant": 0.2,
        "test_acc": accs[-1],
        "wall_s": rows[-1]["wall_s"],
        "peak_mem_bytes": 2_700_000,
        "train_mem_bytes_model": mem,
        "synthetic": False,
        "provenance": {"commit": "abc123", "cpu": "test CPU"},
    }
    folder.mkdir(parents=True)
    write_json(folder / "metrics.json", metrics)
    if log:
        write_log(str(folder / "log.csv"), rows)


def fake_sweep(root: Path) -> Path:
    """bp, bp_ckpt, qzo_ff w16a8 and w8a8 (stops at 10 steps), 2 seeds each; sign_spsa_fp32 without log.csv
    (an older run); an ft task without BP."""
    for (method, quant), (steps, fwd, wall, mem, curves) in GROUPS.items():
        for seed, accs in enumerate(curves):
            write_fake_run(
                root / f"{method}_{quant}_{seed}", method, quant, seed, mem, accs, steps, fwd, wall
            )
    for seed in (0, 1):
        write_fake_run(
            root / f"zo_{seed}", "sign_spsa_fp32", "fp32", seed, 2_200_000, [0.84], 30, 6, 0.01, False
        )
    write_fake_run(root / "ft" / "0", "qzo_ff", "w16a8", 0, 900_000, [0.6], 10, 6, 0.02)
    (root / "ft" / "0" / "metrics.json").write_text(
        (root / "ft" / "0" / "metrics.json").read_text().replace('"lp"', '"ft"')
    )
    return root


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """The fake sweep reported by the command line: `fwdgrad report SWEEP --out OUT`."""
    sweep = fake_sweep(tmp_path_factory.mktemp("sweep"))
    out = sweep.parent / (sweep.name + "_report")
    assert main(["report", str(sweep), "--out", str(out), "--title", "fake sweep"]) == 0
    return sweep, out


def test_compare_records(reported):
    sweep, _ = reported
    runs = collect(sweep)
    recs = {(r["method"], r["quant"], r["mode"]): r for r in compare(runs, aggregate(runs))}
    assert ("qzo_ff", "w16a8", "ft") not in recs  # no BP in ft: not compared
    bp, ff, short, zo = (
        recs["bp", "fp32", "lp"],
        recs["qzo_ff", "w16a8", "lp"],
        recs["qzo_ff", "w8a8", "lp"],
        recs["sign_spsa_fp32", "fp32", "lp"],
    )
    assert (bp["budget_step"], bp["budget_forward_passes"], bp["budget_wall_s"]) == (30, 90, 0.3)
    assert bp["acc_at_step_mean"] == pytest.approx(0.85)  # BP's own row: its final accuracy
    assert ff["acc_at_step_mean"] == pytest.approx(0.5)  # evaluated at step 30
    assert ff["acc_at_forward_passes_mean"] == pytest.approx(0.3)  # 90 passes = step 15: the step-10 eval
    assert ff["acc_at_wall_s_mean"] == pytest.approx(0.3)  # 0.3 s = step 15
    assert ff["gap_at_step"] == pytest.approx(-35.0) and not ff["short_step"]
    assert short["short_step"] and short["acc_at_step_mean"] == pytest.approx(0.5)
    assert math.isnan(zo["acc_at_step_mean"])  # no log.csv
    assert zo["memory_matched_bp"] == "bp fp32" and zo["gap_vs_memory_matched_bp"] == pytest.approx(-1.0)
    assert bp["memory_matched_bp"] == "bp_ckpt fp32" and ff["memory_matched_bp"] == ""
    pareto = sorted(k[:2] for k, r in recs.items() if r["pareto"])
    assert pareto == [("bp", "fp32"), ("bp_ckpt", "fp32"), ("qzo_ff", "w16a8"), ("qzo_ff", "w8a8")]


def test_report_shows_the_comparison_section(reported):
    _, out = reported
    md = (out / "report.md").read_text()
    main_part, section = md.split("## Comparison with BP")
    assert "| digits | small_cnn | lp | fp32 | bp |  | 2 |" in main_part  # the main table is still there
    assert "## Per seed (test %)" in main_part
    assert "### digits / small_cnn / lp" in section and "/ ft" not in section
    assert "BP reference: bp fp32 (30 steps, 90 forward passes, compute 31, 0.3 s)." in section
    rows = {line.split(" | ")[0][2:]: line for line in section.splitlines() if line.startswith("| ")}
    assert rows["bp fp32"] == (
        "| bp fp32 | 2 | 85.0 ± 7.1 | 85.0 ± 7.1 | 85.0 ± 7.1 | 85.0 ± 7.1 | 85.0 ± 7.1 | 2.20 MB "
        "| bp_ckpt fp32 (1.20 MB) | 83.0 | +2.0 | ◆ |"
    )
    assert rows["qzo_ff w16a8"] == (
        "| qzo_ff w16a8 | 2 | 75.0 ± 0.0 | 50.0 ± 0.0 (-35.0) | 30.0 ± 0.0 (-55.0) | 40.0 ± 0.0 (-45.0) "
        "| 30.0 ± 0.0 (-55.0) | 600.00 kB | none fits | – | – | ◆ |"
    )
    assert "| qzo_ff w8a8 | 2 | 50.0 ± 0.0 | 50.0 ± 0.0 (-35.0) † |" in rows["qzo_ff w8a8"]
    assert rows["sign_spsa_fp32 fp32"] == (
        "| sign_spsa_fp32 fp32 | 2 | 84.0 ± 0.0 | – | – | – | – | 2.20 MB | bp fp32 (2.20 MB) | 85.0 | -1.0 "
        "|  |"
    )
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", section)
    assert links == ["report_memory_digits_small_cnn_lp.png"]
    assert (out / links[0]).stat().st_size > 0 and (out / "report.png").exists()
    assert not (out / "report_memory_digits_small_cnn_ft.png").exists()
    with open(out / "report_compare.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 5 and {"acc_at_forward_passes_mean", "memory_matched_bp", "pareto"} <= set(table[0])


def test_report_without_logs_or_bp(tmp_path):
    """Older runs without log.csv: budget views are "–"; a sweep without BP: no comparison section."""
    write_fake_run(tmp_path / "a", "bp", "fp32", 0, 1000, [0.9], 10, 3, 0.01, log=False)
    write_fake_run(tmp_path / "b", "qzo_ff", "w16a8", 0, 500, [0.8], 10, 6, 0.01, log=False)
    assert main(["report", str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "| qzo_ff w16a8 | 1 | 80.0 ± 0.0 | – | – | – | – | 500 B | none fits | – | – | ◆ |" in md
    no_mem = tmp_path / "no_mem"
    write_fake_run(no_mem / "a", "bp", "fp32", 0, 1000, [0.9], 10, 3, 0.01)
    write_fake_run(no_mem / "b", "qzo_ff", "w16a8", 0, None, [0.8], 10, 6, 0.01)  # no modelled memory
    assert main(["report", str(no_mem)]) == 0
    md = (no_mem / "report.md").read_text()
    # BP's 30 forward passes = FF's step 5 and BP's compute its step 9, before its first evaluation: the
    # accuracy before training
    row = (
        "| qzo_ff w16a8 | 1 | 80.0 ± 0.0 | 80.0 ± 0.0 (-10.0) | 20.0 ± 0.0 (-70.0) | 20.0 ± 0.0 (-70.0) "
        "| 80.0 ± 0.0 (-10.0) "
    )
    assert row + "| – | – | – | – |  |" in md
    only_ff = tmp_path / "only_ff"
    write_fake_run(only_ff / "b", "qzo_ff", "w16a8", 0, 500, [0.8], 10, 6, 0.01)
    assert main(["report", str(only_ff)]) == 0
    assert "Comparison with BP" not in (only_ff / "report.md").read_text()
    assert not list(only_ff.glob("report_memory_*.png")) and not (only_ff / "report_compare.csv").exists()


def test_docs_example_is_the_fixture_report(reported):
    """docs/experiments.md's example of the section is this fixture's report.md, verbatim."""
    _, out = reported
    doc = (ROOT / "docs" / "experiments.md").read_text()
    example = re.search(r"### Comparing with backprop\n.*?```markdown\n(.*?)```", doc, re.S)
    assert example, "docs/experiments.md lacks the example of the comparison section"
    assert example[1] in (out / "report.md").read_text()


def test_by_keys_give_each_group_its_own_reference(tmp_path):
    """With `--by lr`, each group is compared with the BP of its own lr when there is one (as FF − BP)."""
    for lr, acc in ((0.1, 0.9), (0.5, 0.7)):
        write_fake_run(tmp_path / f"bp{lr}", "bp", "fp32", 0, 1000, [acc], 10, 3, 0.01)
        write_fake_run(tmp_path / f"ff{lr}", "qzo_ff", "w16a8", 0, 500, [0.8], 10, 6, 0.01)
    for path in tmp_path.rglob("metrics.json"):
        lr = path.parent.name[-3:]
        path.write_text(path.read_text().replace('"seed": 0', f'"seed": 0, "lr": {lr}'))
    assert main(["report", str(tmp_path), "--by", "lr"]) == 0
    md = (tmp_path / "report.md").read_text()
    assert "BP references: bp fp32 0.1 (10 steps, 30 forward passes, compute 10, 0.1 s); bp fp32 0.5 (" in md
    assert "| qzo_ff w16a8 0.1 | bp fp32 0.1 | 1 | 80.0 ± 0.0 | 80.0 ± 0.0 (-10.0) |" in md
    assert "| qzo_ff w16a8 0.5 | bp fp32 0.5 | 1 | 80.0 ± 0.0 | 80.0 ± 0.0 (+10.0) |" in md
