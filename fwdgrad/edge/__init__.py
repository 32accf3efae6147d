"""numpy-only edge runtime: load a bundle, run integer inference, fine-tune with QZO-FF on the device.

Imports numpy (and `fwdgrad.rng`) only, never torch. See ``docs/edge.md``.
"""

from .bundle import FORMAT, VERSION, Bundle, BundleError, load_bundle, save_bundle
from .runtime import Runtime
from .train import Trainer, cross_entropy, evaluate

__all__ = [
    "FORMAT",
    "VERSION",
    "Bundle",
    "BundleError",
    "load_bundle",
    "save_bundle",
    "Runtime",
    "Trainer",
    "cross_entropy",
    "evaluate",
]
