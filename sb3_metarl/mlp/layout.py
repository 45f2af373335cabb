"""
The one detector of SB3's default MLP Gaussian actor and the one table of the activations the layered
twin writes out (value, first and second derivative). Sampling, the layered adaptation and the curvature
products all ask :meth:`MlpActorLayout.of`; an actor it does not recognise takes the autograd path.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.torch_layers import FlattenExtractor
from torch import nn


def _tanh_slope(pre_activation: th.Tensor, output: th.Tensor) -> th.Tensor:
    return 1.0 - output * output


def _tanh_curvature(upstream: th.Tensor, output: th.Tensor, slope: th.Tensor) -> th.Tensor:
    return -2.0 * upstream * output * slope  # tanh'' = -2 tanh tanh'


def _relu_slope(pre_activation: th.Tensor, output: th.Tensor) -> th.Tensor:
    return (pre_activation > 0).to(pre_activation.dtype)


@dataclass(frozen=True)
class Activation:
    """An activation written out: its value and its derivatives, from what a forward pass keeps."""

    name: str
    #: a -> act(a), the same arithmetic as the module's forward
    function: Callable[[th.Tensor], th.Tensor]
    #: (a, act(a)) -> act'(a)
    slope: Callable[[th.Tensor, th.Tensor], th.Tensor]
    #: (upstream cotangent, act(a), act'(a)) -> upstream * act''(a); None where act'' is zero
    curvature: Callable[[th.Tensor, th.Tensor, th.Tensor], th.Tensor] | None


#: the activations of the layered twin (SB3's default MLP uses Tanh; ReLU is the other common choice)
ACTIVATIONS: dict[type[nn.Module], Activation] = {
    nn.Tanh: Activation("tanh", th.tanh, _tanh_slope, _tanh_curvature),
    nn.ReLU: Activation("relu", th.relu, _relu_slope, None),
}


@dataclass(frozen=True)
class MlpActorLayout:
    """Parameter names of an MLP Gaussian actor: ``Linear -> activation`` blocks, a linear mean, a state-free log std."""

    #: (weight name, bias name, activation) per hidden block, input to output
    hidden: tuple[tuple[str, str, Activation], ...]
    #: weight and bias names of the mean's linear layer
    output: tuple[str, str]
    log_std: str = "log_std"

    @property
    def names(self) -> list[str]:
        """:return: every actor parameter name"""
        return [self.log_std, *[name for weight, bias, _ in self.hidden for name in (weight, bias)], *self.output]

    @staticmethod
    def of(policy: ActorCriticPolicy) -> "MlpActorLayout | None":
        """
        :return: the layout of ``policy``'s actor if it is SB3's default MLP (flattened non-image Box
            observations, ``Linear`` blocks with an activation of :data:`ACTIVATIONS`, unsquashed diagonal
            Gaussian actions), else None
        """
        layers = getattr(policy.mlp_extractor, "policy_net", None)
        if not (
            type(policy.action_dist) is DiagGaussianDistribution
            and isinstance(policy.pi_features_extractor, FlattenExtractor)
            and isinstance(policy.observation_space, spaces.Box)
            and not is_image_space(policy.observation_space, check_channels=False)
            and isinstance(policy.action_net, nn.Linear)
            and policy.action_net.bias is not None
            and isinstance(layers, nn.Sequential)
            and len(layers) % 2 == 0
        ):
            return None
        hidden = []
        for index in range(0, len(layers), 2):
            linear, activation = layers[index], layers[index + 1]
            if not (isinstance(linear, nn.Linear) and linear.bias is not None and type(activation) in ACTIVATIONS):
                return None
            prefix = f"mlp_extractor.policy_net.{index}"
            hidden.append((f"{prefix}.weight", f"{prefix}.bias", ACTIVATIONS[type(activation)]))
        return MlpActorLayout(tuple(hidden), ("action_net.weight", "action_net.bias"))
