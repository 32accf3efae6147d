"""The BP vs QZO-FF loss-landscape experiment (docs/landscape.md): `fwdgrad landscape [overrides]`.

    common start   the pipeline's cached source model (`steps.source_model`) as a QModel (`convert_model`,
                   weight headroom on the landscape layers) and as the BN-folded float model, same weights
    trajectories   every run of `runs` trains a copy of the start with `fwdgrad.train.train`, snapshotted
    plane          PCA of the trajectories (or two random filter-normalized directions) through the center
    surface, lines the loss on a grid of the plane and at every snapshot; 1-D lines through the final points
    sharpness      Hessian (float) and forward-only curvature at the start and every final point
    outputs        landscape.npz, landscape.json, landscape_2d.png, landscape_1d.png in the output directory

Config: `fwdgrad.config.LandscapeConfig` (schema `fwdgrad_landscape`, fwdgrad/conf/landscape.yaml): the task
(`TaskConfig`: data, model, quant, mode, pretrain) plus the runs and the settings. Tools:
`fwdgrad.analysis.landscape`.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from ..analysis import landscape as ls
from ..analysis.sharpness import forward_sharpness, hessian_trace, top_hessian_eigenvalue
from ..config import LandscapeConfig, RunConfig, model_label, validate_landscape
from ..engine.model import QModel
from ..files import FolderLock, atomic_open, write_json, write_text
from ..methods import spec
from ..provenance import provenance, provenance_line
from ..train import TrainConfig, evaluate, train, trainable_names
from .steps import convert_model, load_task, output_dir, source_model


# ------------------------------------------------------------------------------------------ stages
@dataclass
class Start:
    """The common start of every run: one point, as a QModel and as the BN-folded float model."""

    task: str  # e.g. "digits 0/1/2/3/4 → 5/6/7/8/9"
    train_xy: tuple  # target task (x, y)
    test_xy: tuple
    qmodel: QModel
    float_model: nn.Module
    paths: dict[str, str]  # QModel node name -> weight path in float_model
    names: list[str]  # the landscape tensors: the training scope's conv/linear nodes
    point: ls.Params
    zero_shot: dict[str, float]
    source: dict[str, Any]  # source-task accuracy, and whether the model came from the cache


@dataclass
class Trajectory:
    label: str
    method: str
    steps: list[int]
    points: list[ls.Params]
    test_acc: float
    wall_s: float
    forward_passes: int


@dataclass
class Plane:
    center: ls.Params
    dirs: list[ls.Params]
    explained: np.ndarray
    axis_labels: tuple[str, str]
    coords: dict[str, np.ndarray]  # per run: (snapshots, 2) least-squares coordinates
    in_plane: dict[str, np.ndarray]
    xs: np.ndarray
    ys: np.ndarray


@dataclass
class Results:
    start: Start
    trajs: dict[str, Trajectory]
    plane: Plane
    surf: ls.Surface
    traj_eval: dict[str, np.ndarray]  # per run: (snapshots, 2) loss and accuracy at the snapshots
    lines: list[ls.Line]
    sharpness: dict
    timings: dict[str, float]
    eval_examples: int  # the evaluation batch's size


def common_start(c: LandscapeConfig, log: Callable[[str], None]) -> Start:
    """Source model (pipeline pretraining, cached) -> QModel with headroom on the landscape layers, and the
    folded float model at the same dequantized weights, so that every run starts from exactly one point."""
    d = c.data
    src, src_train, src_test = load_task(d.source, c.seed)
    tgt, tgt_train, tgt_test = load_task(d.target, c.seed, d.max_train, d.max_test)
    if src.num_classes != tgt.num_classes:
        raise ValueError(
            f"data={d.name!r} is invalid here: the source task has {src.num_classes} classes and the target "
            f"{tgt.num_classes}; allowed: as many target as source classes (the source head is fine-tuned)"
        )
    model, source_acc, cached = source_model(c, src_train, src_test, src.num_classes, tgt_train[0].shape[1])
    q0 = convert_model(model, c, (src_train if c.quant.calib == "source" else tgt_train)[0])
    names = trainable_names(q0, TrainConfig(method="qzo_ff", **c.scope()))
    for node in (q0.weight_nodes()[n] for n in names if c.weight_headroom != 1):
        node.set_weight_scale(node.w_qp.scale * float(c.weight_headroom))
    gm, paths = ls.folded_float_model(model)
    if sorted(paths) != sorted(q0.weight_nodes()):
        raise RuntimeError(
            f"folded float model layers {sorted(paths)} do not match the QModel's {sorted(q0.weight_nodes())}"
        )
    ls.load_weights(gm, paths, ls.quant_weights(q0, list(paths)))
    point = ls.quant_weights(q0, names)
    zero_shot = {"float": evaluate(model, *tgt_test), "quant": evaluate(q0, *tgt_test)}
    log(
        f"landscape: source {model_label(c.model)} ({'cached' if cached else 'pretrained'}, source acc "
        f"{source_acc:.3f}); zero-shot target acc float {zero_shot['float']:.3f}, {c.scheme} "
        f"{zero_shot['quant']:.3f}; landscape over {len(names)} layers "
        f"({sum(v.numel() for v in point.values())} weights)"
    )
    task = f"{d.name} {'/'.join(src.classes)} → {'/'.join(tgt.classes)}"
    source = {"acc": source_acc, "cached": cached}
    return Start(task, tgt_train, tgt_test, q0, gm, paths, names, point, zero_shot, source)


def run_trajectory(c: LandscapeConfig, label: str, r: RunConfig, start: Start) -> Trajectory:
    """Train run `label` from the common start, snapshotting the landscape weights every steps/snapshots
    steps. Float methods train a copy of the folded float model; qzo_ff a copy of the start QModel, whose
    snapshots are the dequantized integer weights."""
    fields = vars(r) | {"m": r.samples, "ff": dict(r.ff)}  # RunConfig's fields are TrainConfig's
    cfg = TrainConfig(**fields, batch_size=c.batch_size, eval_every=r.steps, seed=c.seed, **c.scope())
    quant = spec(r.method).trains == "qmodel"
    model = copy.deepcopy(start.qmodel if quant else start.float_model)
    paths = {n: start.paths[n] for n in start.names}
    get = (
        (lambda: ls.quant_weights(model, start.names)) if quant else (lambda: ls.float_weights(model, paths))
    )
    every = max(1, r.steps // max(1, c.snapshots))
    points, at = [get()], [0]
    bar = tqdm(total=r.steps, desc=f"{label} {r.method}", disable=None if c.progress else True, leave=False)

    def progress(row):
        bar.update(1)
        if row["step"] % every == 0 and row["step"] != r.steps:
            points.append(get())
            at.append(row["step"])

    res = train(model, cfg, start.train_xy, start.test_xy, progress=progress)
    bar.close()
    points.append(get())
    at.append(res.steps)
    return Trajectory(label, r.method, at, points, res.test_acc, res.wall_s, res.forward_passes)


def trajectories(c: LandscapeConfig, start: Start, timings: dict, log) -> dict[str, Trajectory]:
    trajs = {}
    for label, r in c.active_runs.items():
        t = time.perf_counter()
        trajs[label] = tr = run_trajectory(c, label, r, start)
        timings[f"train_{label}_s"] = dt = time.perf_counter() - t
        log(
            f"landscape: run {label} ({tr.method}, {tr.steps[-1]} steps) test acc {tr.test_acc:.3f} in "
            f"{dt:.1f}s"
        )
    return trajs


def evaluators(c: LandscapeConfig, start: Start) -> tuple[ls.Evaluator, ls.FloatEvaluator]:
    """(the surface's evaluator in landscape.eval_mode, the float one for the Hessian), on one fixed batch."""
    L = c.landscape
    ex, ey = start.train_xy if L.eval_split == "train" else start.test_xy
    idx = torch.randperm(len(ex), generator=torch.Generator().manual_seed(c.seed))[: L.eval_examples]
    ex, ey = ex[idx], ey[idx]
    paths = {n: start.paths[n] for n in start.names}
    if L.eval_mode == "float":
        ev: ls.Evaluator = ls.FloatEvaluator(start.float_model, ex, ey, paths)
    else:
        ev = ls.QuantEvaluator(copy.deepcopy(start.qmodel), ex, ey, start.names, mode=L.eval_mode)
    return ev, ls.FloatEvaluator(start.float_model, ex, ey, paths)


def fit_plane(c: LandscapeConfig, start: Start, trajs: dict[str, Trajectory]) -> Plane:
    """The plane through the center (PCA of the trajectories or random), the runs on it, and its grid."""
    L = c.landscape
    center = start.point if L.center == "start" else trajs[L.center].points[-1]
    if L.plane == "pca":
        snaps = [p for tr in trajs.values() for p in tr.points]
        weights = None
        if L.pca_weighting == "equal":  # every run gets the same total weight, whatever its length
            weights = []
            for tr in trajs.values():
                tot = math.sqrt(
                    sum(float((ls.flatten(p) - ls.flatten(center)).square().sum()) for p in tr.points)
                )
                weights += [1.0 / tot if tot > 0 else 0.0] * len(tr.points)
        dirs, explained = ls.pca_directions(center, snaps, weights=weights)
        axis_labels = (
            f"PC1 ({100 * explained[0]:.1f}% of displacement²)",
            f"PC2 ({100 * explained[1]:.1f}%)",
        )
    else:
        dirs, explained = ls.random_plane(center, L.seed, L.norm), np.array([np.nan, np.nan])
        axis_labels = ("filter-normalized direction 1", "filter-normalized direction 2")
    coords, in_plane = {}, {}
    for label, tr in trajs.items():
        coords[label], in_plane[label] = ls.project(tr.points, center, dirs)
    if L.plane == "pca":
        allc = np.concatenate([*coords.values(), np.zeros((1, 2))])
        xs = ls.grid_axis(allc[:, 0].min(), allc[:, 0].max(), L.grid, L.margin)
        ys = ls.grid_axis(allc[:, 1].min(), allc[:, 1].max(), L.grid, L.margin)
    else:
        xs = ys = np.linspace(-L.span, L.span, L.grid)
    return Plane(center, dirs, explained, axis_labels, coords, in_plane, xs, ys)


def surface_stage(c: LandscapeConfig, ev: ls.Evaluator, plane: Plane, trajs, timings: dict, log):
    """The loss on the plane's grid, and at every snapshot (off-plane components included)."""
    L = c.landscape
    log(f"landscape: evaluating a {L.grid}x{L.grid} {L.plane} grid ({L.eval_mode}, {len(ev.y)} examples)")
    surf = ls.surface(ev, plane.center, plane.dirs, plane.xs, plane.ys)
    timings["grid_wall_s"], timings["grid_cpu_s"] = surf.wall_s, surf.cpu_s
    log(
        f"landscape: grid done in {surf.wall_s:.1f}s wall ({surf.cpu_s:.1f}s CPU, "
        f"{1e3 * surf.wall_s / surf.loss.size:.1f} ms/point)"
    )
    traj_eval = {label: np.array([ev(p) for p in tr.points]) for label, tr in trajs.items()}
    return surf, traj_eval


def lines_stage(
    c: LandscapeConfig, ev: ls.Evaluator, trajs: dict[str, Trajectory], timings: dict
) -> list[ls.Line]:
    """start -> final of each run, first final -> second final, a random direction through each final."""
    t = time.perf_counter()
    L = c.landscape
    alphas = np.linspace(-0.5, 1.5, L.line_points)
    lines = []
    for i, (label, tr) in enumerate(trajs.items()):
        lines.append(ls.interpolate(ev, tr.points[0], tr.points[-1], alphas, f"start → {label} final"))
        lines[-1].color = ls.run_color(label, i)
    labs = list(trajs)
    if len(labs) >= 2:
        a, b = trajs[labs[0]].points[-1], trajs[labs[1]].points[-1]
        lines.append(ls.interpolate(ev, a, b, alphas, f"{labs[0]} final → {labs[1]} final"))
        lines[-1].color = "tab:green" if set(labs[:2]) == {"bp", "ff"} else "black"
    for i, (label, tr) in enumerate(trajs.items()):
        dvec = ls.random_direction(tr.points[-1], L.seed + 100 + i, L.norm)
        steps = np.linspace(-1, 1, L.line_points)
        lines.append(ls.along(ev, tr.points[-1], dvec, steps, f"{label} final ± random dir"))
        lines[-1].color = ls.run_color(label, i)
    timings["lines_s"] = time.perf_counter() - t
    return lines


def sharpness_stage(
    c: LandscapeConfig, start: Start, trajs, ev: ls.Evaluator, float_ev: ls.FloatEvaluator
) -> dict:
    """Curvature at the start and every final point; one absolute ρ (from the start's norm) for all."""
    s, sharp = c.sharpness, {}
    pts = {"start": start.point} | {f"{label}_final": tr.points[-1] for label, tr in trajs.items()}
    rho = float(s.rho) * float(ls.flatten(start.point).norm())
    kw = {"rho": rho, "directions": s.directions, "subspace": s.subspace, "seed": c.seed}
    for key, p in pts.items():
        eig = top_hessian_eigenvalue(float_ev.loss_tensor, p, iters=s.power_iters, seed=c.seed)
        tr_f, tr_se = hessian_trace(float_ev.loss_tensor, p, samples=s.directions, seed=c.seed)
        sharp[key] = {"top_eigenvalue_float": eig.as_dict()}
        for mode_name, e in {"float": float_ev, c.landscape.eval_mode: ev}.items():  # same directions
            fs = forward_sharpness(e.loss, p, **kw)
            fsd = fs.as_dict()
            fsd.pop("curvatures")
            fsd["stderr"] = fs.std / math.sqrt(fs.directions)
            sharp[key][f"forward_{mode_name}"] = fsd
        hutchinson = {"trace": tr_f, "stderr": tr_se, "mean": tr_f / fs.dim, "stderr_mean": tr_se / fs.dim}
        sharp[key]["trace_float_hutchinson"] = hutchinson
    return sharp


# ----------------------------------------------------------------------------------------- outputs
FILES = {
    "npz": "landscape.npz",
    "json": "landscape.json",
    "surface_png": "landscape_2d.png",
    "lines_png": "landscape_1d.png",
    "summary_md": "summary.md",
}


def _arrays(r: Results) -> dict[str, np.ndarray]:
    s = r.surf
    arrays = {"xs": s.xs, "ys": s.ys, "loss": s.loss, "acc": s.acc, "saturated": s.saturated}
    arrays["explained"] = r.plane.explained
    for label, tr in r.trajs.items():
        arrays[f"traj_{label}_coords"] = r.plane.coords[label]
        arrays[f"traj_{label}_steps"] = np.array(tr.steps)
        arrays[f"traj_{label}_loss"] = r.traj_eval[label][:, 0]
        arrays[f"traj_{label}_acc"] = r.traj_eval[label][:, 1]
        arrays[f"traj_{label}_in_plane"] = r.plane.in_plane[label]
    for i, line in enumerate(r.lines):
        for k in ("alphas", "loss", "acc"):
            arrays[f"line{i}_{k}"] = getattr(line, k)
    return arrays


def _run_summaries(r: Results) -> dict[str, dict]:
    out = {}
    for lab, tr in r.trajs.items():
        final = r.plane.coords[lab][-1]
        out[lab] = {
            "method": tr.method,
            "steps": tr.steps[-1],
            "forward_passes": tr.forward_passes,
            "test_acc": tr.test_acc,
            "train_wall_s": tr.wall_s,
            "snapshot_steps": tr.steps,
            "final_coords": final.tolist(),
            "final_eval_loss": float(r.traj_eval[lab][-1, 0]),
            "final_eval_acc": float(r.traj_eval[lab][-1, 1]),
            "final_surface_loss": r.surf.at(*final),
            "mean_in_plane": float(r.plane.in_plane[lab].mean()),
            "distance_from_start": float((ls.flatten(tr.points[-1]) - ls.flatten(tr.points[0])).norm()),
        }
    return out


def summary(c: LandscapeConfig, r: Results) -> dict:
    """What landscape.json holds: config, start, runs, plane, grid and line statistics, sharpness, timings."""
    s, p, L = r.surf, r.plane, c.landscape
    grid = {"n": L.grid, "points": int(s.loss.size), "min_loss": float(s.loss.min())}
    grid |= {"argmin": list(s.argmin()), "max_loss": float(s.loss.max())}
    grid |= {"max_saturated_weights": int(s.saturated.max()), "wall_s": s.wall_s, "cpu_s": s.cpu_s}
    grid |= {"ms_per_point": 1e3 * s.wall_s / s.loss.size, "threads": torch.get_num_threads()}
    lines = {}
    for line in r.lines:
        inside = (line.alphas >= 0) & (line.alphas <= 1)
        at = {f"loss_at_{a}": float(np.interp(float(a), line.alphas, line.loss)) for a in (0, 1)}
        lines[line.name] = {"kind": line.kind, "min_loss": float(line.loss.min())} | at
        lines[line.name]["max_loss_in_0_1"] = float(line.loss[inside].max()) if inside.any() else math.nan
    return {
        "config": OmegaConf.to_container(OmegaConf.structured(c)),
        "files": dict(FILES),
        "landscape_tensors": {n: list(r.start.point[n].shape) for n in r.start.names},
        "source": r.start.source,
        "zero_shot_acc": r.start.zero_shot,
        "runs": _run_summaries(r),
        "plane": {"kind": L.plane, "center": L.center, "explained": p.explained.tolist()}
        | {"xs": [float(p.xs[0]), float(p.xs[-1])], "ys": [float(p.ys[0]), float(p.ys[-1])]},
        "grid": grid,
        "lines": lines,
        "sharpness": r.sharpness,
        "timings": r.timings,
    }


def _command() -> str:
    """`fwdgrad landscape` with this job's Hydra overrides (what reproduces it)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    return " ".join(["fwdgrad landscape", *overrides])


def summary_markdown(result: dict) -> str:
    """summary.md: where the figure came from and the numbers the docs quote, as tables."""
    runs, sharp = result["runs"], result["sharpness"]
    head = "| | " + " | ".join(runs) + " |\n|---|" + "---|" * len(runs)
    rows = {
        "method": [r["method"] for r in runs.values()],
        "steps / forward passes": [f"{r['steps']} / {r['forward_passes']:,}" for r in runs.values()],
        "target test accuracy %": [f"{100 * r['test_acc']:.1f}" for r in runs.values()],
        "final loss / accuracy % on the evaluation batch": [
            f"{r['final_eval_loss']:.3f} / {100 * r['final_eval_acc']:.1f}" for r in runs.values()
        ],
        "distance from the start": [f"{r['distance_from_start']:.1f}" for r in runs.values()],
        "mean share of the displacement in the plane": [f"{r['mean_in_plane']:.2f}" for r in runs.values()],
    }
    if sharp:
        rows["top Hessian eigenvalue at the end"] = [
            f"{sharp[f'{lab}_final']['top_eigenvalue_float']['eigenvalue']:.1f}" for lab in runs
        ]
    table = "\n".join([head, *(f"| {k} | " + " | ".join(v) + " |" for k, v in rows.items())])
    lines = "| line | min loss | max loss in α ∈ [0, 1] | loss at 0 | loss at 1 |\n|---|---|---|---|---|\n"
    lines += "\n".join(
        f"| {name} | "
        + " | ".join(f"{v[k]:.3f}" for k in ("min_loss", "max_loss_in_0_1", "loss_at_0", "loss_at_1"))
        + " |"
        for name, v in result["lines"].items()
    )
    g, zs = result["grid"], result["zero_shot_acc"]
    start = (
        f"zero-shot target accuracy {100 * zs['float']:.1f} % (float), {100 * zs['quant']:.1f} % (quantized)"
    )
    grid = f"grid {g['n']}×{g['n']}: loss {g['min_loss']:.3f} to {g['max_loss']:.3f}, minimum at " + (
        f"({g['argmin'][0]:.1f}, {g['argmin'][1]:.1f}); {g['ms_per_point']:.1f} ms/point"
    )
    return (
        f"# Landscape summary\n\n{provenance_line(result['provenance'])}\n\n{start}; {grid}.\n\n"
        f"{table}\n\n{lines}\n"
    )


def write_outputs(c: LandscapeConfig, r: Results, out: Path) -> dict:
    """landscape.npz, landscape_2d.png, landscape_1d.png and landscape.json (returned) in `out`."""
    with atomic_open(out / FILES["npz"], "wb") as f:
        np.savez_compressed(f, **_arrays(r))
    pretty = {"bp": "BP (float SGD)", "ff": f"QZO-FF ({c.scheme}, integer)"}
    run_names = {
        lab: f"{pretty.get(lab, lab)}: {tr.steps[-1]} steps, test acc {100 * tr.test_acc:.1f}%"
        for lab, tr in r.trajs.items()
    }
    L = c.landscape
    where = f"{c.scheme} {L.eval_mode} mode" if L.eval_mode != "float" else "float32"
    title = (
        f"{model_label(c.model)}, {r.start.task}, mode={c.mode.name}; {L.plane} plane through {L.center}; "
        "loss in "
        f"{where} on {r.eval_examples} {L.eval_split} examples"
    )
    ls.plot_surface(
        str(out / FILES["surface_png"]), r.surf, r.plane.coords, r.plane.axis_labels, title, run_names
    )
    ls.plot_lines(str(out / FILES["lines_png"]), r.lines, title)
    result = summary(c, r) | {"provenance": provenance(_command())}
    write_json(out / FILES["json"], result, default=float)
    write_text(out / FILES["summary_md"], summary_markdown(result))
    return result


# ------------------------------------------------------------------------------------------ driver
def run_landscape(cfg: DictConfig | LandscapeConfig, log: Callable[[str], None] = print) -> dict:
    """The experiment (module docstring) on a composed config; returns the summary in landscape.json."""
    c = cfg if isinstance(cfg, LandscapeConfig) else validate_landscape(cfg)
    c.check()
    torch.set_num_threads(c.threads)
    torch.manual_seed(c.seed)
    out = output_dir(c)
    out.mkdir(parents=True, exist_ok=True)
    with FolderLock(out):  # one landscape per folder
        t_all = time.perf_counter()
        start = common_start(c, log)
        timings = {"start_s": time.perf_counter() - t_all}
        trajs = trajectories(c, start, timings, log)
        ev, float_ev = evaluators(c, start)
        plane = fit_plane(c, start, trajs)
        surf, traj_eval = surface_stage(c, ev, plane, trajs, timings, log)
        lines = lines_stage(c, ev, trajs, timings)
        sharp = {}
        if c.sharpness.enabled:
            t = time.perf_counter()
            sharp = sharpness_stage(c, start, trajs, ev, float_ev)
            timings["sharpness_s"] = time.perf_counter() - t
        timings["total_s"] = time.perf_counter() - t_all
        result = write_outputs(
            c, Results(start, trajs, plane, surf, traj_eval, lines, sharp, timings, len(ev.y)), out
        )
        log(f"landscape: wrote {', '.join(FILES.values())} to {out} (total {timings['total_s']:.1f}s)")
        return result
