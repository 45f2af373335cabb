"""Worker processes that name a dead worker and never hang: the guarded pipes, ``GuardedSubprocVecEnv`` and their faults."""

import atexit
import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import gymnasium as gym
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecEnv
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper
from stable_baselines3.common.vec_env.subproc_vec_env import _worker as subproc_worker


class WorkerDiedError(RuntimeError):
    """A sub-env's worker process died or stopped answering."""


class SamplerClosedError(RuntimeError):
    """A call to workers that ``close`` has already stopped."""


class WorkerFailure:
    """What a worker sends instead of an answer when the code it runs (an env) raised: the error and its traceback."""

    def __init__(self, error: BaseException, remote_traceback: str):
        self.description, self.remote_traceback = f"{type(error).__name__}: {error}", remote_traceback


#: seconds between a worker's checks that the process that started it is alive (a worker never outlives its learner)
PARENT_CHECK_SECONDS = 1.0


def prepare_worker_process(learner_pid: int) -> None:
    """
    Called first in every worker process: Ctrl-C is the learner's to handle (a worker that died of the
    terminal's SIGINT would surface as a dead worker instead of ``KeyboardInterrupt``), and the worker
    dies with the learner, whatever signals its env ignores: the kernel sends it SIGKILL when its
    parent exits (Linux), and a thread exits it when the learner process is gone (the parent of a
    forkserver child is the fork server, not the learner).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch() -> None:
        while True:
            time.sleep(PARENT_CHECK_SECONDS)
            try:
                os.kill(learner_pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # alive, under another user
                pass

    threading.Thread(target=watch, name="learner watchdog", daemon=True).start()


_TAG = struct.Struct("<Q")


class TaggedConnection:
    """
    The worker's end of a pipe whose messages carry the request's number: every answer is sent with the
    number of the request it answers, so the learner can never take a late answer for another one.
    """

    def __init__(self, connection: Any):
        self.connection, self.tag = connection, 0

    def recv(self) -> Any:
        self.tag, message = self.connection.recv()
        return message

    def send(self, message: Any) -> None:
        self.connection.send((self.tag, message))

    def recv_bytes(self) -> bytes:
        data = self.connection.recv_bytes()
        self.tag = _TAG.unpack_from(data)[0]
        return data[_TAG.size :]

    def send_bytes(self, data: bytes) -> None:
        self.connection.send_bytes(_TAG.pack(self.tag) + data)

    def close(self) -> None:
        self.connection.close()


class GuardedPipe:
    """
    The parent end of a worker's pipe: waits in bounded slices, checks the worker is alive, and numbers
    every request; an answer to an earlier request (late, after a timeout or an interrupt) is discarded,
    never taken for the current one. The deadline of a call runs from the moment its request was sent,
    so a call to k workers waits ``timeout`` in all, not k times.

    :param remote: the parent's end of the pipe
    :param process: the worker process
    :param name: how errors name the worker, e.g. "SubprocVecEnv worker 3 (sub-env 3)"
    :param timeout: seconds to wait for a living worker's answer (None: no limit)
    """

    def __init__(self, remote: Any, process: mp.Process, name: str, timeout: float | None):
        self.remote, self.process, self.name, self.timeout = remote, process, name, timeout
        self.tag, self.sent_at, self.closed = 0, time.monotonic(), False

    def _died(self, cause: BaseException | None = None) -> WorkerDiedError:
        self.process.join(timeout=0.5)  # let the exit code settle
        exit_code = self.process.exitcode
        state = "is alive but did not answer" if exit_code is None else f"died with exit code {exit_code}"
        detail = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        pid = self.process.pid
        return WorkerDiedError(f"{self.name} (pid {pid}) {state}{detail}.")

    def _check_open(self) -> None:
        if self.closed:
            raise SamplerClosedError(f"{self.name}: the workers were closed (close() was called); build a new env to sample.")

    def _transfer(self, operation: Callable[..., Any], *args: Any) -> Any:
        self._check_open()
        try:
            return operation(*args)
        except (BrokenPipeError, ConnectionResetError, EOFError, OSError) as error:
            raise self._died(error) from None

    def _sent(self) -> None:
        self.tag += 1
        self.sent_at = time.monotonic()

    def send(self, message: Any) -> None:
        self._check_open()
        self._sent()
        self._transfer(self.remote.send, (self.tag, message))

    def send_bytes(self, data: bytes) -> None:
        """Send an already serialized message (the caller counts its size)."""
        self._check_open()
        self._sent()
        self._transfer(self.remote.send_bytes, _TAG.pack(self.tag) + data)

    def _wait(self) -> None:
        self._check_open()
        while not self.remote.poll(0.1):
            if not self.process.is_alive():
                raise self._died()
            if self.timeout is not None and time.monotonic() - self.sent_at > self.timeout:
                raise self._died(TimeoutError(f"no answer within {self.timeout} s"))

    def _answer(self, message: Any) -> Any:
        if isinstance(message, WorkerFailure):
            raise RuntimeError(f"{self.name} failed: {message.description}\n{message.remote_traceback}")
        return message

    def recv(self) -> Any:
        while True:
            self._wait()
            tag, message = self._transfer(self.remote.recv)
            if tag == self.tag:
                return self._answer(message)
            # an answer to an earlier request (late): dropped

    def recv_bytes(self) -> bytes:
        """:return: the answer to the last request, still serialized"""
        while True:
            self._wait()
            data = self._transfer(self.remote.recv_bytes)
            if _TAG.unpack_from(data)[0] == self.tag:
                return data[_TAG.size :]

    def poll(self, timeout: float = 0.0) -> bool:
        return not self.closed and self.remote.poll(timeout)

    def close(self) -> None:
        self.closed = True
        self.remote.close()


#: seconds a worker may take to start (a process importing torch and building its envs), whatever ``timeout`` says
STARTUP_TIMEOUT = 120.0


@contextlib.contextmanager
def starting(pipes: list[GuardedPipe]) -> Iterator[None]:
    """The pipes wait at least ``STARTUP_TIMEOUT`` for answers in the block (the workers' first answers)."""
    timeouts = [pipe.timeout for pipe in pipes]
    for pipe in pipes:
        pipe.timeout = None if pipe.timeout is None else max(pipe.timeout, STARTUP_TIMEOUT)
    try:
        yield
    finally:
        for pipe, timeout in zip(pipes, timeouts):
            pipe.timeout = timeout


#: worker groups (samplers' and SubprocVecEnvs' processes, Ray actors) not yet closed, closed at interpreter exit
_OPEN_WORKER_GROUPS: "weakref.WeakSet[Any]" = weakref.WeakSet()


def _close_open_worker_groups() -> None:
    for group in list(_OPEN_WORKER_GROUPS):
        with contextlib.suppress(Exception):
            group.close()


def register_worker_group(group: Any) -> None:
    """
    Close ``group`` (anything with ``close()``) at interpreter exit if the script did not, before
    multiprocessing's and Ray's own exit handlers run: exit handlers run last-registered first, so the
    handler is registered again (moved last) with every new group, after any ``ray.init``.
    """
    _OPEN_WORKER_GROUPS.add(group)
    atexit.unregister(_close_open_worker_groups)
    atexit.register(_close_open_worker_groups)


def stop_processes(processes: list[mp.Process], deadline: float) -> None:
    """
    Wait for ``processes`` to exit until ``deadline`` (``time.monotonic()``), then terminate those left and
    kill those that still live (a frozen or SIGTERM-ignoring worker): bounded, whatever the workers do.
    """
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.terminate()
    grace = time.monotonic() + 1.0
    for process in processes:
        process.join(timeout=max(0.0, grace - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()  # SIGKILL: also ends a stopped process
    grace = time.monotonic() + 1.0
    for process in processes:
        process.join(timeout=max(0.0, grace - time.monotonic()))


def _guarded_subproc_worker(remote: Any, parent_remote: Any, env_fn_wrapper: Any, learner_pid: int) -> None:
    """SB3's ``SubprocVecEnv`` worker loop, with numbered answers and an env's error sent back with its traceback."""
    prepare_worker_process(learner_pid)
    tagged = TaggedConnection(remote)
    try:
        subproc_worker(tagged, parent_remote, env_fn_wrapper)
    except Exception as error:
        with contextlib.suppress(Exception):
            tagged.send(WorkerFailure(error, traceback.format_exc()))


class GuardedSubprocVecEnv(SubprocVecEnv):
    """
    SB3's ``SubprocVecEnv`` (one process per sub-env) with bounded waits: a worker that dies raises
    ``WorkerDiedError`` naming it within a fraction of a second instead of a bare
    ``ConnectionResetError``; an error raised by an env is raised here with the env's traceback;
    answers are numbered, so a late one is never taken for another; a call to all workers waits
    ``timeout`` in all; ``close`` takes ``close_timeout`` in all and never hangs (workers that do not exit
    are terminated, then killed); workers die with the learner. ``MetaPolicyGradient(vec_env_cls=SubprocVecEnv)``
    uses it.

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
        check_timeout("timeout", timeout)
        check_timeout("close_timeout", close_timeout, allow_none=False)
        self.close_timeout = close_timeout
        self.waiting, self.closed = False, False
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        self.processes, remotes = [], []
        for index, env_fn in enumerate(env_fns):
            remote, work_remote = context.Pipe()
            arguments = (work_remote, remote, CloudpickleWrapper(env_fn), os.getpid())
            process = context.Process(target=_guarded_subproc_worker, args=arguments, daemon=True)
            process.start()
            work_remote.close()
            self.processes.append(process)
            remotes.append(GuardedPipe(remote, process, f"SubprocVecEnv worker {index} (sub-env {index})", timeout))
        self.remotes = remotes
        register_worker_group(self)
        try:
            with starting(self.remotes):
                self.remotes[0].send(("get_spaces", None))
                observation_space, action_space = self.remotes[0].recv()
        except BaseException:
            self.close()
            raise
        VecEnv.__init__(self, len(env_fns), observation_space, action_space)

    def close(self) -> None:
        if self.closed:
            return
        self.closed, self.waiting = True, False
        for remote in self.remotes:
            with contextlib.suppress(WorkerDiedError, SamplerClosedError):
                remote.send(("close", None))
        stop_processes(self.processes, time.monotonic() + self.close_timeout)
        for remote in self.remotes:
            remote.close()


def check_timeout(name: str, value: Any, allow_none: bool = True) -> None:
    """:raises ValueError: unless ``value`` is a finite number > 0 (or None where allowed)"""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        allowed = "a finite number of seconds > 0" + (" or None (no limit)" if allow_none else "")
        raise ValueError(f"sampler_kwargs: {name} must be {allowed}, got {value!r}.")


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
