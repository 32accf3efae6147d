"""Forward-gradient training: estimators, perturbation spaces (float / fixed point), optimizers."""

from .activity import ActivityGradient, ExampleLoss, example_closure
from .estimators import DIFFERENCES, DISTRIBUTIONS, PRESETS, Estimator, Key, make_estimator, preset
from .jvp import JVPForwardGradient, closure_for, jvp_gradient
from .masks import make_masks
from .optim import ForwardGradient, PassLoss, TieWarning, qzo_ff, zo_sgd
from .spaces import FixedPointSpace, FloatSpace, MomentumGuided, Term

__all__ = [
    "DIFFERENCES",
    "DISTRIBUTIONS",
    "PRESETS",
    "Estimator",
    "Key",
    "make_estimator",
    "preset",
    "jvp_gradient",
    "JVPForwardGradient",
    "closure_for",
    "make_masks",
    "ForwardGradient",
    "PassLoss",
    "TieWarning",
    "qzo_ff",
    "zo_sgd",
    "FixedPointSpace",
    "FloatSpace",
    "MomentumGuided",
    "Term",
    "ActivityGradient",
    "ExampleLoss",
    "example_closure",
]
