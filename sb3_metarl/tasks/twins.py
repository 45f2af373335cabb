"""
The batched twins: the sub-envs of one built-in family stepped together, as arrays, to the same results bit for bit
as each env's own ``step`` (each tested so). The sampler's runner steps through one wherever its family has one
(``sampler_kwargs=dict(batched_physics=False)`` turns them off); a custom task env keeps the per-env path.
"""

from collections.abc import Sequence
from typing import Any

from sb3_metarl.tasks.bandit import BatchedGaussianBandit
from sb3_metarl.tasks.ipd import BatchedIPD
from sb3_metarl.tasks.mujoco.batched import BatchedAnt, BatchedLocomotion
from sb3_metarl.tasks.navigation import BatchedNavigation
from sb3_metarl.tasks.tabular import BatchedTabularMDP

#: the batched twins, tried in order
BATCHED_FAMILIES = (
    BatchedLocomotion, BatchedAnt, BatchedNavigation, BatchedTabularMDP, BatchedGaussianBandit, BatchedIPD,
)  # fmt: skip


def batched_stepper(envs: Sequence[Any], num_threads: int = 1, compiled: bool | None = None) -> Any:
    """
    :param envs: unwrapped sub-envs
    :param num_threads: threads that advance the MuJoCo twins' physics
    :param compiled: the MuJoCo twins' physics loop (see ``sb3_metarl.tasks.mujoco.batched``)
    :return: a twin that steps all of ``envs`` exactly as their own ``step`` (one class per batch), or None if none does
    """
    for twin in BATCHED_FAMILIES:
        if envs and all(twin.supports(env) for env in envs) and len({type(env) for env in envs}) == 1:
            return twin(envs, num_threads, compiled)
    return None
