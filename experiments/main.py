"""The main job (same as `fwdgrad main`): BP vs ZO vs QZO-FF on the embedded digits, table + plots.

uv run python experiments/main.py [--out outputs/main]
"""

import sys

from fwdgrad.cli import guarded, main_job

if __name__ == "__main__":
    sys.exit(guarded(main_job, sys.argv[1:]))
