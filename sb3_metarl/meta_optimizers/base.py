"""The interface every meta-optimizer implements, and the checks they share."""

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch as th

from sb3_metarl.common.functional import Params

if TYPE_CHECKING:
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient, MetaSample


class MetaOptimizer(ABC):
    """
    Turns one meta-iteration's samples into a parameter update of the policy.

    Subclasses may keep state between updates (such as an adaptive penalty coefficient); it is saved
    with the model.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: the torch optimizer class the policy is built with (``policy.optimizer``)
    torch_optimizer_class: ClassVar[type[th.optim.Optimizer]] = th.optim.Adam
    #: whether the update steps the torch optimizer at ``learning_rate``
    uses_learning_rate: ClassVar[bool] = True

    @abstractmethod
    def step(self, model: "MetaPolicyGradient", sample: "MetaSample") -> dict[str, float]:
        """
        Apply one meta-update to ``model``'s policy.

        :param model: the algorithm (its policy, gradient mode and adaptation)
        :param sample: the meta-iteration's samples and the graph of its meta-objective
        :return: values to log under ``train/``
        :raises FloatingPointError: on a non-finite meta-gradient or update; the parameters and the
            optimizer state are then restored to their values before the call
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def gradient_norm(grads: Params) -> float:
    """:return: the Euclidean norm of all gradients together"""
    return th.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()


def check_finite_gradient(grads: Params, model: "MetaPolicyGradient") -> None:
    """:raises FloatingPointError: naming the parameters whose meta-gradient is not finite"""
    bad = [name for name, grad in grads.items() if not th.isfinite(grad).all()]
    if bad:
        raise FloatingPointError(
            f"meta-gradient: non-finite values in {bad} at iteration {model.n_updates + 1} "
            f"(after {model.num_timesteps} timesteps); the parameters were left unchanged. "
            "Lower inner_lr or learning_rate, or use a baseline / normalize_advantage."
        )


@contextlib.contextmanager
def restore_on_failure(model: "MetaPolicyGradient") -> Iterator[None]:
    """
    Run a meta-update; if it raises or leaves a parameter non-finite, restore the parameters and the
    policy optimizer's state, so that no training state is lost.

    :raises FloatingPointError: if the update left a parameter non-finite
    """
    params = model.functional_policy.parameters()
    saved_params = {name: param.detach().clone() for name, param in params.items()}
    saved_optimizer = copy.deepcopy(model.policy.optimizer.state_dict())

    def restore() -> None:
        with th.no_grad():
            for name, param in params.items():
                param.copy_(saved_params[name])
        model.policy.optimizer.load_state_dict(saved_optimizer)

    try:
        yield
    except BaseException:
        restore()
        raise
    bad = [name for name, param in params.items() if not th.isfinite(param).all()]
    if bad:
        restore()
        raise FloatingPointError(
            f"meta-update: parameters {bad} became non-finite at iteration {model.n_updates + 1}; the update was "
            "undone (parameters and optimizer state restored). Lower learning_rate or inner_lr."
        )
