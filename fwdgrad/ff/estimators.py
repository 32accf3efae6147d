"""Zeroth-order gradient estimators as small strategy objects (torchzero / ZO-Bench style).

An estimator is (difference formula, perturbation distribution, number of samples m):

    ĝ = (1/m) Σ_i c_i · z_i,   z_i ~ distribution, regenerated from (seed, step, i, tensor)

with the per-sample coefficient c_i given by the difference formula (docs/method.md#estimators):

* ``central``  c = [L(w+εz) − L(w−εz)] / (2ε)          SPSA, two forwards per sample
* ``one_sided`` c = [L(w+εz) − L(w)] / ε                one forward per sample + one shared L(w)
* ``sign``     c = sign(L(w+εz) − L(w−εz))              sign-m-SPSA (the paper's); ĝ has z's range
* ``median``   c_i = sign(L(w+εz_i) − median_j L(w+εz_j)) one forward per sample; ĝ has z's range

Perturbations are never stored for the whole model: every distribution regenerates z for one tensor from
its key, in float (`sample`) or, for the integer ones, as 8-bit codes (`sample_q`, scale Δ_z = z_max/127)
from the integer counter-based sampler in `fwdgrad.rng` that a device can reproduce bit-for-bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import rng
from ..edge.train import median_signs
from ..methods import check_count
from ..rng import torch_port


@dataclass(frozen=True)
class Key:
    """Where a perturbation comes from: everything needed to regenerate it."""

    seed: int
    step: int
    sample: int
    tensor: int


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _generator(key: Key, device) -> torch.Generator:
    """A local torch.Generator seeded by a splitmix64 hash of the key (never the global RNG). Float
    distributions only need determinism; the integer ones use the device-reproducible Philox sampler."""
    h = 0
    for part in (key.seed, key.step, key.sample, key.tensor):
        h = _splitmix64(h ^ (part & 0xFFFFFFFFFFFFFFFF))
    g = torch.Generator(device=device)
    g.manual_seed(h >> 1)
    return g


# ----------------------------------------------------------------------------------- differences
class Difference:
    """Turns losses at perturbed points into the coefficient c_i of z_i."""

    name = "difference"
    two_sided = True  # evaluates w - εz as well as w + εz
    needs_center = False  # needs L(w) once per step
    integer_ready = False  # coefficient is in {-1, 0, 1}: usable by the fixed-point update

    def coefficient(self, l_plus: float, l_minus: float | None, l_center: float | None, eps: float) -> float:
        raise NotImplementedError

    def coefficients(
        self, plus: list[float], minus: list[float] | None, center: float | None, eps: float
    ) -> list[float]:
        """c_1..c_m of one step from its losses (minus is None for one-sided differences)."""
        minus = minus or [None] * len(plus)
        return [self.coefficient(p, q, center, eps) for p, q in zip(plus, minus)]


class Central(Difference):
    name = "central"

    def coefficient(self, l_plus, l_minus, l_center, eps):
        return (l_plus - l_minus) / (2 * eps)


class OneSided(Difference):
    name = "one_sided"
    two_sided = False
    needs_center = True

    def coefficient(self, l_plus, l_minus, l_center, eps):
        return (l_plus - l_center) / eps


class Sign(Difference):
    name = "sign"
    integer_ready = True

    def coefficient(self, l_plus, l_minus, l_center, eps):
        d = l_plus - l_minus
        return float((d > 0) - (d < 0))


class Median(Difference):
    """One-sided sign against the step's median loss: c_i = sign(L(w+εz_i) − median_j L(w+εz_j)).

    One forward per sample and no centre pass, so m = 12 costs the passes of sign-m-SPSA at m = 6 and sees
    twice the directions. The median of the perturbed losses is the baseline instead of L(w) (the idea of
    rank-based fitness shaping in evolution strategies: only the order of the losses is used, so the
    coefficients are -1, 0, 1 and the fixed-point update takes them as it takes sign-m-SPSA's)."""

    name = "median"
    two_sided = False
    integer_ready = True

    def coefficients(self, plus, minus, center, eps):
        return [float(c) for c in median_signs(plus)]


DIFFERENCES = {"central": Central, "one_sided": OneSided, "sign": Sign, "median": Median}


# --------------------------------------------------------------------------------- distributions
class Distribution:
    """Zero-mean, unit-variance (per entry) perturbations regenerated from a `Key`."""

    name = "distribution"
    integer = False  # can produce 8-bit codes for the fixed-point engine

    def sample(self, key: Key, shape, device=None, dtype=torch.float32) -> torch.Tensor:
        raise NotImplementedError


class Gaussian(Distribution):
    name = "gaussian"

    def sample(self, key, shape, device=None, dtype=torch.float32):
        return torch.randn(shape, generator=_generator(key, device), device=device, dtype=dtype)


class Rademacher(Distribution):
    name = "rademacher"

    def sample(self, key, shape, device=None, dtype=torch.float32):
        g = _generator(key, device)
        return torch.randint(0, 2, shape, generator=g, device=device).to(dtype).mul_(2).sub_(1)


class Sphere(Distribution):
    """Uniform on the sphere of radius sqrt(n) of each tensor (n its size): unit variance per entry, and
    layer-local, so no pass over the whole model is needed to normalize."""

    name = "sphere"

    def sample(self, key, shape, device=None, dtype=torch.float32):
        z = torch.randn(shape, generator=_generator(key, device), device=device, dtype=dtype)
        return z.mul_(math.sqrt(z.numel()) / z.norm().clamp_min(1e-12))


class QuantDistribution(Distribution):
    """An 8-bit symmetric distribution with static scale Δ_z = z_max/127 (docs/method.md)."""

    integer = True

    def __init__(self, z_max: float = 3.5):
        self.z_max = rng.check_z_max(z_max)
        self.delta = self.z_max / 127.0
        self.one_q = rng.one_q(self.z_max)  # the constant 1.0 on z's scale, round(1/Δ_z)

    def sample(self, key, shape, device=None, dtype=torch.float32):
        return self.sample_q(key, shape, device).to(dtype) * self.delta


class QuantGaussian(QuantDistribution):
    """N(0, 1) clipped at ±z_max, quantized to 8 bits by the integer lookup-table sampler."""

    name = "qgaussian"

    def sample_q(self, key, shape, device=None):
        return torch_port.gaussian_q(
            key.seed, key.step, key.sample, key.tensor, shape, z_max=self.z_max, device=device
        )


class QuantRademacher(QuantDistribution):
    """±1_q on the 8-bit z scale."""

    name = "qrademacher"

    def sample_q(self, key, shape, device=None):
        return torch_port.rademacher_q(
            key.seed, key.step, key.sample, key.tensor, shape, z_max=self.z_max, device=device
        )


DISTRIBUTIONS = {
    "gaussian": Gaussian,
    "rademacher": Rademacher,
    "sphere": Sphere,
    "qgaussian": QuantGaussian,
    "qrademacher": QuantRademacher,
}


def make_distribution(name: str, z_max: float = 3.5) -> Distribution:
    if name not in DISTRIBUTIONS:
        raise ValueError(f"distribution {name!r} is invalid; allowed: {sorted(DISTRIBUTIONS)}")
    cls = DISTRIBUTIONS[name]
    return cls(z_max) if issubclass(cls, QuantDistribution) else cls()


@dataclass
class Estimator:
    """A difference formula, a distribution and the number of samples m averaged per step."""

    difference: Difference
    distribution: Distribution
    m: int = 1

    def __post_init__(self):
        check_count("m", self.m)
        if isinstance(self.difference, Median) and self.m < 2:
            raise ValueError(f"m={self.m!r} is invalid for the median difference; allowed: integers >= 2")

    @property
    def forwards_per_step(self) -> int:
        return self.m * (2 if self.difference.two_sided else 1) + (1 if self.difference.needs_center else 0)


def make_estimator(
    difference: str = "sign", distribution: str = "qgaussian", m: int = 3, z_max: float = 3.5
) -> Estimator:
    if difference not in DIFFERENCES:
        raise ValueError(f"difference {difference!r} is invalid; allowed: {sorted(DIFFERENCES)}")
    return Estimator(DIFFERENCES[difference](), make_distribution(distribution, z_max), m)


# Presets: thin configurations of the strategies above.
PRESETS = {
    "spsa": dict(difference="central", distribution="gaussian", m=1),
    "one_sided": dict(difference="one_sided", distribution="gaussian", m=1),
    "sign_spsa": dict(difference="sign", distribution="gaussian", m=3),
    "qzo_ff": dict(difference="sign", distribution="qgaussian", m=3),
}


def preset(name: str, **overrides) -> Estimator:
    if name not in PRESETS:
        raise ValueError(f"estimator preset {name!r} is invalid; allowed: {sorted(PRESETS)}")
    return make_estimator(**{**PRESETS[name], **overrides})
