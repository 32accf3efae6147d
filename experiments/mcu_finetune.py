"""The main job's model fine-tuned on an emulated Cortex-M and, with the same settings on the same batches, by
the engine in integer mode (QZO-FF with the integer loss): the trained weights, every step's loss and the test
accuracy side by side.

The device side is the documented command ``python -m fwdgrad.edge mcu`` (the generated C runtime built with
arm-none-eabi-gcc, run under qemu-system-arm; batches streamed in over semihosting), called in-process with
``--json``. The engine side loads the run's model.pt, builds `fwdgrad.ff.qzo_ff` with the bundle's settings,
starts its step counter at the bundle's step and steps on the same batches (`batch_indices`) with
`fwdgrad.ff.intloss.integer_closure`. Writes OUT/finetune.json and OUT/finetune.md.

    uv run fwdgrad main
    uv run fwdgrad export outputs/main/qzo_ff_w16a8/model.pt outputs/edge/main.npz --data outputs/edge
    uv run python experiments/mcu_finetune.py --model outputs/main/qzo_ff_w16a8/model.pt \\
        --bundle outputs/edge/main.npz --data outputs/edge [--steps 300] [--batch 128] \\
        [--board mps2-an500] [--device mcu_m7] [--out docs/results/mcu] [--render JSON]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import bench_results
import numpy as np
import torch

from fwdgrad.edge import load_bundle
from fwdgrad.edge.__main__ import batch_indices
from fwdgrad.edge.__main__ import main as edge_main
from fwdgrad.export.settings import load_model
from fwdgrad.ff import qzo_ff
from fwdgrad.ff.intloss import integer_closure
from fwdgrad.provenance import provenance_line


def engine_finetune(
    model_path: str, bundle_path: str, train: dict, test: dict, steps: int, batch: int
) -> dict:
    """The engine's QZO-FF from the bundle's step for `steps` steps with the integer loss: its weights, the
    mean of each step's 2m losses, and test accuracy (integer mode) before and after."""
    q, _ = load_model(model_path)
    tr = load_bundle(bundle_path).training
    names = tr["trainable"]
    opt = qzo_ff(
        q, tr["lr"], tr["eps"], tr["m"], tr["seed"], trainable=names, distribution=tr["distribution"],
        z_max=tr["z_max"], rounding=tr["rounding"], perturb_scale=tr["perturb_scale"],
        eps_min_q=tr["eps_min_q"],
    )  # fmt: skip
    opt.step_count = tr["step"]
    closure = integer_closure(q, lambda: names[0])
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["y"]).long()
    xt, yt = torch.from_numpy(test["x"]), torch.from_numpy(test["y"]).long()

    def accuracy() -> int:
        with torch.no_grad():
            return int((q.run(xt, mode="integer").argmax(1) == yt).sum())

    before, losses, t0 = accuracy(), [], time.perf_counter()
    for k in range(tr["step"], tr["step"] + steps):
        idx = torch.from_numpy(batch_indices(tr["seed"], k, batch, len(x)))
        losses.append(float(opt.step(closure(x[idx], y[idx]))))
    wall = time.perf_counter() - t0
    weights = {n: q.weight_nodes()[n].weight_q.numpy().copy() for n in names}
    return {"weights": weights, "losses": losses, "before": before, "after": accuracy(), "wall_s": wall}


def render(res: dict) -> str:
    dev, eng = res["device"], res["engine"]
    n = dev["eval"]["after"]["n"]
    acc = lambda c: f"{100 * c / n:.1f} % ({c}/{n})"  # noqa: E731
    inst = dev["instructions"]
    mem = dev["memory"]["objects"]["app"]
    lines = [
        "# The main job's model fine-tuned on an emulated Cortex-M, against the engine",
        "",
        res["provenance"],
        "",
        f"Model: {res['model']} exported to {res['bundle']} (step {dev['steps'][0]}); {res['steps']} QZO-FF "
        f"steps of batch {dev['batch']} with the integer loss on the run's target train data "
        f"({res['train_samples']} images, digits 5-9), test on its {n} test images. Device: "
        f"`{dev['board']}` ({dev['cpu']}) under QEMU, built for the `{dev['device']}` profile's memory.",
        "",
        "| | device (C under QEMU) | engine (integer mode) |",
        "|---|---|---|",
        f"| test accuracy before | {acc(dev['eval']['before']['correct'])} | {acc(eng['before'])} |",
        f"| test accuracy after {res['steps']} steps | {acc(dev['eval']['after']['correct'])} | "
        f"{acc(eng['after'])} |",
        f"| loss of the last step (mean of 2m) | {dev['losses'][-1]:.4f} | {eng['losses'][-1]:.4f} |",
        f"| steps with identical losses | {res['equal_losses']} / {res['steps']} | |",
        f"| trained weights identical | {res['equal_weights']} ({res['weights']} weights) | |",
        f"| wall time on the host | {dev['wall_s']:.1f} s (QEMU, -icount) | {eng['wall_s']:.1f} s |",
        "",
        f"Instructions per train_step (median): {inst['train_step_median']:,}; per inference: "
        f"{inst['infer_median']:,} (QEMU `-icount shift=0` and SysTick, exact to one tick). Application "
        f"memory (linker map): flash {mem['flash']:,} B, SRAM {mem['sram']:,} B plus a "
        f"{dev['memory']['stack_bytes']:,} B stack reservation; the prefix store is "
        f"{dev['prefix_bytes']:,} B.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="the run's model.pt")
    ap.add_argument("--bundle", help="its exported bundle (not modified)")
    ap.add_argument("--data", help="folder with train.npz and test.npz (fwdgrad export --data)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--board", default="mps2-an500")
    ap.add_argument("--device", default="mcu_m7")
    ap.add_argument("--log-every", type=int, default=25)
    bench_results.add_arguments(ap, "finetune")
    args = ap.parse_args(argv)
    done = bench_results.rendered(args, render)
    if done is not None:
        return done
    if not (args.model and args.bundle and args.data):
        ap.error("--model, --bundle and --data are required (or --render JSON)")
    data = {}
    for part in ("train", "test"):
        with np.load(os.path.join(args.data, f"{part}.npz"), allow_pickle=False) as f:
            data[part] = {"x": f["x"], "y": f["y"]}
    start = load_bundle(args.bundle).training["step"]
    with tempfile.TemporaryDirectory() as tmp:
        out_bundle, summary = os.path.join(tmp, "mcu.npz"), os.path.join(tmp, "mcu.json")
        cmd = [
            "mcu", args.bundle, os.path.join(args.data, "train.npz"), "--steps", str(start + args.steps),
            "--batch", str(args.batch), "--board", args.board, "--device", args.device,
            "--eval", os.path.join(args.data, "test.npz"), "--output", out_bundle, "--json", summary,
            "--log-every", str(args.log_every), "--build-dir", os.path.join(tmp, "build"),
        ]  # fmt: skip
        if edge_main(cmd) != 0:
            raise SystemExit("python -m fwdgrad.edge mcu failed")
        with open(summary) as f:
            device = json.load(f)
        trained = load_bundle(out_bundle)
        print(f"engine: {args.steps} steps on the same batches ...", flush=True)
        engine = engine_finetune(args.model, args.bundle, data["train"], data["test"], args.steps, args.batch)
        equal_w = all(np.array_equal(trained.arrays[f"{n}.weight"], w) for n, w in engine["weights"].items())
    result = {
        "provenance": provenance_line(bench_results.source("mcu_finetune.py", argv)),
        "model": args.model,
        "bundle": args.bundle,
        "steps": args.steps,
        "train_samples": len(data["train"]["y"]),
        "device": device,
        "engine": {k: v for k, v in engine.items() if k != "weights"},
        "equal_losses": sum(a == b for a, b in zip(device["losses"], engine["losses"])),
        "equal_weights": equal_w,
        "weights": int(sum(w.size for w in engine["weights"].values())),
    }
    return bench_results.publish(result, args, "finetune", render)


if __name__ == "__main__":
    main()
