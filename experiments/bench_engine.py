"""Forward-pass time of the integer and fake execution modes relative to the float32 model.

Same model (CIFAR-style ResNet-8, batch 64, 32x32 inputs), same process, interleaved repetitions, median
times. Goal: integer <= 2.0x and fake <= 1.5x float32. Prints JSON.

    uv run python experiments/bench_engine.py [--schemes w8a8 w16a8] [--reps 15] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from timing import timed

from fwdgrad.engine import convert
from fwdgrad.models import build_model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w16a8"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=3).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    result = {
        "model": "resnet8",
        "batch": args.batch,
        "input": [3, 32, 32],
        "threads": args.threads,
        "torch": torch.__version__,
        "schemes": {},
    }
    with torch.no_grad():
        for scheme in args.schemes:
            q = convert(model, scheme, x)
            runs = {
                "float32": lambda: model(x),
                "integer": lambda q=q: q(x, mode="integer"),
                "fake": lambda q=q: q(x, mode="fake"),
            }
            for fn in runs.values():  # warm-up
                fn()
            times = {k: [] for k in runs}
            for _ in range(args.reps):  # interleave so drift hits every mode alike
                for k, fn in runs.items():
                    times[k] += timed(fn, 1)
            med = {k: statistics.median(v) for k, v in times.items()}
            result["schemes"][scheme] = {
                "float32_ms": round(med["float32"] * 1e3, 3),
                "integer_ms": round(med["integer"] * 1e3, 3),
                "fake_ms": round(med["fake"] * 1e3, 3),
                "integer_over_float32": round(med["integer"] / med["float32"], 3),
                "fake_over_float32": round(med["fake"] / med["float32"], 3),
                "goal": {"integer": 2.0, "fake": 1.5},
            }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
