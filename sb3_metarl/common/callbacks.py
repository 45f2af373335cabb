"""
Callbacks for meta-training: adaptation-aware evaluation, checkpoints every k meta-iterations and a progress bar that
counts real transitions. SB3's own callbacks work too: their ``on_step`` is called once per sampled batch (each inner
step's and the outer one's: ``inner_steps + 1`` per meta-iteration), on every sampler backend.
"""

import io
import os
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.callbacks import (
    BaseCallback,
    CallbackList,
    CheckpointCallback,
    EvalCallback,
    EventCallback,
    ProgressBarCallback,
)
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback
from stable_baselines3.common.vec_env import VecEnv
from tqdm.rich import tqdm

from sb3_metarl.common.files import replaced_atomically


class MetaProgressBarCallback(ProgressBarCallback):
    """
    SB3's progress bar, advanced by the transitions of each lock-step (finished episodes and spare sub-envs
    excluded). ``learn`` finishes the meta-iteration it starts, so the bar's total is the budget rounded up to
    whole meta-iterations (at most ``model.max_steps_per_iteration`` each); when training ends the total is set
    to the transitions taken (episodes that ended early make iterations shorter).
    """

    def _on_training_start(self) -> None:
        remaining = self.locals["total_timesteps"] - self.model.num_timesteps
        per_iteration = getattr(self.model, "max_steps_per_iteration", None)
        if per_iteration:
            remaining = -(-remaining // per_iteration) * per_iteration
        self.pbar = tqdm(total=remaining)

    def _on_step(self) -> bool:
        self.pbar.update(self.locals.get("n_transitions", self.training_env.num_envs))
        if self.pbar.n > self.pbar.total:
            self.pbar.total = self.pbar.n
        return True

    def _on_training_end(self) -> None:
        self.pbar.total = self.pbar.n
        super()._on_training_end()


class BetweenIterations(BaseCallback):
    """
    A callback that acts between meta-iterations (when one's update is done and nothing of the next is sampled),
    every ``every`` meta-updates of the model, at most once per update count; ``on_step`` does nothing.
    """

    every = 1
    _last_acted_update = -1

    def _on_step(self) -> bool:
        return True

    def _on_rollout_start(self) -> None:
        self._act_if_due()

    def _on_training_end(self) -> None:
        self._act_if_due()

    def _act_if_due(self) -> bool:
        """:return: whether it acted (the model's ``n_updates`` a new multiple of ``every``)"""
        updates = self.model.n_updates
        if updates == 0 or updates == self._last_acted_update or updates % self.every != 0:
            return False
        self._last_acted_update = updates
        self._act()
        return True

    def _act(self) -> None:
        raise NotImplementedError


class MetaCheckpointCallback(BetweenIterations, CheckpointCallback):
    """
    SB3's ``CheckpointCallback`` counted in meta-iterations: a zip (``{name_prefix}_{num_timesteps}_steps.zip`` in
    ``save_path``, as SB3's) after every ``save_every`` meta-updates, taken between iterations, so that
    ``load(...)`` then ``learn(..., reset_num_timesteps=False)`` continues from there bit for bit with nothing
    sampled twice. (SB3's ``CheckpointCallback(save_freq=n)`` counts ``on_step`` calls, here one per sampled batch:
    ``n = k * (inner_steps + 1)`` also saves every k meta-iterations, but in the middle of one, whose sampling the
    continued run then repeats.)

    :param save_every: meta-iterations between checkpoints (the model's ``n_updates`` a multiple of it)
    :param save_path: the folder of the checkpoints
    :param name_prefix: the zips' name prefix
    :param verbose: 2 prints each checkpoint's path
    """

    def __init__(self, save_every: int, save_path: str, name_prefix: str = "rl_model", verbose: int = 0):
        if isinstance(save_every, bool) or not isinstance(save_every, (int, np.integer)) or save_every < 1:
            raise ValueError(f"save_every: must be an integer >= 1 (meta-iterations between checkpoints), got {save_every!r}.")
        super().__init__(save_freq=1, save_path=save_path, name_prefix=name_prefix, verbose=verbose)
        self.save_every = self.every = int(save_every)

    def _act(self) -> None:
        path = self._checkpoint_path(extension="zip")
        self.model.save(path)
        if self.verbose >= 2:
            print(f"Saving model checkpoint to {path}")


class MetaEvalCallback(BetweenIterations):
    """
    Evaluation of a meta-trained policy as meta-RL measures it: on ``n_tasks`` held-out tasks (drawn
    from a stream seeded by ``seed``, the same tasks every time), the return before adaptation and
    after 1..``inner_steps`` inner steps (``MetaPolicyGradient.evaluate_adaptation``, which leaves
    training's random streams untouched). Every ``eval_freq`` meta-updates it logs
    ``eval/return_after_{k}_steps`` for k = 0..K (and ``eval/success_rate_after_{k}_steps`` when the env
    reports success), ``eval/mean_reward`` (the return after K steps, SB3's key) and ``eval/n_updates`` (the
    meta-updates of the model measured), and saves ``best_model.zip`` whenever that post-adaptation return is the
    best so far.

    :param eval_env: the env to evaluate on (an id, an instance, a factory or a VecEnv of task-aware envs);
        None: the model's own env and task sampler
    :param n_tasks: held-out tasks per evaluation
    :param inner_steps: adaptation steps K
    :param eval_freq: evaluate every ``eval_freq`` meta-iterations (meta-updates)
    :param best_model_save_path: folder for ``best_model.zip`` (None: not saved)
    :param seed: seed of the held-out tasks, the evaluation envs and the action noise
    :param verbose: 1 prints each evaluation
    :param in_background: evaluate in a worker process while training goes on, so that the evaluation's episodes do
        not hold the sampler (``model.evaluation_worker``): a copy of the model as it was when the evaluation was due
        (``save``'s bytes) on sub-envs of ``eval_env`` of the worker's own (``eval_env`` is required: the model's
        sub-envs are training's; not a VecEnv). The numbers are the foreground's (tested); they are logged at the
        first iteration boundary after the evaluation ends and at the end of ``learn``, which waits for it;
        ``best_model.zip`` is that copy. One evaluation at a time: a due one first waits for the last. The worker
        starts in a few seconds (a process importing torch) and lives until ``learn`` returns.
    """

    def __init__(
        self,
        eval_env: GymEnv | str | gym.Env | None = None,
        n_tasks: int = 10,
        inner_steps: int = 1,
        eval_freq: int = 1,
        best_model_save_path: str | None = None,
        seed: int = 0,
        verbose: int = 0,
        in_background: bool = False,
    ):
        super().__init__(verbose)
        for name, value, low in [("n_tasks", n_tasks, 1), ("inner_steps", inner_steps, 0), ("eval_freq", eval_freq, 1)]:
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}.")
        if in_background and (eval_env is None or isinstance(eval_env, VecEnv)):
            raise ValueError(
                "eval_env: in_background=True evaluates in a worker process on sub-envs of its own, made from eval_env "
                f"(an id, a factory or an env instance), got {type(eval_env).__name__}; e.g. the id you train on."
            )
        self.eval_env = eval_env
        self.n_tasks, self.inner_steps, self.eval_freq = int(n_tasks), int(inner_steps), int(eval_freq)
        self.best_model_save_path = best_model_save_path
        self.seed = seed
        self.in_background = bool(in_background)
        self.best_mean_reward = -np.inf
        self.last_mean_reward = -np.inf
        #: the model's number of meta-updates at each evaluation
        self.evaluations_updates: list[int] = []
        #: per evaluation, the mean return after 0..K inner steps
        self.evaluations_results: list[np.ndarray] = []
        self.last_table: dict[str, Any] | None = None
        self.every = self.eval_freq
        # in the background: the worker (one per learn) and the evaluation in flight (the meta-updates of the model it
        # measures, that model's saved bytes)
        self._worker: Any = None
        self._in_flight: tuple[int, bytes] | None = None

    def _on_rollout_start(self) -> None:
        self._collect(wait=False)
        super()._on_rollout_start()

    def _on_training_end(self) -> None:
        try:
            acted = self._act_if_due()
            collected = self._collect(wait=True)
        finally:  # (also when the evaluation failed: its error is raised after the worker is stopped)
            if self._worker is not None:
                self._worker.close()
                self._worker = None
        if acted or collected:
            self.logger.dump(self.num_timesteps)

    def _act(self) -> None:
        if not self.in_background:
            self.evaluate()
            return
        if self._collect(wait=True):
            self.logger.dump(self.num_timesteps)  # its row, before the next evaluation's values replace it
        buffer = io.BytesIO()
        self.model.save(buffer)
        snapshot = buffer.getvalue()
        if self._worker is None:
            self._worker = self.model.evaluation_worker(self.eval_env)
        self._worker.submit(snapshot, n_tasks=self.n_tasks, inner_steps=self.inner_steps, seed=self.seed)
        self._in_flight = (self.model.n_updates, snapshot)

    def _collect(self, wait: bool) -> bool:
        """Record the background evaluation's table if it is there (``wait``: wait for it); :return: whether it was."""
        if self._in_flight is None or not (wait or self._worker.done()):
            return False
        updates, snapshot = self._in_flight
        self._in_flight = None
        table = self._worker.result()  # (an error of the evaluation is raised here, with the worker's traceback)

        def save_snapshot(path: str) -> None:
            with replaced_atomically(path) as temporary:
                temporary.write_bytes(snapshot)

        self._record(table, updates, save_snapshot)
        return True

    def evaluate(self) -> dict[str, Any]:
        """
        Evaluate now, in the foreground whatever ``in_background``, log, and save the best model.

        :return: ``evaluate_adaptation``'s table
        """
        table = self.model.evaluate_adaptation(
            n_tasks=self.n_tasks, inner_steps=self.inner_steps, seed=self.seed, env=self.eval_env
        )
        self._record(table, self.model.n_updates, self.model.save)
        return table

    def _record(self, table: dict[str, Any], updates: int, save: Callable[[str], None]) -> None:
        """Log ``table``, the evaluation after ``updates`` meta-updates, and ``save(path)`` the model measured if best."""
        self.last_table = table
        for steps, mean in zip(table["inner_steps"], table["mean"]):
            self.logger.record(f"eval/return_after_{steps}_steps", float(mean))
        if "success_rate" in table:
            for steps, rate in zip(table["inner_steps"], table["success_rate"]):
                self.logger.record(f"eval/success_rate_after_{steps}_steps", float(rate))
        self.last_mean_reward = float(table["mean"][-1])
        self.logger.record("eval/mean_reward", self.last_mean_reward)
        self.logger.record("eval/n_updates", updates)
        self.evaluations_updates.append(updates)
        self.evaluations_results.append(np.asarray(table["mean"]))
        if self.verbose >= 1:
            steps = ", ".join(f"{k}: {m:.2f}" for k, m in zip(table["inner_steps"], table["mean"]))
            print(f"Eval after {updates} meta-updates, return after k inner steps: {steps}")
        if self.last_mean_reward > self.best_mean_reward:
            self.best_mean_reward = self.last_mean_reward
            if self.best_model_save_path is not None:
                os.makedirs(self.best_model_save_path, exist_ok=True)
                save(os.path.join(self.best_model_save_path, "best_model.zip"))
            if self.verbose >= 1:
                print("New best post-adaptation return")


def reject_unadapted_evaluation(callback: MaybeCallback) -> None:
    """
    :raises ValueError: if ``callback`` holds SB3's ``EvalCallback``, which scores the un-adapted policy on
        the eval env's current task (meaningless for a meta-trained policy)
    """
    if isinstance(callback, list):
        for item in callback:
            reject_unadapted_evaluation(item)
    elif isinstance(callback, CallbackList):
        reject_unadapted_evaluation(callback.callbacks)
    elif isinstance(callback, EvalCallback):
        raise ValueError(
            "callback: EvalCallback scores the un-adapted policy on one fixed task, which says nothing about a "
            "meta-trained policy; use sb3_metarl.MetaEvalCallback (held-out tasks, returns after 0..K inner steps, "
            "best_model.zip by post-adaptation return)."
        )
    elif isinstance(callback, EventCallback) and callback.callback is not None:
        reject_unadapted_evaluation(callback.callback)
