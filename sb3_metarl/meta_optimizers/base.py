"""The interface every meta-optimizer implements, and the checks they share."""

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch as th

from sb3_metarl.adaptation import Adaptation, MetaSample
from sb3_metarl.common.functional import Params


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
    def step(self, adaptation: Adaptation, sample: MetaSample, optimizer: th.optim.Optimizer) -> dict[str, float]:
        """
        Apply one meta-update to the parameters of ``adaptation``'s policy.

        :param adaptation: the differentiable adaptation (replay, objective, KL) of the policy to update
        :param sample: the meta-iteration's samples and the graph of its meta-objective
        :param optimizer: the torch optimizer over the policy's parameters (``torch_optimizer_class``)
        :return: values to log under ``train/``
        :raises FloatingPointError: on a non-finite meta-gradient or update; the parameters and the
            optimizer state are then restored to their values before the call
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def gradient_norm(grads: Params) -> float:
    """:return: the Euclidean norm of all gradients together"""
    return th.sqrt(sum(g.pow(2).sum() for g in grads.values())).item()


def check_finite_gradient(grads: Params) -> None:
    """:raises FloatingPointError: naming the parameters whose meta-gradient is not finite"""
    bad = [name for name, grad in grads.items() if not th.isfinite(grad).all()]
    if bad:
        raise FloatingPointError(
            f"meta-gradient: non-finite values in {bad}; the parameters were left unchanged. "
            "Lower inner_lr or learning_rate, or use a baseline / normalize_advantage."
        )


@contextlib.contextmanager
def restore_on_failure(params: Params, optimizer: th.optim.Optimizer) -> Iterator[None]:
    """
    Run a meta-update; if it raises or leaves a parameter non-finite, restore the parameters and the
    optimizer's state, so that no training state is lost.

    :param params: the parameters the update changes in place
    :param optimizer: the torch optimizer whose state the update may change
    :raises FloatingPointError: if the update left a parameter non-finite
    """
    saved_params = {name: param.detach().clone() for name, param in params.items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())

    def restore() -> None:
        with th.no_grad():
            for name, param in params.items():
                param.copy_(saved_params[name])
        optimizer.load_state_dict(saved_optimizer)

    try:
        yield
    except BaseException:
        restore()
        raise
    bad = [name for name, param in params.items() if not th.isfinite(param).all()]
    if bad:
        restore()
        raise FloatingPointError(
            f"meta-update: parameters {bad} became non-finite; the update was "
            "undone (parameters and optimizer state restored). Lower learning_rate or inner_lr."
        )
