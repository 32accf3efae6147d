"""Flash and SRAM of the generated C runtime on the emulated Cortex-M boards, measured from the linker map,
next to the training-memory model's prediction for the same model and settings, and the fit of each
against every device profile.

Two models, QZO-FF w16a8 (m = 3, the qzo_ff method's default; eps 1e-2, lr 0.05), weights only trained:

- the main job's model: small_cnn on 8x8 digits (10 classes, as tests/test_mcu.py builds it; the main job
  itself trains a 5-way head), the head `_8` trained;
- ResNet-8, width 0.25, on 28x28 digits, `layer3_conv2` and `fc` trained.

Each is built (`fwdgrad.edge.mcu.build`, nothing is run) for every board in `mcu.BOARDS` at C batch 1 and 8,
linked against the mcu_m7 profile (its 2 MiB flash and 512 KiB SRAM, cut to the board's memories) with the
default stack reservation. Measured: flash (text + rodata + data) and SRAM (data + bss) of the application
and of model.o, from ``app.map`` after --gc-sections. Predicted: `fwdgrad.analysis.memory.memory_breakdown`
(method "ff", the same trainable weights, format and m) at batch 1 and 8, placed as `check_fit` places it:
flash = all weights, SRAM = trainable weights + scratch + gradients + perturbation.

What batch means: in the memory model, the leading dimension of the traced input, every sample's
activations live at once. In the C runtime, the samples per `train_step`; it runs them one at a time
through one static arena (sized for one sample), so batch only grows the application's input buffer and
model.o's prefix store (the frozen prefix's outputs of `batch` samples, reused across the 2m perturbed
forwards; the memory model does not count that cache).

Prints JSON; with --out DIR (docs/results/mcu) writes DIR/memory.json and DIR/memory.md (`--render JSON`
rewrites the Markdown of an earlier JSON without building anything). Needs arm-none-eabi-gcc and
qemu-system-arm (`fwdgrad.edge.mcu.unavailable`); about 15 s.

    uv run python experiments/mcu_memory.py [--out docs/results/mcu] [--models NAME ...] [--boards BOARD ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

import bench_results
import torch

from fwdgrad.analysis.devices import UnsupportedFormat, check_fit, list_devices, load_device
from fwdgrad.analysis.memory import fmt_bytes, memory_breakdown
from fwdgrad.data.digits import load_digits_tensors
from fwdgrad.edge import load_bundle, mcu
from fwdgrad.engine import convert
from fwdgrad.export import export_bundle
from fwdgrad.models import build_model
from fwdgrad.provenance import provenance_line

FMT, M, EPS, LR, SEED = "w16a8", 3, 1e-2, 0.05, 7
BATCHES = (1, 8)
FIT_DEVICE = "mcu_m7"
#: name -> (build_model args, image size, samples for calibration, bundle trainable, memory-model params)
MODELS = {
    "small_cnn": (("small_cnn", 10, 1), {}, 8, 64, ["_8"], ["8.weight"]),
    "resnet8_w0.25": (
        ("resnet8", 10, 1),
        {"width": 0.25},
        28,
        32,
        ["layer3_conv2", "fc"],
        ["layer3.conv2.weight", "fc.weight"],
    ),
}


def _version(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def predicted(name: str, batch: int) -> dict:
    args, kw, size, _, _, params = MODELS[name]
    b = memory_breakdown(
        build_model(*args, **kw),
        (batch, 1, size, size),
        "ff",
        "lp",
        FMT,
        m=M,
        trainable=params,
        model_name=name,
    )
    fits = {}
    for dev in list_devices():
        try:
            rep = check_fit(dev, b)
            fits[dev] = {"fits": rep.fits, "format": True}
        except UnsupportedFormat:  # bytes only
            d = load_device(dev)
            sram = (
                b.trainable_weights + b.scratch + b.gradients + b.optimizer_state + b.perturbation + b.masks
            )
            fits[dev] = {"fits": sram <= d.sram_bytes and b.weights <= d.flash_bytes, "format": False}
    parts = (
        "weights",
        "trainable_weights",
        "scratch",
        "gradients",
        "perturbation",
        "optimizer_state",
        "masks",
    )
    out = {p: getattr(b, p) for p in parts}
    out["flash"] = b.weights
    out["sram"] = sum(out[p] for p in parts[1:])
    out["n_params"], out["n_updated"], out["fits"] = b.n_params, b.n_updated, fits
    return out


def measured(name: str, tmp: str, boards) -> list[dict]:
    args, kw, size, n, trainable, _ = MODELS[name]
    torch.manual_seed(0)
    x = load_digits_tensors(size)[0][:n]
    q = convert(build_model(*args, **kw), FMT, x)
    path = os.path.join(tmp, f"{name}.npz")
    export_bundle(q, path, trainable, eps=EPS, lr=LR, m=M, seed=SEED)
    bundle = load_bundle(path)
    trained = sum(bundle.arrays[f"{t['name']}.weight"].nbytes for t in bundle.training["tensors"])
    rows = []
    for board in boards:
        for batch in BATCHES:
            out = os.path.join(tmp, f"{name}-{board}-{batch}")
            os.makedirs(out)
            row = {"model": name, "board": board, "batch": batch}
            try:
                info = mcu.build(bundle, out, x.shape[1:], batch=batch, board=board, device=FIT_DEVICE)
                row["linked_with"] = FIT_DEVICE
            except mcu.MCUError as e:  # does not fit the profile: the board alone, the message kept
                row["fit_error"] = str(e)
                info = mcu.build(bundle, out, x.shape[1:], batch=batch, board=board)
            mem = info["memory"]
            app, model = mem["objects"]["app"], mem["objects"]["model.o"]
            row |= {
                "app_flash": app["flash"],
                "app_sram": app["sram"],
                "stack_bytes": mem["stack_bytes"],
                "stack_static_bytes": mem["stack_static_bytes"],
                "stack_path": mem["stack_path"],
                "app_sram_with_stack": app["sram"] + mem["stack_bytes"],
                "model_flash": model["flash"],
                "model_sram": model["sram"],
                "model_text": model["text"],
                "model_data": model["data"],
                "model_bss": model["bss"],
                "arena_bytes": info["arena_bytes"],
                "trainable_bytes": trained,
                "prefix_bytes": info.get("prefix_bytes", 0),
                "cgen_flash_payload": info["flash_bytes"],
                "cgen_sram": info["sram_bytes"],
                "flash_region_bytes": mem["flash_region_bytes"],
                "ram_region_bytes": mem["ram_region_bytes"],
            }
            rows.append(row)
    return rows


def _fits(row: dict, dev) -> bool:
    return row["app_flash"] <= dev.flash_bytes and row["app_sram_with_stack"] <= dev.sram_bytes


def markdown(result: dict) -> str:
    s = result["settings"]
    boards = [r["board"] for r in result["measured"]]
    ref = "mps2-an500" if "mps2-an500" in boards else boards[0]  # the side-by-side tables' build
    lines = [
        "# C runtime on Cortex-M: linker-map flash and SRAM against the memory model",
        "",
        provenance_line(result["provenance"]),
        f"Toolchain: {result['toolchain']['gcc']}; {result['toolchain']['qemu']}. Sizes do not depend on the "
        "CPU that builds them; nothing here runs on the emulated boards.",
        "",
        f"QZO-FF {s['fmt']}, m = {s['m']}, weights only trained (small_cnn: `_8`, the head; ResNet-8 width "
        f"0.25 on 28x28: `layer3_conv2` and `fc`). Measured = the linker map `app.map` after --gc-sections "
        f"(flash = text + rodata + data, SRAM = data + bss; the stack is a separate {s['stack_bytes']:,} B "
        'reservation, "+ stack"; "stack (call graph)" is the worst case gcc\'s -fcallgraph-info=su frames '
        "give from reset_handler plus an interrupt on top, library frames such as memcpy not counted). "
        "The memory model counts no stack. Predicted = `memory_breakdown(..., 'ff', fmt, m, trainable=...)` "
        "placed as "
        "`check_fit` places it (flash = all weights; SRAM = trainable weights + scratch + gradients + "
        "perturbation). Batch: in the memory model, samples whose activations live at once; in the C "
        "runtime, samples per train_step, run one at a time through one arena (batch only grows the input "
        "buffer and the prefix store: the frozen prefix's outputs of `batch` samples, which the memory model "
        "does not count).",
        "",
        "## Measured (bytes)",
        "",
        "| model | board | C batch | app flash | app SRAM | + stack | stack (call graph) | model.o flash "
        "| model.o SRAM | FLASH / RAM region |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["measured"]:
        lines.append(
            f"| {r['model']} | {r['board']} | {r['batch']} | {r['app_flash']:,} | {r['app_sram']:,} | "
            f"{r['app_sram_with_stack']:,} | {r['stack_static_bytes']:,} | {r['model_flash']:,} | "
            f"{r['model_sram']:,} | "
            f"{r['flash_region_bytes']:,} / {r['ram_region_bytes']:,} |"
        )
    lines += [
        "",
        "## Memory model (bytes)",
        "",
        "| model | batch | params | flash (all weights) | trainable weights | scratch | gradients "
        "| perturbation | SRAM |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per in result["predicted"].items():
        for batch, p in per.items():
            lines.append(
                f"| {name} | {batch} | {p['n_params']:,} | {p['flash']:,} | {p['trainable_weights']:,} | "
                f"{p['scratch']:,} | {p['gradients']:,} | {p['perturbation']:,} | {p['sram']:,} |"
            )
    # the reference board's builds, each with the memory model's prediction at its batch
    paired = [
        (r, result["predicted"][r["model"]][str(r["batch"])]) for r in result["measured"] if r["board"] == ref
    ]
    lines += [
        "",
        f"## Side by side: model.o ({ref}, -mcpu={result['boards'][ref]['mcpu']}) against the memory model, "
        "same batch",
        "",
        "| model | batch | model.o flash | predicted flash | ratio | model.o SRAM | predicted SRAM | ratio | "
        "app SRAM + stack |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r, p in paired:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['model_flash']:,} | {p['flash']:,} | "
            f"{r['model_flash'] / p['flash']:.2f} | {r['model_sram']:,} | {p['sram']:,} | "
            f"{r['model_sram'] / p['sram']:.2f} | {r['app_sram_with_stack']:,} |"
        )
    lines += [
        "",
        f"## model.o by component against the memory model's categories ({ref} build, bytes)",
        "",
        "Flash: model.o = code + constants (frozen weights, biases, requantization multipliers and "
        "shifts) + the trainable weights' initial values (.data); the model counts all weights. SRAM: the "
        "arena (one sample's live activations) against scratch; the trainable weights (.data) against "
        "trainable weights; their perturbed copy (.bss, the C runtime's only training buffer: z is "
        "regenerated element by element from Philox, no update sum is stored) against gradients + "
        "perturbation; the prefix store, and the rest of .bss (losses, step state, padding), which the "
        "model does not count.",
        "",
        "| model | batch | code | constants | trainable (.data) | all weights (model) | arena "
        "| scratch (model) | perturbed copy | gradients + perturbation (model) | prefix store | other |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r, p in paired:
        code = r["model_text"] - r["cgen_flash_payload"]
        other = r["model_sram"] - r["arena_bytes"] - 2 * r["trainable_bytes"] - r["prefix_bytes"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {code:,} | {r['cgen_flash_payload']:,} | {r['model_data']:,} | "
            f"{p['weights']:,} | {r['arena_bytes']:,} | {p['scratch']:,} | {r['trainable_bytes']:,} | "
            f"{p['gradients'] + p['perturbation']:,} | {r['prefix_bytes']:,} | {other:,} |"
        )
    devs = result["devices"]
    lines += [
        "",
        "## Fit per device profile",
        "",
        f"Measured: application flash and SRAM + stack ({ref} build) within the profile's flash and SRAM "
        f"(for {FIT_DEVICE} also checked by the linker on every board). Predicted: `check_fit`'s bytes "
        f"(profiles without {s['fmt']}, npu and rpi4, fit by bytes only: `check_fit` rejects the format).",
        "",
        "| model | batch | "
        + " | ".join(f"{d} (SRAM {fmt_bytes(v['sram_bytes'])})" for d, v in devs.items())
        + " |",
        "|---|---|" + "---|" * len(devs),
    ]
    for r in result["measured"]:
        if r["board"] != ref:
            continue
        p = result["predicted"][r["model"]][str(r["batch"])]
        cells = []
        for d in devs:
            m_fit, pf, sram = r["fits"][d], p["fits"][d], devs[d]["sram_bytes"]
            fmt = "" if pf["format"] else f", no {s['fmt']}"
            cells.append(
                f"measured {'yes' if m_fit else 'no'} ({100 * r['app_sram_with_stack'] / sram:.2g} % SRAM), "
                f"model {'yes' if pf['fits'] else 'no'} ({100 * p['sram'] / sram:.2g} %{fmt})"
            )
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    errors = [r for r in result["measured"] if "fit_error" in r]
    lines += [
        "",
        f"Linked with device={FIT_DEVICE}: {len(result['measured']) - len(errors)} of "
        f"{len(result['measured'])} builds fit.",
    ]
    lines += [f"- {r['model']} on {r['board']}, batch {r['batch']}: {r['fit_error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--boards", nargs="+", choices=list(mcu.BOARDS), default=list(mcu.BOARDS))
    bench_results.add_arguments(ap, "memory")
    args = ap.parse_args(argv)
    if (earlier := bench_results.rendered(args, markdown)) is not None:
        return earlier
    reason = mcu.unavailable()
    if reason:
        raise SystemExit(f"mcu_memory.py: {reason}")
    result = {
        "provenance": bench_results.source("mcu_memory.py", argv),
        "toolchain": {"gcc": _version([mcu.CC, "--version"]), "qemu": _version([mcu.QEMU, "--version"])},
        "settings": {
            "fmt": FMT,
            "m": M,
            "eps": EPS,
            "lr": LR,
            "stack_bytes": mcu.STACK_BYTES,
            "batches": BATCHES,
        },
        "boards": {b: {"mcpu": mcu.BOARDS[b], "memory": mcu.BOARD_MEMORY[b]} for b in mcu.BOARDS},
        "devices": {
            d: {"sram_bytes": load_device(d).sram_bytes, "flash_bytes": load_device(d).flash_bytes}
            for d in list_devices()
        },
        "measured": [],
        "predicted": {name: {str(b): predicted(name, b) for b in BATCHES} for name in args.models},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            result["measured"] += measured(name, tmp, args.boards)
    for r in result["measured"]:
        r["fits"] = {d: _fits(r, load_device(d)) for d in list_devices()}
    return bench_results.publish(result, args, "memory", markdown)


if __name__ == "__main__":
    main()
