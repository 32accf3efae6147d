"""Export a converted QModel and its QZO-FF training settings as one bundle for the numpy runtime
(`fwdgrad.edge`): the bundle writer (`bundle`), model files (model.pt, plain data), a run's settings and how
export defaults to them (`settings`), the `fwdgrad export` command (`command`)."""

from .bundle import EXPORT_REQUANT, export_bundle
from .command import export_main
from .settings import load_model, run_settings, save_model

__all__ = ["EXPORT_REQUANT", "export_bundle", "export_main", "load_model", "run_settings", "save_model"]
