"""numpy edge runtime vs the PyTorch engine's integer mode: QZO-FF step time and process peak RSS.

One bundle (CIFAR-style ResNet-8, w16a8, all layers trainable), one data batch and m; each side fine-tunes
in its own fresh subprocess with the same thread count, then the final weights are compared bit for bit.
The parent process imports neither numpy nor torch before the workers ran: Linux carries a parent's peak
RSS into a forked child's ru_maxrss, so a big parent would mask the workers' figures. Prints JSON; with
--out DIR also writes DIR/edge.json and DIR/edge.md (`--render JSON` rewrites the Markdown of an earlier run).

    uv run python experiments/bench_edge.py [--batch 32] [--size 32] [--m 3] [--steps 6] [--threads 1]
                                            [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

import bench_results
from timing import timed

from fwdgrad.provenance import provenance_line  # neither numpy nor torch (as bench_results)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def worker_numpy(args) -> dict:
    """Fine-tune the bundle with the numpy runtime (torch is never imported here)."""
    import numpy as np

    from fwdgrad.edge import Trainer, load_bundle

    d = np.load(args.data)
    x, y = d["x"], d["y"]
    rss_loaded = _rss_mib()
    bundle = load_bundle(args.bundle)
    trainer = Trainer(bundle)
    fwd = timed(lambda: trainer.runtime.run(x), args.steps)
    steps = timed(lambda: trainer.step(x, y), args.steps)
    np.savez(
        args.weights, **{t["name"]: bundle.arrays[t["name"] + ".weight"] for t in bundle.training["tensors"]}
    )
    return {
        "forward_s": fwd,
        "step_s": steps,
        "rss_before_model_mib": rss_loaded,
        "torch_loaded": "torch" in sys.modules,
    }


def worker_torch(args) -> dict:
    """Fine-tune the same QModel with `qzo_ff` in the PyTorch engine's integer mode (float64 CE closure)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from fwdgrad.edge import load_bundle
    from fwdgrad.export import load_model
    from fwdgrad.ff import qzo_ff

    d = np.load(args.data)
    x, y = torch.from_numpy(d["x"]), torch.from_numpy(d["y"])
    rss_loaded = _rss_mib()
    q, _ = load_model(args.qmodel)
    tr = load_bundle(args.bundle).training
    opt = qzo_ff(q, tr["lr"], tr["eps"], tr["m"], tr["seed"], trainable=tr["trainable"])
    oq = q.output_qparams()
    s, zp = float(oq.scale.reshape(-1)[0]), int(oq.zero_point.reshape(-1)[0])

    def closure():
        return F.cross_entropy((q.run(x, mode="integer").double() - zp) * s, y)

    with torch.no_grad():
        fwd = timed(lambda: q.run(x, mode="integer"), args.steps)
        steps = timed(lambda: opt.step(closure), args.steps)
    nodes = q.weight_nodes()
    np.savez(args.weights, **{n: nodes[n].weight_q.numpy() for n in tr["trainable"]})
    return {"forward_s": fwd, "step_s": steps, "rss_before_model_mib": rss_loaded, "torch_loaded": True}


def worker_prepare(args) -> dict:
    """Convert the model, export the bundle, save the batch and the QModel (a model file of plain data)."""
    import numpy as np
    import torch

    from fwdgrad.config import BUILD_MODEL
    from fwdgrad.engine import convert
    from fwdgrad.export import export_bundle, save_model
    from fwdgrad.models import build_model

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_model("resnet8", num_classes=10, in_channels=3)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    q = convert(model, "w16a8", x)
    export_bundle(q, args.bundle, None, eps=1e-3, lr=1e-4, m=args.m, seed=0)
    np.savez(args.data, x=x.numpy(), y=y.numpy())
    save_model(args.qmodel, q, {"_target_": BUILD_MODEL, "name": "resnet8"}, 10, x.shape[1:])
    return {}


WORKERS = {"prepare": worker_prepare, "numpy": worker_numpy, "torch": worker_torch}


def _run_worker(args, side: str, paths: dict, env: dict) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        side,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--size",
        str(args.size),
        "--m",
        str(args.m),
    ]
    for k, v in paths.items():
        cmd += [f"--{k}", v]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=32, help="input height = width")
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="timed steps (and forwards) per side")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads of both sides")
    ap.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    for a in ("--bundle", "--data", "--qmodel", "--weights"):
        ap.add_argument(a, help=argparse.SUPPRESS)
    bench_results.add_arguments(ap, "edge")
    args = ap.parse_args(argv)
    if args.worker:
        res = WORKERS[args.worker](args)
        print(json.dumps(dict(res, peak_rss_mib=_rss_mib())))
        return res
    if (earlier := bench_results.rendered(args, markdown)) is not None:  # no measuring
        return earlier
    threads = {k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env = dict(os.environ, **threads)
    result = {
        "model": "resnet8",
        "scheme": "w16a8",
        "input": [3, args.size, args.size],
        "batch": args.batch,
        "m": args.m,
        "forwards_per_step": 2 * args.m,
        "timed_steps": args.steps,
        "threads": args.threads,
    }
    with tempfile.TemporaryDirectory() as tmp:
        paths = {
            k: os.path.join(tmp, f)
            for k, f in (("bundle", "bundle.npz"), ("data", "data.npz"), ("qmodel", "qmodel.pt"))
        }
        _run_worker(args, "prepare", paths, env)
        result["bundle_bytes"] = os.path.getsize(paths["bundle"])
        for side in ("numpy", "torch"):
            r = _run_worker(args, side, dict(paths, weights=os.path.join(tmp, f"w_{side}.npz")), env)
            result[side] = {
                "step_ms": round(statistics.median(r["step_s"]) * 1e3, 1),
                "first_step_ms": round(r["step_s"][0] * 1e3, 1),
                "forward_ms": round(statistics.median(r["forward_s"]) * 1e3, 1),
                "peak_rss_mib": round(r["peak_rss_mib"], 1),
                "rss_before_model_mib": round(r["rss_before_model_mib"], 1),
                "torch_loaded": r["torch_loaded"],
            }
        import numpy as np  # only now: the workers are done

        with np.load(os.path.join(tmp, "w_numpy.npz")) as a, np.load(os.path.join(tmp, "w_torch.npz")) as b:
            result["weights_bit_exact"] = a.files == b.files and all(
                np.array_equal(a[k], b[k]) for k in a.files
            )
    result["step_time_numpy_over_torch"] = round(result["numpy"]["step_ms"] / result["torch"]["step_ms"], 3)
    result["peak_rss_numpy_over_torch"] = round(
        result["numpy"]["peak_rss_mib"] / result["torch"]["peak_rss_mib"], 3
    )
    result = {"provenance": bench_results.source("bench_edge.py", argv), **result}  # torch loads only now
    return bench_results.publish(result, args, "edge", markdown)


def markdown(result: dict) -> str:
    n, t = result["numpy"], result["torch"]
    return "\n".join(
        [
            "# numpy edge runtime against the PyTorch engine (integer mode)",
            "",
            provenance_line(result["provenance"]),
            "",
            f"{result['model']} {result['scheme']}, input {'x'.join(map(str, result['input']))}, batch "
            f"{result['batch']}, m = {result['m']} ({result['forwards_per_step']} forwards per step), "
            f"{result['timed_steps']} timed steps per side, {result['threads']} thread(s), each side in its "
            "own fresh process:",
            "",
            "| | numpy runtime | PyTorch engine (integer) |",
            "|---|---|---|",
            f"| step, median ms | {n['step_ms']} | {t['step_ms']} |",
            f"| forward pass, median ms | {n['forward_ms']} | {t['forward_ms']} |",
            f"| process peak RSS, MiB | {n['peak_rss_mib']} | {t['peak_rss_mib']} |",
            f"| RSS after imports and data, MiB | {n['rss_before_model_mib']} "
            f"| {t['rss_before_model_mib']} |",
            f"| final weights bit-identical | {result['weights_bit_exact']} | |",
            "",
            f"Step time numpy / engine: {result['step_time_numpy_over_torch']}; peak RSS numpy / engine: "
            f"{result['peak_rss_numpy_over_torch']}.",
            "",
        ]
    )


if __name__ == "__main__":
    main()
