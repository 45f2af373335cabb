"""Acting per task group, each with its own parameters and its own noise stream: the same actions on every backend."""

import copy
from collections.abc import Sequence

import numpy as np
import torch as th
from stable_baselines3.common.distributions import DiagGaussianDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.utils import obs_as_tensor

from sb3_metarl.common.functional import Params, sample_actions
from sb3_metarl.mlp import LayeredActor, MlpActorLayout


def cpu_copy(policy: ActorCriticPolicy) -> ActorCriticPolicy:
    """:return: a copy of ``policy`` on the CPU, without its optimizer (acting only evaluates it)"""
    cpu_policy = copy.deepcopy(policy).to("cpu")
    cpu_policy.optimizer = None
    return cpu_policy


class GroupPolicies:
    """
    One CPU copy of the policy per task group, loaded with the group's parameters once per sampling
    phase, so that acting is a plain call of the SB3 policy (no per-step parameter substitution).
    Acting is per group, not batched over groups: a batched matmul's last bits depend on the batch it
    is part of, so a process holding other groups would sample other actions; per group, a group's
    actions depend only on its parameters, its observations and its noise stream, and every backend
    samples the same episodes for the same seed.

    :param policy: the policy whose architecture the copies have (the copies live on the CPU: sampling is the same on
        every device, and never slower on a GPU learner than on a CPU one)
    """

    def __init__(self, policy: ActorCriticPolicy):
        self.policy = policy
        self.copies: list[ActorCriticPolicy] = []
        #: SB3's default MLP actor acts through its layered twin (``sb3_metarl.mlp``): small networks cost their
        #: Python calls, not their arithmetic; None: the policy's own modules
        self.layout = MlpActorLayout.of(policy)
        #: per group, the layered twin of its copy (rebuilt at every load: it reads the std once)
        self.layered: list[LayeredActor] = []

    def load(self, task_params: Params) -> None:
        """:param task_params: per-group parameters (leading dim: the groups) of the policy's trainable parameters"""
        n_groups = next(iter(task_params.values())).shape[0]
        while len(self.copies) < n_groups:
            clone = cpu_copy(self.policy) if not self.copies else copy.deepcopy(self.copies[0])
            clone.set_training_mode(False)
            self.copies.append(clone)
        with th.no_grad():
            # one transfer per phase: acting is on the CPU whatever the learner's device (a GPU policy would make
            # every group's step a few tiny kernel launches; measured slower than the CPU in docs/results/scaling.md)
            cpu_params = {name: param.detach().to("cpu") for name, param in task_params.items()}
            for group in range(n_groups):
                for name, param in self.copies[group].named_parameters():
                    if name in cpu_params:
                        param.copy_(cpu_params[name][group])
            if self.layout is not None:
                self.layered = [LayeredActor(self.layout, clone) for clone in self.copies]

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
                if self.layout is not None:
                    actions = self.layered[group].sample(obs[rows], generators[group]).cpu().numpy()
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


def fresh_noise_seeds(noise_seeds: Sequence[int] | None, n_tasks: int) -> list[int]:
    """:return: ``noise_seeds`` as a list, or ``n_tasks`` seeds from fresh entropy when None"""
    if noise_seeds is not None:
        return [int(seed) for seed in noise_seeds]
    return [int(seed) for seed in np.random.SeedSequence().generate_state(n_tasks, np.uint64) >> np.uint64(2)]


def draw_noise_seeds(generator: th.Generator, n_groups: int) -> list[int]:
    """:return: one seed per task group for a sampling phase, drawn from ``generator`` (the run's action-noise stream)"""
    return [int(seed) for seed in th.randint(0, 2**62, (n_groups,), generator=generator)]


def group_generators(seeds: Sequence[int]) -> list[th.Generator]:
    """:return: one CPU generator per task group, seeded with the group's noise seed for this sampling phase"""
    return [th.Generator().manual_seed(int(seed)) for seed in seeds]


def check_finite_actions(actions: np.ndarray) -> None:
    """:raises FloatingPointError: if a sampled action is not finite (the policy's parameters are broken)"""
    if not np.isfinite(actions).all():
        raise FloatingPointError(
            "policy: non-finite actions sampled (the current or adapted parameters are not finite or too large); "
            "lower inner_lr or learning_rate."
        )
