"""The experiment pipeline (docs/experiments.md): shared steps (`steps`), progress and log lines
(`progress`), the transfer path (`transfer`), few-shot episodes (`fewshot`), one Hydra job end to end
(`experiment.run_experiment`), the main job (`main_job`) and the loss-landscape experiment (`landscape`)."""

from .experiment import run_experiment

__all__ = ["run_experiment"]
