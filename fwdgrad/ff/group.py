"""`OneGroupOptimizer`: the `torch.optim.Optimizer` base of the forward-only optimizers. One parameter group
holds the tensors a method trains and its hyperparameters (`lr`, and `eps` for the zeroth-order ones), so
every `torch.optim.lr_scheduler` drives them; the group is fixed at construction."""

from __future__ import annotations

import torch


class OneGroupOptimizer(torch.optim.Optimizer):
    def __init__(self, params, defaults: dict):
        self._fixed_groups = False
        super().__init__(params, defaults)
        self._fixed_groups = True

    def add_param_group(self, param_group: dict) -> None:
        if self._fixed_groups:
            raise ValueError(
                f"{type(self).__name__} trains one parameter group, the tensors it was built for; allowed: "
                "build a new optimizer for another set of tensors"
            )
        super().add_param_group(param_group)

    def _hyper(self, key: str):
        return self.param_groups[0][key]

    def _set_hyper(self, key: str, value) -> None:
        for group in self.param_groups:
            group[key] = value

    lr = property(lambda self: self._hyper("lr"), lambda self, v: self._set_hyper("lr", v))
