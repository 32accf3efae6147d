"""How SIGINT (Ctrl-C) and SIGTERM (`kill`, SLURM before preemption or at its time limit) stop fwdgrad.

A training loop defers them to the end of the current step (`deferred_signals`), writes its checkpoint,
hands the signal over to a job scheduler's handler if one was installed (submitit's checkpoint-and-requeue
under SLURM: the requeued job resumes from that checkpoint) and raises `Interrupted`; elsewhere
`terminate_raises` turns SIGTERM into `Interrupted` too. The command line prints the message as one line
and exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM), so a scheduler can tell an interrupted
job from a failed one. Standard library only."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run; `exit_code` = 128 + the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class Deferred(list):
    """The signals `deferred_signals` recorded (a list of signal numbers), and the handlers it replaced."""

    def __init__(self):
        super().__init__()
        self.previous: dict[int, object] = {}

    def hand_over(self) -> None:
        """After the checkpoint: give the first signal to the handler it would have reached, when that one
        is a job scheduler's (submitit's checkpoint-and-requeue under SLURM), not Python's or fwdgrad's."""
        h = self.previous.get(self[0]) if self else None
        if callable(h) and h is not signal.default_int_handler and not getattr(h, "fwdgrad", False):
            self.previous[self[0]] = signal.SIG_IGN  # the scheduler stops the job with it again: done
            h(self[0], None)


@contextmanager
def deferred_signals() -> Iterator[Deferred]:
    """Within the block, SIGINT/SIGTERM are recorded in the yielded list instead of stopping the process
    mid-step (the loop checks it between steps); a second one raises `Interrupted` at once. Outside the main
    thread (where handlers cannot be set) signals keep their usual effect; an ignored signal (SIG_IGN, as
    SIGINT in a background job) stays ignored."""
    got = Deferred()
    if not _main_thread():
        yield got
        return

    def handler(signum, frame):
        name = signal.Signals(signum).name
        if got:
            raise Interrupted(signum, f"stopped by a second {name}, without a checkpoint")
        got.append(signum)
        if sys.stderr.isatty():
            print(f"\n{name}: stopping after this step (again: at once)", file=sys.stderr)

    sigs = [s for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN]
    got.previous = {s: signal.signal(s, handler) for s in sigs}
    try:
        yield got
    finally:
        for s, h in got.previous.items():
            signal.signal(s, h)


@contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises `Interrupted` (as Ctrl-C raises KeyboardInterrupt), so `finally`
    blocks run, locks are released and temporary files removed."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum, "stopped by SIGTERM")

    handler.fwdgrad = True  # not handed over to (Deferred.hand_over)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
