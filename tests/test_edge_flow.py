"""The documented edge flow (docs/edge.md) on a main-job-like model: a short pipeline run of the main job's
qzo_ff arm -> `fwdgrad export` of its model.pt (every option defaults to the run's settings) ->
`python -m fwdgrad.edge finetune` on the run's target data. The device must continue the run, not undo it;
and export refuses, in one line, a run whose options the runtime cannot reproduce."""

import re

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from fwdgrad.cli import main as fwdgrad
from fwdgrad.conf import CONF_DIR
from fwdgrad.edge import Runtime, evaluate, load_bundle
from fwdgrad.edge.__main__ import main as edge
from fwdgrad.export import load_model
from fwdgrad.pipeline.main_job import MAIN_ARMS
from fwdgrad.statefile import load_state, save_state

STEPS = 200  # the main job's qzo_ff arm trains 1000; the edge then fine-tunes 300 more
RUN_OPTIONS = ("trainable", "lr", "eps", "m", "seed", "step", "distribution", "z_max", "rounding")


def pipeline_run(root, name: str, *overrides: str, steps: int = STEPS):
    """One pipeline run of the main job's qzo_ff arm (`steps` steps, `overrides` added); its output dir."""
    from fwdgrad.pipeline import run_experiment

    arm = [o for o in dict(MAIN_ARMS)["qzo_ff_w16a8"] if not o.startswith("train.steps=")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "experiment=main",
                *arm,
                f"train.steps={steps}",
                "progress=false",
                f"cache_dir={root / 'cache'}",
                f"out_dir={root / name}",
                *overrides,
            ],
        )
    run_experiment(cfg)
    return root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("edge_flow")


@pytest.fixture(scope="module")
def run_dir(root):
    return pipeline_run(root, "qzo_ff_w16a8")


def test_model_pt_stores_the_run_settings(run_dir):
    s = load_state(run_dir / "model.pt", "model")["training"]
    assert s["method"] == "qzo_ff" and s["trainable"] == ["_8"]
    assert (s["lr"], s["eps"], s["m"], s["seed"], s["step"], s["batch_size"]) == (
        0.05,
        0.01,
        6,
        0,
        STEPS,
        128,
    )
    assert s["fixed_point"] == {
        "difference": "sign",
        "distribution": "qgaussian",
        "z_max": 3.5,
        "rounding": "nearest",
        "perturb_scale": "one",
        "eps_min_q": 0,
        "weight_headroom": 4,
        "layerwise": "off",
    }
    assert s["unsupported"] == {"momentum": None, "kernel_norm": None, "sharpness_rho": None}


def test_documented_flow_keeps_the_accuracy(run_dir, root, capsys):
    bundle, data = root / "flow.npz", root / "data"
    assert fwdgrad(["export", str(run_dir / "model.pt"), str(bundle), "--data", str(data)]) == 0
    out = capsys.readouterr().out
    for opt in RUN_OPTIONS:  # one line per setting, saying where it came from
        assert re.search(rf"^{opt} +\S.*\(from the run", out, re.M), (opt, out)
    assert "weight_headroom  4  (from the run; already in the weight scales, not re-applied)" in out

    b = load_bundle(bundle)
    q, _ = load_model(run_dir / "model.pt")
    tr = b.training
    assert (tr["trainable"], tr["lr"], tr["eps"], tr["step"]) == (["_8"], 0.05, 0.01, STEPS)
    # the run already multiplied the head's scale by weight_headroom: export must not do it again
    assert tr["tensors"][0]["weight_scale"] == q.weight_nodes()["_8"].w_qp.scale.reshape(-1).tolist()

    test = np.load(data / "test.npz")
    x, y = test["x"], test["y"]
    before, _ = evaluate(Runtime(b), x, y)
    assert before > 0.6, before  # a meaningful model to keep
    steps = str(STEPS + 300)
    args = ["finetune", str(bundle), str(data / "train.npz"), "--steps", steps, "--batch", "128"]
    assert edge([*args, "--log-every", "100", "--eval", str(data / "test.npz")]) == 0
    out = capsys.readouterr().out
    after = float(re.search(r"eval accuracy (\S+)", out).group(1))
    assert load_bundle(bundle).training["step"] == STEPS + 300
    assert after >= before - 0.02, f"edge fine-tuning took test accuracy from {before:.4f} to {after:.4f}"


def test_command_line_overrides_the_run(run_dir, root, capsys):
    path = root / "override.npz"
    argv = [
        "export",
        str(run_dir / "model.pt"),
        str(path),
        "--eps",
        "0.02",
        "--step",
        "0",
        "--rounding",
        "floor",
    ]
    assert fwdgrad(argv) == 0
    out = capsys.readouterr().out
    assert "eps              0.02  (from the command line)" in out
    assert "rounding         floor  (from the command line)" in out
    assert "lr               0.05  (from the run)" in out
    tr = load_bundle(path).training
    assert (tr["eps"], tr["step"], tr["rounding"], tr["lr"]) == (0.02, 0, "floor", 0.05)


def test_bare_qmodel_keeps_the_defaults_and_needs_lr(run_dir, root, capsys):
    """A model file without a run (no config, no training settings, as fwdgrad.export.save_model writes)."""
    bare = root / "bare.pt"
    save_state(bare, "model", load_state(run_dir / "model.pt", "model") | {"config": None, "training": None})
    assert fwdgrad(["export", str(bare), str(root / "bare.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fwdgrad export: error: --lr is required") and "\n" not in err
    assert not (root / "bare.npz").exists()
    assert fwdgrad(["export", str(bare), str(root / "bare.npz"), "--lr", "0.05"]) == 0
    assert "eps              0.001  (default)" in capsys.readouterr().out
    tr = load_bundle(root / "bare.npz").training
    assert (tr["eps"], tr["m"], tr["step"], len(tr["trainable"])) == (1e-3, 3, 0, 3)


@pytest.mark.parametrize(
    "option, value, named",
    [
        ("momentum", {"alpha": 0.5, "beta": 0.5, "warmup": 10}, "momentum="),
        ("kernel_norm", True, "kernel_norm=True"),
        ("sharpness_rho", 0.01, "sharpness_rho=0.01"),
        ("scope", "sparse", "mode=sparse"),
        ("lr_schedule", "cosine", "lr_schedule='cosine'"),
    ],
)
def test_export_refuses_what_the_runtime_cannot_reproduce(run_dir, root, capsys, option, value, named):
    obj = load_state(run_dir / "model.pt", "model")
    s = obj["training"]
    if option in s["unsupported"]:
        s["unsupported"][option] = value
    else:
        s[option] = value
        s["sparse"] = {"kind": "topk", "density": 0.1} if value == "sparse" else None
    ckpt, out = root / f"{option}.pt", root / f"{option}.npz"
    save_state(ckpt, "model", obj)
    assert fwdgrad(["export", str(ckpt), str(out), "--data", str(root / f"{option}_data")]) == 2
    std = capsys.readouterr()
    err = std.err.strip()
    assert err.startswith("fwdgrad export: error: the run trained with ") and "\n" not in err, err
    assert named in err and "the edge runtime cannot reproduce" in err and "--ignore-unsupported" in err
    assert std.out == "" and not out.exists() and not (root / f"{option}_data").exists()
    assert fwdgrad(["export", str(ckpt), str(out), "--ignore-unsupported"]) == 0
    assert f"ignored (--ignore-unsupported): {named}" in capsys.readouterr().out and out.exists()


def test_median_run_exports_its_difference_and_old_runs_mean_sign(root, run_dir, capsys):
    """A run with the median difference carries it into the bundle, and the numpy runtime continues it; a
    model.pt saved before the difference was recorded exports as sign (what it trained with)."""
    d = pipeline_run(root, "median", "method.m=4", "method.ff.difference=median", steps=3)
    assert fwdgrad(["export", str(d / "model.pt"), str(root / "median.npz"), "--data", str(root / "md")]) == 0
    assert re.search(r"^difference +median +\(from the run", capsys.readouterr().out, re.M)
    assert load_bundle(root / "median.npz").training["difference"] == "median"
    args = ["finetune", str(root / "median.npz"), str(root / "md" / "train.npz"), "--steps", "5"]
    assert edge([*args, "--batch", "32"]) == 0
    assert load_bundle(root / "median.npz").training["step"] == 5
    old = load_state(run_dir / "model.pt", "model")
    del old["training"]["fixed_point"]["difference"]
    save_state(root / "old.pt", "model", old)
    assert fwdgrad(["export", str(root / "old.pt"), str(root / "old.npz")]) == 0
    assert re.search(r"^difference +sign +\(from the run", capsys.readouterr().out, re.M)
    assert load_bundle(root / "old.npz").training["difference"] == "sign"


def test_perturbed_outputs_run_exports_and_continues_on_the_runtime(root, run_dir, capsys):
    """A run with perturbed outputs carries them (and its central difference) into the bundle, the numpy
    runtime continues it, and `--perturb weights` falls back to sign-m-SPSA on the weights."""
    d = pipeline_run(
        root, "outputs", "method.m=2", "method.ff.perturb=outputs", "method.ff.difference=central", steps=3
    )
    assert (
        fwdgrad(["export", str(d / "model.pt"), str(root / "outputs.npz"), "--data", str(root / "od")]) == 0
    )
    shown = capsys.readouterr().out
    assert re.search(r"^perturb +outputs +\(from the run", shown, re.M)
    assert re.search(r"^difference +central +\(from the run", shown, re.M)
    tr = load_bundle(root / "outputs.npz").training
    assert (tr["target"], tr["difference"], tr["outputs"]["eps_q"]) == ("outputs", "central", 1)
    args = ["finetune", str(root / "outputs.npz"), str(root / "od" / "train.npz"), "--steps", "5"]
    assert edge([*args, "--batch", "32"]) == 0
    assert load_bundle(root / "outputs.npz").training["step"] == 5
    out = root / "outputs_w.npz"
    assert fwdgrad(["export", str(d / "model.pt"), str(out), "--perturb", "weights"]) == 0
    assert (
        "difference       sign  (default: the run's 'central' needs --perturb outputs)"
        in capsys.readouterr().out
    )
    assert (load_bundle(out).training["target"], load_bundle(out).training["difference"]) == (
        "weights",
        "sign",
    )


def test_real_run_with_enhancements_is_refused(root, run_dir, capsys):
    """A pipeline run with sharpness-aware probes and kernel-wise normalization (the source model is cached
    by run_dir): model.pt records both, and export names both."""
    d = pipeline_run(root, "sharp", "enhancement=sharpness_kernel_norm", steps=2)
    assert fwdgrad(["export", str(d / "model.pt"), str(root / "sharp.npz")]) == 2
    err = capsys.readouterr().err.strip()
    assert "kernel_norm=True" in err and "sharpness_rho=0.01" in err and "\n" not in err, err
    assert not (root / "sharp.npz").exists()
