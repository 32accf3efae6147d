"""The integer ViT against its float model: prediction agreement and accuracy, the per-op error of the
integer LayerNorm and softmax, and the integer / float32 forward time, in one process.

The model is the source model of `experiment=ood_vit` (a small ViT pretrained on clean Fashion-MNIST by the
pipeline and cached; a first call pretrains it), converted at each scheme with the preset's calibration,
and evaluated on the clean Fashion-MNIST test set (10,000 images). Per-op error is each op's own: the
integer op's output against the float op on the same (dequantized) integer input, in output LSBs.
Times are medians of interleaved runs with 1 thread. Prints JSON; with --out DIR also writes
DIR/vit.json and DIR/vit.md (`--render JSON` rewrites the Markdown of an earlier JSON).

    uv run python experiments/bench_vit.py [--schemes w16a8 w8a8] [--residual 8 16] [--max-test N]
        [--batch 64] [--reps 5] [--set KEY=VALUE ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
import warnings

import bench_results
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from fwdgrad.conf import CONF_DIR
from fwdgrad.config import validate
from fwdgrad.engine import convert
from fwdgrad.engine.transformer import QLayerNorm, QSoftmax
from fwdgrad.pipeline.steps import load_task, source_model
from fwdgrad.provenance import provenance_line
from fwdgrad.quant import dequantize


def _config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=["experiment=ood_vit", "progress=false", *overrides]))


def _predict(model, x, batch: int = 500) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def op_errors(q, float_model, x) -> dict:
    """Max and mean |integer − float| in output LSBs of every LayerNorm and softmax, each on its own input,
    where the float value lies in the output's range (the share of clipped outputs is reported apart)."""
    env = q.run(x, keep=True)
    modules = dict(float_model.named_modules())
    found: dict[str, list[torch.Tensor]] = {"layernorm": [], "softmax": []}
    for node in q.nodes:
        if isinstance(node, QLayerNorm):
            ln = modules[node.name.replace("_ln", ".ln").replace("layers_", "layers.")]
            xin = dequantize(env[node.inputs[0]], node.in_qp).float()
            ref = F.layer_norm(xin, ln.normalized_shape, ln.weight, ln.bias, ln.eps)
            kind = "layernorm"
        elif isinstance(node, QSoftmax):
            ref = torch.softmax(dequantize(env[node.inputs[0]], node.in_qp).float(), -1)
            kind = "softmax"
        else:
            continue
        out = dequantize(env[node.name], node.out_qp).float()
        fmt, s, zp = node.out_qp.fmt, float(node.out_qp.scale), int(node.out_qp.zero_point)
        inside = (ref >= (fmt.qmin - zp) * s) & (ref <= (fmt.qmax - zp) * s)
        err = ((out - ref).abs() / s).detach()
        found[kind].append((err[inside], (~inside).float().mean()))
    result = {}
    for k, v in found.items():
        err = torch.cat([e for e, _ in v])
        clipped = float(torch.stack([c for _, c in v]).mean())
        result[k] = {"max_lsb": round(float(err.max()), 3), "mean_lsb": round(float(err.mean()), 4)}
        result[k]["clipped_pct"] = round(100 * clipped, 3)
    return result


def forward_times(q, model, x, reps: int) -> dict:
    """Median seconds of the integer and the float32 forward, interleaved, 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ti, tf = [], []
    with torch.no_grad():
        q(x), model(x)  # warm-up (kernel timing, builds)
        for _ in range(reps):
            t = time.perf_counter()
            q(x)
            ti.append(time.perf_counter() - t)
            t = time.perf_counter()
            model(x)
            tf.append(time.perf_counter() - t)
    torch.set_num_threads(threads)
    mi, mf = sorted(ti)[reps // 2], sorted(tf)[reps // 2]
    return {"integer_ms": round(mi * 1e3, 2), "float_ms": round(mf * 1e3, 2), "ratio": round(mi / mf, 3)}


def markdown(result: dict) -> str:
    lines = [
        "# Integer ViT against its float model",
        "",
        provenance_line(result["provenance"]),
        "",
        f"Model: {result['model']}, source test accuracy (float) {result['float_acc']:.4f} on "
        f"{result['test_examples']:,} clean Fashion-MNIST test images. Per-op error: each integer op against "
        "the float op on the same input, in output LSBs, where the float value is inside the output range "
        "(the share outside, clipped by the calibrated range, in brackets). Forward time: batch "
        f"{result['batch']}, 1 thread, median of {result['reps']} interleaved runs.",
        "",
        "| scheme | residual bits | integer acc | Δ acc (pts) | agreement | LayerNorm max / mean LSB "
        "| softmax max / mean LSB | integer / float32 forward |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        ln, sm, t = r["op_error"]["layernorm"], r["op_error"]["softmax"], r["time"]
        delta = 100 * (r["acc"] - result["float_acc"])
        lines.append(
            f"| {r['scheme']} | {r['residual_bits']} | {r['acc']:.4f} | {delta:+.2f} "
            f"| {100 * r['agreement']:.2f} % | {ln['max_lsb']} / {ln['mean_lsb']} ({ln['clipped_pct']} %) "
            f"| {sm['max_lsb']} / {sm['mean_lsb']} | {t['ratio']} ({t['integer_ms']} / {t['float_ms']} ms) |"
        )
    return "\n".join(lines + [""])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", nargs="+", default=["w16a8", "w8a8"])
    ap.add_argument("--residual", nargs="+", type=int, default=[8, 16], help="residual stream widths")
    ap.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test images")
    ap.add_argument("--batch", type=int, default=64, help="batch of the timed forward")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--set", nargs="+", default=[], dest="overrides", help="Hydra overrides of the preset")
    bench_results.add_arguments(ap, "vit")
    args = ap.parse_args(argv)
    if (earlier := bench_results.rendered(args, markdown)) is not None:
        return earlier
    c = _config(args.overrides)
    src, src_train, src_test = load_task(c.data.source, c.seed)
    model, _, _ = source_model(c, src_train, src_test, src.num_classes, src_train[0].shape[1])
    x, y = src_test[0][: args.max_test], src_test[1][: args.max_test]
    pred_f = _predict(model, x)
    result = {
        "provenance": bench_results.source("bench_vit.py", argv),
        "model": f"vit_tiny {dict(c.model)}",
        "test_examples": len(x),
        "float_acc": float((pred_f == y).float().mean()),
        "batch": args.batch,
        "reps": args.reps,
        "rows": [],
    }
    calib = src_train[0][: c.quant.calib_size]
    for scheme in args.schemes:
        for bits in args.residual:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a fallback op would warn: the whole ViT runs in integers
                q = convert(model, scheme, calib, residual_bits=bits)
            pred = _predict(q, x)
            result["rows"].append(
                {
                    "scheme": scheme,
                    "residual_bits": bits,
                    "acc": float((pred == y).float().mean()),
                    "agreement": float((pred == pred_f).float().mean()),
                    "op_error": op_errors(q, model, x[:256]),
                    "time": forward_times(q, model, x[: args.batch], args.reps),
                    "kernels": q.describe(),
                }
            )
            print(f"{scheme} residual {bits}: {result['rows'][-1]['agreement']:.4f} agreement", flush=True)
    return bench_results.publish(result, args, "vit", markdown)


if __name__ == "__main__":
    main()
