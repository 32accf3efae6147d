"""What a person sees while an experiment runs: pretraining, evaluations over a test set, training steps,
few-shot episodes.

* On a terminal (and with `progress: true`): tqdm bars on stderr, as before; an evaluation during training
  shows in the training bar (`eval 41%`), one on its own gets a bar once it has run a second.
* When stdout is not a terminal (a pipe, a file, CI, SLURM): log lines through `logging` (logger
  `fwdgrad.progress`): one when a phase starts (what runs and how long it is), then one every
  `log_every_steps` steps and/or every `log_every_s` seconds (step, loss, latest test accuracy, steps/s,
  elapsed, ETA; long evaluations say how far they are), and one at the end. Under Hydra (`fwdgrad run`)
  they go to stdout and to the job log `<run dir>/fwdgrad.log`; where logging is not configured (library
  use, `fwdgrad main`) they go nowhere.

Both at once when stdout is redirected but stderr is a terminal (`fwdgrad run ... > run.log`).
"""

from __future__ import annotations

import logging
import sys
import time
from contextvars import Token

import torch.nn as nn
from tqdm import tqdm

from ..config import TaskConfig
from ..train import EVAL_PROGRESS, evaluate

log = logging.getLogger("fwdgrad.progress")


def stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


def duration(seconds: float) -> str:
    """1:02:03, 2:03, 15 s or 0.4 s."""
    if seconds < 9.95:
        return f"{seconds:.1f} s"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """The progress of one loop of `total` units (module docstring): `update(n, **fields)` after unit n.

    `evaluations=True`: while it is open, `fwdgrad.train.evaluate` calls without a callback of their own
    (those inside `train`) report to `evaluating`. Close it (or use it as a context manager) when done."""

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str = "step",
        *,
        bar: bool = True,
        every_s: float = 30.0,
        every_steps: int = 0,
        lines: bool | None = None,
        evaluations: bool = False,
        start: str | None = None,
    ):
        self.desc, self.total, self.unit = desc, total, unit
        self.every_s, self.every_steps = every_s, every_steps
        self.lines = not stdout_is_terminal() if lines is None else lines
        self.bar = tqdm(total=total, unit=unit, desc=desc, disable=None if bar else True, leave=False)
        self.n = 0
        self.fields: dict[str, str] = {}
        self.t0 = self.t_line = time.perf_counter()
        self.first: tuple[int, float] | None = None  # the first update: rates leave out what came before
        self.eval_t0 = 0.0
        self._token: Token | None = EVAL_PROGRESS.set(self.evaluating) if evaluations else None
        self.closed = False
        if self.lines:
            log.info("%s: %s", desc, start or (f"{total:,} {unit}s" if total else "started"))

    @classmethod
    def of(cls, c: TaskConfig, desc: str, total: int | None, unit: str = "step", **kw) -> Progress:
        """A Progress with the run's settings: `progress` (bars), `log_every_s`, `log_every_steps`."""
        every = {"every_s": c.log_every_s, "every_steps": c.log_every_steps}
        return cls(desc, total, unit, bar=c.progress, **every, **kw)

    # ------------------------------------------------------------------------------------------ loop
    def update(self, n: int, **fields) -> None:
        """Unit n (1-based, absolute) is done; `fields` (loss=..., acc=...) show next to it from now on."""
        now = time.perf_counter()
        if self.first is None:
            self.first = (n, now)
        self.fields |= {k: (f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in fields.items()}
        if self.fields:
            self.bar.set_postfix(self.fields, refresh=False)
        self.bar.update(n - self.n)
        self.n = n
        if not self.lines:
            return
        by_steps = self.every_steps and n % self.every_steps == 0
        by_time = self.every_s and now - self.t_line >= self.every_s
        if by_steps or by_time or n == self.total:
            log.info("%s: %s", self.desc, self.status(now))
            self.t_line = now

    def status(self, now: float) -> str:
        """`step 120/600 (20%), loss 0.6120, acc 0.7710 | 5.3 step/s, elapsed 0:23, ETA 1:31`."""
        total = f"/{self.total:,} ({100 * self.n // self.total}%)" if self.total else ""
        parts = [f"{self.unit} {self.n:,}{total}", *(f"{k} {v}" for k, v in self.fields.items())]
        n0, t0 = self.first or (0, self.t0)
        rate = (self.n - n0) / (now - t0) if self.n > n0 and now > t0 else self.n / max(now - self.t0, 1e-9)
        timing = [f"{rate:.3g} {self.unit}/s", f"elapsed {duration(now - self.t0)}"]
        if self.total and self.n < self.total and rate > 0:
            timing.append(f"ETA {duration((self.total - self.n) / rate)}")
        return ", ".join(parts) + " | " + ", ".join(timing)

    # ----------------------------------------------------------------------------------- evaluations
    def evaluating(self, done: int, total: int) -> None:
        """`fwdgrad.train.evaluate`'s callback: `done` of `total` test examples."""
        if self.closed:
            return
        now = time.perf_counter()
        if done == 0:
            self.eval_t0 = now
            if not self.bar.disable:
                self.bar.set_postfix(self.fields | {"eval": "0%"})
        elif not self.bar.disable:
            self.bar.set_postfix(self.fields | {"eval": f"{100 * done // max(total, 1)}%"})
        if self.lines and self.every_s and now - self.t_line >= self.every_s and 0 < done < total:
            pct = 100 * done / max(total, 1)
            log.info(
                "%s: evaluating on the test set after %s %s: %s/%s examples (%.0f%%), %s",
                self.desc,
                self.unit,
                f"{self.n:,}",
                f"{done:,}",
                f"{total:,}",
                pct,
                duration(now - self.eval_t0),
            )
            self.t_line = now
        if done >= total and not self.bar.disable:
            self.bar.set_postfix(self.fields)

    # ------------------------------------------------------------------------------------------ end
    def close(self) -> None:
        """Close the bar and stop hearing evaluations."""
        if self.closed:
            return
        self.closed = True
        if self._token is not None:
            EVAL_PROGRESS.reset(self._token)
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def evaluate_shown(c: TaskConfig, what: str, model: nn.Module, x, y) -> float:
    """`fwdgrad.train.evaluate` that a person can follow: on a terminal a bar over the examples (after the
    first second); elsewhere a line when it starts, lines while it runs (`log_every_s`) and its result."""
    lines = not stdout_is_terminal()
    if lines:
        split = "validation" if getattr(getattr(c, "data", None), "validation", None) else "test"
        log.info("%s: evaluating %s %s examples", what, f"{len(x):,}", split)
    t0 = time.perf_counter()
    disable = None if c.progress else True
    bar = tqdm(total=len(x), unit="ex", desc=what, disable=disable, leave=False, delay=1.0)
    last = [t0]

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)
        now = time.perf_counter()
        if lines and c.log_every_s and now - last[0] >= c.log_every_s and done < total:
            log.info("%s: %s/%s examples (%.0f%%)", what, f"{done:,}", f"{total:,}", 100 * done / total)
            last[0] = now

    try:
        acc = evaluate(model, x, y, progress=progress)
    finally:
        bar.close()
    if lines:
        log.info("%s: %.4f (%s)", what, acc, duration(time.perf_counter() - t0))
    return acc
