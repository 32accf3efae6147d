"""`FixedPointSettings`: the fixed-point options of QZO-FF, one type carried by `qzo_ff`, the fixed-point
space, export and the edge bundle's header (docs/method.md#the-fixed-point-formulation). Torch-free, so the
method registry and config validation can name its fields without importing torch.

    difference     the coefficient c_i ∈ {-1, 0, 1} of z_i: sign (sign(L(w+εz_i) − L(w−εz_i)), two passes per
                   sample; the paper's) | median (sign(L(w+εz_i) − median_j L(w+εz_j)), one pass per sample)
                   | central (the integer loss difference L+ − L−; only with perturbed outputs,
                   `fwdgrad.ff.activity`)
    distribution   8-bit perturbation z_q: qgaussian (Philox + Gaussian table) | qrademacher (±1_q)
    z_max          z's range; static scale Δ_z = z_max/127, unit 1_q = round(1/Δ_z)
    rounding       rounding of the perturbation and the update: nearest | floor | stochastic
    perturb_scale  requantization of w_q·1_q ± ε_q·z_q to the weights: one (r_p = 1/1_q) | delta_z (r_p = Δ_z)
    eps_min_q      lower bound of ε_q = round(ε/Δ_w), in weight LSBs (0: none, the paper's)
    weight_headroom  the trained layers' Δ_w is multiplied by this once before training (1: the paper's)
    layerwise      off (every step perturbs and updates all trained tensors) | cycle | sample (one tensor per
                   step, in turn or drawn: layer-wise forward gradients, `fwdgrad.rng.active_tensor`)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .rng import LAYERWISE, check_z_max

#: the differences whose coefficients lie in {-1, 0, 1}, which the integer update of the weights takes
INTEGER_DIFFERENCES = ("sign", "median")
#: ... and the integer loss difference L+ − L− itself, which the output-perturbed update takes (`perturb`)
OUTPUT_DIFFERENCES = (*INTEGER_DIFFERENCES, "central")
QUANT_DISTRIBUTIONS = ("qgaussian", "qrademacher")
ROUNDINGS = ("nearest", "floor", "stochastic")
PERTURB_SCALES = ("one", "delta_z")


@dataclass(frozen=True)
class FixedPointSettings:
    difference: str = "sign"
    distribution: str = "qgaussian"
    z_max: float = 3.5
    rounding: str = "nearest"
    perturb_scale: str = "one"
    eps_min_q: int = 0
    weight_headroom: float = 1.0
    layerwise: str = "off"

    def __post_init__(self):
        if self.difference not in OUTPUT_DIFFERENCES:
            raise ValueError(
                f"difference {self.difference!r} is invalid for fixed-point training; allowed: "
                f"{', '.join(INTEGER_DIFFERENCES)}, or central with perturb=outputs"
            )
        if self.distribution not in QUANT_DISTRIBUTIONS:
            kind = "float" if self.distribution in ("gaussian", "rademacher", "sphere") else "unknown"
            raise ValueError(
                f"distribution {self.distribution!r} is {kind}; fixed-point training needs an 8-bit "
                f"one; allowed: {', '.join(QUANT_DISTRIBUTIONS)}"
            )
        check_z_max(self.z_max)
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r} is invalid; allowed: {ROUNDINGS}")
        if self.perturb_scale not in PERTURB_SCALES:
            raise ValueError(f"perturb_scale {self.perturb_scale!r} is invalid; allowed: 'one', 'delta_z'")
        if isinstance(self.eps_min_q, bool) or not isinstance(self.eps_min_q, int) or self.eps_min_q < 0:
            raise ValueError(f"eps_min_q={self.eps_min_q!r} is invalid; allowed: integers >= 0")
        if not self.weight_headroom >= 1.0:
            raise ValueError(f"weight_headroom={self.weight_headroom!r} is invalid; allowed: >= 1")
        if self.layerwise not in LAYERWISE:
            raise ValueError(f"layerwise={self.layerwise!r} is invalid; allowed: {', '.join(LAYERWISE)}")

    def as_dict(self) -> dict:
        return asdict(self)


FIXED_POINT_KEYS = tuple(f.name for f in fields(FixedPointSettings))
