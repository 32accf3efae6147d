"""The main job (`fwdgrad main`): small_cnn pretrained on digits 0-4 (cached), adapted to digits 5-9 for the
same 1000 steps with fp32 BP, the memory-matched BP (fixed point, w16a8), fp32 sign-SPSA and QZO-FF w16a8
(integer engine; sign and median differences, and perturbed outputs); prints the comparison and writes
plots, results.json and results.md."""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from ..conf import CONF_DIR
from ..files import FolderLock, write_json, write_text
from ..plots import plot_curves
from ..provenance import provenance, provenance_line
from ..report import main_table
from .experiment import run_experiment

#: The main job's arms: (label, Hydra overrides on top of experiment=main). Learning rates chosen on a
#: held-out 20 % of the training set over seeds 0-2 (data.validation=0.2; docs/experiments.md#the-main-job).
MAIN_ARMS = (
    ("bp_fp32", ["method=bp", "method.lr=1.0", "train.steps=1000"]),
    # the memory-matched baseline: backprop in fixed point (w16a8 storage, STE), the modelled on-device
    # memory of QZO-FF's linear probe within a few bytes
    ("bp_w16a8", ["method=bp_qat", "quant=w16a8", "method.lr=1.0", "train.steps=1000"]),
    ("zo_fp32", ["method=sign_spsa_fp32", "method.lr=0.05", "method.eps=1e-2", "train.steps=1000"]),
    (  # m = 6: 12 forward passes per step, 4x BP's 3
        "qzo_ff_w16a8",
        [
            "method=qzo_ff",
            "quant=w16a8",
            "method.lr=0.05",
            "method.eps=1e-2",
            "method.m=6",
            "train.steps=1000",
        ],
    ),
    (  # the median difference: m = 12 one-sided passes, the same 12 forward passes per step as m = 6 above
        "qzo_ff_w16a8_median",
        [
            "method=qzo_ff",
            "quant=w16a8",
            "method.lr=0.05",
            "method.eps=1e-2",
            "method.m=12",
            "method.ff.difference=median",
            "train.steps=1000",
            "variant=median",
        ],
    ),
    (  # activity perturbation: the head's outputs perturbed per example (±1 LSB), the central integer loss
        # difference; m = 6: 12 forward passes per step (4x BP's), each of what follows the head (nothing)
        "qzo_ff_w16a8_outputs",
        [
            "method=qzo_ff",
            "quant=w16a8",
            "method.lr=1.0",
            "method.m=6",
            "method.ff.perturb=outputs",
            "method.ff.difference=central",
            "method.ff.distribution=qrademacher",
            "train.lr_schedule=cosine",
            "train.steps=1000",
            "variant=outputs",
        ],
    ),
    (  # the median difference at m = 48: 16x BP's forward passes, but each of the 48 runs the head alone
        # (prefix reuse) and all 48 run as one stacked pass: at equal MAC-weighted compute (1.09 forward
        # equivalents per step, BP 1.004) and about BP's wall time
        "qzo_ff_w16a8_median_m48",
        [
            "method=qzo_ff",
            "quant=w16a8",
            "method.lr=0.2",
            "method.eps=1e-2",
            "method.m=48",
            "method.ff.difference=median",
            "train.steps=1000",
            "variant=median_m48",  # its own group in reports
        ],
    ),
)


def run_main_job(
    out: Path, seed: int = 0, overrides: list[str] | None = None, command: str | None = None
) -> str:
    """Run every arm into out/<label> (fresh, never a resume), write the plots and results (with `command`,
    the commit and the CPU); returns the printed table. Holds out/'s lock throughout: a second main job into
    the same folder stops before it deletes anything."""
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):
        return _main_job(out, seed, overrides, command)


def _main_job(out: Path, seed: int, overrides: list[str] | None, command: str | None) -> str:
    t0 = time.perf_counter()
    results = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for label, arm in MAIN_ARMS:
            shutil.rmtree(out / label, ignore_errors=True)
            cfg = compose(
                "config",
                overrides=[
                    "experiment=main",
                    *arm,
                    f"seed={seed}",
                    f"out_dir={out / label}",
                    *(overrides or []),
                ],
            )
            m = run_experiment(cfg)
            print(
                f"{label}: zero-shot {m['zero_shot_acc']:.3f} -> test {m['test_acc']:.3f} "
                f"({m['steps']} steps, {m['wall_s']:.1f} s)",
                flush=True,
            )
            results.append(m | {"label": label})
    logs = {r["label"]: read_log(out / r["label"] / "log.csv") for r in results}
    for x in ("step", "forward_passes"):
        plot_curves(logs, out / f"curves_{x}.png", "digits 0-4 -> 5-9, small_cnn, linear probing", x=x)
    table = main_table(results)
    total = time.perf_counter() - t0
    print(f"\n{table}\n\ntotal wall time {total:.1f} s; written to {out}/")
    prov = provenance(command)
    write_json(out / "results.json", {"total_wall_s": total, "provenance": prov, "runs": results})
    title = "# Main job: digits 0-4 -> 5-9 (small_cnn, linear probing)"
    source = provenance_line(prov)
    write_text(out / "results.md", f"{title}\n\n{source}\n\n{table}\n\nTotal wall time {total:.1f} s.\n")
    return table


def read_log(path: Path) -> list[dict]:
    """A log.csv as rows of floats (empty cells dropped)."""
    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
