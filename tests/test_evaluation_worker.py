"""The evaluation worker: a process evaluating saved copies of a model with the learner's numbers, and its faults."""

import io
import os
import signal
import time

import numpy as np
import pytest

from sb3_metarl.samplers.processes import WorkerDiedError

ENV = "sb3_metarl/Navigation2D-v0"
EVALUATION = dict(n_tasks=3, inner_steps=1, seed=5)


def _saved(model) -> bytes:
    buffer = io.BytesIO()
    model.save(buffer)
    return buffer.getvalue()


def test_the_worker_evaluates_each_copy_as_the_learner_evaluates_the_model_it_was_saved_from(make_model):
    model = make_model(inner_lr=0.01, seed=0)
    worker = model.evaluation_worker(ENV)
    try:
        for _ in range(2):  # two models: the worker's sub-envs, made at the first evaluation, serve the second alike
            model.learn(model.max_steps_per_iteration, reset_num_timesteps=False)
            worker.submit(_saved(model), **EVALUATION)
            expected = model.evaluate_adaptation(env=ENV, **EVALUATION)
            table = worker.result()
            np.testing.assert_array_equal(table["per_task"], expected["per_task"])
            np.testing.assert_array_equal(table["mean"], expected["mean"])
    finally:
        worker.close()
    assert not worker.process.is_alive()


def test_a_dead_worker_is_named_within_seconds_not_waited_for(make_model):
    model = make_model(inner_lr=0.01, seed=0)
    worker = model.evaluation_worker(ENV)
    try:
        worker.submit(_saved(model), **EVALUATION)
        os.kill(worker.process.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"evaluation worker \(pid \d+\) died with exit code -9"):
            worker.result()
        assert time.monotonic() - start < 5.0
    finally:
        worker.close()


def test_one_evaluation_at_a_time_and_an_evaluation_s_error_comes_back_with_its_traceback(make_model):
    model = make_model(inner_lr=0.01, seed=0)
    worker = model.evaluation_worker(ENV)
    try:
        worker.submit(_saved(model), **EVALUATION)
        with pytest.raises(RuntimeError, match=r"take the last evaluation's result\(\) before submitting another"):
            worker.submit(_saved(model), **EVALUATION)
        worker.result()
        worker.submit(_saved(model), n_tasks=0)  # refused by evaluate_adaptation, in the worker
        with pytest.raises(RuntimeError, match=r"evaluation worker failed: ValueError: n_tasks: must be an integer >= 1"):
            worker.result()
        worker.submit(_saved(model), **EVALUATION)  # the worker goes on after an evaluation's error
        assert worker.result()["per_task"].shape == (3, 2)
    finally:
        worker.close()
