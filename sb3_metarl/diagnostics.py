"""
Measuring meta-gradient estimators: against the exact references of :mod:`sb3_metarl.exact`
(:func:`measure_estimators`), and against each other during training
(:class:`MetaGradientDiagnosticsCallback`).
"""

import csv
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from sb3_metarl.common.functional import FunctionalPolicy, grad_params
from sb3_metarl.exact import bandit_pathwise_gradient, exact_meta_gradient, tabular_value_function
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode, policy_gradient_surrogate
from sb3_metarl.meta_pg import MetaPolicyGradient
from sb3_metarl.tasks import FixedTaskSampler, GaussianBanditEnv, TabularMDPEnv

#: (mode, inner_episodes) -> a model whose ``meta_batch_size`` slots all run one task
ModelFactory = Callable[[str, int], MetaPolicyGradient]
#: inner_episodes -> (reference gradient as a flat vector, its standard error per coordinate or None)
ReferenceFn = Callable[[int], tuple[th.Tensor, th.Tensor | None]]

#: the Gaussian-bandit setting of the tests and benchmarks: target, initial mean and log-std, inner lr
BANDIT_TARGET, BANDIT_MEAN, BANDIT_LOG_STD, BANDIT_INNER_LR = 0.5, 0.2, -0.5, 0.1


def make_bandit_model(
    gradient_mode: str | GradientMode,
    inner_episodes: int,
    outer_episodes: int,
    meta_batch_size: int = 250,
    inner_steps: int = 1,
    seed: int = 0,
    **kwargs: Any,
) -> MetaPolicyGradient:
    """
    A model on ``GaussianBandit-v0`` with one fixed target, a policy N(mean, std^2) set to
    (``BANDIT_MEAN``, exp(``BANDIT_LOG_STD``)) and no baseline, so that the path-wise reference of
    :func:`sb3_metarl.exact.bandit_pathwise_gradient` applies. Each of the ``meta_batch_size`` task
    slots gives one independent estimate (``estimate_meta_gradient(per_task=True)``).
    """
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/GaussianBandit-v0",
        gradient_mode=gradient_mode,
        meta_batch_size=meta_batch_size,
        inner_episodes=inner_episodes,
        outer_episodes=outer_episodes,
        inner_steps=inner_steps,
        inner_lr=BANDIT_INNER_LR,
        baseline=None,
        task_sampler=FixedTaskSampler([BANDIT_TARGET]),
        policy_kwargs=dict(net_arch=[]),
        seed=seed,
        **kwargs,
    )
    with th.no_grad():
        model.policy.action_net.bias.fill_(BANDIT_MEAN)
        model.policy.log_std.fill_(BANDIT_LOG_STD)
    return model


def bandit_estimates(model: MetaPolicyGradient, calls: int = 2) -> np.ndarray:
    """:return: independent estimates of the gradient w.r.t. (mean, log_std), shape (calls * B, 2)"""
    rows = []
    for _ in range(calls):
        grads = model.estimate_meta_gradient(per_task=True)
        rows.append(th.stack([grads["action_net.bias"][:, 0], grads["log_std"][:, 0]], dim=1))
    return th.cat(rows).double().cpu().numpy()


def make_tabular_model(
    gradient_mode: str | GradientMode,
    inner_episodes: int,
    inner_steps: int = 1,
    task_seed: int = 0,
    meta_batch_size: int = 10,
    seed: int = 0,
    **kwargs: Any,
) -> tuple[MetaPolicyGradient, np.ndarray]:
    """
    A model on ``TabularMDP-v0`` in the setting of Liu et al. (2022): a tabular softmax policy
    (``net_arch=[]``, near-uniform at initialisation), inner lr 10, gamma 0.8, one fixed reward matrix
    drawn with ``task_seed``; ``outer_episodes`` equals ``inner_episodes``.

    :return: the model and its task
    """
    task = np.random.default_rng(task_seed).uniform(0, 1, size=(20, 5))
    settings = dict(inner_lr=10.0, gamma=0.8, policy_kwargs=dict(net_arch=[]))
    settings.update(kwargs)
    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/TabularMDP-v0",
        gradient_mode=gradient_mode,
        meta_batch_size=meta_batch_size,
        inner_episodes=inner_episodes,
        outer_episodes=inner_episodes,
        inner_steps=inner_steps,
        task_sampler=FixedTaskSampler([task]),
        seed=seed,
        **settings,
    )
    return model, task


def flat_gradient(grads: dict[str, th.Tensor]) -> th.Tensor:
    """:return: a gradient dict (name -> tensor) as one vector, names sorted"""
    return th.cat([grads[name].flatten() for name in sorted(grads)])


def flat_per_task_gradient(grads: dict[str, th.Tensor]) -> th.Tensor:
    """:return: a per-task gradient dict (name -> (B, ...)) as a (B, n_params) matrix, names sorted"""
    return th.cat([grads[name].flatten(1) for name in sorted(grads)], dim=1)


def compare_with_exact(model: MetaPolicyGradient, task: np.ndarray, calls: int = 4) -> dict[str, float]:
    """
    Average ``calls * meta_batch_size`` independent estimates and compare them with the exact MAML
    meta-gradient of the tabular MDP.

    :return: the metrics of :func:`summarize`, and ``relative_error``, ``|mean - ref| / |ref|``
    """
    reference = flat_gradient(exact_meta_gradient(model, [task])).double().cpu()
    estimates = _estimates(model, calls)[0]
    summary = summarize(estimates, reference)
    summary["relative_error"] = ((estimates.mean(0) - reference).norm() / reference.norm()).item()
    return summary


# ------------------------------------------------------------------------------- measure_estimators


def _unwrapped(model: MetaPolicyGradient) -> Any:
    model.episode_sampler  # noqa: B018  (a clear error when the model has no env)
    return model.get_env().get_attr("unwrapped", indices=[0])[0]


def exact_reference(model: MetaPolicyGradient, task: Any) -> ReferenceFn | None:
    """
    The exact reference for ``model`` on ``task`` where :mod:`sb3_metarl.exact` has one: the exact
    MAML meta-gradient on a tabular MDP (the N -> infinity limit), or the path-wise gradient of the
    N-sample objective on the Gaussian bandit (needs ``baseline=None`` and ``net_arch=[]``).

    :return: a function of N giving the flat reference and its standard error, or None
    """
    if isinstance(_unwrapped(model), TabularMDPEnv):
        reference = flat_gradient(exact_meta_gradient(model, [task])).double().cpu()
        return lambda n: (reference, None)
    if isinstance(_unwrapped(model), GaussianBanditEnv):
        if model.baseline is not None:
            raise ValueError("baseline: the bandit's path-wise reference needs baseline=None.")
        params = model.functional_policy.parameters()
        mean, log_std = params["action_net.bias"].item(), params["log_std"].item()
        # positions of the mean and the log-std in the flat (names sorted) gradient; all else is zero
        offsets = dict(zip(sorted(params), np.cumsum([0] + [params[k].numel() for k in sorted(params)])))
        positions = [int(offsets["action_net.bias"]), int(offsets["log_std"])]
        size = sum(p.numel() for p in params.values())

        def bandit(n: int) -> tuple[th.Tensor, th.Tensor]:
            grad, se = bandit_pathwise_gradient(mean, log_std, float(task), model.resolved_inner_lr(), n, model.inner_steps)
            reference, reference_se = th.zeros(size, dtype=th.float64), th.zeros(size, dtype=th.float64)
            reference[positions], reference_se[positions] = th.as_tensor(grad), th.as_tensor(se)
            return reference, reference_se

        return bandit
    return None


def _sf_reference(factory: ModelFactory, repeats: int) -> ReferenceFn:
    def reference(n: int) -> tuple[th.Tensor, th.Tensor]:
        estimates = _estimates(factory("sf", n), repeats)[0]
        return estimates.mean(0), estimates.std(0) / np.sqrt(len(estimates))

    return reference


def _estimates(model: MetaPolicyGradient, repeats: int) -> tuple[th.Tensor, float]:
    """:return: (repeats * B, n_params) independent estimates and the seconds per estimate"""
    start = time.perf_counter()
    rows = [flat_per_task_gradient(model.estimate_meta_gradient(per_task=True)) for _ in range(repeats)]
    estimates = th.cat(rows).double().cpu()
    return estimates, (time.perf_counter() - start) / len(estimates)


def summarize(estimates: th.Tensor, reference: th.Tensor, reference_se: th.Tensor | None = None) -> dict[str, float]:
    """
    :param estimates: independent estimates (n, d)
    :param reference: the reference gradient (d,)
    :param reference_se: the reference's standard error per coordinate, if it is itself an estimate
    :return: ``distance_se`` (|mean - ref| over the standard error of that difference), ``max_abs_z``
        (largest coordinate-wise z), ``variance`` (trace of the covariance of single estimates),
        ``cosine_mean``, ``cosine_single``, ``relative_bias`` (noise-corrected |bias| / |ref|) and
        ``relative_noise`` (the mean's standard error / |ref|)
    """
    n = len(estimates)
    mean, variance = estimates.mean(0), estimates.var(0)
    reference_var = th.zeros_like(reference) if reference_se is None else reference_se.pow(2)
    difference_var = variance / n + reference_var
    squared_error = (mean - reference).pow(2).sum()
    nonzero = difference_var > 0
    z = (mean - reference)[nonzero] / difference_var[nonzero].sqrt()
    cosine = th.nn.functional.cosine_similarity
    norm = reference.norm().clamp(min=1e-12)
    return {
        "distance_se": (squared_error.sqrt() / difference_var.sum().sqrt().clamp(min=1e-12)).item(),
        "max_abs_z": z.abs().max().item() if len(z) else 0.0,
        "variance": variance.sum().item(),
        "cosine_mean": cosine(mean, reference, dim=0).item(),
        "cosine_single": cosine(estimates, reference.expand_as(estimates), dim=1).mean().item(),
        "relative_bias": ((squared_error - difference_var.sum()).clamp(min=0).sqrt() / norm).item(),
        "relative_noise": (difference_var.sum().sqrt() / norm).item(),
    }


def measure_estimators(
    model_or_factory: MetaPolicyGradient | ModelFactory,
    modes: Sequence[str],
    sample_sizes: Sequence[int],
    repeats: int,
    reference: ReferenceFn | str | None = None,
    reference_repeats: int = 20,
) -> list[dict[str, Any]]:
    """
    Bias, variance and alignment of meta-gradient estimators as the number of inner episodes N grows.

    Every ``meta_batch_size`` slot of the model runs the same task, so each slot of each call is one
    independent estimate: ``repeats * meta_batch_size`` estimates per (mode, N).

    :param model_or_factory: a model whose task sampler gives the single task to study (a
        ``FixedTaskSampler([task])``), or a factory ``(mode, N) -> model``
    :param modes: gradient modes to measure
    :param sample_sizes: values of N (``inner_episodes``)
    :param repeats: calls of ``estimate_meta_gradient`` per (mode, N)
    :param reference: None (exact where :func:`exact_reference` applies, else ``"sf"``), ``"sf"`` (the
        mean of ``reference_repeats`` calls of the unbiased ``sf`` mode at the same N, whose standard
        error enters the z-scores) or a function of N giving the reference and its standard error
    :param reference_repeats: calls for the ``"sf"`` reference
    :return: one row per (mode, N): ``mode``, ``inner_episodes``, ``n_estimates``, the metrics of
        :func:`summarize`, ``reference_se`` (norm of the reference's standard error) and
        ``seconds_per_estimate``
    """
    if not isinstance(model_or_factory, MetaPolicyGradient):
        return _measure(model_or_factory, modes, sample_sizes, repeats, reference, reference_repeats)
    model = model_or_factory
    saved = model.gradient_mode, model.inner_episodes
    try:
        return _measure(_reconfigure(model), modes, sample_sizes, repeats, reference, reference_repeats)
    finally:
        model.gradient_mode, model.inner_episodes = saved  # the caller's model is left as it was


def mode_named(mode: GradientMode, name: str) -> GradientMode:
    """:return: ``mode`` if it is called ``name`` (keeping its configuration), else the named mode with defaults"""
    return mode if mode.name == name else make_gradient_mode(name)


def _reconfigure(model: MetaPolicyGradient) -> ModelFactory:
    """:return: a factory that switches ``model`` to the requested mode and number of inner episodes"""
    saved_mode = model.gradient_mode

    def factory(mode: str, n: int) -> MetaPolicyGradient:
        model.gradient_mode = mode_named(saved_mode, mode)
        model.inner_episodes = n
        return model

    return factory


def _measure(
    factory: ModelFactory,
    modes: Sequence[str],
    sample_sizes: Sequence[int],
    repeats: int,
    reference: ReferenceFn | str | None,
    reference_repeats: int,
) -> list[dict[str, Any]]:
    if reference is None or reference == "exact":
        probe = factory(modes[0], sample_sizes[0])
        task = probe._task_sampler.sample(1, np.random.default_rng(0))[0]
        reference_fn = exact_reference(probe, task)
        if reference_fn is None and reference == "exact":
            raise ValueError("reference: no exact reference for this env; use reference='sf' or a function.")
        reference = reference_fn or "sf"
    if reference == "sf":
        reference = _sf_reference(factory, reference_repeats)
    if not callable(reference):
        raise ValueError(f"reference: expected None, 'exact', 'sf' or a function of N, got {reference!r}.")

    rows = []
    for n in sample_sizes:
        reference_vector, reference_se = reference(n)
        for mode in modes:
            estimates, seconds = _estimates(factory(mode, n), repeats)
            row: dict[str, Any] = {"mode": mode, "inner_episodes": n, "n_estimates": len(estimates)}
            row.update(summarize(estimates, reference_vector, reference_se))
            row["reference_se"] = 0.0 if reference_se is None else reference_se.norm().item()
            row["seconds_per_estimate"] = seconds
            rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str) -> None:
    """Write ``measure_estimators``' rows (or any list of flat dicts with the same keys) as CSV."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------ decomposition

#: how a piece of the decomposed meta-gradient is obtained
PIECES = ("sampled", "exact")


def decomposed_meta_gradient(
    model: MetaPolicyGradient,
    tasks: list[Any],
    inner: str = "sampled",
    hessian: str | GradientMode | None = None,
    outer: str = "sampled",
    per_task: bool = False,
) -> dict[str, th.Tensor]:
    """
    The meta-gradient assembled from three pieces, each sampled or exact (Liu et al. 2022, Appendix I.1.2):
    (I) the inner-loop policy gradient, whose value makes each inner step (its sampling error is the
    compositional bias); (II) the inner step's derivative, the Hessian of the inner objective (a gradient
    mode's inner surrogate on the inner samples, or exact); (III) the outer-loop policy gradient at the
    adapted parameters. Each inner step is ``theta_{k+1} = theta_k + eta (stop(g_I) + g_II - stop(g_II))``:
    its value comes from (I) and its derivative from (II). Sampled pieces draw fresh episodes with the
    model's sampler (``inner_episodes`` at theta_k, ``outer_episodes`` at theta_zeta); exact pieces use the
    dynamic-programming value of a ``TabularMDP-v0`` model. With every piece exact this is the exact MAML
    meta-gradient (``exact_meta_gradient``). Inner steps are not clipped (the exact reference has no clip).

    :param model: the model (its policy, ``inner_lr``, ``inner_steps``, gradient mode, sampler)
    :param tasks: at most ``meta_batch_size`` tasks (reward matrices for exact pieces)
    :param inner: "sampled" or "exact": (I), the value of each inner step; sampled with the Hessian's mode
        (the model's gradient mode when the Hessian is exact): all modes' first derivative is the policy gradient
    :param hessian: "exact", or a gradient mode (name or instance) whose inner surrogate's second derivative
        estimates the Hessian; default: the model's gradient mode. Modes that add a correction term to the
        outer objective (``sf``) are not decomposable this way.
    :param outer: "sampled" or "exact": (III)
    :param per_task: return one estimate per task (leading task dim) instead of their mean
    :return: policy parameter name -> ascent direction of the meta-objective
    :raises ValueError: on an unknown piece, a non-decomposable mode, or exact pieces without a TabularMDP env
    """
    for name, value in (("inner", inner), ("outer", outer)):
        if value not in PIECES:
            raise ValueError(f"{name}: must be one of {PIECES}, got {value!r}.")
    hessian_mode = None if hessian == "exact" else make_gradient_mode(model.gradient_mode if hessian is None else hessian)
    if hessian_mode is not None and type(hessian_mode).correction is not GradientMode.correction:
        raise ValueError(
            f"hessian: the {hessian_mode.name!r} mode adds a correction term to the outer objective, so its Hessian "
            "estimate is not its inner surrogate's alone; use 'exact' or a mode without one (lsf, lvc, dice, "
            "loaded_dice, maml, fomaml)."
        )
    values = tabular_value_function(model, tasks) if "exact" in (inner, outer, hessian) else None
    adaptation = model.adaptation
    value_mode = hessian_mode or model.gradient_mode
    inner_lr = model.resolved_inner_lr()
    task_theta = FunctionalPolicy.expand(model.functional_policy.parameters(), len(tasks))
    params = task_theta
    for _ in range(model.inner_steps):
        batch = None
        if inner == "sampled" or hessian_mode is not None:
            batch = model.sample_episodes(tasks, params, model.inner_episodes)
            assert batch is not None
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        if inner == "sampled":
            inner_value = grad_params(value_mode.inner_surrogate(adaptation.log_prob(leaves, batch), batch).sum(), leaves)
        else:
            inner_value = grad_params(values(leaves).sum(), leaves)
        if hessian_mode is None:
            derivative = grad_params(values(params).sum(), params, create_graph=True)
        else:
            surrogate = hessian_mode.inner_surrogate(adaptation.log_prob(params, batch), batch)
            derivative = grad_params(surrogate.sum(), params, create_graph=True)
        params = {
            n: params[n] + inner_lr * (inner_value[n].detach() + derivative[n] - derivative[n].detach())
            for n in params
        }
    if outer == "exact":
        objective = values(params).sum()
    else:
        outer_batch = model.sample_episodes(tasks, params, model.outer_episodes)
        assert outer_batch is not None
        objective = policy_gradient_surrogate(adaptation.log_prob(params, outer_batch), outer_batch).sum()
    grads = grad_params(objective, task_theta)
    return {n: (g if per_task else g.mean(0)).float() for n, g in grads.items()}


# ------------------------------------------------------------------------------------------ callback


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
