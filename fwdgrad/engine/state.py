"""A `QModel` as plain data (`qmodel_state`) and back (`rebuild_qmodel`), so that a saved model holds no
pickled objects (fwdgrad.statefile). The state keeps what conversion found and training changed; the graph
itself is traced again from the float architecture, which is all a rebuild needs besides the state:

    {"options": {"scheme", "per_channel", "acc_bits", "overflow", "requant", "mode"},
     "activations": {node name: qparams or None},  every node's output format, in node order (calibrated)
     "weights": {trainable node name: qparams},     weight formats and scales (training may change them)
     "tensors": the QModel's state dict}            integer weights, int32 biases, constants, lookup
                                                    tables, float parameters of fallback ops
    qparams = {"format": QFormat fields, "scale": float64 tensor, "zero_point": int64 tensor}
"""

from __future__ import annotations

import warnings
from dataclasses import asdict

import torch.nn as nn

from ..quant import QFormat, QParams
from .convert import convert
from .model import QModel


def _qparams_state(qp: QParams | None) -> dict | None:
    return None if qp is None else {"format": asdict(qp.fmt), "scale": qp.scale, "zero_point": qp.zero_point}


def _qparams(state: dict | None) -> QParams | None:
    return None if state is None else QParams(QFormat(**state["format"]), state["scale"], state["zero_point"])


def qmodel_state(q: QModel) -> dict:
    """`q` as plain data (dicts, strings, numbers, tensors): see the module docstring."""
    weights = q.weight_nodes()
    return {
        "options": {
            "scheme": q.scheme,
            "per_channel": any(n.w_qp.fmt.axis is not None for n in weights.values()),
            "acc_bits": q.acc.bits,
            "overflow": q.acc.overflow,
            "requant": q.requant,
            "mode": q.mode,
        },
        "activations": {n.name: _qparams_state(n.out_qp) for n in q.nodes},
        "weights": {name: _qparams_state(n.w_qp) for name, n in weights.items()},
        "tensors": dict(q.state_dict()),
    }


def rebuild_qmodel(float_model: nn.Module, state: dict) -> QModel:
    """The QModel `state` was taken from: `float_model` (its architecture; its weights do not matter) is
    converted with the stored activation formats instead of calibration, then takes the stored weight
    formats and tensors. A state that does not fit the model is a one-line ValueError."""
    o = state["options"]
    with warnings.catch_warnings():  # ops without an integer kernel were named when it was first converted
        warnings.simplefilter("ignore")
        q = convert(
            float_model,
            o["scheme"],
            None,
            per_channel=o["per_channel"],
            acc_bits=o["acc_bits"],
            overflow=o["overflow"],
            requant=o["requant"],
            mode=o["mode"],
            act_qparams={name: _qparams(qp) for name, qp in state["activations"].items()},
        )
    names, saved = [n.name for n in q.nodes], list(state["activations"])
    if names != saved:
        raise ValueError(f"the model's nodes {names} are not the saved model's {saved}")
    for name, node in q.weight_nodes().items():
        node.use_weight_qparams(_qparams(state["weights"][name]))
    try:
        q.load_state_dict(state["tensors"])
    except RuntimeError as e:  # torch lists every mismatch over several lines
        why = " ".join(str(e).split())
        raise ValueError(f"the saved tensors do not fit the model: {why}") from None
    return q
