"""BP vs QZO-FF loss landscape with both trajectories: one command, Hydra config fwdgrad/conf/landscape.yaml.

    uv run python experiments/landscape.py                      # digits, small_cnn, PCA plane, 21x21 grid
    uv run python experiments/landscape.py landscape.plane=random landscape.center=ff mode=lp

The same app as `uv run fwdgrad landscape` (fwdgrad.pipeline.landscape). Writes landscape_2d.png,
landscape_1d.png, landscape.npz and landscape.json to the Hydra output dir
(outputs/landscape/<date>_<time>). See docs/landscape.md.
"""

from __future__ import annotations

import sys

from fwdgrad.cli import landscape

if __name__ == "__main__":
    sys.exit(landscape(sys.argv[1:]))
