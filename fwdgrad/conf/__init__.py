"""The Hydra configs, shipped inside the package: `CONF_DIR` is the one place they are looked up."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent
