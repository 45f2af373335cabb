"""
A worker process that evaluates saved copies of a model while training goes on (``MetaEvalCallback(in_background=True)``):
the evaluation's episodes run on another core instead of holding the learner's sampler. A thread would not do: the
sampling loops of both are Python, which one interpreter runs one at a time.
"""

import contextlib
import io
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import torch as th
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env.base_vec_env import CloudpickleWrapper

from sb3_metarl.samplers.processes import (
    GuardedPipe,
    SamplerClosedError,
    TaggedConnection,
    WorkerDiedError,
    WorkerFailure,
    check_timeout,
    prepare_worker_process,
    register_worker_group,
    stop_processes,
)


def _serve_evaluations(remote: Any, parent_remote: Any, wrapped: CloudpickleWrapper, learner_pid: int) -> None:
    """The worker's loop: load each copy, evaluate it on the sub-envs made at the first request, answer the table."""
    prepare_worker_process(learner_pid)
    parent_remote.close()
    connection = TaggedConnection(remote)
    model_class, eval_env, device = wrapped.var
    venv = None
    try:
        while True:
            try:
                request = connection.recv()
            except EOFError:  # the learner closed its end
                return
            if request is None:
                return
            snapshot, arguments, torch_threads = request
            try:
                th.set_num_threads(torch_threads)
                model = model_class.load(io.BytesIO(snapshot), env=None, device=device)
                if venv is None:  # as many sub-envs as training steps, made once: seeded anew by every evaluation
                    venv = model.make_sub_envs(eval_env, model.n_envs, sampler="vec_env")
                connection.send(model.evaluate_adaptation(env=venv, **arguments))
            except Exception as error:
                connection.send(WorkerFailure(error, traceback.format_exc()))
    finally:
        if venv is not None:
            with contextlib.suppress(Exception):
                venv.close()


class EvaluationWorker:
    """
    A process that evaluates copies of a model, each saved in memory by ``model.save``, one at a time, with
    ``evaluate_adaptation`` on sub-envs of ``eval_env`` of its own (as many as the model trains on, made at the first
    evaluation and seeded anew by each): the same numbers as the learner's ``evaluate_adaptation(env=eval_env)`` on
    the model the copy was saved from, with the same torch threads. ``submit`` returns at once; ``done`` says whether
    the answer is there and ``result`` waits for it. A dead worker is a ``WorkerDiedError`` naming it within a second;
    an error of the evaluation is raised by ``result`` with the worker's traceback; the worker dies with the learner.

    :param model_class: the class that loads the copies (``MetaPolicyGradient`` or a subclass, importable by name)
    :param eval_env: an env id, a factory or an env instance (sent to the worker with cloudpickle)
    :param device: the device the copies are loaded on
    :param timeout: seconds an evaluation may take before the worker is taken for frozen (None: no limit)
    :param start_method: multiprocessing's start method ("forkserver" where there is one, else "spawn")
    """

    def __init__(
        self,
        model_class: type,
        eval_env: GymEnv | str | Callable[[], gym.Env],
        device: th.device | str = "cpu",
        timeout: float | None = None,
        start_method: str | None = None,
    ):
        check_timeout("timeout", timeout)
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        context = mp.get_context(start_method)
        remote, work_remote = context.Pipe()
        arguments = (work_remote, remote, CloudpickleWrapper((model_class, eval_env, str(device))), os.getpid())
        self.process = context.Process(target=_serve_evaluations, args=arguments, daemon=True, name="sb3_metarl-evaluation")
        self.process.start()
        work_remote.close()
        self.pipe = GuardedPipe(remote, self.process, "evaluation worker", timeout)
        self.pending = False
        self.closed = False
        register_worker_group(self)

    def submit(self, snapshot: bytes, **arguments: Any) -> None:
        """
        Start evaluating the model saved in ``snapshot``.

        :param snapshot: the bytes ``model.save`` wrote
        :param arguments: ``evaluate_adaptation``'s (``n_tasks``, ``inner_steps``, ``seed``, ``tasks``)
        :raises RuntimeError: if the last evaluation's result was not taken yet
        """
        if self.pending:
            raise RuntimeError("evaluation worker: take the last evaluation's result() before submitting another.")
        self.pipe.send((snapshot, arguments, th.get_num_threads()))
        self.pending = True

    def done(self) -> bool:
        """:return: whether the submitted evaluation's answer is there (or the worker died: ``result`` says how)"""
        if not self.pending:
            return False
        return self.pipe.poll() or not self.process.is_alive()

    def result(self) -> dict[str, Any]:
        """:return: the submitted evaluation's table (``evaluate_adaptation``'s), waiting for it"""
        if not self.pending:
            raise RuntimeError("evaluation worker: no evaluation was submitted.")
        self.pending = False
        return self.pipe.recv()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the worker: it ends its evaluation's sub-envs and exits, or is terminated after ``timeout`` seconds."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(WorkerDiedError, SamplerClosedError):
            self.pipe.send(None)
        stop_processes([self.process], time.monotonic() + timeout)
        self.pipe.close()
