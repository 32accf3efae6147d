"""Hydra configs: every preset and group option composes and validates; bad values fail fast in one line."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from fwdgrad import config as fc
from fwdgrad.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_choices_match_the_code():
    from fwdgrad.data import DATASETS
    from fwdgrad.engine import ENGINE_MODES
    from fwdgrad.ff.optim import qzo_ff, zo_sgd
    from fwdgrad.methods import SCOPES
    from fwdgrad.models import MODELS
    from fwdgrad.train import LR_SCHEDULES, METHODS

    assert fc.DATASETS == DATASETS and set(fc.MODELS) == set(MODELS)
    assert fc.METHODS == METHODS and fc.SCOPES == SCOPES and fc.LR_SCHEDULES == LR_SCHEDULES
    assert fc.ENGINE_MODES == ENGINE_MODES
    from fwdgrad.analysis.landscape import NORMS

    assert fc.NORMS == NORMS
    fixed = {
        "model",
        "params",
        "lr",
        "eps",
        "m",
        "seed",
        "trainable",
        "sparse",
        "estimator",
        "estimator_overrides",
    }
    assert set(fc.FF_OPTIONS["qzo_ff"]) == set(inspect.signature(qzo_ff).parameters) - fixed
    assert (
        set(fc.FF_OPTIONS["zo_sgd"]) - {"difference", "distribution", "z_max"}
        == set(inspect.signature(zo_sgd).parameters) - fixed
    )


def test_presets_exist():
    expected = {
        "fewshot_vision",
        "fewshot_audio",
        "crossdomain_lp",
        "ood",
        "ablation_m",
        "ablation_bits",
        "ablation_distribution",
        "ablation_enhancements",
        "main",
    }
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes(preset):
    cfg = composed(f"experiment={preset}")
    c = fc.validate(cfg)
    assert c.data.name and c.model["name"] in fc.MODELS
    if preset != "main":  # every paper-family preset carries its sweep
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            hcfg = compose("config", overrides=[f"experiment={preset}"], return_hydra_config=True)
        assert hcfg.hydra.sweeper.params


@pytest.mark.parametrize("group", ["data", "model", "method", "quant", "mode", "enhancement"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")):
        extra = {
            "method": {"bp_qat": ["quant=auto"]},
            "quant": {"fp32": ["method=bp"]},
            "mode": {"bias": ["method=bp"]},
        }
        extra = extra.get(group, {})
        extra = extra.get(option, ["method=qzo_ff"] if group == "quant" and option != "auto" else [])
        c = fc.validate(composed(f"{group}={option}", *extra))
        assert c is not None


def test_ood_severity_and_auto_quant():
    c = fc.validate(composed("experiment=ood", "data.severity=easy"))
    assert c.data.name == "fashion_mnist_c_easy" and c.data.target["severity"] == "easy"
    assert c.scheme == "w16a8"
    assert fc.validate(composed("method=bp")).scheme == "fp32"
    assert fc.validate(composed("quant=w8a8", "quant.weight_bits=16")).quant.name == "w16a8"
    assert fc.validate(composed("experiment=ablation_m", "method.m=1")).variant == "m1"
    assert fc.validate(composed("experiment=ood", "method=bp")).lr == 0.1  # method_lr of the preset
    assert fc.validate(composed("experiment=ood", "method=qzo_ff")).lr == 0.01
    assert fc.validate(composed("method=qzo_ff", "method.lr=0.3")).lr == 0.3


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["quant=w16a8", "quant.weight_bits=0"], "quant.weight_bits=0 is invalid; allowed: 8, 16"),
        (["quant=w16a8", "quant.acc_bits=64"], "quant.acc_bits=64 is invalid; allowed: integers 16..48"),
        (["method.m=0"], "method.m=0 is invalid"),
        (["method.eps=0"], "method.eps=0.0 is invalid; allowed: > 0"),
        (["method.eps=-1e-3"], "method.eps=-0.001 is invalid"),
        (["method.lr=0"], "method.lr=0.0 is invalid"),
        (["method=bp", "quant=w16a8"], "which trains a float model"),
        (["train.steps=null"], "exactly one of them"),
        (["mode.sparse_density=0"], "mode.sparse_density=0.0 is invalid"),
        (
            ["train.lr_schedule=step"],
            "train.lr_schedule='step' is invalid; allowed: constant, cosine, linear",
        ),
        (["data.fewshot.n_way=0", "data=fewshot_digits"], "data.fewshot.n_way=0 is invalid"),
        (["+method.ff.bogus=1"], "method.ff.bogus=1 is invalid"),
        (["method.ff.difference=median", "method.m=1"], "method.m=1 is invalid; allowed: integers >= 2"),
        (["train.head_init=means"], "train.head_init='means' is invalid; allowed: source, imprint"),
        (["train.head_init=imprint", "data=fewshot_digits"], "head_init='imprint' is invalid with few-shot"),
        (["+method_lr.sgd=0.1"], "method_lr key='sgd' is invalid"),
        (["experiment=ood", "method_lr.bp=0"], "method_lr.bp=0.0 is invalid"),
    ],
)
def test_validate_rejects(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        fc.validate(composed(*overrides))


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["quant=w16a8", "quant.weight_bits=0"], "quant.weight_bits=0"),
        (["method.m=0"], "method.m=0"),
        (["method.eps=0"], "method.eps=0.0"),
        (["method=nonsense"], "method='nonsense' is invalid; allowed: bp, "),
        (["data_root=/nonexistent/fwdgrad-data"], "data_root='/nonexistent/fwdgrad-data' does not exist"),
        (["method.m=three"], "could not be converted to Integer"),
    ],
)
def test_entry_point_fails_in_one_line(tmp_path, overrides, needle):
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    p = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "run.py"), *overrides, f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr


def test_cli_one_line_folds_messages():
    from hydra.errors import InstantiationException, MissingConfigException

    from fwdgrad.cli import one_line

    e = MissingConfigException("Could not find 'model/x'\n\nAvailable...", "model/x", ["b", "a"])
    assert one_line(e) == "model='x' is invalid; allowed: a, b"
    try:
        try:
            raise FileNotFoundError("Fashion-MNIST not found at /x")
        except FileNotFoundError as cause:
            raise InstantiationException("Error in call to target\nfull_key: data") from cause
    except InstantiationException as e:
        assert one_line(e) == "Fashion-MNIST not found at /x"
