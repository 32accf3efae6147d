"""Command line of the edge runtime (numpy only):

    python -m fwdgrad.edge finetune BUNDLE DATA.npz --steps N [--batch B] [--checkpoint-every K]
                                    [--eval DATA.npz] [--output PATH] [--log-every L]
                                    [--loss float|integer]
    python -m fwdgrad.edge eval BUNDLE DATA.npz [--batch B]
    python -m fwdgrad.edge mcu BUNDLE DATA.npz --steps N [--batch B] [--board BOARD] [--device PROFILE]
                               [--eval DATA.npz] [--output PATH] [--build-dir DIR] [--log-every L]

DATA.npz holds ``x`` (float NCHW, or integer codes already quantized) and ``y`` (integer labels).
``--steps N`` is the step count to reach: training continues from the bundle's step counter, so re-running
the same command after an interruption resumes from the last checkpoint and ends in the same state.
Batch of step k: ``perm[(k·B + j) mod len(x)]``, j < B, with ``perm`` a fixed permutation derived from the
bundle's seed — it depends on k only, so resumed runs see the same batches.
``mcu`` runs the same steps in the generated C runtime (`fwdgrad.edge.cgen`, integer loss) on an emulated
Cortex-M (`fwdgrad.edge.mcu`, QEMU): the batches stream in through semihosting files, the losses and weights
come back, and the bundle is saved as ``finetune --loss integer`` would have left it.

Exit status: 0 done; 2 bad input or an OS error (one line on stderr, checked before anything is written, and a
failed save leaves the previous file intact); 130 / 143 after SIGINT / SIGTERM during ``finetune``, which
finishes the current step and saves a checkpoint first (a second signal aborts at once).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import sys
import tempfile
import time

import numpy as np

from .. import rng
from ..files import remove_stale_temps, temp_path, write_json
from ..rng.streams import DATA_STREAM
from ..signals import deferred_signals
from . import mcu
from .bundle import LOSS_NAMES, load_bundle, save_bundle
from .loss import LOSS_BITS, IntegerLossTrainer
from .runtime import Runtime
from .train import Trainer, evaluate

PROG = "python -m fwdgrad.edge"


def peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def _read_npz(path: str) -> dict[str, np.ndarray] | None:
    """Arrays 'x' and 'y' (those present) of an .npz file; None if the file is no zip archive."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in ("x", "y") if k in npz.files}


def load_data(path: str, runtime: Runtime) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays 'x' and 'y', checked against the bundle before any use: the same
    number N > 0 of samples, x as `Runtime.check_input` requires, y integer labels of the model's classes."""
    try:
        arrays = _read_npz(path)
    except OSError as err:
        raise ValueError(f"cannot read data file {path!r}: {err.strerror or err}") from None
    except Exception as err:  # damaged archive (BadZipFile, bad CRC) or a pickled (object) array
        raise ValueError(
            f"cannot read data file {path!r}: not an intact .npz of numeric arrays "
            f"({type(err).__name__}: {err})"
        ) from None
    if arrays is None:
        raise ValueError(
            f"data file {path!r} is not an .npz (zip) archive; allowed: an .npz with arrays 'x', 'y'"
        )
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ValueError(f"data file {path!r} lacks array(s) {missing}; expected 'x' and 'y'")
    x, y = arrays["x"], arrays["y"]
    if x.ndim == 0 or y.ndim != 1 or len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"data file {path!r}: x has shape {list(x.shape)}, y {list(y.shape)}; allowed: x (N, ...) and "
            "y (N,) with N > 0"
        )
    if y.dtype.kind not in "iu":
        raise ValueError(f"data file {path!r}: y has dtype {y.dtype}; allowed: integer class labels")
    try:
        classes = runtime.check_input(x)
    except ValueError as err:
        raise ValueError(f"data file {path!r}: {err}") from None
    if y.min() < 0 or y.max() >= classes:
        raise ValueError(
            f"data file {path!r}: labels y span {y.min()}..{y.max()}; allowed: 0..{classes - 1} "
            f"(the model's {classes} classes)"
        )
    return x, y.astype(np.int64)


def batch_indices(seed: int, step: int, batch: int, n: int) -> np.ndarray:
    perm = np.argsort(rng.hash_words(seed, 0, DATA_STREAM, 0, n), kind="stable")
    return perm[(step * batch + np.arange(batch)) % n]


def check_writable(path: str, what: str = "bundle") -> None:
    """Fail in one line, before training, if a bundle cannot be written at `path`: a folder there, a missing
    folder or a file in its place, no write permission (probed by creating and removing the temp file a save
    uses, which also works where permission bits do not tell, e.g. read-only mounts)."""
    if os.path.isdir(path):
        raise ValueError(f"cannot write {what} {path!r}: it is a folder; allowed: a file path")
    tmp = temp_path(path)
    try:
        open(tmp, "wb").close()
    except OSError as err:
        raise ValueError(
            f"cannot write {what} {path!r}: {err.strerror or err}; allowed: a file in an existing, "
            "writable folder"
        ) from None
    tmp.unlink()


def save(bundle, path: str) -> None:
    """`save_bundle`, with an OS error (e.g. a full disk) as one line naming `path`, not the temp file."""
    try:
        save_bundle(bundle, path)
    except OSError as err:
        raise ValueError(
            f"cannot write bundle {path!r}: {err.strerror or err}; the previous file is unchanged"
        ) from None


def _inputs(args, runtime: Runtime) -> tuple:
    """(x, y, xe, ye, out) of `finetune` and `mcu`, every check done before anything is written: the data
    and --eval data against the bundle, --batch against the data, the output path (BUNDLE or --output)
    writable; stale temp files of killed writers beside it removed."""
    x, y = load_data(args.data, runtime)
    xe, ye = load_data(args.eval, runtime) if args.eval else (None, None)
    if args.batch > len(x):
        raise ValueError(
            f"--batch {args.batch} is larger than the {len(x)} samples of {args.data!r}; allowed: 1..{len(x)}"
        )
    out = args.output or args.bundle
    check_writable(out)
    if getattr(args, "json", None):
        check_writable(args.json, "summary")
    remove_stale_temps(os.path.dirname(os.path.abspath(out)))  # temp files of killed writers
    return x, y, xe, ye, out


def _announce(start: int, steps: int) -> bool:
    """Say where a run of `steps` steps starts from the bundle's `start`; whether there is work."""
    if start >= steps:
        print(f"bundle is already at step {start} >= --steps {steps}; nothing to do")
    elif start:
        print(f"resuming at step {start}")
    return start < steps


def finetune(args) -> int:
    bundle = load_bundle(args.bundle)
    loss = args.loss or ("integer" if bundle.training.get("loss") == LOSS_NAMES["integer"] else "float")
    if loss != "float" or args.loss:
        print(f"loss {loss} ({'--loss' if args.loss else 'from the bundle'})")
    trainer = (IntegerLossTrainer if loss == "integer" else Trainer)(bundle)
    x, y, xe, ye, out = _inputs(args, trainer.runtime)
    seed, start = bundle.training["seed"], trainer.step_count
    _announce(start, args.steps)
    t0 = time.perf_counter()
    with deferred_signals() as stop:
        for k in range(start, args.steps):
            idx = batch_indices(seed, k, args.batch, len(x))
            loss = trainer.step(x[idx], y[idx])
            done = k + 1
            if done % args.log_every == 0 or done == args.steps:
                print(
                    f"step {done}/{args.steps}  loss {loss:.4f}  elapsed {time.perf_counter() - t0:.1f}s",
                    flush=True,
                )
            if stop:
                break
            if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.steps:
                save(bundle, out)
                print(f"checkpoint step {done} -> {out}", flush=True)
        if trainer.step_count > start:
            save(bundle, out)
            print(f"saved step {trainer.step_count} -> {out}", flush=True)
    if stop:
        resume = "run the same command again" if out == args.bundle else f"run it with {out!r} as BUNDLE"
        print(
            f"{PROG}: stopped by {signal.Signals(stop[0]).name} at step {trainer.step_count} "
            f"(saved to {out!r}); to resume, {resume}",
            file=sys.stderr,
        )
        return 128 + stop[0]
    if args.eval:
        acc, loss = evaluate(trainer.runtime, xe, ye, args.batch)
        print(f"eval accuracy {acc:.4f} ({round(acc * len(xe))}/{len(xe)})  loss {loss:.4f}")
    print(f"peak RSS {peak_rss_mib():.1f} MiB")
    return 0


def mcu_cmd(args) -> int:
    """`finetune` on an emulated Cortex-M: build the C runtime for `--board` (cut to `--device`'s memory),
    stream the batches of steps start..N-1 in, read the losses and trained weights back, save the bundle."""
    bundle = load_bundle(args.bundle)
    if not (bundle.training or {}).get("tensors"):
        raise ValueError(f"bundle {args.bundle!r} has no trainable tensors; export it with training settings")
    runtime = Runtime(bundle)
    x, y, xe, ye, out = _inputs(args, runtime)
    seed, start = bundle.training["seed"], bundle.training["step"]
    if not _announce(start, args.steps):
        return 0
    build_dir = args.build_dir or tempfile.mkdtemp(prefix="fwdgrad-mcu-")
    os.makedirs(build_dir, exist_ok=True)
    info = mcu.build(bundle, build_dir, x.shape[1:], args.batch, args.board, device=args.device)
    app = info["memory"]["objects"]["app"]
    fit = f", fits {args.device}" if args.device else ""
    print(
        f"built {info['elf']} for {args.board} ({mcu.BOARDS[args.board]}): flash {app['flash']:,} B, "
        f"SRAM {app['sram']:,} B + {info['memory']['stack_bytes']:,} B stack{fit}",
        flush=True,
    )
    idx = np.concatenate([batch_indices(seed, k, args.batch, len(x)) for k in range(start, args.steps)])
    eval_codes = None if xe is None else runtime.quantize_input(xe)
    t0, done = time.perf_counter(), [start]
    per_loss = args.batch * 2.0**LOSS_BITS

    def progress(line: str) -> None:
        if line.startswith("S "):
            done[0] += 1
            vals = [int(v) for v in line.split()[1:]]
            if done[0] % args.log_every == 0 or done[0] == args.steps:
                loss = sum(vals) / len(vals) / per_loss
                elapsed = time.perf_counter() - t0
                print(f"step {done[0]}/{args.steps}  loss {loss:.4f}  elapsed {elapsed:.1f}s", flush=True)

    res = mcu.run(
        info,
        bundle,
        eval_codes,
        runtime.quantize_input(x)[idx],  # each sample quantized once, however many steps reuse it
        y[idx],
        eval_codes,
        args.batch,
        args.board,
        args.timeout,
        on_line=progress,
    )
    for t, spec in enumerate(bundle.training["tensors"]):
        w = bundle.arrays[f"{spec['name']}.weight"]
        w[...] = res.weights[t].reshape(w.shape)
    bundle.training["step"] = args.steps
    save(bundle, out)
    print(f"saved step {args.steps} -> {out}", flush=True)
    evals = {}
    if xe is not None:
        for when, logits in (("before", res.logits), ("after", res.eval_logits)):
            evals[when] = {"correct": int((logits.argmax(1) == ye).sum()), "n": len(ye)}
            correct = evals[when]["correct"]
            print(f"eval accuracy {when} {correct / len(ye):.4f} ({correct}/{len(ye)})")
    step_i, infer_i = int(np.median(res.step_instructions)), int(np.median(res.infer_instructions or [0]))
    print(
        f"instructions per train_step (batch {args.batch}): median {step_i:,}; per infer: median "
        f"{infer_i:,} (QEMU -icount)"
    )
    if args.json:
        summary = {
            "bundle": args.bundle,
            "output": out,
            "board": args.board,
            "cpu": mcu.BOARDS[args.board],
            "device": args.device,
            "batch": args.batch,
            "steps": [start, args.steps],
            "losses": [sum(v) / len(v) / per_loss for v in res.losses],
            "eval": evals,
            "instructions": {"train_step_median": step_i, "infer_median": infer_i},
            "memory": info["memory"],
            "prefix_bytes": info["prefix_bytes"],
            "wall_s": time.perf_counter() - t0,
        }
        write_json(args.json, summary, indent=1)
        print(f"wrote {args.json}")
    return 0


def evaluate_cmd(args) -> int:
    runtime = Runtime(load_bundle(args.bundle))
    x, y = load_data(args.data, runtime)
    acc, loss = evaluate(runtime, x, y, args.batch)
    print(f"accuracy {acc:.4f} ({round(acc * len(x))}/{len(x)})  loss {loss:.4f}")
    print(f"peak RSS {peak_rss_mib():.1f} MiB")
    return 0


def _positive(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v!r} is invalid; allowed: integers >= 1")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (`PROG: error: ...`, exit 2), like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    ap = _Parser(prog=PROG, description="numpy-only edge runtime")
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
    ft.add_argument(
        "--loss",
        choices=tuple(LOSS_NAMES),
        default=None,
        help="decide each step's signs on the float64 or the integer cross-entropy (as the C runtime does); "
        "default: the bundle's training.loss",
    )
    mc = sub.add_parser("mcu", help="QZO-FF fine-tuning in the C runtime on an emulated Cortex-M (QEMU)")
    mc.add_argument("bundle")
    mc.add_argument("data")
    mc.add_argument("--steps", type=_positive, required=True, help="step count to reach")
    mc.add_argument("--batch", type=_positive, default=32)
    mc.add_argument("--board", choices=sorted(mcu.BOARDS), default="mps2-an500")
    mc.add_argument("--device", default=None, help="device profile whose flash/SRAM the build must fit")
    mc.add_argument("--eval", default=None, metavar="DATA.npz", help="accuracy before and after, on the MCU")
    mc.add_argument("--output", default=None, help="write the trained bundle here instead of over BUNDLE")
    mc.add_argument(
        "--build-dir", default=None, help="where the C sources, ELF and map go (default: a temp dir)"
    )
    mc.add_argument("--log-every", type=_positive, default=10)
    mc.add_argument("--timeout", type=_positive, default=3600, help="seconds QEMU may run")
    mc.add_argument(
        "--json", default=None, metavar="PATH", help="also write a summary (losses, accuracy, ...)"
    )
    ev = sub.add_parser("eval", help="accuracy and loss of a bundle on data")
    ev.add_argument("bundle")
    ev.add_argument("data")
    ev.add_argument("--batch", type=_positive, default=64)
    args = ap.parse_args(argv)
    try:
        return {"finetune": finetune, "mcu": mcu_cmd, "eval": evaluate_cmd}[args.command](args)
    except (ValueError, OSError, mcu.MCUError) as err:
        line = str(err).replace("\n", " ")  # one line, whatever the message
        print(f"{PROG}: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        signum = getattr(err, "signum", signal.SIGINT)
        print(
            f"{PROG}: aborted by {signal.Signals(signum).name}; the bundle keeps its last save",
            file=sys.stderr,
        )
        return 128 + signum


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        # outside the training loop (loading, evaluation, exiting) Ctrl-C ends the process at once, without
        # a traceback; nothing is being written there but the probe's empty temp file, which goes next start
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(main())
