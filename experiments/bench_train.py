"""Cost of a forward-gradient training step, measured side by side in one run.

On one model (ResNet-8, 32x32 inputs, full fine-tuning so every weight is perturbed):

* QZO-FF step time / (2m x one forward pass in the same mode), integer and fake mode  (goal <= 1.25)
* fp32 ZO-SGD (sign-m-SPSA) step time / (2m x one float32 forward)
* FF step time / BP step time (fp32 backprop, SGD)
* peak memory of a QZO-FF step / peak memory of inference on the same batch              (goal <= 1.10)
* BP step peak memory / FF step peak memory

Times are medians over interleaved repetitions; memory is torch's allocator peak (profiler), see
`fwdgrad.measure.measure_peak_memory`. Prints JSON.

    uv run python experiments/bench_train.py [--batch 32] [--m 3] [--reps 7]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from timing import median_time

from fwdgrad.engine import convert
from fwdgrad.ff import qzo_ff, zo_sgd
from fwdgrad.measure import measure_peak_memory
from fwdgrad.models import build_model


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet8")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    model = build_model(args.model, num_classes=10, in_channels=3).eval()
    m = args.m
    out = {"model": args.model, "batch": args.batch, "m": m, "threads": args.threads, "mode": "ft"}

    def loss_of(f):
        return lambda: F.cross_entropy(f(x), y)

    # float32: one forward, a ZO-SGD step, a BP step
    zo = zo_sgd(model, lr=1e-4, eps=1e-3, estimator="sign_spsa", m=m)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)

    def bp_step():
        sgd.zero_grad()
        F.cross_entropy(model(x), y).backward()
        sgd.step()

    with torch.no_grad():
        t_f32 = median_time(lambda: model(x), args.reps)
        t_zo = median_time(lambda: zo.step(loss_of(model)), args.reps)
        mem_inf_f32 = measure_peak_memory(lambda: model(x))
    t_bp = median_time(bp_step, args.reps)
    mem_bp = measure_peak_memory(bp_step)
    out["fp32"] = {
        "forward_ms": round(t_f32 * 1e3, 2),
        "zo_step_ms": round(t_zo * 1e3, 2),
        "bp_step_ms": round(t_bp * 1e3, 2),
        "zo_step_over_2m_forwards": round(t_zo / (2 * m * t_f32), 3),
        "zo_step_over_bp_step": round(t_zo / t_bp, 3),
    }
    for mode in ("integer", "fake"):
        q = convert(model, "w16a8", x)
        q.mode = mode
        opt = qzo_ff(q, lr=1e-3, eps=1e-3, m=m)
        with torch.no_grad():
            t_fwd = median_time(lambda q=q: q(x), args.reps)
            t_step = median_time(lambda q=q, opt=opt: opt.step(loss_of(q)), args.reps)
            mem_inf = measure_peak_memory(lambda q=q: q(x))
            mem_step = measure_peak_memory(lambda q=q, opt=opt: opt.step(loss_of(q)))
        out[f"qzo_ff_{mode}"] = {
            "forward_ms": round(t_fwd * 1e3, 2),
            "step_ms": round(t_step * 1e3, 2),
            "step_over_2m_forwards": round(t_step / (2 * m * t_fwd), 3),
            "step_over_bp_step": round(t_step / t_bp, 3),
            "peak_step_bytes": mem_step,
            "peak_inference_bytes": mem_inf,
            "step_over_inference_memory": round(mem_step / mem_inf, 3),
            "bp_over_ff_memory": round(mem_bp / mem_step, 3),
        }
    out["memory"] = {"bp_step_bytes": mem_bp, "fp32_inference_bytes": mem_inf_f32}
    out["goals"] = {"step_over_2m_forwards": 1.25, "step_over_inference_memory": 1.10}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
