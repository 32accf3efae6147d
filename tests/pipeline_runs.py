"""Shared by the pipeline tests: the tiny overrides and one in-process run of the real composed config."""

from hydra import compose, initialize_config_dir

from fwdgrad.conf import CONF_DIR

TINY = [
    "train.steps=2",
    "train.eval_every=1",
    "pretrain.steps=2",
    "progress=false",
    "data.max_train=48",
    "data.max_test=24",
]


def run(tmp_path, *overrides, out="run", base=TINY):
    """`run_experiment` on `fwdgrad/conf/config.yaml` + base + a cache and out_dir under tmp_path."""
    from fwdgrad.pipeline import run_experiment

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[*base, f"cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / out}", *overrides],
        )
    return run_experiment(cfg)
