"""Forward-gradient estimators, the fixed-point QZO-FF step, and their guarantees."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fwdgrad import rng
from fwdgrad.engine import convert
from fwdgrad.ff import DIFFERENCES, DISTRIBUTIONS, Key, jvp_gradient, make_estimator, qzo_ff, zo_sgd
from fwdgrad.ff.estimators import QuantGaussian
from fwdgrad.quant import QFormat, QParams


class Quadratic(nn.Module):
    """L(w) = ½ (w − w*)ᵀ A (w − w*) with a known gradient A (w − w*)."""

    def __init__(self, d=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.linspace(0.5, 3.0, d, dtype=torch.float64)) @ q.T)
        self.register_buffer("opt", torch.randn(d, generator=g, dtype=torch.float64))
        self.w = nn.Parameter(torch.zeros(d, dtype=torch.float64))

    def forward(self):
        e = self.w - self.opt
        return 0.5 * e @ self.A @ e

    def grad(self):
        return self.A @ (self.w.detach() - self.opt)


def estimate(opt, closure, params):
    """ĝ of one step, read off the update with lr = 1 (the update is w ← w − lr·ĝ)."""
    before = [p.detach().clone() for p in params]
    opt.step(closure)
    g = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, params)])
    with torch.no_grad():
        for b, p in zip(before, params):
            p.copy_(b)
    return g


def cosine(a, b):
    return float(F.cosine_similarity(a.double().reshape(1, -1), b.double().reshape(1, -1)))


FLOAT_DISTRIBUTIONS = sorted(DISTRIBUTIONS)


@pytest.mark.parametrize("difference", sorted(DIFFERENCES))
@pytest.mark.parametrize("distribution", FLOAT_DISTRIBUTIONS)
def test_every_estimator_points_downhill_and_is_reproducible(difference, distribution):
    """One parametrized check for every (difference, distribution): E[ĝ]·∇L > 0, cosine grows with m,
    same seed → same estimate, weights restored apart from the update."""
    q = Quadratic()
    true = q.grad()
    cos = {}
    for m in (2, 32):  # the median difference needs two losses
        est = make_estimator(difference, distribution, m)
        gs = []
        for seed in range(4):
            opt = zo_sgd([("w", q.w)], lr=1.0, eps=1e-4, estimator=est, seed=seed)
            gs.append(estimate(opt, q, [q.w]))
        cos[m] = float(np.mean([cosine(g, true) for g in gs]))
    assert cos[2] > 0.0 and cos[32] > cos[2] and cos[32] > 0.5, cos
    est = make_estimator(difference, distribution, 3)
    a = estimate(zo_sgd([("w", q.w)], 1.0, 1e-4, est, seed=11), q, [q.w])
    b = estimate(zo_sgd([("w", q.w)], 1.0, 1e-4, est, seed=11), q, [q.w])
    assert torch.equal(a, b)


def test_spsa_cosine_rises_toward_one_with_m_on_an_mlp():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    loss = lambda: F.cross_entropy(mlp(x), y)  # noqa: E731
    params = list(mlp.parameters())
    true = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss(), params)])
    cos = []
    for m in (1, 16, 256):
        opt = zo_sgd(mlp, lr=1.0, eps=1e-5, estimator="spsa", m=m, seed=1)
        cos.append(cosine(estimate(opt, loss, params), true))
    assert cos[0] < cos[1] < cos[2] and cos[2] > 0.75, cos  # ≈ sqrt(m / (m + d)), d = 83


def test_jvp_forward_gradient_is_unbiased():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 2, (16,))
    params = dict(mlp.named_parameters())
    auto = torch.autograd.grad(F.cross_entropy(mlp(x), y), list(params.values()))

    def loss_of(p):
        return F.cross_entropy(torch.func.functional_call(mlp, p, (x,)), y)

    g, loss = jvp_gradient(loss_of, params, Key(0, 0, 0, 0), m=1500)
    flat = torch.cat([g[n].reshape(-1) for n in params])
    ref = torch.cat([a.reshape(-1) for a in auto])
    assert cosine(flat, ref) > 0.93
    assert torch.allclose(flat, ref, atol=0.25 * ref.abs().max())
    assert abs(loss - float(F.cross_entropy(mlp(x), y))) < 1e-12


def test_median_signs():
    from fwdgrad.edge.train import median_signs

    assert median_signs([3.0, 1.0, 2.0]) == [1, -1, 0]  # odd m: the middle loss itself gives 0
    assert median_signs([4.0, 1.0, 2.0, 3.0]) == [1, -1, -1, 1]  # even m: the mean of the two middle ones
    assert median_signs([5, 5, 5, 7]) == [0, 0, 0, 1]  # ties at the median give no direction
    assert median_signs([2.0, 2.0]) == [0, 0] and median_signs([]) == []
    big = 2**40  # integer losses: 2·L against the sum of the middle two, no rounding
    assert median_signs([big, big + 1, big + 2, big + 3]) == [-1, -1, 1, 1]


def test_median_needs_two_samples_and_signs_fixed_point():
    with pytest.raises(ValueError, match="m=1 is invalid for the median difference; allowed: integers >= 2"):
        make_estimator("median", "gaussian", 1)
    from fwdgrad.fixed_point import FixedPointSettings

    with pytest.raises(ValueError, match="difference 'one_sided' is invalid for fixed-point training"):
        FixedPointSettings(difference="one_sided")
    with pytest.raises(ValueError, match="'central' is invalid for perturbed weights"):
        qzo_ff(one_layer(torch.zeros(2, 3, dtype=torch.int16), 0.01)[0], 0.1, difference="central")


# ------------------------------------------------------------------------------------ fixed point
def one_layer(w_q, delta_w, bits=16):
    """A QModel with one bias-free Linear whose integer weights and scale we set by hand."""
    model = nn.Sequential(nn.Linear(w_q.shape[1], w_q.shape[0], bias=False))
    q = convert(model, f"w{bits}a8", torch.rand(4, w_q.shape[1]))
    node = q.weight_nodes()["_0"]
    node.w_qp = QParams(QFormat(bits=bits), torch.tensor(delta_w))
    node.weight_q.copy_(w_q)
    node._derive_scales()
    return q, node


def test_paper_worked_example_constants():
    z = QuantGaussian(3.5)
    assert abs(z.delta - 0.0276) < 1e-4 and z.one_q == 36


def test_hand_computed_qzo_ff_step_matches_exactly():
    """Every integer of one QZO-FF step (m = 2) worked out with Python ints from docs/method.md."""
    w0 = [1000, -2000, 3000, 15, -7, 32000]
    delta_w, eps, lr, seed, m = 1e-4, 1e-3, 0.01, 7, 2
    q, node = one_layer(torch.tensor([w0], dtype=torch.int16), delta_w)
    c = [0.3, -1.0, 0.5, 2.0, -0.2, 0.1]  # the loss is linear in the perturbed weights
    opt = qzo_ff(q, lr=lr, eps=eps, m=m, seed=seed)

    def closure():
        w = q._weight_fn("_0", node).reshape(-1).tolist()
        return sum(ci * wi * delta_w for ci, wi in zip(c, w))

    opt.step(closure)

    def mult(r):  # integer multiplier and right shift of a real factor: r ≈ M / 2^n
        mant, e = math.frexp(r)
        return round(mant * 2**31), 31 - e

    one_q = 36
    eps_q = round(eps / delta_w)  # 10 LSB
    mp, n_p = mult(1 / one_q)
    signs, zs = [], []
    for i in range(m):
        z = rng.gaussian_q(seed, 0, i, 0, (1, 6)).reshape(-1).tolist()
        w_plus = [
            max(-32767, min(32767, ((w * one_q + eps_q * zi) * mp + (1 << (n_p - 1))) >> n_p))
            for w, zi in zip(w0, z)
        ]
        w_minus = [
            max(-32767, min(32767, ((w * one_q - eps_q * zi) * mp + (1 << (n_p - 1))) >> n_p))
            for w, zi in zip(w0, z)
        ]
        d = sum(ci * (a - b) for ci, a, b in zip(c, w_plus, w_minus))
        signs.append((d > 0) - (d < 0))
        zs.append(z)
    s = [sum(sg * z[k] for sg, z in zip(signs, zs)) for k in range(6)]
    g_q = [max(-127, min(127, (1 if v > 0 else -1) * ((abs(v) * 2 + m) // (2 * m)))) for v in s]
    mu, n_u = mult(lr * (3.5 / 127) / delta_w)
    expect = [max(-32767, min(32767, w - ((g * mu + (1 << (n_u - 1))) >> n_u))) for w, g in zip(w0, g_q)]
    assert node.weight_q.reshape(-1).tolist() == expect
    assert expect != w0  # the step did something


def _digits_qmodel(scheme="w16a8", seed=0):
    from fwdgrad.data import digits_split
    from fwdgrad.models import build_model

    torch.manual_seed(seed)
    src, _ = digits_split(range(5))
    model = build_model("small_cnn", num_classes=5, in_channels=1).eval()
    return convert(model, scheme, src.tensors[0][:128]), src.tensors


def test_perturbation_restores_weights_and_same_seed_is_bit_identical():
    runs = []
    for _ in range(2):
        q, (x, y) = _digits_qmodel()
        before = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
        opt = qzo_ff(q, lr=0.02, eps=1e-3, m=2, seed=3)
        seen = []

        def closure():
            # inside a perturbed pass the stored integers are untouched
            assert all(torch.equal(node.weight_q, before[n]) for n, node in q.weight_nodes().items())
            out = F.cross_entropy(q(x[:32]), y[:32])
            seen.append(float(out))
            return out

        opt.step(closure)
        assert len(seen) == 4 and len(set(seen)) > 1  # ±ε passes really differ
        for step in range(4):
            before = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
            opt.step(lambda s=step: F.cross_entropy(q(x[32 * s : 32 * s + 32]), y[32 * s : 32 * s + 32]))
        runs.append({n: node.weight_q.clone() for n, node in q.weight_nodes().items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.parametrize("planned", [6, 2, 0])
def test_a_steps_passes_are_planned_before_its_first_forward(monkeypatch, planned):
    """The perturbed weights of a step's passes are computed before its first forward, as many passes as
    PLAN_ELEMENTS holds (the rest just before their pass; never inside a forward), with the integers of
    computing each at its pass."""
    from fwdgrad.ff import spaces

    q, (x, y) = _digits_qmodel()
    monkeypatch.setattr(
        spaces, "PLAN_ELEMENTS", planned * sum(n.weight_q.numel() for n in q.weight_nodes().values())
    )
    weights = []
    for plan in (True, False):
        q, _ = _digits_qmodel()
        opt = qzo_ff(q, lr=0.05, eps=1e-3, m=3, seed=0)
        if not plan:
            monkeypatch.setattr(opt.space, "plan", lambda step, passes: None)
        events = []  # "w": a layer's perturbed weights computed, "f": a forward, "i" inside it
        inner = opt.space.perturbed_weights
        opt.space.perturbed_weights = lambda step, t, passes: (
            events.append("w" * len(passes)) or inner(step, t, passes)
        )

        def closure(s):
            events.append("f")
            out = q(x[32 * s : 32 * s + 32])
            events.append("i")
            return F.cross_entropy(out, y[32 * s : 32 * s + 32])

        for s in range(3):
            events.clear()
            opt.step(lambda s=s: closure(s))
            layers = len(opt.space.nodes)
            first = "".join(events).index("f")
            assert first == (max(planned, 1) if plan else 1) * layers
            assert "".join(events).replace("fi", "") == "w" * 6 * layers  # all outside the forwards
        weights.append([n.weight_q.clone() for n in q.weight_nodes().values()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_frozen_layers_never_perturbed_and_sparse_touches_only_masked():
    q, (x, y) = _digits_qmodel()
    names = list(q.weight_nodes())
    start = {n: node.weight_q.clone() for n, node in q.weight_nodes().items()}
    opt = qzo_ff(
        q, lr=0.05, eps=1e-3, m=2, seed=0, trainable=names[-2:], sparse={"kind": "topk", "density": 0.1}
    )
    asked = set()
    inner = opt.space.perturbed_weights

    def spy(step, t, passes):
        asked.add(opt.space.names[t])
        return inner(step, t, passes)

    opt.space.perturbed_weights = spy
    for s in range(6):
        opt.step(lambda s=s: F.cross_entropy(q(x[32 * s : 32 * s + 32]), y[32 * s : 32 * s + 32]))
    assert asked == set(names[-2:])
    assert torch.equal(q.weight_nodes()[names[0]].weight_q, start[names[0]])  # frozen: untouched
    for t, n in enumerate(names[-2:]):
        mask = opt.space.masks[t]
        changed = q.weight_nodes()[n].weight_q != start[n]
        assert changed.any() and not (changed & ~mask).any()
        assert abs(mask.float().mean() - 0.1) < 0.02


@pytest.mark.parametrize(
    "option",
    [
        {"momentum": {"warmup": 1}},
        {"kernel_norm": True},
        {"sharpness_rho": 5e-3},
        {"rounding": "stochastic"},
        {"rounding": "floor"},
        {"perturb_scale": "delta_z"},
        {"distribution": "qrademacher"},
    ],
)
def test_each_enhancement_runs_deterministically_and_moves_weights(option):
    finals = []
    for _ in range(2):
        q, (x, y) = _digits_qmodel()
        start = q.weight_nodes()["fc"].weight_q.clone() if "fc" in q.weight_nodes() else None
        last = list(q.weight_nodes())[-1]
        start = q.weight_nodes()[last].weight_q.clone()
        opt = qzo_ff(q, lr=0.05, eps=1e-3, m=2, seed=1, trainable=[last], **option)
        for s in range(4):
            opt.step(lambda s=s: F.cross_entropy(q(x[32 * s : 32 * s + 32]), y[32 * s : 32 * s + 32]))
        w = q.weight_nodes()[last].weight_q.clone()
        assert not torch.equal(w, start)
        finals.append(w)
    assert torch.equal(*finals)
    fpo = {"sharpness_rho": 8}.get(next(iter(option)), 6)
    assert opt.forwards_per_step == fpo - 2 if "sharpness_rho" not in option else opt.forwards_per_step == 6


def test_float_enhancements_and_bad_values():
    q = Quadratic()
    for opts in (
        {"momentum": {"warmup": 0}},
        {"kernel_norm": True},
        {"sharpness_rho": 1e-3},
        {"sparse": {"kind": "random", "density": 0.5}},
    ):
        opt = zo_sgd([("w", q.w)], lr=0.05, eps=1e-4, estimator="sign_spsa", **opts)
        start = float(q())
        for _ in range(30):
            opt.step(q)
        assert float(q()) < start, opts
    with pytest.raises(ValueError, match="m=0"):
        make_estimator("sign", "gaussian", 0)
    with pytest.raises(ValueError, match="eps=0"):
        zo_sgd([("w", q.w)], lr=0.1, eps=0.0)
    with pytest.raises(ValueError, match="'gaussian' is float"):
        qzo_ff(_digits_qmodel()[0], lr=0.1, distribution="gaussian")
