"""Experiment trackers, the `logger` config group (docs/experiments.md#experiment-tracking).

A run talks to one `Tracker`: `start(config, name)`, `log_step(row)` after every training step,
`finish(metrics, files)` at the end (or `fail()` when the run raises). Backends (`BACKENDS`):

    csv          nothing beyond the run's own log.csv and metrics.json (the default)
    tensorboard  event files in <out>/tensorboard/ (torch.utils.tensorboard.SummaryWriter)
    mlflow       a run in MLflow's local store under the output directory: sqlite:///<out>/mlflow.db, its
                 artifacts in <out>/mlruns/ (logger.tracking_uri points it elsewhere, e.g. a server)

Scalars are `train/<key>` per step (loss, test_acc when evaluated, forward_passes, wall_s, tie_fraction:
every number in the step's row), `episode/<key>` per few-shot episode and `final/<key>` for every number in
metrics.json. MLflow 3.13+ refuses its old file store (`file:./mlruns`) unless MLFLOW_ALLOW_FILE_STORE is
set, so the local store is SQLite, the backend MLflow recommends.

tensorboard and mlflow are optional (the `tracking` extra); a missing one is a `TrackerUnavailable`
(a ValueError: one line and exit status 2 from the command line) naming the install command.
"""

from __future__ import annotations

import importlib
import json
import numbers
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .config import LoggerConfig

INSTALL = "uv sync --extra tracking (or pip install 'fwdgrad[tracking]')"
LABELS = ("dataset", "model", "mode", "method", "quant", "variant", "seed", "synthetic")  # of metrics.json


class TrackerUnavailable(ValueError):
    """The package a `logger` backend needs is not installed."""


def _require(backend: str, *modules: str) -> None:
    """Import `modules` in order; the first missing one is a one-line TrackerUnavailable."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise TrackerUnavailable(
                f"logger={backend!r} needs the {module.split('.')[0]} package, which is not installed; "
                f"install it with {INSTALL}"
            ) from None


def scalars(row: dict, skip: Iterable[str] = ()) -> dict[str, float]:
    """The numbers of a log row or of metrics.json (bools, strings, None and nested values left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in skip and isinstance(v, numbers.Real) and not isinstance(v, bool)
    }


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys -> values (JSON for lists, empty dicts and non-strings)."""
    out = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out |= flatten(v, f"{key}.")
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v, default=str)
    return out


def tee(*callbacks: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """One callback calling each of `callbacks` (None entries skipped) in turn; None if there are none."""
    fns = [f for f in callbacks if f is not None]
    if len(fns) <= 1:
        return fns[0] if fns else None

    def call(row: dict) -> None:
        for f in fns:
            f(row)

    return call


class Tracker:
    """The interface, and the `csv` backend: log.csv and metrics.json are written by the pipeline itself."""

    name = "csv"

    def __init__(self, settings: LoggerConfig, out_dir: str | Path):
        self.settings = settings
        self.out_dir = Path(out_dir)

    def start(self, config: dict, name: str) -> None:
        """A new tracked run with the resolved config (a nested dict) under the display name `name`."""

    def log_step(self, row: dict, prefix: str = "train", step_key: str = "step") -> None:
        """Every number of `row` as `<prefix>/<key>` at step row[step_key]."""
        self._log({f"{prefix}/{k}": v for k, v in scalars(row, (step_key,)).items()}, int(row[step_key]))

    def log_episode(self, row: dict) -> None:
        """A few-shot episode's results as `episode/<key>` at step row["episode"]."""
        self.log_step(row, "episode", "episode")

    def finish(self, metrics: dict, files: Iterable[str | Path] = ()) -> None:
        """The final metrics (`final/<key>`), the run's labels, and the `files` that exist; closes the run."""

    def fail(self) -> None:
        """Close the run after an exception (whatever was logged stays)."""

    def _log(self, values: dict[str, float], step: int) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in <out>/tensorboard/: scalars, the config and final metrics as text, PNGs as images."""

    name = "tensorboard"

    def __init__(self, settings: LoggerConfig, out_dir: str | Path):
        super().__init__(settings, out_dir)
        _require(self.name, "tensorboard", "torch.utils.tensorboard")
        self.log_dir = self.out_dir / "tensorboard"
        self.writer = None

    def start(self, config: dict, name: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=10)
        self.writer.add_text("run", name, 0)
        self.writer.add_text("config", _code(json.dumps(config, indent=2, default=str)), 0)

    def _log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def finish(self, metrics: dict, files: Iterable[str | Path] = ()) -> None:
        import numpy as np
        from PIL import Image

        step = int(metrics.get("steps") or 0)
        final = scalars(metrics, LABELS)
        self._log({f"final/{k}": v for k, v in final.items()}, step)
        shown = [k for k in (*LABELS, *final) if k in metrics]
        table = "\n".join(f"| {k} | {metrics[k]} |" for k in shown)
        self.writer.add_text("metrics", "| metric | value |\n|---|---|\n" + table, step)
        for f in map(Path, files):
            if f.suffix == ".png" and f.exists():
                image = np.asarray(Image.open(f).convert("RGB"))
                self.writer.add_image(f"plots/{f.stem}", image, step, dataformats="HWC")
        self.writer.close()

    def fail(self) -> None:
        if self.writer is not None:
            self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow run: params = the flattened config, metrics per step (sent in batches), final metrics,
    tags = the run's labels, artifacts = the given files."""

    name = "mlflow"
    FLUSH_S = 10.0  # send buffered step metrics at most this long after they were logged
    BATCH = (1000, 100)  # MLflow's limits per log_batch call: metrics, params
    PARAM_CHARS = 6000  # MLflow's limit on a param value

    def __init__(self, settings: LoggerConfig, out_dir: str | Path):
        super().__init__(settings, out_dir)
        _require(self.name, "mlflow")
        from mlflow.tracking import MlflowClient

        local = settings.tracking_uri is None
        self.tracking_uri = (
            f"sqlite:///{(self.out_dir / 'mlflow.db').resolve()}" if local else settings.tracking_uri
        )
        self.artifact_location = (self.out_dir / "mlruns").resolve().as_uri() if local else None
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = None
        self.buffer, self.sent_at = [], time.monotonic()

    def start(self, config: dict, name: str) -> None:
        from mlflow.entities import Param

        c, experiment = self.client, self.settings.experiment_name
        found = c.get_experiment_by_name(experiment)
        if found is None:
            try:
                experiment_id = c.create_experiment(experiment, artifact_location=self.artifact_location)
            except Exception:  # created meanwhile by a parallel job sharing the store
                experiment_id = c.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        self.run_id = c.create_run(experiment_id, run_name=name).info.run_id
        params = [
            Param(re.sub(r"[^\w\-. :/]", "_", k), v[: self.PARAM_CHARS]) for k, v in flatten(config).items()
        ]
        n = self.BATCH[1]
        for i in range(0, len(params), n):
            c.log_batch(self.run_id, params=params[i : i + n])

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, v, now, step) for k, v in values.items()]
        if len(self.buffer) >= self.BATCH[0] or time.monotonic() - self.sent_at >= self.FLUSH_S:
            self._flush()

    def _flush(self) -> None:
        n = self.BATCH[0]
        for i in range(0, len(self.buffer), n):
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + n])
        self.buffer, self.sent_at = [], time.monotonic()

    def finish(self, metrics: dict, files: Iterable[str | Path] = ()) -> None:
        step = int(metrics.get("steps") or 0)
        self._log({f"final/{k}": v for k, v in scalars(metrics, LABELS).items()}, step)
        self._flush()
        for k in LABELS:
            if k in metrics:
                self.client.set_tag(self.run_id, k, str(metrics[k]))
        for f in map(Path, files):
            if f.exists():
                self.client.log_artifact(self.run_id, str(f))
        self.client.set_terminated(self.run_id, "FINISHED")

    def fail(self) -> None:
        if self.run_id is None:
            return
        try:  # never hide the run's own exception behind one from the tracker
            self._flush()
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception:
            pass


BACKENDS: dict[str, type[Tracker]] = {
    "csv": Tracker,
    "tensorboard": TensorBoardTracker,
    "mlflow": MlflowTracker,
}


def make_tracker(settings: LoggerConfig, out_dir: str | Path) -> Tracker:
    """The tracker of `settings.name` writing under `out_dir` (raises TrackerUnavailable if its package is
    missing, before anything is written)."""
    if settings.name not in BACKENDS:
        raise ValueError(f"logger={settings.name!r} is invalid; allowed: {', '.join(BACKENDS)}")
    return BACKENDS[settings.name](settings, out_dir)


def _code(text: str) -> str:
    """Markdown code block (TensorBoard renders text summaries as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())
