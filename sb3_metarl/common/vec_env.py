"""Vectorized envs for meta-training: a ``SubprocVecEnv`` that names a dead worker and never hangs."""

import copy
import multiprocessing as mp
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv


class WorkerDiedError(RuntimeError):
    """A sub-env's worker process died or stopped answering."""


class GuardedPipe:
    """
    The parent end of a worker's pipe whose ``recv`` waits in bounded slices and checks the worker is alive.

    :param remote: the parent's end of the pipe
    :param process: the worker process
    :param name: how errors name the worker, e.g. "SubprocVecEnv worker 3 (sub-env 3)"
    :param timeout: seconds to wait for a living worker's answer (None: no limit)
    """

    def __init__(self, remote: Any, process: mp.Process, name: str, timeout: float | None):
        self.remote, self.process, self.name, self.timeout = remote, process, name, timeout

    def _died(self, cause: BaseException | None = None) -> WorkerDiedError:
        self.process.join(timeout=0.5)  # let the exit code settle
        exit_code = self.process.exitcode
        state = "is alive but did not answer" if exit_code is None else f"died with exit code {exit_code}"
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        pid = self.process.pid
        return WorkerDiedError(f"{self.name} (pid {pid}) {state}{detail}.")

    def _transfer(self, operation: Callable[..., Any], *args: Any) -> Any:
        try:
            return operation(*args)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as error:
            raise self._died(error) from None

    def send(self, message: Any) -> None:
        self._transfer(self.remote.send, message)

    def send_bytes(self, data: bytes) -> None:
        """Send an already serialized message (the caller counts its size)."""
        self._transfer(self.remote.send_bytes, data)

    def _wait(self) -> None:
        start = time.monotonic()
        while not self.remote.poll(0.1):
            if not self.process.is_alive():
                raise self._died()
            if self.timeout is not None and time.monotonic() - start > self.timeout:
                raise self._died(TimeoutError(f"no answer within {self.timeout} s"))

    def recv(self) -> Any:
        self._wait()
        return self._transfer(self.remote.recv)

    def recv_bytes(self) -> bytes:
        """:return: the next message, still serialized"""
        self._wait()
        return self._transfer(self.remote.recv_bytes)

    def poll(self, timeout: float = 0.0) -> bool:
        return self.remote.poll(timeout)

    def close(self) -> None:
        self.remote.close()


class GuardedSubprocVecEnv(SubprocVecEnv):
    """
    SB3's ``SubprocVecEnv`` (one process per sub-env) with bounded waits: a worker that dies raises
    ``WorkerDiedError`` naming it within a fraction of a second instead of a bare
    ``ConnectionResetError``, and ``close`` never hangs (workers that do not exit are terminated).
    ``MetaPolicyGradient(vec_env_cls=SubprocVecEnv)`` uses it.

    :param env_fns: the sub-envs' factories
    :param start_method: multiprocessing start method (SB3's default when None)
    :param timeout: seconds to wait for a living worker's answer before giving up (None: no limit)
    :param close_timeout: seconds ``close`` waits for the workers to exit before terminating them
    """

    def __init__(
        self,
        env_fns: list[Callable[[], gym.Env]],
        start_method: str | None = None,
        timeout: float | None = 600.0,
        close_timeout: float = 5.0,
    ):
        self.close_timeout = close_timeout
        super().__init__(env_fns, start_method)
        self.remotes = [
            GuardedPipe(remote, process, f"SubprocVecEnv worker {index} (sub-env {index})", timeout)
            for index, (remote, process) in enumerate(zip(self.remotes, self.processes))
        ]

    def close(self) -> None:
        if self.closed:
            return
        # drain answers already sent (after a failed step some were never read), without waiting for more
        for remote in self.remotes:
            try:
                while remote.poll(0.0):
                    remote.remote.recv()
            except (EOFError, OSError):
                pass
        self.waiting = False
        for remote in self.remotes:
            try:
                remote.send(("close", None))
            except WorkerDiedError:
                pass
        deadline = time.monotonic() + self.close_timeout
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=1.0)
            if process.is_alive():
                process.kill()
                process.join(timeout=1.0)
        for remote in self.remotes:
            remote.close()
        self.closed = True


def resolve_vec_env_cls(vec_env_cls: type | str | None) -> type | None:
    """
    :param vec_env_cls: None, a VecEnv class, or its name ("DummyVecEnv" / "dummy", "SubprocVecEnv" / "subproc",
        as the command line gives it)
    :return: the class to build sub-envs with; SB3's ``SubprocVecEnv`` becomes ``GuardedSubprocVecEnv``
    """
    names = {
        "dummy": DummyVecEnv,
        "dummyvecenv": DummyVecEnv,
        "subproc": GuardedSubprocVecEnv,
        "subprocvecenv": GuardedSubprocVecEnv,
    }
    if vec_env_cls is None:
        return None
    if isinstance(vec_env_cls, str):
        if vec_env_cls.lower() not in names:
            raise ValueError(
                f"vec_env_cls: unknown name {vec_env_cls!r}; use 'DummyVecEnv' or 'SubprocVecEnv' (or the class)."
            )
        return names[vec_env_cls.lower()]
    if not (isinstance(vec_env_cls, type) and issubclass(vec_env_cls, VecEnv)):
        raise ValueError(f"vec_env_cls: expected a VecEnv class or its name, got {vec_env_cls!r}.")
    return GuardedSubprocVecEnv if vec_env_cls is SubprocVecEnv else vec_env_cls


class PrototypeCopies:
    """
    A picklable factory of deep copies of one env instance (the prototype), each with a fresh random
    generator (the model reseeds them from its seed when it has one).

    :param env: the prototype
    :raises ValueError: if the env cannot be copied
    """

    def __init__(self, env: gym.Env):
        try:
            copy.deepcopy(env)
        except Exception as error:
            raise ValueError(
                f"env: the env instance {env!r:.80} cannot be copied into the sub-envs ({type(error).__name__}: {error}); "
                "pass its registered id or a factory (a callable returning a new env) instead."
            ) from None
        self.env = env

    def __call__(self) -> gym.Env:
        env = copy.deepcopy(self.env)
        env.np_random = np.random.default_rng()
        return env


def make_task_env(env_id: str, env_kwargs: dict[str, Any] | None = None) -> gym.Env:
    """
    Module-level (picklable) factory: importing sb3_metarl first registers the built-in ids, also
    inside ``SubprocVecEnv`` workers.
    """
    import sb3_metarl.tasks  # noqa: F401

    return gym.make(env_id, **(env_kwargs or {}))
