"""End-to-end pipeline runs of every experiment preset on tiny settings, metrics.json contract, source cache,
device check, the main job and a 2-job joblib sweep + report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_runs import TINY, run

from fwdgrad.conf import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
METRICS_FIELDS = (
    "method",
    "quant",
    "dataset",
    "model",
    "mode",
    "seed",
    "steps",
    "forward_passes",
    "zero_shot_acc",
    "test_acc",
    "wall_s",
    "peak_mem_bytes",
    "train_mem_bytes_model",
    "config",
    "synthetic",
)
PER_PRESET = {
    "fewshot_vision": ["data.fewshot.episodes=2", "data.max_train=null", "data.max_test=null"],
    "fewshot_audio": [
        "data.fewshot.episodes=2",
        "data.fewshot.n_query=1",
        "data.source.clips_per_word=4",
        "data.target.clips_per_word=2",
        "model.channels=8",
        "model.blocks=1",
    ],
    "ood": ["data.target.corruption=gaussian_noise", "model.width=0.25"],
    "crossdomain_lp": ["model.width=0.25"],
}
TINY_TRANSFORMER = ["model.depth=1", "model.hidden_dim=16", "model.heads=2", "mode.prompts=2"]
PER_PRESET |= {
    "ood_vit": ["data.target.corruption=gaussian_noise", *TINY_TRANSFORMER],
    "crossdomain_vit": TINY_TRANSFORMER,
    "fewshot_audio_ast": [
        *(o for o in PER_PRESET["fewshot_audio"] if not o.startswith("model.")),
        *TINY_TRANSFORMER,
    ],
}
PRESETS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def need_data(preset):
    if preset in ("ood", "crossdomain_lp", "ood_vit", "crossdomain_vit"):
        from fwdgrad.data import DEBIAN_FASHION_DIR, default_root

        if not (Path(DEBIAN_FASHION_DIR).is_dir() or (default_root() / "FashionMNIST").is_dir()):
            pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    if preset.startswith("fewshot_audio"):
        from fwdgrad.data.espeak import EspeakUnavailable, list_voices

        try:
            list_voices()
        except EspeakUnavailable as e:
            pytest.skip(f"eSpeak NG unavailable: {e}")


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_end_to_end(tmp_path, preset):
    need_data(preset)
    m = run(tmp_path, f"experiment={preset}", *PER_PRESET.get(preset, []))
    for k in METRICS_FIELDS:
        assert k in m, k
    assert 0 <= m["zero_shot_acc"] <= 1 and 0 <= m["test_acc"] <= 1
    assert m["steps"] == 2 and m["forward_passes"] > 0
    assert m["peak_mem_bytes"] > 0 and m["train_mem_bytes_model"] > 0
    assert m["synthetic"] == preset.startswith("fewshot_audio")
    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text())["test_acc"] == m["test_acc"]
    for f in ("log.csv", "curves.png"):
        assert (out / f).stat().st_size > 0
    if "fewshot" not in preset:
        assert (out / "checkpoint.pt").exists() and (out / "model.pt").exists()


def test_metrics_and_source_cache(tmp_path):
    a = run(tmp_path, "method=bp", out="a")
    b = run(tmp_path, "method=qzo_ff", "quant=w16a8", out="b")
    assert not a["source_cached"] and b["source_cached"] and a["source_acc"] == b["source_acc"]
    assert a["zero_shot_acc"] == b["zero_shot_acc"]  # the same cached source model, same target data
    assert (a["quant"], b["quant"], b["forward_passes"], a["forward_passes"]) == ("fp32", "w16a8", 12, 6)
    assert a["memory"]["method"] == "bp" and b["memory"]["method"] == "ff" and b["memory"]["fmt"] == "w16a8"
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 1
    c = run(tmp_path, "method=bp", "pretrain.lr=1e-3", out="c")  # another source config: another model
    assert not c["source_cached"] and len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 2


def test_imprinted_head_starts_every_method_from_the_class_means(tmp_path):
    a = run(tmp_path, "method=bp", out="a")
    b = run(tmp_path, "method=bp", "train.head_init=imprint", out="b")
    c = run(tmp_path, "method=qzo_ff", "train.head_init=imprint", out="c")
    assert a["head_init_passes"] == 0 and b["head_init_passes"] == c["head_init_passes"] >= 1
    assert b["zero_shot_acc"] == c["zero_shot_acc"] > a["zero_shot_acc"]  # the source head knows 0-4
    assert b["config"]["train"]["head_init"] == "imprint"


@pytest.mark.parametrize(
    "enhancement", ["momentum", "sharpness", "sparse", "kernel_norm", "sharpness_kernel_norm"]
)
def test_enhancements_run(tmp_path, enhancement):
    m = run(tmp_path, "experiment=ablation_enhancements", f"enhancement={enhancement}")
    assert m["variant"] == enhancement
    assert m["mode"] == ("sparse" if enhancement == "sparse" else "ft")


def test_device_check_stops_before_training(tmp_path):
    from fwdgrad.analysis.devices import DeviceDoesNotFit

    with pytest.raises(DeviceDoesNotFit, match="does not fit on mcu_m7"):
        run(tmp_path, "device=mcu_m7", "model=resnet8", "method=bp_qat", "mode=ft")
    assert not (tmp_path / "run" / "log.csv").exists() and not (tmp_path / "cache").exists()
    m = run(tmp_path, "device=mcu_m7", "train.batch_size=8")
    assert "fits on mcu_m7" in m["device_fit"]


def test_main_job_tiny(tmp_path, capsys):
    from fwdgrad.cli import main

    assert main(["main", "--out", str(tmp_path / "main"), *TINY, f"cache_dir={tmp_path / 'cache'}"]) == 0
    res = json.loads((tmp_path / "main" / "results.json").read_text())
    labels = [
        "bp_fp32",
        "bp_w16a8",
        "zo_fp32",
        "qzo_ff_w16a8",
        "qzo_ff_w16a8_median",
        "qzo_ff_w16a8_outputs",
        "qzo_ff_w16a8_median_m48",
    ]
    assert [r["label"] for r in res["runs"]] == labels
    assert [r["quant"] for r in res["runs"]] == ["fp32", "w16a8", "fp32", "w16a8", "w16a8", "w16a8", "w16a8"]
    passes = [2 * 12, 2 * 12, 2 * 12]  # 2 tiny steps, 12 passes each
    assert [r["forward_passes"] for r in res["runs"]][3:6] == passes
    assert "| qzo_ff_w16a8 | qzo_ff | w16a8 |" in capsys.readouterr().out
    for f in ("results.md", "curves_step.png", "curves_forward_passes.png"):
        assert (tmp_path / "main" / f).exists()


def test_joblib_multirun_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"FWDGRAD_CACHE": str(tmp_path)}
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "run.py"),
            "-m",
            "hydra/launcher=local",
            "experiment=main",
            "method=bp",
            "seed=0,1",
            "pretrain.seed=0",
            *TINY,
            f"hydra.sweep.dir={sweep}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(p.parent.name for p in sweep.rglob("metrics.json")) == ["0", "1"]
    from fwdgrad.cli import main

    assert main(["report", str(sweep)]) == 0
    md = (sweep / "report.md").read_text()
    assert "| digits | small_cnn | lp | fp32 | bp |  | 2 |" in md
    assert (sweep / "report.csv").exists() and (sweep / "report.png").exists()


def test_cli_memory_and_usage(capsys):
    from fwdgrad.cli import main

    assert main(["memory", "small_cnn", "--input-shape", "1", "1", "8", "8", "--num-classes", "5"]) == 0
    assert "| w16a8 |" in capsys.readouterr().out
    assert main(["bogus"]) == 2 and "fwdgrad run" in capsys.readouterr().err
    assert main(["--help"]) == 0


@pytest.mark.parametrize(
    "method, mode",
    [(m, "ft") for m in ("bp", "bp_fp16", "bp_bf16", "bp_qat", "zo_fp32", "sign_spsa_fp32", "qzo_ff", "jvp")]
    + [("bp", "sparse"), ("qzo_ff", "sparse")],
)
def test_every_method_and_mode(tmp_path, method, mode):
    m = run(tmp_path, f"method={method}", f"mode={mode}", "pretrain.seed=0")
    assert m["method"] == method and m["mode"] == mode and m["steps"] == 2
    assert m["quant"] == ("w16a8" if method in ("qzo_ff", "bp_qat") else "fp32")
    assert (tmp_path / "run" / "model.pt").exists()
