"""Plain meta-gradient ascent with a torch optimizer (Algorithm 1 of the seeds)."""

import warnings
from typing import ClassVar

import torch as th

from sb3_metarl.adaptation import Adaptation, MetaSample
from sb3_metarl.meta_optimizers.base import MetaOptimizer, check_finite_gradient, gradient_norm, restore_on_failure


class GradientAscent(MetaOptimizer):
    """
    One step of the policy's torch optimizer along the meta-gradient (the gradient of the mean over
    tasks of the gradient mode's meta-objective), at ``learning_rate``.

    :param max_grad_norm: clip the meta-gradient's global norm to this value before the step (SB3's
        ``max_grad_norm``); None: no clipping
    """

    name = "adam"

    def __init__(self, max_grad_norm: float | None = None):
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm: must be None or a number > 0, got {max_grad_norm!r}.")
        self.max_grad_norm = max_grad_norm

    def step(self, adaptation: Adaptation, sample: MetaSample, optimizer: th.optim.Optimizer) -> dict[str, float]:
        grads = {n: g.mean(0) for n, g in adaptation.per_task_meta_gradient(sample).items()}
        check_finite_gradient(grads)
        norm = gradient_norm(grads)
        if self.max_grad_norm is not None and norm > self.max_grad_norm:
            grads = {n: g * (self.max_grad_norm / norm) for n, g in grads.items()}
        params = adaptation.parameters()
        with restore_on_failure(params, optimizer):
            optimizer.zero_grad()
            for name, param in params.items():
                param.grad = -grads[name]  # the optimizers minimize; the meta-objective is maximized
            optimizer.step()
        return {"meta_grad_norm": norm}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(max_grad_norm={self.max_grad_norm})"


class AdamAscent(GradientAscent):
    """Meta-gradient ascent with Adam."""

    name = "adam"
    torch_optimizer_class: ClassVar[type[th.optim.Optimizer]] = th.optim.Adam


class SGDAscent(GradientAscent):
    """
    Meta-gradient ascent with (momentum-free by default) SGD. Its step is proportional to the
    meta-gradient, whose scale grows with the horizon and the rewards, so by default the gradient's
    norm is clipped to 0.5 (SB3's A2C/PPO default): a step never exceeds ``0.5 * learning_rate``.
    """

    name = "sgd"
    torch_optimizer_class: ClassVar[type[th.optim.Optimizer]] = th.optim.SGD

    def __init__(self, max_grad_norm: float | None = 0.5):
        super().__init__(max_grad_norm)


def __getattr__(name: str) -> type:
    # the classes' names in 0.1 (its zips, tests/data/v0_1_0 among them, pickle them by those names): pickle paths only
    new = {"Adam": AdamAscent, "SGD": SGDAscent}.get(name)
    if new is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(f"sb3_metarl.meta_optimizers.{name} is deprecated; use {new.__name__}.", DeprecationWarning, stacklevel=2)
    return new
