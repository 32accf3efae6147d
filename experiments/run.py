"""The Hydra experiment app (same as `fwdgrad run`); see docs/experiments.md.

uv run python experiments/run.py experiment=ood method=qzo_ff quant=w16a8 seed=0
uv run python experiments/run.py -m experiment=ablation_m hydra/launcher=local
"""

import sys

from fwdgrad.cli import run

if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
