"""experiments/vs_bp.py: each forward-only group against BP from its own head, graded within 4x passes."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vs_bp():
    spec = importlib.util.spec_from_file_location("vs_bp", ROOT / "experiments" / "vs_bp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, quant, acc, passes, variant="", head_init=""):
    return {
        "dataset": "fashion_to_digits",
        "mode": "lp",
        "method": method,
        "quant": quant,
        "variant": variant,
        "train.head_init": head_init,
        "n": "3",
        "test_acc_mean": str(acc),
        "test_acc_std": "0.01",
        "forward_passes_mean": str(passes),
        "compute_mean": "1.0",
    }


def test_groups_meet_against_bp_from_their_head_and_only_within_4x_passes(vs_bp):
    rows = [
        _row("bp", "fp32", 0.87, 3000),
        _row("bp", "fp32", 0.88, 3000, "imprint", "imprint"),
        _row("qzo_ff", "w16a8", 0.76, 12000, "median"),
        _row("qzo_ff", "w16a8", 0.84, 12000, "median_imprint", "imprint"),
        _row("qzo_ff", "w16a8", 0.86, 48000, "median_imprint_m48", "imprint"),
    ]
    got = {r["group"]: r for r in vs_bp.goal_rows(rows)}
    variants = ("median", "median_imprint", "median_imprint_m48")
    plain, imprint, m48 = (got[f"qzo_ff w16a8 {v}"] for v in variants)
    assert plain["bp"] == pytest.approx(87.0) and plain["gap"] == pytest.approx(-11.0) and not plain["met"]
    assert imprint["bp"] == pytest.approx(88.0) and imprint["gap"] == pytest.approx(-4.0) and imprint["met"]
    assert m48["passes"] == pytest.approx(16.0) and not m48["within_4x"]
    text = vs_bp.markdown(list(got.values()))
    assert "**no** (missed by 6.0)" in text and "88.0 ± 1.0 (imprint head)" in text
    assert "not counted: over 4x passes (gap within the goal)" in text
