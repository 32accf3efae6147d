"""Instructions per inference and per QZO-FF train_step of a bundle's C runtime on each emulated Cortex-M, and
the step latency they imply at each device profile's clock (an estimate: one instruction per cycle).

For every board of `fwdgrad.edge.mcu.BOARDS` the bundle is built (`mcu.build`, batch B) and run under QEMU
with ``-icount shift=0`` (one guest instruction = 1 ns of virtual time, read through SysTick: exact to one
tick): `--infer` inferences, then `--steps` train_steps on the first batches of DATA. Writes OUT/cost.json and
OUT/cost.md.

    uv run python experiments/mcu_cost.py --bundle outputs/edge/main.npz --data outputs/edge/train.npz \\
        [--batch 128] [--steps 2] [--infer 8] [--out docs/results/mcu] [--render JSON]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import bench_results

from fwdgrad.analysis.devices import list_devices, load_device
from fwdgrad.edge import Runtime, load_bundle, mcu
from fwdgrad.edge.__main__ import load_data
from fwdgrad.provenance import provenance_line


def measure(bundle_path: str, data: str, batch: int, steps: int, infer: int) -> list[dict]:
    bundle = load_bundle(bundle_path)
    runtime = Runtime(bundle)
    x, y = load_data(data, runtime)
    codes = runtime.quantize_input(x[: max(infer, steps * batch)])
    rows = []
    for board, cpu in mcu.BOARDS.items():
        with tempfile.TemporaryDirectory() as tmp:
            info = mcu.build(load_bundle(bundle_path), tmp, x.shape[1:], batch, board)
            n = steps * batch
            res = mcu.run(info, bundle, codes[:infer], codes[:n], y[:n], None, batch, board, timeout=3600)
        print(f"{board}: infer {res.infer_instructions}, train_step {res.step_instructions}", flush=True)
        rows.append(
            {
                "board": board,
                "cpu": cpu.split("+")[0],
                "infer": int(statistics.median(res.infer_instructions)),
                "step": int(statistics.median(res.step_instructions)),
                "infer_spread": max(res.infer_instructions) - min(res.infer_instructions),
                "step_spread": max(res.step_instructions) - min(res.step_instructions),
            }
        )
    return rows


def render(res: dict) -> str:
    m, b = res["m"], res["batch"]
    lines = [
        "# The C runtime's cost on emulated Cortex-M boards",
        "",
        res["provenance"],
        "",
        f"Bundle {res['bundle']} ({res['trainable']} trainable, m = {m}), train_step of batch {b}. "
        "Instruction counts from QEMU `-icount shift=0` and SysTick, exact to one tick (40 instructions on "
        "the MPS2 boards, 31.25 on the MPS3), medians over the calls (largest spread between calls in "
        f'brackets). "Without prefix reuse" is computed, not measured: 2m·batch inferences ({2 * m * b}).',
        "",
        "| board | CPU | instructions per infer | per train_step | per train_step without prefix reuse |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['board']} | {r['cpu']} | {r['infer']:,} ({r['infer_spread']}) | {r['step']:,} "
            f"({r['step_spread']}) | {2 * m * b * r['infer']:,} |"
        )
    lines += [
        "",
        "**Estimated** latency at each device profile's clock (`clock_hz`), assuming one instruction per "
        "cycle on the board of the same core. Neither a cycle count nor a hardware measurement: a Cortex-M7 "
        "is dual-issue, flash wait states and cache misses slow it, and the C kernels use plain int64 "
        "arithmetic, not SMLAD. Profiles without `clock_hz` or without a Cortex-M core are not listed.",
        "",
        "| profile | clock | board | infer | train_step |",
        "|---|---|---|---|---|",
    ]
    for p in res["profiles"]:
        r = next(r for r in res["rows"] if r["board"] == p["board"])
        clock = p["clock_hz"]
        lines.append(
            f"| {p['name']} | {clock / 1e6:g} MHz | {p['board']} | {1e3 * r['infer'] / clock:.2f} ms | "
            f"{r['step'] / clock:.3f} s |"
        )
    return "\n".join(lines) + "\n"


#: device profile -> the board with the same core
PROFILE_BOARD = {"mcu_m7": "mps2-an500"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", help="a bundle with training settings")
    ap.add_argument("--data", help="an .npz with x and y (the train_step batches)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--infer", type=int, default=8)
    bench_results.add_arguments(ap, "cost")
    args = ap.parse_args(argv)
    done = bench_results.rendered(args, render)
    if done is not None:
        return done
    if not (args.bundle and args.data):
        ap.error("--bundle and --data are required (or --render JSON)")
    tr = load_bundle(args.bundle).training
    profiles = []
    for name in list_devices():
        dev = load_device(name)
        if dev.clock_hz and name in PROFILE_BOARD:
            profiles.append({"name": name, "clock_hz": dev.clock_hz, "board": PROFILE_BOARD[name]})
    result = {
        "provenance": provenance_line(bench_results.source("mcu_cost.py", argv)),
        "bundle": args.bundle,
        "trainable": " ".join(tr["trainable"]),
        "m": tr["m"],
        "batch": args.batch,
        "rows": measure(args.bundle, args.data, args.batch, args.steps, args.infer),
        "profiles": profiles,
    }
    return bench_results.publish(result, args, "cost", render)


if __name__ == "__main__":
    main()
