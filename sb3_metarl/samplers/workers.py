"""
The workers of ``sampler="subproc"`` and ``sampler="ray"``: a ``Shard`` (a block of task groups, its sub-envs and a CPU
copy of the policy, sampling whole episodes locally) in a process (``ProcessWorker``) or a Ray actor (``RayWorker``).
"""

import contextlib
import os
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.vec_env import DummyVecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_metarl.samplers.acting import GroupPolicies
from sb3_metarl.samplers.collection import collect_episodes
from sb3_metarl.samplers.processes import (
    GuardedPipe,
    SamplerClosedError,
    TaggedConnection,
    WorkerDiedError,
    prepare_worker_process,
)
from sb3_metarl.samplers.runner import GroupRunner

#: the per-step arrays of a sampled batch a worker sends back, only at the steps the masks mark valid (the
#: learner recomputes every log-likelihood)
BATCH_FIELDS = ("observations", "actions", "rewards")


class Shard:
    """
    What a worker holds: a block of sub-envs (a ``DummyVecEnv``, for the VecEnv API) and a copy of the
    policy's architecture. Runs in the worker process or Ray actor.

    :param env_fns: factories of the block's sub-envs, group-major
    :param envs_per_group: sub-envs per task group
    :param first_env_index: the model-wide index of the block's first sub-env
    """

    def __init__(
        self,
        env_fns: list[Callable[[], gym.Env]],
        envs_per_group: int,
        first_env_index: int = 0,
        batched_physics: bool = True,
        num_threads: int = 1,
    ):
        # one thread per worker: k workers share the machine's cores
        th.set_num_threads(1)
        self.venv = DummyVecEnv(env_fns)
        self.envs_per_group, self.first_env_index = envs_per_group, first_env_index
        self.batched_physics, self.num_threads = batched_physics, num_threads
        self.policies: GroupPolicies | None = None
        self.runner: GroupRunner | None = None

    def spaces(self) -> tuple[gym.Space, gym.Space]:
        return self.venv.observation_space, self.venv.action_space

    def pid(self) -> int:
        return os.getpid()

    def configure(self, horizon: int, policy_bytes: bytes | None) -> None:
        """Set the episode length and (when given) the policy architecture (a cloudpickled CPU policy)."""
        if policy_bytes is not None:
            self.policies = GroupPolicies(cloudpickle.loads(policy_bytes))
        if self.runner is not None:
            self.runner.close()
        self.runner = GroupRunner(
            self.venv.envs,
            self.envs_per_group,
            horizon,
            self.venv.observation_space,
            self.venv.action_space,
            self.first_env_index,
            self.batched_physics,
            self.num_threads,
        )

    def sample(
        self, tasks: Sequence[Any], task_params: dict[str, np.ndarray], n_episodes: int, noise_seeds: Sequence[int]
    ) -> dict[str, Any]:
        """:return: the block's episodes: ``masks`` (H, columns), ``BATCH_FIELDS`` at the valid steps only, ``successes``"""
        if self.runner is None or self.policies is None:
            raise RuntimeError("sampler worker: configure(horizon, policy) must come before sample.")
        params = {name: th.tensor(value) for name, value in task_params.items()}  # Ray gives read-only arrays
        buffer = collect_episodes(self.runner, self.policies, tasks, params, n_episodes, noise_seeds)
        assert buffer is not None  # no step callback: never stopped
        valid = buffer.masks > 0
        # the steps after an episode's end are zeros: not sent (an Ant's episodes fill a fraction of the horizon)
        arrays = {field: getattr(buffer, field)[valid] for field in BATCH_FIELDS}
        arrays["masks"], arrays["successes"] = buffer.masks, buffer.successes
        # the block's random streams after the phase: the learner keeps them, so saving never asks a worker
        arrays["rng_states"] = [generator.bit_generator.state for generator in self.venv.get_attr("np_random")]
        return arrays

    # the VecEnv API, for SB3 and for the model's random streams
    def step(self, actions: np.ndarray) -> VecEnvStepReturn:
        return self.venv.step(actions)

    def reset(self) -> VecEnvObs:
        return self.venv.reset()

    def seed(self, seed: int | None) -> None:
        self.venv.seed(seed)

    def set_options(self, options: list[dict]) -> None:
        self.venv.set_options(options)

    def get_attr(self, name: str, indices: list[int]) -> list[Any]:
        return self.venv.get_attr(name, indices)

    def set_attr(self, name: str, value: Any, indices: list[int]) -> None:
        self.venv.set_attr(name, value, indices)

    def set_attr_each(self, name: str, values: list[Any], indices: list[int]) -> None:
        for index, value in zip(indices, values):
            self.venv.set_attr(name, value, [index])

    def env_method(self, name: str, args: tuple, kwargs: dict, indices: list[int]) -> list[Any]:
        return self.venv.env_method(name, *args, indices=indices, **kwargs)

    def env_is_wrapped(self, wrapper_class: type, indices: list[int]) -> list[bool]:
        return self.venv.env_is_wrapped(wrapper_class, indices)

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        self.venv.close()


def _process_worker(connection: Any, parent_remote: Any, shard_args: bytes, learner_pid: int) -> None:
    prepare_worker_process(learner_pid)
    parent_remote.close()
    remote = TaggedConnection(connection)  # every answer carries the number of its request
    remote.tag = 1  # the "ready" below answers the learner's first wait
    try:
        shard = Shard(*cloudpickle.loads(shard_args))
    except Exception as error:  # the parent raises it, with the worker's traceback
        remote.send_bytes(cloudpickle.dumps(("error", (error, traceback.format_exc()))))
        return
    remote.send_bytes(cloudpickle.dumps(("ok", None)))
    while True:
        try:
            method, args = cloudpickle.loads(remote.recv_bytes())
        except (EOFError, KeyboardInterrupt):
            break
        if method == "close":
            shard.close()
            remote.send_bytes(cloudpickle.dumps(("ok", None)))
            break
        try:
            answer = ("ok", getattr(shard, method)(*args))
        except Exception as error:
            answer = ("error", (error, traceback.format_exc()))
        remote.send_bytes(cloudpickle.dumps(answer))


class ProcessWorker:
    """A ``Shard`` in a process of its own, with bounded waits (a dead worker raises ``WorkerDiedError`` naming it)."""

    def __init__(self, context: Any, shard_args: tuple, name: str, timeout: float | None):
        self.name = name
        remote, work_remote = context.Pipe()
        self.process = context.Process(
            target=_process_worker,
            args=(work_remote, remote, cloudpickle.dumps(shard_args), os.getpid()),
            daemon=True,
            name=name,
        )
        self.process.start()
        work_remote.close()
        self.pipe = GuardedPipe(remote, self.process, name, timeout)
        self.pipe.tag = 1  # the worker's "ready" message answers request 1
        #: bytes sent to and received from the worker so far (serialized messages)
        self.bytes_sent = self.bytes_received = 0

    def submit(self, method: str, *args: Any) -> None:
        data = cloudpickle.dumps((method, args))
        self.bytes_sent += len(data)
        self.pipe.send_bytes(data)

    def result(self) -> Any:
        data = self.pipe.recv_bytes()
        self.bytes_received += len(data)
        status, value = cloudpickle.loads(data)
        if status == "error":
            error, remote_traceback = value
            raise error from RuntimeError(f"in {self.name}:\n{remote_traceback}")
        return value

    def request_close(self) -> None:
        """Ask the worker to exit (answers still in the pipe are numbered: they are never read as another's)."""
        with contextlib.suppress(WorkerDiedError, SamplerClosedError, EOFError, OSError):
            self.pipe.send_bytes(cloudpickle.dumps(("close", ())))


class RayWorker:
    """A ``Shard`` in a Ray actor (one CPU); a dead actor raises ``WorkerDiedError`` naming it."""

    def __init__(self, shard_args: tuple, name: str, timeout: float | None):
        import ray

        self.ray, self.name, self.timeout = ray, name, timeout
        self.actor = ray.remote(num_cpus=1)(Shard).remote(*shard_args)
        self.reference: Any = None
        #: Ray serializes the messages itself: not counted
        self.bytes_sent = self.bytes_received = 0

    def submit(self, method: str, *args: Any) -> None:
        # a new reference per request: an earlier request's late answer belongs to its own reference
        self.reference = getattr(self.actor, method).remote(*args)
        self.sent_at = time.monotonic()

    def result(self) -> Any:
        # the deadline runs from the request: a call to k actors waits ``timeout`` in all
        while not self.ray.wait([self.reference], timeout=0.5)[0]:
            if self.timeout is not None and time.monotonic() - self.sent_at > self.timeout:
                raise WorkerDiedError(f"{self.name} did not answer within {self.timeout} s.")
        try:
            return self.ray.get(self.reference)
        except self.ray.exceptions.RayActorError as error:
            raise WorkerDiedError(f"{self.name} died ({type(error).__name__}: {str(error).splitlines()[0]}).") from None
        except self.ray.exceptions.RayTaskError as error:
            raise error.as_instanceof_cause() from None

    def close(self) -> None:
        # never from a Ray that was shut down (at exit, ray.kill would start a new local cluster and hang)
        if not self.ray.is_initialized():
            return
        with contextlib.suppress(Exception):  # already dead
            self.ray.kill(self.actor)


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError('sampler="ray" needs Ray: pip install -e ".[ray]" (or pip install "ray[default]").') from None
    return ray
