"""Integer-simulated models: convert a float model, run it bit-exactly (`integer`) or as quantsim (`fake`)."""

from .convert import SCHEMES, Scheme, convert, fold_batchnorm
from .intops import AccumulatorSpec, OverflowStats
from .model import ENGINE_MODES, Prefix, QModel
from .nodes import ExecContext, QConv2d, QLinear, QNode, QWeighted

__all__ = [
    "SCHEMES",
    "Scheme",
    "convert",
    "fold_batchnorm",
    "AccumulatorSpec",
    "OverflowStats",
    "ENGINE_MODES",
    "Prefix",
    "QModel",
    "ExecContext",
    "QConv2d",
    "QLinear",
    "QNode",
    "QWeighted",
]
