"""
``sampler="subproc"`` and ``sampler="ray"``: the sub-envs live in ``k`` workers (processes or Ray
actors), each owning a contiguous block of task groups and a CPU copy of the policy. Per sampling
phase a worker receives its tasks, their parameters and noise seeds once, samples whole episodes
locally (``GroupRunner``) and returns them.
"""

import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle
import gymnasium as gym
import numpy as np
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from sb3_metarl.common.buffers import EpisodeBatch, TaskRolloutBuffer
from sb3_metarl.common.functional import FunctionalPolicy, Params
from sb3_metarl.samplers.acting import cpu_copy, fresh_noise_seeds
from sb3_metarl.samplers.collection import episode_horizon
from sb3_metarl.samplers.processes import SamplerClosedError, check_timeout, register_worker_group, starting, stop_processes
from sb3_metarl.samplers.protocol import EpisodeSampler, StepCallback
from sb3_metarl.samplers.runner import check_runner_arguments, physics_threads
from sb3_metarl.samplers.workers import BATCH_FIELDS, ProcessWorker, RayWorker, import_ray


class ShardedVecEnv(VecEnv, EpisodeSampler):
    """
    A VecEnv whose sub-envs live in ``num_workers`` workers, each holding a contiguous block of task
    groups (many sub-envs per worker, not one process per sub-env), and an episode sampler on them.
    ``sample`` sends each worker its tasks, their parameters and noise seeds once and gets whole
    episodes back; the samples are bit-identical to ``sampler="vec_env"`` for the same seed and
    sub-env layout (each group acts with its own policy call and noise stream, see ``GroupPolicies``).
    The VecEnv API (``step``, ``get_attr``, ...) works too, routed to the workers, so SB3 and the
    model's random streams see an ordinary VecEnv. Every wait is bounded: a worker that dies raises
    ``WorkerDiedError`` naming it within about a second, and ``close`` never hangs.

    :param env_fns: the sub-envs' factories (picklable, e.g. ``functools.partial(make_task_env, env_id)``)
    :param n_groups: task groups B (divides ``len(env_fns)``)
    :param max_episode_steps: the horizon H (default: the sub-envs' own)
    :param backend: "subproc" (processes on this machine) or "ray" (Ray actors: local or on a cluster)
    :param num_workers: workers k (default: the machine's cores for "subproc", the Ray cluster's CPUs for
        "ray"); at most ``n_groups``
    :param timeout: seconds to wait for a living worker's answer before raising (None: no limit)
    :param start_method: multiprocessing start method for "subproc" (default "forkserver" where available)
    :param address: Ray cluster address for ``ray.init`` when Ray is not yet initialized (None: a local Ray)
    :param ray_init_kwargs: further arguments of ``ray.init`` (e.g. ``num_cpus``)
    :param close_timeout: seconds ``close`` waits for the workers (all together) to exit before terminating them
    :param batched_physics: each worker steps its block with the family's batched twin where there is one
        (``GroupRunner``: the same samples, bit for bit)
    :param num_threads: threads per worker that advance the batched twin's physics (default: "subproc", the cores
        available divided among the workers; "ray", 1, the CPU each actor holds)
    """

    def __init__(
        self,
        env_fns: list[Callable[[], gym.Env]],
        n_groups: int,
        max_episode_steps: int | None = None,
        backend: str = "subproc",
        num_workers: int | None = None,
        timeout: float | None = 600.0,
        start_method: str | None = None,
        address: str | None = None,
        ray_init_kwargs: dict[str, Any] | None = None,
        close_timeout: float = 5.0,
        batched_physics: bool = True,
        num_threads: int | None = None,
    ):
        check_runner_arguments(batched_physics, num_threads)
        if backend not in ("subproc", "ray"):
            raise ValueError(f"backend: 'subproc' or 'ray', got {backend!r}.")
        if len(env_fns) % n_groups != 0:
            raise ValueError(f"n_envs: {len(env_fns)} sub-envs are not a multiple of meta_batch_size={n_groups}.")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1):
            raise ValueError(f"sampler_kwargs: num_workers must be a positive integer, got {num_workers!r}.")
        check_timeout("timeout", timeout)
        check_timeout("close_timeout", close_timeout, allow_none=False)
        self.closed = True  # until the workers exist
        self.n_groups, self.envs_per_group, self.close_timeout = n_groups, len(env_fns) // n_groups, close_timeout
        self.backend = backend
        if backend == "ray":
            ray = import_ray()
            if not ray.is_initialized():
                ray.init(address=address, **(ray_init_kwargs or {}))
            default_workers = int(ray.cluster_resources().get("CPU", 1))
            wanted = min(num_workers or default_workers, n_groups)
            if wanted > default_workers:
                # each actor asks for one CPU: the ones beyond the cluster's would wait for CPUs forever
                raise ValueError(
                    f"sampler_kwargs: num_workers={num_workers} Ray actors need {wanted} CPUs, but the Ray cluster has "
                    f"{default_workers}; use num_workers<={default_workers}, or a cluster with more CPUs "
                    "(address=..., or ray_init_kwargs=dict(num_cpus=...) for a local Ray)."
                )
        else:
            default_workers = os.cpu_count() or 1
        n_workers = min(num_workers or default_workers, n_groups)
        # by default each "subproc" worker gets its share of this machine's cores; a Ray actor holds one CPU
        num_threads = num_threads or (1 if backend == "ray" else physics_threads(None, n_workers))
        #: the task groups [first, last) of each worker
        self.group_blocks = [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(n_groups), n_workers)]
        self.workers: list[ProcessWorker | RayWorker] = []
        context = mp.get_context(start_method or ("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"))
        per_group = self.envs_per_group
        for index, (first, last) in enumerate(self.group_blocks):
            block = env_fns[first * per_group : last * per_group]
            shard_args = (block, per_group, first * per_group, batched_physics, num_threads)
            envs = f"sub-envs {first * per_group}-{last * per_group - 1}"
            name = f"sampler worker {index} ({backend}; task groups {first}-{last - 1}, {envs})"
            if backend == "ray":
                self.workers.append(RayWorker(shard_args, name, timeout))
            else:
                self.workers.append(ProcessWorker(context, shard_args, name, timeout))
        self.closed = False
        #: held by each request-and-answer exchange with the workers (see ``_broadcast``)
        self._exchange_lock = threading.RLock()
        register_worker_group(self)  # closed at interpreter exit if the script does not, before Ray's own exit
        #: the first sub-env index of each worker
        self.env_offsets = [first * per_group for first, _ in self.group_blocks]
        self.num_envs = len(env_fns)  # for the routing below, before VecEnv's set-up (which reads render_mode)
        try:
            with starting([worker.pipe for worker in self.workers if isinstance(worker, ProcessWorker)]):
                for worker in self.workers:
                    if backend == "subproc":
                        worker.result()  # the worker's "ready" (or its construction error)
            observation_space, action_space = self._call(0, "spaces")
            VecEnv.__init__(self, len(env_fns), observation_space, action_space)
            self.horizon = episode_horizon(self, max_episode_steps)
            self._broadcast("configure", lambda _: (self.horizon, None))
            self._worker_pids: list[int] = self._broadcast("pid", lambda _: ())
        except BaseException:
            self.close()
            raise
        self._actions: np.ndarray | None = None
        #: the sub-envs' random states as the workers reported them after the last ``sample`` (None: not yet known)
        self._rng_states: list[dict[str, Any]] | None = None

    # ------------------------------------------------------------------ calls to the workers

    def _call(self, worker: int, method: str, *args: Any) -> Any:
        with self._exchange_lock:
            self._check_open()
            self.workers[worker].submit(method, *args)
            return self.workers[worker].result()

    def _broadcast(self, method: str, arguments: Callable[[int], tuple], workers: Sequence[int] | None = None) -> list[Any]:
        """Call ``method`` on the workers at once (``arguments(i)`` for worker i); every answer is awaited."""
        # one exchange at a time: a call from another thread (a monitoring thread's get_attr) waits for the one in
        # flight, where it would have sent its request down the same pipes and one side taken the other's answer
        with self._exchange_lock:
            self._check_open()
            workers = range(len(self.workers)) if workers is None else workers
            for index in workers:
                self.workers[index].submit(method, *arguments(index))
            results, first_error = [], None
            for index in workers:
                try:
                    results.append(self.workers[index].result())
                except BaseException as error:  # collect the other answers so no pipe holds a stale one
                    results.append(None)
                    first_error = first_error or error
            if first_error is not None:
                raise first_error
            return results

    def _by_worker(self, indices: VecEnvIndices) -> dict[int, list[int]]:
        """:return: worker -> the local indices of the requested sub-envs, in request order"""
        routed: dict[int, list[int]] = {}
        offsets = np.array(self.env_offsets)
        for index in self._get_indices(indices):
            worker = int(np.searchsorted(offsets, index, side="right") - 1)
            routed.setdefault(worker, []).append(int(index) - self.env_offsets[worker])
        return routed

    # ------------------------------------------------------------------ the episode sampler

    def attach_policy(self, policy: ActorCriticPolicy) -> None:
        cpu_policy = cloudpickle.dumps(cpu_copy(policy))
        #: what the workers need of the parameters: the actor's (the value head does not act)
        self.actor_names = FunctionalPolicy(policy).actor_names
        self._broadcast("configure", lambda _: (self.horizon, cpu_policy))

    def sample(
        self,
        tasks: Sequence[Any],
        task_params: Params,
        n_episodes: int,
        noise_seeds: Sequence[int] | None = None,
        step_callback: StepCallback | None = None,
    ) -> EpisodeBatch | None:
        n_tasks = len(tasks)
        if not 0 < n_tasks <= self.n_groups:
            raise ValueError(f"tasks: expected 1 to {self.n_groups} tasks, got {n_tasks}.")
        params = {name: task_params[name].detach().cpu().numpy() for name in self.actor_names}
        noise_seeds = fresh_noise_seeds(noise_seeds, n_tasks)
        busy = [i for i, (first, _) in enumerate(self.group_blocks) if first < n_tasks]

        def arguments(worker: int) -> tuple:
            first, last = self.group_blocks[worker]
            last = min(last, n_tasks)
            block = {name: value[first:last] for name, value in params.items()}
            return list(tasks[first:last]), block, n_episodes, list(noise_seeds[first:last])

        results = self._broadcast("sample", arguments, busy)
        rng_states = list(self._rng_states) if self._rng_states is not None else None
        for worker, arrays in zip(busy, results):
            if rng_states is not None:
                offset = self.env_offsets[worker]
                rng_states[offset : offset + len(arrays["rng_states"])] = arrays["rng_states"]
        # an idle worker's streams are unchanged; unknown (None) until every worker has sampled once
        self._rng_states = rng_states if rng_states is not None else (
            [state for arrays in results for state in arrays["rng_states"]] if len(busy) == len(self.workers) else None
        )
        device = next(iter(task_params.values())).device
        buffer = TaskRolloutBuffer(self.horizon, n_tasks, n_episodes, self.observation_space, self.action_space, device)
        for worker, arrays in zip(busy, results):
            first, last = self.group_blocks[worker]
            columns = slice(first * n_episodes, min(last, n_tasks) * n_episodes)
            buffer.masks[:, columns] = arrays["masks"]
            valid = arrays["masks"] > 0
            for field in BATCH_FIELDS:
                getattr(buffer, field)[:, columns][valid] = arrays[field]
            if arrays["successes"] is not None:
                if buffer.successes is None:
                    buffer.successes = np.zeros(buffer.n_envs, dtype=np.float32)
                buffer.successes[columns] = arrays["successes"]
        if step_callback is not None and not step_callback(int(buffer.masks.sum()), {}):
            return None
        return buffer.to_batch()

    def env_rng_states(self) -> list[dict[str, Any]] | None:
        return self._rng_states

    def traffic(self) -> dict[str, int]:
        """:return: bytes sent to and received from the worker processes so far ("subproc"; Ray's serialization is its own)"""
        return {
            "sent": sum(worker.bytes_sent for worker in self.workers),
            "received": sum(worker.bytes_received for worker in self.workers),
        }

    def worker_pids(self) -> list[int]:
        """
        :return: the process id of each worker (for monitoring; killing one makes the next call raise), as reported
            when the workers started: asking nothing of them, it answers at once from any thread, also during ``sample``
        """
        return list(self._worker_pids)

    # ------------------------------------------------------------------ the VecEnv API

    def reset(self) -> VecEnvObs:
        self._rng_states = None  # a reset draws from the sub-envs' streams
        return np.concatenate(self._broadcast("reset", lambda _: ()))

    def seed(self, seed: int | None = None) -> list[int | None]:
        """SB3's ``VecEnv.seed``: sub-env i is reset with seed ``seed + i`` at the next reset."""
        self._broadcast("seed", lambda w: (None if seed is None else seed + self.env_offsets[w],))
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def set_options(self, options: list[dict] | dict | None = None) -> None:
        """SB3's ``VecEnv.set_options``: options for the next reset (one dict, or one per sub-env)."""
        per_env = options if isinstance(options, list) else [options or {}] * self.num_envs
        self._broadcast("set_options", lambda w: (per_env[self.env_offsets[w] : self.env_offsets[w] + self._block_size(w)],))

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        self._rng_states = None
        actions = self._actions
        results = self._broadcast(
            "step", lambda w: (actions[self.env_offsets[w] : self.env_offsets[w] + self._block_size(w)],)
        )
        obs, rewards, dones, infos = zip(*results)
        return np.concatenate(obs), np.concatenate(rewards), np.concatenate(dones), [i for block in infos for i in block]

    def _block_size(self, worker: int) -> int:
        first, last = self.group_blocks[worker]
        return (last - first) * self.envs_per_group

    def _routed_call(self, method: str, indices: VecEnvIndices, *args: Any) -> list[Any]:
        routed = self._by_worker(indices)
        workers = list(routed)
        results = self._broadcast(method, lambda w: (*args, routed[w]), workers)
        # back in request order
        by_global = {}
        for worker, values in zip(workers, results):
            for local, value in zip(routed[worker], values or [None] * len(routed[worker])):
                by_global[self.env_offsets[worker] + local] = value
        return [by_global[index] for index in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._routed_call("get_attr", indices, attr_name)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        if attr_name == "np_random":
            self._rng_states = None  # one generator shared by several sub-envs: read them back when needed
        self._routed_call("set_attr", indices, attr_name, value)

    def set_attr_each(self, attr_name: str, values: Sequence[Any], indices: VecEnvIndices = None) -> None:
        """Set ``attr_name`` to a value of its own on each sub-env (one message per worker)."""
        routed = self._by_worker(indices)
        order = list(self._get_indices(indices))
        value_of = dict(zip(order, values))
        if attr_name == "np_random":  # the streams are set from here: known without asking
            states = self._rng_states or [None] * self.num_envs
            for index, generator in value_of.items():
                states[index] = generator.bit_generator.state
            self._rng_states = states if all(state is not None for state in states) else None
        self._broadcast(
            "set_attr_each",
            lambda w: (attr_name, [value_of[self.env_offsets[w] + i] for i in routed[w]], routed[w]),
            list(routed),
        )

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any
    ) -> list[Any]:
        self._rng_states = None
        return self._routed_call("env_method", indices, method_name, method_args, method_kwargs)

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return self._routed_call("env_is_wrapped", indices, wrapper_class)

    def _check_open(self) -> None:
        if self.closed:
            raise SamplerClosedError(
                f"sampler ({self.backend}): its workers were closed (close() was called); give the model a new env "
                "(model.set_env(...)) to sample again."
            )

    def close(self) -> None:
        """Stop the workers: ``close_timeout`` seconds in all for them to exit, then terminated, then killed."""
        if self.closed:
            return
        self.closed = True
        deadline = time.monotonic() + self.close_timeout
        processes = []
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.request_close()
                processes.append(worker.process)
            else:
                worker.close()
        stop_processes(processes, deadline)
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.pipe.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
