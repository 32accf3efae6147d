"""Speed of the exact integer engine against the float32 model, measured side by side in one process.

For each model, batch and scheme, the forward time over interleaved rounds (each runs every variant once;
ratios are the median over rounds of each round's ratio, times the median ms) of:
  float32       the model as given (the baseline of every ratio)
  integer       the exact integer mode: certified float kernels + the fused C epilogue
  integer_torch the same integers on the torch fallback path (no C compiler, or FWDGRAD_KERNELS=0)
  integer_float integer mode with requant=float (PyTorch x86 semantics)
  fake          fake-quant mode
and, for the first model and batch at w16a8, training steps (m perturbations):
  ft step       QZO-FF, every layer trained / (2m forwards in the same mode, back to back), integer and
                fake
  lp step       QZO-FF on the last layer, a fresh batch each step (frozen prefix once, the 2m head passes
                stacked into one, the update) / one full forward of that batch; and the same step with
                the 2m head passes one by one (`sequential`)
It records the CPU's ISA flags, torch's CPU capability, whether the C kernels were built and the kernel
each layer chose, and times the perturbation sampler (C against the numpy reference). Prints JSON; with
--out DIR also writes DIR/bench.json and DIR/bench.md (`--render JSON` rewrites the Markdown of an earlier
JSON without measuring).

    uv run python experiments/bench_engine.py [--models resnet8 resnet18 mobilenet_v2] [--batches 16 64]
        [--schemes w8a8 w16a8] [--reps 15] [--threads 1] [--m 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
from contextlib import nullcontext
from pathlib import Path

import bench_results
import torch
import torch.nn.functional as F
from timing import timed

from fwdgrad import native
from fwdgrad.engine import convert, kernels
from fwdgrad.ff import PassLoss, qzo_ff
from fwdgrad.models import build_model
from fwdgrad.provenance import provenance_line
from fwdgrad.rng import reference, torch_port

ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
GOALS = {  # ratios to the float32 forward (forward), or to 2m / one forward (steps)
    "forward": {"w8a8": 1.0, "w16a8": 1.5, "other_models": 2.0, "integer_float": 0.5, "fake": 1.2},
    "steps": {"ft_integer": 1.05, "ft_fake": 1.05, "lp_integer": 1.05},
}


def isa() -> dict:
    """The ISA flags (of ISA_FLAGS) /proc/cpuinfo lists, and torch's own view of the CPU."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {
        "flags": [f for f in ISA_FLAGS if f in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "c_kernels": kernels.library() is not None,
    }


def interleaved(fns: dict, reps: int) -> dict[str, list[float]]:
    """Seconds of each (function, context) in `fns`, one per round: every round runs each once, in the
    reverse order every other round (A B, B A: a drift within a round favours neither), so drift hits them
    all alike (the warm-up round is dropped)."""
    times = {k: [] for k in fns}
    for r in range(reps + 1):  # the first round warms up
        for k, (fn, ctx) in list(fns.items())[:: -1 if r % 2 else 1]:
            with ctx():
                t = timed(fn, 1)
            kernels.library()  # reload outside the timed call after a torch-path round
            times[k] += t
    return {k: v[1:] for k, v in times.items()}


def ms(times: dict[str, list[float]], k: str) -> float:
    """The median milliseconds of `k`."""
    return round(statistics.median(times[k]) * 1e3, 2)


def ratio(times: dict[str, list[float]], k: str, base: str, scale: float = 1.0) -> float:
    """The median over rounds of k's time / (scale · base's time) in the same round: a slow spell of the
    machine (this VM's speed drifts by tens of % within seconds) cancels in each round's ratio."""
    return round(statistics.median(a / (scale * b) for a, b in zip(times[k], times[base])), 3)


def forward_row(model, name: str, batch: int, scheme: str, reps: int, g) -> dict:
    x = torch.randn(batch, 3, 32, 32, generator=g)
    q = convert(model, scheme, x)
    fns = {
        "float32": (lambda: model(x), nullcontext),
        "integer": (lambda: q(x, mode="integer"), nullcontext),
        "integer_torch": (lambda: q(x, mode="integer"), native.disabled),
        "integer_float": (lambda: _with_requant(q, "float", x), nullcontext),
        "fake": (lambda: q(x, mode="fake"), nullcontext),
    }
    t = interleaved(fns, reps)
    row = {"model": name, "batch": batch, "scheme": scheme}
    row |= {f"{k}_ms": ms(t, k) for k in t}
    row |= {f"{k}_over_float32": ratio(t, k, "float32") for k in t if k != "float32"}
    row["kernels"] = q.describe()
    with native.disabled():
        row["kernels_torch_path"] = q.describe()
    return row


def _with_requant(q, requant: str, x):
    before, q.requant = q.requant, requant
    try:
        return q(x, mode="integer")
    finally:
        q.requant = before


def step_rows(model, batch: int, m: int, reps: int, g) -> dict:
    """QZO-FF step costs on the model at w16a8 (see the module docstring)."""
    xs = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(reps + 1)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in xs]
    x, y = xs[0], ys[0]
    out = {}
    groups = []  # each group interleaved on its own: a step beside the forward it is compared with
    for mode in ("integer", "fake"):
        q = convert(model, "w16a8", x)
        q.mode = mode
        opt = qzo_ff(q, lr=1e-3, eps=1e-3, m=m)
        groups.append(
            {  # 2m forwards back to back against one step: blocks of one length see the same drift
                f"{mode}_forwards": (lambda q=q: [q(x) for _ in range(2 * m)], nullcontext),
                f"{mode}_ft_step": (
                    lambda q=q, opt=opt: opt.step(lambda: F.cross_entropy(q(x), y)),
                    nullcontext,
                ),
            }
        )
    q = convert(model, "w16a8", x)
    head = list(q.weight_nodes())[-1]
    lp = qzo_ff(q, lr=1e-3, eps=1e-3, m=m, trainable=[head])
    batches = iter(range(10**9))

    def lp_step(stacked: bool):
        i = next(batches) % len(xs)
        prefix = q.run_prefix(xs[i], head)
        closure = PassLoss(lambda: q(xs[i], prefix=prefix), ys[i], F.cross_entropy)  # as `fwdgrad.train`
        lp.step(closure if stacked else lambda: closure())  # a plain closure runs pass by pass

    def lp_forward():
        q(xs[next(batches) % len(xs)])

    groups.append(
        {
            "lp_forward": (lp_forward, nullcontext),
            "lp_step": (lambda: lp_step(True), nullcontext),
            "lp_step_sequential": (lambda: lp_step(False), nullcontext),
        }
    )
    t = {}
    with torch.no_grad():
        for fns in groups:  # four times the rounds of a forward row: these ratios are judged to a percent,
            t |= interleaved(fns, 4 * reps)  # and one round's ratio varies by ±10 % on this VM
    for mode in ("integer", "fake"):
        out[f"ft_{mode}"] = {
            "forward_ms": round(ms(t, f"{mode}_forwards") / (2 * m), 2),
            "step_ms": ms(t, f"{mode}_ft_step"),
            "step_over_2m_forwards": ratio(t, f"{mode}_ft_step", f"{mode}_forwards"),
        }
    out["lp_integer"] = {
        "forward_ms": ms(t, "lp_forward"),
        "step_ms": ms(t, "lp_step"),
        "step_over_forward": ratio(t, "lp_step", "lp_forward"),
        "sequential_step_ms": ms(t, "lp_step_sequential"),
        "sequential_step_over_forward": ratio(t, "lp_step_sequential", "lp_forward"),
        "trained": head,
    }
    return out


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def sampler_rows(reps: int) -> dict:
    """The 8-bit Gaussian perturbation of n elements: C (torch_port on the CPU) vs the numpy reference."""
    out = {}
    for n in (1 << 16, 1 << 20):
        fns = {
            "c": (lambda n=n: torch_port.gaussian_q(1, 2, 3, 4, (n,)), nullcontext),
            "numpy": (lambda n=n: reference.gaussian_q(1, 2, 3, 4, (n,)), nullcontext),
        }
        t = interleaved(fns, reps)
        out[str(n)] = {f"{k}_ms": round(statistics.median(v) * 1e3, 3) for k, v in t.items()}
    return out


def markdown(result: dict) -> str:
    cpu, prov = result["cpu"], result["provenance"]
    flags = ", ".join(cpu["flags"]) or "none of " + ", ".join(ISA_FLAGS)
    lines = [
        "# Engine benchmark",
        "",
        provenance_line(prov),
        "",
        f"CPU: {prov['cpu']}; ISA flags: {flags}; torch CPU capability {cpu['torch_cpu_capability']}; "
        f"C kernels built: {cpu['c_kernels']}; {result['threads']} thread(s), {result['reps']} interleaved "
        "rounds (four times as many for the steps; the order reversed every other round): ratios are the "
        "median of each round's ratio, times the median ms.",
        "",
        "Forward time relative to the float32 model (lower is faster):",
        "",
        _row(
            "model",
            "batch",
            "scheme",
            "float32 ms",
            "integer",
            "integer, torch path",
            "requant=float",
            "fake",
        ),
        _row(*["---"] * 8),
    ]
    for r in result["forward"]:
        lines.append(
            _row(
                r["model"],
                r["batch"],
                r["scheme"],
                r["float32_ms"],
                r["integer_over_float32"],
                r["integer_torch_over_float32"],
                r["integer_float_over_float32"],
                r["fake_over_float32"],
            )  # fmt: skip
        )
    s = result.get("steps")
    if s:
        lines += ["", f"Training steps ({s['model']}, batch {s['batch']}, w16a8, m = {s['m']}):", ""]
        lines += [_row("step", "forward ms", "step ms", "ratio"), _row(*["---"] * 4)]
        for key, label, ratio in (
            ("ft_integer", "QZO-FF ft, integer / (2m forwards)", "step_over_2m_forwards"),
            ("ft_fake", "QZO-FF ft, fake / (2m forwards)", "step_over_2m_forwards"),
            ("lp_integer", "QZO-FF lp (fresh batch), integer / one forward", "step_over_forward"),
        ):
            lines.append(_row(label, s[key]["forward_ms"], s[key]["step_ms"], s[key][ratio]))
        lp = s["lp_integer"]
        if "sequential_step_ms" in lp:  # JSON written before the passes were stacked lacks it
            label = "QZO-FF lp, head passes one by one (not stacked)"
            cells = lp["forward_ms"], lp["sequential_step_ms"], lp["sequential_step_over_forward"]
            lines.append(_row(label, *cells))
    if result.get("sampler"):
        lines += ["", "Perturbation sampler (`gaussian_q`, int8), median ms:", ""]
        lines += [_row("elements", "C", "numpy reference"), _row("---", "---", "---")]
        lines += [_row(n, v["c_ms"], v["numpy_ms"]) for n, v in result["sampler"].items()]
    first = result["forward"][0]
    lines += [
        "",
        f"Kernels chosen ({first['model']}, {first['scheme']}):",
        "",
        "| layer | kernel |",
        "|---|---|",
    ]
    lines += [_row(k, v) for k, v in first["kernels"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet8", "resnet18", "mobilenet_v2"])
    ap.add_argument("--batches", nargs="+", type=int, default=[16, 64])
    ap.add_argument("--schemes", nargs="+", default=["w8a8", "w16a8"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--m", type=int, default=3)
    bench_results.add_arguments(ap, "bench")
    args = ap.parse_args(argv)
    if (earlier := bench_results.rendered(args, markdown)) is not None:  # no measuring
        return earlier
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    result = {
        "provenance": bench_results.source("bench_engine.py", argv),
        "cpu": isa(),
        "threads": args.threads,
        "reps": args.reps,
        "goals": GOALS,
        "forward": [],
    }
    with torch.no_grad():
        for name in args.models:
            model = build_model(name, num_classes=10, in_channels=3).eval()
            for batch in args.batches:
                for scheme in args.schemes:
                    row = forward_row(model, name, batch, scheme, args.reps, g)
                    result["forward"].append(row)
                    print(
                        json.dumps({k: v for k, v in row.items() if not k.startswith("kernels")}), flush=True
                    )
    model = build_model(args.models[0], num_classes=10, in_channels=3).eval()
    batch = args.batches[-1]
    result["steps"] = {"model": args.models[0], "batch": batch, "m": args.m}
    result["steps"] |= step_rows(model, batch, args.m, args.reps, g)
    result["sampler"] = sampler_rows(args.reps)
    return bench_results.publish(result, args, "bench", markdown)


if __name__ == "__main__":
    main()
