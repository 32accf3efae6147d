"""Ties are diagnosed: every forward-only run records the fraction of perturbation pairs whose two losses
were equal (L+ == L-) per step (log.csv) and over the run (metrics.json), and warns once when more than half
of the pairs tied over the first 10 steps."""

import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from pipeline_runs import run

from fwdgrad.engine import convert
from fwdgrad.ff import qzo_ff
from fwdgrad.ff.optim import TIE_WARN_STEPS, TieWarning
from fwdgrad.models import build_model

TIES = ["progress=false", "train.steps=12", "train.eval_every=12", "train.batch_size=4", "method.m=3"]


def log_column(path, key):
    with open(path) as f:
        return [row[key] for row in csv.DictReader(f)]


def test_random_init_model_at_eps_1e3_ties_and_warns_once(tmp_path):
    """A random-initialised narrow CNN (4 features into the head) at eps=1e-3, w16a8, batch 4: the head's
    perturbation rarely moves an 8-bit logit by one LSB, so most pairs tie; the pretrained digits model at
    eps=1e-2 ties far less."""
    random_init = ["pretrain.steps=0", "model.width=2", "method=qzo_ff", "quant=w16a8", "method.eps=1e-3"]
    with pytest.warns(TieWarning) as caught:
        tied = run(tmp_path, *random_init, out="tied", base=TIES)
    ours = [w for w in caught if issubclass(w.category, TieWarning)]
    assert len(ours) == 1  # once per run
    msg = str(ours[0].message)
    assert "less than one LSB" in msg and "method.eps=1e-2" in msg and "\n" not in msg
    assert tied["tie_fraction"] > 0.5
    column = log_column(tmp_path / "tied" / "log.csv", "tie_fraction")
    assert len(column) == 12 and all(0 <= float(v) <= 1 for v in column)
    assert sum(map(float, column)) / 12 == pytest.approx(tied["tie_fraction"])

    with warnings.catch_warnings():
        warnings.simplefilter("error", TieWarning)  # no warning here
        pretrained = run(
            tmp_path, "method=qzo_ff", "quant=w16a8", "method.eps=1e-2", out="pretrained", base=TIES
        )
    assert pretrained["tie_fraction"] < tied["tie_fraction"]


def test_runs_without_perturbation_pairs_record_none(tmp_path):
    m = run(tmp_path, "method=bp", "pretrain.steps=2", "train.steps=2", base=TIES)
    assert m["tie_fraction"] is None
    assert log_column(tmp_path / "run" / "log.csv", "tie_fraction") == ["", ""]


def test_optimizer_counts_ties_per_step_and_in_total():
    """w8a8 with the paper's scheme, head only: eps_q = round(1e-3 / Δ_w) = 0, so every pair ties (and the
    one warning comes after the 10th step); the counters are part of the optimizer's state_dict."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 5, (16,), generator=g)
    q = convert(build_model("small_cnn", num_classes=5, in_channels=1, width=4).eval(), "w8a8", x)
    head = list(q.weight_nodes())[-1:]
    opt = qzo_ff(q, lr=0.05, eps=1e-3, m=2, trainable=head)
    assert int(opt.space.size_q(0, 1e-3).max()) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(TIE_WARN_STEPS + 2):
            opt.step(lambda: F.cross_entropy(q(x), y))
            assert (opt.last_ties, opt.last_pairs) == (2, 2)
            assert sum(issubclass(w.category, TieWarning) for w in caught) == (step >= TIE_WARN_STEPS - 1)
    assert (opt.ties, opt.pairs, opt.tie_fraction) == (24, 24, 1.0)
    again = qzo_ff(q, lr=0.05, eps=1e-3, m=2, trainable=head)
    again.load_state_dict(opt.state_dict())
    assert (again.ties, again.pairs, again.tie_warned) == (24, 24, True)
