"""Command line of the edge runtime (numpy only):

    python -m fwdgrad.edge finetune BUNDLE DATA.npz --steps N [--batch B] [--checkpoint-every K]
                                    [--eval DATA.npz] [--output PATH] [--log-every L]
    python -m fwdgrad.edge eval BUNDLE DATA.npz [--batch B]

DATA.npz holds ``x`` (float NCHW, or integer codes already quantized) and ``y`` (integer labels).
``--steps N`` is the step count to reach: training continues from the bundle's step counter, so re-running
the same command after an interruption resumes from the last checkpoint and ends in the same state.
Batch of step k: ``perm[(k·B + j) mod len(x)]``, j < B, with ``perm`` a fixed permutation derived from the
bundle's seed — it depends on k only, so resumed runs see the same batches.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np

from .. import rng
from ..rng.streams import DATA_STREAM
from .bundle import BundleError, load_bundle, save_bundle
from .runtime import Runtime
from .train import Trainer, evaluate


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def load_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays 'x' and 'y' of equal length; y integer labels >= 0."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise ValueError(f"data file {path!r} lacks array(s) {missing}; expected 'x' and 'y'")
            x, y = npz["x"], npz["y"]
    except (OSError, EOFError) as err:
        raise ValueError(f"cannot read data file {path!r}: {err}") from None
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"data file {path!r}: x has {len(x)} samples, y has {len(y)}; need equal and > 0")
    if y.dtype.kind not in "iu" or y.min() < 0:
        raise ValueError(f"data file {path!r}: y must be integer class labels >= 0, got dtype {y.dtype}")
    return x, y.astype(np.int64)


def batch_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
    perm = np.argsort(rng.hash_words(seed, 0, DATA_STREAM, 0, n), kind="stable")
    return perm[(step * batch + np.arange(batch)) % n]


def finetune(args) -> None:
    bundle = load_bundle(args.bundle)
    x, y = load_data(args.data)
    out = args.output or args.bundle
    trainer = Trainer(bundle)
    seed, start = bundle.training["seed"], trainer.step_count
    if start >= args.steps:
        print(f"bundle is already at step {start} >= --steps {args.steps}; nothing to do")
    elif start:
        print(f"resuming at step {start}")
    t0 = time.perf_counter()
    for k in range(start, args.steps):
        idx = batch_indices(seed, k, args.batch, len(x))
        loss = trainer.step(x[idx], y[idx])
        done = k + 1
        if done % args.log_every == 0 or done == args.steps:
            print(
                f"step {done}/{args.steps}  loss {loss:.4f}  elapsed {time.perf_counter() - t0:.1f}s",
                flush=True,
            )
        if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
            save_bundle(bundle, out)
            print(f"checkpoint step {done} -> {out}", flush=True)
    if start < args.steps:
        save_bundle(bundle, out)
        print(f"saved step {trainer.step_count} -> {out}")
    if args.eval:
        xe, ye = load_data(args.eval)
        acc, loss = evaluate(trainer.runtime, xe, ye, args.batch)
        print(f"eval accuracy {acc:.4f} ({round(acc * len(xe))}/{len(xe)})  loss {loss:.4f}")
    print(f"peak RSS {peak_rss_mib():.1f} MiB")


def evaluate_cmd(args) -> None:
    x, y = load_data(args.data)
    acc, loss = evaluate(Runtime(load_bundle(args.bundle)), x, y, args.batch)
    print(f"accuracy {acc:.4f} ({round(acc * len(x))}/{len(x)})  loss {loss:.4f}")
    print(f"peak RSS {peak_rss_mib():.1f} MiB")


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r} is invalid; allowed: integers >= 1")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fwdgrad.edge", description="numpy-only edge runtime")
    sub = ap.add_subparsers(dest="command", required=True)
    ft = sub.add_parser("finetune", help="QZO-FF fine-tuning of a bundle on local data")
    ft.add_argument("bundle")
    ft.add_argument("data")
    ft.add_argument(
        "--steps", type=_positive, required=True, help="step count to reach (resumes from the bundle's)"
    )
    ft.add_argument("--batch", type=_positive, default=32)
    ft.add_argument("--checkpoint-every", type=_positive, default=None, metavar="K")
    ft.add_argument("--eval", default=None, metavar="DATA.npz", help="evaluate accuracy at the end")
    ft.add_argument("--output", default=None, help="write checkpoints here instead of over BUNDLE")
    ft.add_argument("--log-every", type=_positive, default=10)
    ev = sub.add_parser("eval", help="accuracy and loss of a bundle on data")
    ev.add_argument("bundle")
    ev.add_argument("data")
    ev.add_argument("--batch", type=_positive, default=64)
    args = ap.parse_args(argv)
    try:
        (finetune if args.command == "finetune" else evaluate_cmd)(args)
    except (BundleError, ValueError, OSError) as err:
        print(f"{ap.prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
