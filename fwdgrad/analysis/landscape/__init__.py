"""Loss landscapes (Li et al. 2018) for float and quantized models, with BP and forward-gradient trajectories.

A point of the landscape is a set of named tensors (``Params = dict[str, Tensor]``): the weights that vary.
Everything else in the model stays at its stored value. The tools:

* :mod:`.params` — the named-tensor algebra and the directions: filter-normalized random directions
  (:func:`random_direction`, :func:`normalize_direction`: each filter — a slice along dim 0, a conv output
  channel or a linear output row — of a Gaussian direction rescaled to the norm of the same filter of the
  weights; 1-D tensors get a zero direction by default, ``ignore="biasbn"``, or the weights themselves,
  ``ignore="none"``, as in Li et al.'s code), PCA directions (:func:`pca_directions`: top right-singular
  vectors of the stacked ``snapshot − center``, uncentered, so the least-squares best plane *through the
  center*) and the least-squares placement of trajectories on a plane (:func:`project`; ``in_plane`` reports
  how much of each displacement the plane captures).
* :mod:`.evaluators` — (loss, accuracy) at a point on a fixed batch: :class:`FloatEvaluator` (any float
  module), :class:`QuantEvaluator` (a QModel at re-quantized weights, integer or fake mode),
  :class:`FunctionEvaluator` (any function of a point).
* :mod:`.surfaces` — :func:`interpolate`, :func:`along`, :func:`surface` (a 2-D grid), :func:`grid_axis`.
* :mod:`.models` — the BN-folded float model and the QModel weights as points (:func:`folded_float_model`).
* :mod:`.plots` — :func:`plot_surface`, :func:`plot_lines`.

The BP vs QZO-FF experiment built on them (``fwdgrad landscape``) is :mod:`fwdgrad.pipeline.landscape`;
docs/landscape.md describes both.
"""

from .evaluators import Evaluator, FloatEvaluator, FunctionEvaluator, QuantEvaluator
from .models import float_weights, folded_float_model, load_weights, quant_weights
from .params import (
    IGNORES,
    NORMS,
    Params,
    clone,
    combine,
    filter_norms,
    flatten,
    normalize_direction,
    pca_directions,
    project,
    random_direction,
    random_plane,
    subtract,
    unflatten,
)
from .plots import RUN_COLORS, plot_lines, plot_surface, run_color
from .surfaces import Line, Surface, along, grid_axis, interpolate, surface

__all__ = [
    "Evaluator",
    "FloatEvaluator",
    "FunctionEvaluator",
    "QuantEvaluator",
    "float_weights",
    "folded_float_model",
    "load_weights",
    "quant_weights",
    "IGNORES",
    "NORMS",
    "Params",
    "clone",
    "combine",
    "filter_norms",
    "flatten",
    "normalize_direction",
    "pca_directions",
    "project",
    "random_direction",
    "random_plane",
    "subtract",
    "unflatten",
    "RUN_COLORS",
    "plot_lines",
    "plot_surface",
    "run_color",
    "Line",
    "Surface",
    "along",
    "grid_axis",
    "interpolate",
    "surface",
]
