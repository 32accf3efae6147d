"""BP vs QZO-FF loss landscape with both trajectories: one command, Hydra config fwdgrad/conf/landscape.yaml.

    uv run python experiments/landscape.py                      # digits, small_cnn, PCA plane, 21x21 grid
    uv run python experiments/landscape.py landscape.plane=random landscape.center=ff mode=lp

Writes landscape_2d.png, landscape_1d.png, landscape.npz and landscape.json to the Hydra output dir
(outputs/landscape/<date>/<time>). See docs/landscape.md.
"""

from __future__ import annotations

import hydra

from fwdgrad.analysis.landscape import hydra_task


@hydra.main(config_path="../fwdgrad/conf", config_name="landscape", version_base=None)
def app(cfg) -> dict:
    return hydra_task(cfg)


if __name__ == "__main__":
    app()
