"""Plain meta-gradient ascent with a torch optimizer (Algorithm 1 of the seeds)."""

from typing import TYPE_CHECKING, ClassVar

import torch as th

from sb3_metarl.common.functional import grad_params
from sb3_metarl.meta_optimizers.base import MetaOptimizer, check_finite_gradient, gradient_norm, restore_on_failure

if TYPE_CHECKING:
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient, MetaSample


class GradientAscent(MetaOptimizer):
    """
    One step of the policy's torch optimizer along the meta-gradient (the gradient of the mean over
    tasks of the gradient mode's meta-objective), at ``learning_rate``.
    """

    name = "adam"

    def step(self, model: "MetaPolicyGradient", sample: "MetaSample") -> dict[str, float]:
        grads = {n: g.mean(0) for n, g in grad_params(sample.objective.sum(), sample.task_theta).items()}
        check_finite_gradient(grads, model)
        params = model.functional_policy.parameters()
        optimizer = model.policy.optimizer
        with restore_on_failure(model):
            optimizer.zero_grad()
            for name, param in params.items():
                param.grad = -grads[name]  # the optimizers minimize; the meta-objective is maximized
            optimizer.step()
        return {"meta_grad_norm": gradient_norm(grads)}


class Adam(GradientAscent):
    """Meta-gradient ascent with Adam."""

    name = "adam"
    torch_optimizer_class: ClassVar[type[th.optim.Optimizer]] = th.optim.Adam


class SGD(GradientAscent):
    """Meta-gradient ascent with (momentum-free by default) SGD."""

    name = "sgd"
    torch_optimizer_class: ClassVar[type[th.optim.Optimizer]] = th.optim.SGD
