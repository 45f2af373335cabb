"""The episode-sampler protocol and what every backend shares: acting per task group with its own noise."""

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import FlattenExtractor
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn
from torch.nn import functional as F

from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import Params, sample_actions
from sb3_metarl.common.task_vec_env import StepCallback


def group_generators(seeds: Sequence[int]) -> list[th.Generator]:
    """:return: one CPU generator per task group, seeded with the group's noise seed for this sampling phase"""
    return [th.Generator().manual_seed(int(seed)) for seed in seeds]


class GroupPolicies:
    """
    One copy of the policy per task group, loaded with the group's parameters once per sampling
    phase, so that acting is a plain call of the SB3 policy (no per-step parameter substitution).
    Acting is per group, not batched over groups: a batched matmul's last bits depend on the batch it
    is part of, so a process holding other groups would sample other actions; per group, a group's
    actions depend only on its parameters, its observations and its noise stream, and every backend
    samples the same episodes for the same seed.

    :param policy: the policy whose architecture the copies have (they live on its device)
    """

    def __init__(self, policy: ActorCriticPolicy):
        self.policy = policy
        self.copies: list[ActorCriticPolicy] = []
        #: SB3's default MLP actor (flattened Box observations, Linear/activation layers, Gaussian actions) is
        #: evaluated layer by layer: small networks cost their Python calls, not their arithmetic
        self.plain_mlp = _is_plain_mlp_actor(policy)
        #: per group, for the plain MLP: its layers as (function, weight, bias) and its action std (read once per load)
        self.plain_layers: list[list[tuple[Callable[..., th.Tensor], th.Tensor | None, th.Tensor | None]]] = []
        self.plain_stds: list[th.Tensor] = []

    def load(self, task_params: Params) -> None:
        """:param task_params: per-group parameters (leading dim: the groups) of the policy's trainable parameters"""
        n_groups = next(iter(task_params.values())).shape[0]
        while len(self.copies) < n_groups:
            clone = copy.deepcopy(self.policy)
            clone.optimizer = None  # only evaluated
            clone.set_training_mode(False)
            self.copies.append(clone)
        with th.no_grad():
            for group in range(n_groups):
                for name, param in self.copies[group].named_parameters():
                    if name in task_params:
                        param.copy_(task_params[name][group])
            if self.plain_mlp:
                self.plain_layers = [_plain_layers(clone) for clone in self.copies]
                self.plain_stds = [clone.log_std.exp() for clone in self.copies]

    def act(
        self,
        obs: np.ndarray,
        envs_per_group: int,
        groups: np.ndarray,
        generators: list[th.Generator],
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """
        Sample one action per sub-env of the given groups, each group with its own parameters and noise generator.

        :param obs: observations of all sub-envs, group-major
        :param groups: the groups to act for (the other rows of ``out`` are left as they are)
        :param generators: one noise generator per group
        :param out: the array to write the actions into (allocated on the first call when None)
        :return: the actions, one row per sub-env (as sampled, before clipping)
        """
        with th.no_grad():
            for group in groups:
                rows = slice(group * envs_per_group, (group + 1) * envs_per_group)
                if self.plain_mlp:
                    actions = self._sample_plain_mlp(group, obs[rows], generators[group]).cpu().numpy()
                else:
                    actions = self._sample(self.copies[group], obs[rows], generators[group]).cpu().numpy()
                if out is None:
                    out = np.zeros((len(obs), *actions.shape[1:]), dtype=actions.dtype)
                out[rows] = actions
        assert out is not None, "no group to act for"
        return out

    @staticmethod
    def _sample(policy: ActorCriticPolicy, obs: np.ndarray, generator: th.Generator) -> th.Tensor:
        # SB3's get_distribution, without building a Normal for Gaussian policies (the cost of a small MLP's
        # forward): the same actions as sample_actions(policy.get_distribution(obs), generator)
        features = policy.extract_features(obs_as_tensor(obs, policy.device), policy.pi_features_extractor)
        mean = policy.action_net(policy.mlp_extractor.forward_actor(features))
        if isinstance(policy.action_dist, DiagGaussianDistribution):
            noise = th.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
            return mean + th.ones_like(mean) * policy.log_std.exp() * noise
        return sample_actions(policy.action_dist.proba_distribution(action_logits=mean), generator)


    def _sample_plain_mlp(self, group: int, obs: np.ndarray, generator: th.Generator) -> th.Tensor:
        # what extract_features -> mlp_extractor.forward_actor -> action_net -> a Gaussian sample compute for this
        # architecture, with the layers and the std read once per load: per lock-step this call is the sampler's
        # own cost on cheap envs
        # the layers' device (SB3's policy.device walks the parameters on every call)
        latent = th.as_tensor(obs, device=self.plain_stds[group].device)
        if latent.dtype != th.float32:
            latent = latent.float()
        if latent.dim() != 2:
            latent = latent.flatten(1)
        for function, weight, bias in self.plain_layers[group]:
            latent = function(latent) if weight is None else function(latent, weight, bias)
        noise = th.randn(latent.shape, generator=generator, dtype=latent.dtype).to(latent.device)
        return latent + self.plain_stds[group] * noise


#: activations evaluated by their functions (the same arithmetic as the module's forward, without the module call)
_ACTIVATION_FUNCTIONS: dict[type, Callable[[th.Tensor], th.Tensor]] = {nn.Tanh: th.tanh, nn.ReLU: th.relu}


def _plain_layers(policy: ActorCriticPolicy) -> list[tuple[Callable[..., th.Tensor], th.Tensor | None, th.Tensor | None]]:
    """:return: the plain MLP actor's layers to the action mean, as (function, weight, bias); weight None: an activation"""
    layers: list[tuple[Callable[..., th.Tensor], th.Tensor | None, th.Tensor | None]] = []
    for layer in [*policy.mlp_extractor.policy_net, policy.action_net]:
        if isinstance(layer, nn.Linear):
            layers.append((F.linear, layer.weight, layer.bias))
        else:
            layers.append((_ACTIVATION_FUNCTIONS.get(type(layer), layer), None, None))
    return layers


def _is_plain_mlp_actor(policy: ActorCriticPolicy) -> bool:
    """:return: whether the policy's actor is SB3's default MLP on flattened Box observations with Gaussian actions"""
    layers = getattr(policy.mlp_extractor, "policy_net", None)
    return (
        isinstance(policy.pi_features_extractor, FlattenExtractor)
        and isinstance(policy.observation_space, spaces.Box)
        and isinstance(policy.action_dist, DiagGaussianDistribution)
        and isinstance(policy.action_net, nn.Linear)
        and isinstance(layers, nn.Sequential)
        and all(isinstance(layer, nn.Linear) or not any(True for _ in layer.parameters()) for layer in layers)
    )


def check_finite_actions(actions: np.ndarray) -> None:
    """:raises FloatingPointError: if a sampled action is not finite (the policy's parameters are broken)"""
    if not np.isfinite(actions).all():
        raise FloatingPointError(
            "policy: non-finite actions sampled (the current or adapted parameters are not finite or too large); "
            "lower inner_lr or learning_rate."
        )


def fresh_noise_seeds(noise_seeds: Sequence[int] | None, n_tasks: int) -> list[int]:
    """:return: ``noise_seeds`` as a list, or ``n_tasks`` seeds from fresh entropy when None"""
    if noise_seeds is not None:
        return [int(seed) for seed in noise_seeds]
    return [int(seed) for seed in np.random.SeedSequence().generate_state(n_tasks, np.uint64) >> np.uint64(2)]


def draw_noise_seeds(generator: th.Generator, n_groups: int) -> list[int]:
    """:return: one seed per task group for a sampling phase, drawn from ``generator`` (the run's action-noise stream)"""
    return [int(seed) for seed in th.randint(0, 2**62, (n_groups,), generator=generator)]


class EpisodeSampler(ABC):
    """
    Samples whole episodes for B tasks with given per-task parameters. A backend returns episodes
    only: the learner recomputes every log-likelihood it differentiates, so no backend is trusted
    for gradients.

    The sub-envs are split into ``n_groups`` groups of ``envs_per_group``, one task per group; E
    episodes per task take ``ceil(E / envs_per_group)`` waves.
    """

    n_groups: int
    envs_per_group: int
    horizon: int

    def attach_policy(self, policy: ActorCriticPolicy) -> None:
        """
        Give the sampler the policy's architecture (a remote backend ships a CPU copy once; the
        parameters come with every ``sample``). Called by the algorithm whenever its policy is (re)built.
        """
        return None

    @abstractmethod
    def sample(
        self,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int] | None = None,
        step_callback: StepCallback | None = None,
    ) -> EpisodeBatch | None:
        """
        :param tasks: at most ``n_groups`` tasks (spare groups stay idle)
        :param task_params: per-task policy parameters (detached), leading dim ``len(tasks)``
        :param n_episodes: episodes per task
        :param noise_seeds: one action-noise seed per task (see ``GroupPolicies``); None: fresh entropy. The
            algorithm passes seeds drawn from its own stream (and ``step_callback``) when the method accepts them
        :param step_callback: receives the transition counts; False stops sampling
        :return: the episodes (B, E, H, ...) without weights (the algorithm recomputes the log-likelihoods and
            weighs them), or None if ``step_callback`` stopped sampling
        """

    def env_rng_states(self) -> list[dict[str, Any]] | None:
        """
        :return: the sub-envs' random-generator states right after the last ``sample`` (``bit_generator.state``
            per sub-env), read without a further call to any worker; None when the sampler cannot tell (the
            algorithm then reads them from the VecEnv)
        """
        return None

    def close(self) -> None:
        """Release the backend's workers (idempotent)."""
        return None


def sampler_options(sampler: EpisodeSampler, noise_seeds: Sequence[int], step_callback: StepCallback | None) -> dict[str, Any]:
    """
    :return: the keyword arguments of ``sampler.sample`` beyond ``(tasks, task_params, n_episodes)`` that it
        accepts: a user's sampler may leave out the noise seeds (it then samples with its own randomness, and
        runs are not reproducible) or the step callback (timesteps are then counted per batch by the caller)
    """
    parameters = inspect.signature(sampler.sample).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    options = {"noise_seeds": noise_seeds, "step_callback": step_callback}
    return {name: value for name, value in options.items() if takes_any or name in parameters}
