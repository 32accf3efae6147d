"""Wall time of a QZO-FF run against a BP run of the OOD preset, one after the other on this machine.

Runs `fwdgrad run experiment=ood data.severity=<severity> mode.lp_layers=1 method=<bp|qzo_ff> seed=<seed>`
(the source model is pretrained once and cached, so a first-ever call pretrains it first, outside the
measured times) and reads each run's metrics.json: the training-step time (`wall_s`, what reports show),
the whole run (`total_wall_s`: data, conversion, calibration, evaluations) and the test accuracy.
Prints JSON; with --out DIR also writes DIR/ood_wall.json and DIR/ood_wall.md (`--render JSON` rewrites
the Markdown of an earlier JSON without running anything).

    uv run python experiments/bench_ood.py [--severity medium] [--seed 0] [--steps N] [--out DIR]
        [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_results

from fwdgrad.provenance import provenance_line

METHODS = ("bp", "qzo_ff")


def run(method: str, args, folder: Path) -> dict:
    overrides = [
        "experiment=ood",
        f"data.severity={args.severity}",
        "mode.lp_layers=1",
        f"method={method}",
        f"seed={args.seed}",
        f"hydra.run.dir={folder / method}",
        *args.overrides,
    ]
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    cmd = [sys.executable, "-m", "fwdgrad.cli", "run", *overrides]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((folder / method / "metrics.json").read_text())
    return {k: metrics[k] for k in ("test_acc", "wall_s", "total_wall_s", "steps", "forward_passes")}


def markdown(result: dict) -> str:
    bp, ff, ratio = result["bp"], result["qzo_ff"], result["qzo_ff_over_bp"]
    return "\n".join(
        [
            "# QZO-FF against BP: wall time of the OOD preset",
            "",
            provenance_line(result["provenance"]),
            "",
            f"`experiment=ood data.severity={result['severity']} mode.lp_layers=1`, seed {result['seed']}, "
            "one run after the other on this machine:",
            "",
            "| method | test acc | training steps s (`wall_s`) | whole run s (`total_wall_s`) |",
            "|---|---|---|---|",
            f"| BP fp32 | {bp['test_acc']:.4f} | {bp['wall_s']:.1f} | {bp['total_wall_s']:.1f} |",
            f"| QZO-FF w16a8 | {ff['test_acc']:.4f} | {ff['wall_s']:.1f} | {ff['total_wall_s']:.1f} |",
            f"| QZO-FF / BP | | {ratio['wall_s']} | {ratio['total_wall_s']} |",
            "",
        ]
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--severity", default="medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    ap.add_argument("--set", nargs="+", default=[], dest="overrides", help="more Hydra overrides (both runs)")
    bench_results.add_arguments(ap, "ood_wall")
    args = ap.parse_args(argv)
    if (earlier := bench_results.rendered(args, markdown)) is not None:  # no measuring
        return earlier
    result = {"provenance": bench_results.source("bench_ood.py", argv), "severity": args.severity}
    result["seed"] = args.seed
    with tempfile.TemporaryDirectory() as tmp:
        for method in METHODS:
            result[method] = run(method, args, Path(tmp))
    bp, ff = result["bp"], result["qzo_ff"]
    result["qzo_ff_over_bp"] = {
        "wall_s": round(ff["wall_s"] / bp["wall_s"], 3),
        "total_wall_s": round(ff["total_wall_s"] / bp["total_wall_s"], 3),
    }
    result["goal"] = {"wall_s": 1.5}
    return bench_results.publish(result, args, "ood_wall", markdown)


if __name__ == "__main__":
    main()
