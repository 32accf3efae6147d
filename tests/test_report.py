"""`fwdgrad report`: aggregation over seeds, the FF − BP gap, Markdown/CSV/PNG outputs."""

import json
import math

import pytest

from fwdgrad.report import aggregate, collect, main_table, report


def write_run(root, name, **kw):
    m = {
        "dataset": "digits",
        "model": "small_cnn",
        "mode": "lp",
        "quant": "fp32",
        "method": "bp",
        "variant": "",
        "seed": 0,
        "steps": 10,
        "forward_passes": 30,
        "zero_shot_acc": 0.2,
        "test_acc": 0.9,
        "wall_s": 1.0,
        "peak_mem_bytes": 1000,
        "train_mem_bytes_model": 2000,
        "synthetic": False,
    } | kw
    (root / name).mkdir(parents=True)
    (root / name / "metrics.json").write_text(json.dumps(m))


@pytest.fixture
def sweep(tmp_path):
    write_run(tmp_path, "0", seed=0, test_acc=0.90)
    write_run(tmp_path, "1", seed=1, test_acc=0.80)
    write_run(
        tmp_path,
        "2",
        seed=0,
        method="qzo_ff",
        quant="w16a8",
        test_acc=0.80,
        forward_passes=60,
        zero_shot_acc_quant=0.19,
    )
    write_run(
        tmp_path,
        "3",
        seed=1,
        method="qzo_ff",
        quant="w16a8",
        test_acc=0.70,
        forward_passes=60,
        zero_shot_acc_quant=0.17,
    )
    write_run(tmp_path, "sub/4", seed=0, method="qzo_ff", quant="w16a8", mode="ft", test_acc=0.5)
    return tmp_path


def test_runs_from_an_imprinted_head_are_their_own_groups_against_bp_from_it(sweep):
    imprint = {"config": {"train": {"head_init": "imprint"}}}
    write_run(sweep, "5", test_acc=0.95, **imprint)
    write_run(sweep, "6", method="qzo_ff", quant="w16a8", test_acc=0.85, **imprint)
    report(sweep)
    rows = {
        (r["method"], r["mode"], r["train.head_init"]): r
        for r in aggregate(collect(sweep), ("train.head_init",))
    }
    assert rows["qzo_ff", "lp", "imprint"]["gap_vs_bp"] == pytest.approx(-10.0)  # against BP from its head
    assert rows["qzo_ff", "lp", ""]["gap_vs_bp"] == pytest.approx(-10.0)  # against BP from the source head
    text = (sweep / "report.md").read_text()
    assert "train.head_init" in text and "| imprint |" in text  # the column joined without --by


def test_aggregate_mean_std_and_gap(sweep):
    rows = {(r["method"], r["mode"]): r for r in aggregate(collect(sweep))}
    bp, ff, ft = rows["bp", "lp"], rows["qzo_ff", "lp"], rows["qzo_ff", "ft"]
    assert bp["n"] == 2 and bp["seeds"] == [0, 1]
    assert bp["test_acc_mean"] == pytest.approx(0.85)
    assert bp["test_acc_std"] == pytest.approx(math.sqrt(0.005))
    assert ff["gap_vs_bp"] == pytest.approx(-10.0)  # FF (w16a8) vs BP (fp32) of the same dataset/model/mode
    assert math.isnan(bp["gap_vs_bp"]) and math.isnan(ft["gap_vs_bp"])  # no BP run in ft mode
    assert ft["n"] == 1 and ft["test_acc_std"] == 0.0


def test_report_writes_table_csv_and_plot(sweep, tmp_path):
    out = tmp_path / "out"
    table = report(sweep, out)
    # zero-shot, quantized zero-shot (mean ± std), test, FF − BP, forward passes
    row = "| qzo_ff |  | 2 | 20.0 ± 0.0 | 18.0 ± 1.4 | 75.0 ± 7.1 | -10.0 | 60 |"
    assert "| digits | small_cnn | lp | w16a8 " + row in table
    assert (out / "report.md").read_text().count("\n| digits") == 3
    assert (out / "report.csv").read_text().startswith("dataset,model,mode,quant,method,variant,n,")
    assert (out / "report.png").stat().st_size > 0


def test_report_empty_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json below"):
        report(tmp_path)


def test_main_table():
    run = {
        "label": "qzo",
        "method": "qzo_ff",
        "quant": "w16a8",
        "zero_shot_acc": 0.25,
        "test_acc": 0.8,
        "steps": 600,
        "forward_passes": 3600,
        "wall_s": 12.34,
        "peak_mem_bytes": 2_000_000,
        "train_mem_bytes_model": 300_000,
    }
    row = "| qzo | qzo_ff | w16a8 | 25.0 | 80.0 | 600 | 3,600 | 12.3 | 2.00 MB | 300.00 kB |"
    assert row in main_table([run])
