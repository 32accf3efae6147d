"""The weight spaces the landscape experiment compares: the BN-folded float model (what BP trains) and the
dequantized conv/linear weights of a QModel (what QZO-FF trains), under the same (QModel node) names."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn

from ...engine.model import QModel
from ...quant import dequantize
from .params import Params


def folded_float_model(model: nn.Module, freeze_bias: bool = True) -> tuple[fx.GraphModule, dict[str, str]]:
    """The float model the integer engine sees: fx-traced with BatchNorm folded into its conv/linear.

    Returns (graph module, {QModel node name: weight path}) — the node names are those `convert` gives the
    same model (same trace). freeze_bias turns the folded biases into buffers, so the module's parameters
    are exactly the conv/linear weights QZO-FF trains (it never updates the int32 biases).
    """
    from ...engine.convert import fold_batchnorm

    gm = fold_batchnorm(fx.symbolic_trace(copy.deepcopy(model).eval()))
    gm.delete_all_unused_submodules()  # the folded BatchNorms
    modules = dict(gm.named_modules())
    names = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(modules[n.target], nn.Conv2d | nn.Linear):
            names[n.name] = f"{n.target}.weight"
            mod = modules[n.target]
            if freeze_bias and isinstance(mod.bias, nn.Parameter):
                b = mod.bias.detach().clone()
                del mod.bias
                mod.register_buffer("bias", b)
    for p in [n for n, _ in gm.named_parameters() if n not in names.values()]:
        raise ValueError(f"folded model keeps a parameter outside conv/linear ({p}); not supported here")
    return gm.eval(), names


def float_weights(model: nn.Module, paths: Mapping[str, str]) -> Params:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return {n: tensors[p].detach().clone() for n, p in paths.items()}


def load_weights(model: nn.Module, paths: Mapping[str, str], params: Params) -> None:
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for n, p in paths.items():
            tensors[p].copy_(params[n])


def quant_weights(q: QModel, names: Sequence[str]) -> Params:
    nodes = q.weight_nodes()
    return {n: dequantize(nodes[n].weight_q, nodes[n].w_qp) for n in names}
