"""Experiment trackers (`logger` group, fwdgrad.tracking): tiny pipeline runs logged to TensorBoard and MLflow
and read back with each library's own reader; the config checks; a missing package is one line, exit 2."""

import csv
import json
import sys

import pytest
from hydra import compose, initialize_config_dir

from fwdgrad import config as fc
from fwdgrad.conf import CONF_DIR
from fwdgrad.tracking import BACKENDS, TrackerUnavailable, flatten, make_tracker, tee

TINY = [
    "train.steps=4",
    "train.eval_every=2",
    "pretrain.steps=2",
    "progress=false",
    "data.max_train=48",
    "data.max_test=24",
]
FILES = {"metrics.json", "log.csv", "curves.png"}


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")  # one source model for the module


def run(out, cache, *overrides):
    from fwdgrad.pipeline import run_experiment

    return run_experiment(composed(*TINY, f"cache_dir={cache}", f"out_dir={out}", *overrides))


def log_rows(out):
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


def test_logger_group_and_checks():
    assert tuple(BACKENDS) == fc.LOGGERS
    assert fc.validate(composed()).logger.name == "csv"  # the default
    for option in sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml")):
        assert fc.validate(composed(f"logger={option}")).logger.name == option
    bad = [
        (["logger.name=wandb"], "logger='wandb' is invalid; allowed: csv, tensorboard, mlflow"),
        (
            ["logger=tensorboard", "logger.tracking_uri=x"],
            "logger.tracking_uri='x' is invalid; allowed: null",
        ),
        (["logger=mlflow", "logger.experiment_name="], "logger.experiment_name='' is invalid"),
    ]
    for overrides, message in bad:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            fc.validate(composed(*overrides))


def test_tee_and_flatten():
    calls = []
    a, b = (lambda r: calls.append(("a", r))), (lambda r: calls.append(("b", r)))
    assert tee() is None and tee(None, None) is None and tee(None, a) is a
    tee(a, None, b)({"step": 1})
    assert calls == [("a", {"step": 1}), ("b", {"step": 1})]
    nested = {"method": {"name": "qzo_ff", "ff": {}, "m": 3}, "tags": ["x", 1], "out_dir": None}
    assert flatten(nested) == {
        "method.name": "qzo_ff",
        "method.ff": "{}",
        "method.m": "3",
        "tags": '["x", 1]',
        "out_dir": "null",
    }


def test_csv_writes_no_tracker_files(tmp_path, cache):
    run(tmp_path / "run", cache)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert FILES <= names and not names & {"tensorboard", "mlflow.db", "mlruns"}


def _accumulator(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def test_tensorboard_run_reads_back(tmp_path, cache):
    out = tmp_path / "run"
    m = run(out, cache, "logger=tensorboard")
    ea = _accumulator(out / "tensorboard")
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/test_acc", "train/forward_passes", "final/test_acc"} <= scalars
    rows = log_rows(out)
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    acc = ea.Scalars("train/test_acc")  # only the evaluated steps
    assert [e.step for e in acc] == [2, 4] and acc[-1].value == pytest.approx(m["test_acc"], rel=1e-6)
    assert [e.value for e in ea.Scalars("train/forward_passes")] == [6, 12, 18, 24]  # qzo_ff m=3: 6 a step
    (final,) = ea.Scalars("final/test_acc")
    assert final.step == 4 and final.value == pytest.approx(m["test_acc"], rel=1e-6)
    assert ea.Scalars("final/zero_shot_acc")[0].value == pytest.approx(m["zero_shot_acc"], rel=1e-6)
    (image,) = ea.Images("plots/curves")
    assert image.width > 100 and image.height > 100
    texts = {t: ea.Tensors(t)[0].tensor_proto.string_val[0].decode() for t in ea.Tags()["tensors"]}
    assert '"name": "tensorboard"' in texts["config/text_summary"]
    assert "| method | qzo_ff |" in texts["metrics/text_summary"]


def test_fewshot_logs_episodes_and_the_mean_log(tmp_path, cache):
    out = tmp_path / "run"
    fewshot = [
        "experiment=fewshot_vision",
        "data.fewshot.episodes=2",
        "data.max_train=null",
        "data.max_test=null",
    ]
    run(out, cache, *fewshot, "logger=tensorboard")
    ea = _accumulator(out / "tensorboard")
    episodes = json.loads((out / "episodes.json").read_text())
    acc = ea.Scalars("episode/test_acc")
    assert [e.step for e in acc] == [0, 1]
    assert [e.value for e in acc] == pytest.approx([r["test_acc"] for r in episodes], rel=1e-6)
    loss = ea.Scalars("train/loss")  # the per-step log averaged over episodes (log.csv)
    assert [e.value for e in loss] == pytest.approx([float(r["loss"]) for r in log_rows(out)], rel=1e-6)


def test_mlflow_run_reads_back(tmp_path, cache):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    m = run(out, cache, "logger=mlflow", "method.m=1")
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fwdgrad")
    (r,) = client.search_runs([experiment.experiment_id])
    assert r.info.status == "FINISHED" and r.info.run_name == "digits qzo_ff w16a8 seed=0"
    params = r.data.params
    assert params["method.name"] == "qzo_ff" and params["method.m"] == "1" and params["train.steps"] == "4"
    assert params["logger.name"] == "mlflow" and params["model._target_"] == "fwdgrad.models.build_model"
    assert r.data.tags["method"] == "qzo_ff" and r.data.tags["quant"] == "w16a8"
    loss = client.get_metric_history(r.info.run_id, "train/loss")
    assert sorted(x.step for x in loss) == [1, 2, 3, 4]
    steps = {int(row["step"]): float(row["loss"]) for row in log_rows(out)}
    assert all(x.value == pytest.approx(steps[x.step], rel=1e-6) for x in loss)
    acc = client.get_metric_history(r.info.run_id, "train/test_acc")
    assert sorted(x.step for x in acc) == [2, 4]
    assert r.data.metrics["final/test_acc"] == pytest.approx(m["test_acc"])
    assert r.data.metrics["final/forward_passes"] == 8  # m=1: 2 forward passes a step
    assert {a.path for a in client.list_artifacts(r.info.run_id)} == FILES
    stored = out / "mlruns" / r.info.run_id / "artifacts" / "metrics.json"
    assert json.loads(stored.read_text())["test_acc"] == m["test_acc"]  # the local store, in the run's dir

    # a run that raises is closed as FAILED, with what it logged so far
    t = make_tracker(fc.LoggerConfig(name="mlflow"), out)
    t.start({"seed": 1}, "failing")
    t.log_step({"step": 1, "loss": 0.5})
    t.fail()
    (failed,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'failing'")
    assert failed.info.status == "FAILED" and failed.data.metrics == {"train/loss": 0.5}


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_missing_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, backend):
    from fwdgrad.cli import main

    monkeypatch.setitem(sys.modules, backend, None)  # `import <backend>` raises ImportError
    with pytest.raises(TrackerUnavailable, match=rf"logger='{backend}' needs the {backend} package"):
        make_tracker(fc.LoggerConfig(name=backend), tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # as `fwdgrad run` sets them (restored after the test)
    monkeypatch.setenv("_FWDGRAD_QUIET", "1")
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["run", f"logger={backend}", f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"error: logger='{backend}' needs the {backend} package, which is not installed; install it with "
        "uv sync --extra tracking (or pip install 'fwdgrad[tracking]')"
    ]
    assert not (tmp_path / "cache").exists() and not (run_dir / "metrics.json").exists()  # stopped first
