import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad.analysis.landscape import (
    FloatEvaluator,
    FunctionEvaluator,
    QuantEvaluator,
    combine,
    filter_norms,
    flatten,
    folded_float_model,
    interpolate,
    normalize_direction,
    pca_directions,
    project,
    random_direction,
    random_plane,
    surface,
)
from fwdgrad.analysis.sharpness import forward_sharpness, hessian_trace, top_hessian_eigenvalue
from fwdgrad.cli import main
from fwdgrad.conf import CONF_DIR
from fwdgrad.config import validate_landscape as validate
from fwdgrad.engine import convert
from fwdgrad.models import build_model


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: one thread is fastest, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quadratic_regression(seed=0, n=64, d=6, k=3):
    """nn.Linear with MSE to targets of a known linear map: a convex quadratic in the weights, optimum W*."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w_star = torch.randn(k, d, generator=g)
    model = nn.Linear(d, k, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star)
    return model, x, x @ w_star.T, w_star


def spd(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.5, 7.0, d, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T, eig


# ------------------------------------------------------------------------------------------ surfaces
def test_surface_of_convex_quadratic_is_bowl_with_minimum_at_optimum():
    model, x, y, w_star = quadratic_regression()
    ev = FloatEvaluator(model, x, y, ["weight"], criterion=F.mse_loss)
    center = ev.center()
    assert torch.equal(center["weight"], w_star)
    dirs = random_plane(center, seed=3)
    xs = ys = np.linspace(-1, 1, 11)
    s = surface(ev, center, dirs, xs, ys)
    assert s.loss.shape == (11, 11)
    assert np.unravel_index(np.argmin(s.loss), s.loss.shape) == (5, 5)
    assert s.argmin() == (0.0, 0.0)
    assert s.loss[5, 5] == pytest.approx(0.0, abs=1e-10)
    # values strictly increase away from the center along every row, column and ring
    assert np.all(np.diff(s.loss[5, 5:]) > 0) and np.all(np.diff(s.loss[5, :6]) < 0)
    assert np.all(np.diff(s.loss[5:, 5]) > 0) and np.all(np.diff(s.loss[:6, 5]) < 0)
    for r in range(1, 5):  # every square ring around the center lies above the minimum inside it
        inner = s.loss[5 - r + 1 : 5 + r, 5 - r + 1 : 5 + r]
        ring = np.concatenate(
            [
                s.loss[5 - r, 5 - r : 6 + r],
                s.loss[5 + r, 5 - r : 6 + r],
                s.loss[5 - r : 6 + r, 5 - r],
                s.loss[5 - r : 6 + r, 5 + r],
            ]
        )
        assert ring.min() > inner.min()
    # the surface is exactly the quadratic form: L(a, b) = mean((x (a d1 + b d2)ᵀ)²)
    d1, d2 = dirs[0]["weight"], dirs[1]["weight"]
    expect = F.mse_loss(x @ (0.4 * d1 - 0.6 * d2).T, torch.zeros_like(y))
    got = s.loss[np.argmin(abs(ys + 0.6)), np.argmin(abs(xs - 0.4))]
    assert got == pytest.approx(float(expect), rel=1e-5)


def test_analytic_bowl_minimum_at_known_optimum_off_center():
    a, _ = spd(5)
    w_star = torch.arange(5, dtype=torch.float64)

    def loss(p):
        e = p["w"] - w_star
        return 0.5 * e @ a @ e

    d1 = {"w": torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64)}
    d2 = {"w": torch.tensor([0, 1.0, 0, 0, 0], dtype=torch.float64)}
    center = {"w": w_star - 0.5 * d1["w"] + 0.25 * d2["w"]}  # the plane contains w* at (0.5, -0.25)
    grid = np.linspace(-1, 1, 9)
    s = surface(FunctionEvaluator(loss, center), center, [d1, d2], grid, grid)
    assert s.argmin() == (0.5, -0.25)
    assert s.loss.min() == pytest.approx(0.0, abs=1e-12)


def test_line_between_identical_checkpoints_is_flat():
    torch.manual_seed(0)
    model = build_model("small_cnn", 5, 1).eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 5, (64,))
    ev = FloatEvaluator(model, x, y)
    c = ev.center()
    line = interpolate(ev, c, {k: v.clone() for k, v in c.items()})
    assert line.alphas[0] == -0.5 and line.alphas[-1] == 1.5 and len(line.alphas) == 41
    assert np.ptp(line.loss) == 0.0 and np.ptp(line.acc) == 0.0
    q = convert(model, "w16a8", x)
    qe = QuantEvaluator(q, x, y)
    qc = qe.center()
    qline = interpolate(qe, qc, {k: v.clone() for k, v in qc.items()}, np.linspace(-0.5, 1.5, 9))
    assert np.ptp(qline.loss) == 0.0
    with torch.no_grad():  # and the quantized line at the stored point equals the model's own output
        assert qline.loss[0] == pytest.approx(float(F.cross_entropy(q(x), y)), abs=1e-6)


# --------------------------------------------------------------------------------------- directions
def test_filter_normalized_direction_has_per_filter_norms_of_weights():
    torch.manual_seed(0)
    model = build_model("small_cnn", 5, 1)
    w = {n: p.detach() for n, p in model.named_parameters()}
    d = random_direction(w, seed=1)
    for n, t in w.items():
        if t.dim() <= 1:
            assert torch.count_nonzero(d[n]) == 0  # biases / BN ignored
        else:
            assert torch.allclose(filter_norms(d[n]), filter_norms(t), rtol=1e-5)
            assert not torch.allclose(d[n], t)
    d2 = normalize_direction({n: torch.randn_like(t) for n, t in w.items()}, w, ignore="none")
    assert all(torch.equal(d2[n], t) for n, t in w.items() if t.dim() <= 1)
    layer = normalize_direction({n: torch.randn_like(t) for n, t in w.items()}, w, norm="layer")
    for n, t in w.items():
        if t.dim() > 1:
            assert float(layer[n].norm()) == pytest.approx(float(t.norm()), rel=1e-5)
    with pytest.raises(ValueError, match="allowed"):
        random_direction(w, norm="sphere")


def test_pca_and_projection_recover_a_trajectory_in_a_plane():
    g = torch.Generator().manual_seed(0)
    center = {
        "a": torch.randn(4, 3, generator=g, dtype=torch.float64),
        "b": torch.randn(5, generator=g, dtype=torch.float64),
    }
    u = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in center.items()}
    v = {k: torch.randn(t.shape, generator=g, dtype=torch.float64) for k, t in center.items()}
    coeffs = [(0.1 * t, 0.3 * math.sin(t)) for t in range(1, 9)]
    snaps = [combine(center, [u, v], c) for c in coeffs]
    dirs, explained = pca_directions(center, snaps)
    assert explained.sum() == pytest.approx(1.0)
    assert float(flatten(dirs[0]) @ flatten(dirs[1])) == pytest.approx(0.0, abs=1e-10)
    coords, in_plane = project(snaps, center, dirs)
    np.testing.assert_allclose(in_plane, 1.0, atol=1e-8)
    rebuilt = [combine(center, dirs, c) for c in coords]
    for r, s in zip(rebuilt, snaps):
        assert torch.allclose(flatten(r), flatten(s), atol=1e-9)
    # least-squares projection onto the (non-orthogonal) generating directions gives the true coefficients
    c2, _ = project(snaps, center, [u, v])
    np.testing.assert_allclose(c2, np.array(coeffs), atol=1e-9)


# ----------------------------------------------------------------------------------------- quantized
def test_quantized_points_closer_than_half_lsb_collapse():
    torch.manual_seed(0)
    model = build_model("small_cnn", 5, 1).eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 5, (64,))
    q = convert(model, "w8a8", x)
    ev = QuantEvaluator(q, x, y)
    c = ev.center()
    lsb = {n: float(node.w_qp.scale) for n, node in ev.nodes.items()}
    sign = {n: torch.where(torch.rand(t.shape) < 0.5, -1.0, 1.0) for n, t in c.items()}
    near = {n: t + 0.4 * lsb[n] * sign[n] for n, t in c.items()}
    far = {n: t + 3.0 * lsb[n] * sign[n] for n, t in c.items()}
    codes_near, codes_c = ev.quantize_point(near), ev.quantize_point(c)
    assert all(torch.equal(codes_near[n], codes_c[n]) for n in codes_c)
    assert ev(near) == ev(c)
    assert ev(far)[0] != ev(c)[0]
    big = {n: t * 10 for n, t in c.items()}
    ev(big)
    assert ev.last_saturated > 0


def test_prefix_reuse_gives_the_same_losses():
    torch.manual_seed(0)
    model = build_model("small_cnn", 5, 1).eval()
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 5, (64,))
    gm, paths = folded_float_model(model)
    q = convert(model, "w16a8", x)
    assert sorted(paths) == sorted(q.weight_nodes())
    head = list(q.weight_nodes())[-1:]
    for make in (
        lambda r: FloatEvaluator(gm, x, y, {n: paths[n] for n in head}, reuse_prefix=r),
        lambda r: QuantEvaluator(q, x, y, head, mode="integer", reuse_prefix=r),
        lambda r: QuantEvaluator(q, x, y, head, mode="fake", reuse_prefix=r),
    ):
        fast, slow = make(True), make(False)
        c = fast.center()
        d = random_direction(c, seed=2)
        for a in (0.0, 0.3, -0.7):
            p = combine(c, [d], [a])
            assert fast(p) == slow(p)
    # the QModel's own prefix API, which QuantEvaluator uses: resuming from the frozen prefix is bit-exact
    with torch.no_grad():
        for mode in ("integer", "fake"):
            prefix = q.run_prefix(x, head[0], mode=mode)
            assert torch.equal(q(x, mode=mode, prefix=prefix), q(x, mode=mode))
        with pytest.raises(ValueError, match="prefix computed in 'fake' mode"):
            q(x, mode="integer", prefix=prefix)
    # the folded float model computes what the original does (eval-mode BatchNorm folded in)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)
    assert all(p.dim() > 1 for p in gm.parameters())  # only conv/linear weights train (biases are buffers)


# ----------------------------------------------------------------------------------------- sharpness
def test_power_iteration_finds_top_eigenvalue_of_quadratic():
    a, eig = spd(8, seed=1)

    def loss(p):
        w = torch.cat([p["u"].reshape(-1), p["v"]])
        return 0.5 * w @ a @ w

    params = {"u": torch.randn(2, 3, dtype=torch.float64), "v": torch.randn(2, dtype=torch.float64)}
    res = top_hessian_eigenvalue(loss, params, iters=500, tol=1e-10, return_vector=True)
    assert res.converged
    assert res.eigenvalue == pytest.approx(float(eig.max()), rel=1e-6)
    vec = torch.cat([res.eigenvector["u"].reshape(-1), res.eigenvector["v"]])
    assert torch.allclose(a @ vec, eig.max() * vec, atol=1e-3)
    tr, se = hessian_trace(loss, params, samples=400)
    assert abs(tr - float(eig.sum())) < 5 * se + 1e-9
    diag = torch.diag(eig)  # Hutchinson is exact for a diagonal Hessian

    def loss_diag(p):
        w = torch.cat([p["u"].reshape(-1), p["v"]])
        return 0.5 * w @ diag @ w

    assert hessian_trace(loss_diag, params, samples=3)[0] == pytest.approx(float(eig.sum()), rel=1e-10)


def test_forward_sharpness_matches_trace_over_d_on_quadratic():
    d = 10
    a, eig = spd(d, seed=2)
    w0 = torch.randn(d, dtype=torch.float64)

    def loss(p):
        return 0.5 * p["w"] @ a @ p["w"]

    params = {"w": w0}
    exact = forward_sharpness(loss, params, rho=0.1, directions=d, subspace=d, seed=0)
    assert exact.mean == pytest.approx(float(eig.sum()) / d, rel=1e-8)  # a full orthonormal block: exact
    assert exact.trace == pytest.approx(float(eig.sum()), rel=1e-8)
    assert exact.ritz == pytest.approx(float(eig.max()), rel=1e-6)  # full subspace: Ritz = λ_max
    assert exact.max_sampled <= float(eig.max()) + 1e-9
    many = forward_sharpness(loss, params, rho=0.1, directions=40 * d, seed=1)
    assert many.mean == pytest.approx(float(eig.sum()) / d, rel=1e-8)  # 40 full blocks
    few = forward_sharpness(loss, params, rho=0.1, directions=4, subspace=3, seed=3)
    assert few.forward_passes == 1 + 2 * 4 + 2 * 3
    assert float(eig.min()) <= few.mean <= float(eig.max())
    assert few.ritz <= float(eig.max()) + 1e-9
    with pytest.raises(ValueError, match="rho"):
        forward_sharpness(loss, params, rho=0.0)


def test_sharpness_through_float_model_agrees():
    """On a real (non-quadratic) model, the forward estimate of tr(H)/d is close to Hutchinson's."""
    model, x, y, _ = quadratic_regression(d=4, k=2)
    ev = FloatEvaluator(model, x, y, ["weight"], criterion=F.mse_loss)
    c = ev.center()
    top = top_hessian_eigenvalue(ev.loss_tensor, c, iters=200, tol=1e-9)
    h = 2 * torch.kron(torch.eye(2), x.T @ x / (len(x) * 2))  # MSE mean over n·k entries
    eig = torch.linalg.eigvalsh(h.double())
    assert top.eigenvalue == pytest.approx(float(eig.max()), rel=1e-3)
    fs = forward_sharpness(ev.loss, c, rho=0.05, directions=8, subspace=8)
    assert fs.mean == pytest.approx(float(eig.mean()), rel=1e-3)
    assert fs.ritz == pytest.approx(float(eig.max()), rel=1e-3)


# ---------------------------------------------------------------------------------------- experiment
def test_experiment_end_to_end_tiny(tmp_path):
    out = tmp_path / "run"
    rc = main(
        [
            "landscape",
            f"hydra.run.dir={out}",
            f"cache_dir={tmp_path / 'cache'}",
            "progress=false",
            "pretrain.steps=20",
            "runs.bp.steps=4",
            "runs.ff.steps=4",
            "snapshots=2",
            "landscape.grid=3",
            "landscape.line_points=3",
            "landscape.eval_examples=64",
            "sharpness.power_iters=2",
            "sharpness.directions=2",
            "sharpness.subspace=2",
        ]
    )
    assert rc == 0
    for f in ("landscape.npz", "landscape.json", "landscape_2d.png", "landscape_1d.png", "summary.md"):
        assert (out / f).is_file(), f
    assert (out / "summary.md").read_text().count("Generated by `fwdgrad landscape ") == 1
    summary = json.loads((out / "landscape.json").read_text())
    assert summary["config"]["landscape"]["grid"] == 3 and summary["grid"]["points"] == 9
    assert set(summary["runs"]) == {"bp", "ff"}
    assert summary["runs"]["bp"]["snapshot_steps"] == [0, 2, 4]
    z = np.load(out / "landscape.npz")
    assert z["loss"].shape == (3, 3) and z["traj_ff_coords"].shape == (3, 2)
    # both runs start from the same point
    np.testing.assert_allclose(z["traj_bp_coords"][0], z["traj_ff_coords"][0], atol=1e-9)
    assert z["traj_bp_loss"][0] == z["traj_ff_loss"][0]


@pytest.mark.parametrize(
    "override,match",
    [
        ("landscape.plane=hessian", "landscape.plane='hessian' is invalid; allowed"),
        ("landscape.eval_mode=int", "landscape.eval_mode='int' is invalid"),
        ("landscape.center=nowhere", "landscape.center='nowhere' is invalid; allowed: start, bp, ff$"),
        ("runs.ff.method=bp_qat", "runs.ff.method='bp_qat' is invalid"),
        ("landscape.grid=1", "landscape.grid=1 is invalid"),
        ("quant=fp32", "quant='fp32' is invalid; allowed: a fixed-point scheme"),
    ],
)
def test_bad_config_is_a_one_line_error(override, match):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("landscape", overrides=[override])
    with pytest.raises(ValueError, match=match) as err:
        validate(cfg)
    assert "\n" not in str(err.value)
