"""Integer-simulated models: convert a float model, run it bit-exactly (`integer`) or as quantsim (`fake`);
save it as plain data and rebuild it (`state`)."""

from .convert import SCHEMES, Scheme, convert, fold_batchnorm
from .intops import AccumulatorSpec, OverflowStats
from .model import ENGINE_MODES, Prefix, QModel
from .nodes import ExecContext, QConv2d, QLinear, QNode, QWeighted
from .state import qmodel_state, rebuild_qmodel

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
    "qmodel_state",
    "rebuild_qmodel",
]
