"""A callback comparing gradient modes on each meta-iteration's own episodes during training."""

import itertools
from collections.abc import Sequence

import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_metarl.estimators.study import flat_per_task_gradient, mode_named


class MetaGradientDiagnosticsCallback(BaseCallback):
    """
    Every ``every`` meta-iterations of ``learn``, evaluates several gradient modes on that iteration's
    own episodes (no extra sampling; see :meth:`MetaPolicyGradient.meta_gradient_on_samples`) and logs:

    - ``diagnostics/variance_across_tasks/<mode>``: trace of the covariance of the per-task estimates;
    - ``diagnostics/grad_norm/<mode>``: norm of the mean estimate;
    - ``diagnostics/cosine/<mode_a>_vs_<mode_b>``: cosine between two modes' mean estimates.

    :param modes: the modes to compare (the model's own mode is always included)
    :param every: meta-iterations between measurements
    :param verbose: verbosity level
    """

    def __init__(self, modes: Sequence[str] = ("lsf", "lvc", "maml"), every: int = 10, verbose: int = 0):
        super().__init__(verbose)
        if every < 1:
            raise ValueError(f"every: must be a positive integer, got {every}.")
        self.modes = list(modes)
        self.every = every
        self.iterations = 0
        self.last: dict[str, float] = {}

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.iterations += 1
        if self.iterations % self.every != 0:
            return
        model = self.model
        sample = self.locals["sample"]
        names = list(dict.fromkeys([model.gradient_mode.name, *self.modes]))
        means = {}
        for name in names:
            mode = mode_named(model.gradient_mode, name)
            per_task = flat_per_task_gradient(model.meta_gradient_on_samples(sample, mode)).detach()
            means[name] = per_task.mean(0)
            self.last[f"diagnostics/variance_across_tasks/{name}"] = per_task.var(0).sum().item() if len(per_task) > 1 else 0.0
            self.last[f"diagnostics/grad_norm/{name}"] = means[name].norm().item()
        for first, second in itertools.combinations(names, 2):
            cosine = th.nn.functional.cosine_similarity(means[first], means[second], dim=0).item()
            self.last[f"diagnostics/cosine/{first}_vs_{second}"] = cosine
        for key, value in self.last.items():
            self.logger.record(key, value)
