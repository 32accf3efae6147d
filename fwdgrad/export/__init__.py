"""Export a converted QModel and its QZO-FF training settings as one bundle for the numpy runtime
(`fwdgrad.edge`): the bundle writer (`bundle`), a run's settings and how export defaults to them
(`settings`), the `fwdgrad export` command (`command`)."""

from .bundle import EXPORT_REQUANT, export_bundle
from .command import export_main
from .settings import run_settings

__all__ = ["EXPORT_REQUANT", "export_bundle", "export_main", "run_settings"]
