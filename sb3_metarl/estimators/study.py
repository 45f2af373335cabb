"""Measuring meta-gradient estimators against the exact references of :mod:`sb3_metarl.estimators.exact`
(:func:`measure_estimators`): bias, variance and cosine per mode and inner batch size."""

import csv
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th

from sb3_metarl.estimators.exact import bandit_pathwise_gradient, exact_meta_gradient
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode
from sb3_metarl.meta_pg import MetaPolicyGradient
from sb3_metarl.tasks import GaussianBanditEnv, TabularMDPEnv

#: (mode, inner_episodes) -> a model whose ``meta_batch_size`` slots all run one task
ModelFactory = Callable[[str, int], MetaPolicyGradient]


class Configured(NamedTuple):
    """A model and the mode and number of inner episodes to estimate with (None: the model's own)."""

    model: MetaPolicyGradient
    gradient_mode: GradientMode | None = None
    inner_episodes: int | None = None


#: (mode, inner_episodes) -> what estimates with them
Configuration = Callable[[str, int], Configured]
#: inner_episodes -> (reference gradient as a flat vector, its standard error per coordinate or None)
ReferenceFn = Callable[[int], tuple[th.Tensor, th.Tensor | None]]


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
    estimates = _estimates(Configured(model), calls)[0]
    summary = summarize(estimates, reference)
    summary["relative_error"] = ((estimates.mean(0) - reference).norm() / reference.norm()).item()
    return summary


# ------------------------------------------------------------------------------- measure_estimators


def _unwrapped(model: MetaPolicyGradient) -> Any:
    model.episode_sampler  # noqa: B018  (a clear error when the model has no env)
    return model.get_env().get_attr("unwrapped", indices=[0])[0]


def exact_reference(model: MetaPolicyGradient, task: Any) -> ReferenceFn | None:
    """
    The exact reference for ``model`` on ``task`` where :mod:`sb3_metarl.estimators.exact` has one: the exact
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
            grad, se = bandit_pathwise_gradient(mean, log_std, float(task), model.calibrate_inner_lr(), n, model.inner_steps)
            reference, reference_se = th.zeros(size, dtype=th.float64), th.zeros(size, dtype=th.float64)
            reference[positions], reference_se[positions] = th.as_tensor(grad), th.as_tensor(se)
            return reference, reference_se

        return bandit
    return None


def _sf_reference(configuration: Configuration, repeats: int) -> ReferenceFn:
    def reference(n: int) -> tuple[th.Tensor, th.Tensor]:
        estimates = _estimates(configuration("sf", n), repeats)[0]
        return estimates.mean(0), estimates.std(0) / np.sqrt(len(estimates))

    return reference


def _estimates(configured: Configured, repeats: int) -> tuple[th.Tensor, float]:
    """:return: (repeats * B, n_params) independent estimates and the seconds per estimate"""
    model, mode, n = configured
    start = time.perf_counter()
    rows = [
        flat_per_task_gradient(model.estimate_meta_gradient(per_task=True, gradient_mode=mode, inner_episodes=n))
        for _ in range(repeats)
    ]
    estimates = th.cat(rows).double().cpu()
    return estimates, (time.perf_counter() - start) / len(estimates)


def summarize(estimates: th.Tensor, reference: th.Tensor, reference_se: th.Tensor | None = None) -> dict[str, float]:
    """
    :param estimates: independent estimates (n, d)
    :param reference: the reference gradient (d,)
    :param reference_se: the reference's standard error per coordinate, if it is itself an estimate
    :return: ``distance_se`` (``|mean - ref|`` over the standard error of that difference), ``max_abs_z``
        (largest coordinate-wise z), ``variance`` (trace of the covariance of single estimates),
        ``cosine_mean``, ``cosine_single``, ``relative_bias`` (noise-corrected ``|bias| / |ref|``) and
        ``relative_noise`` (the mean's standard error / ``|ref|``)
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
    if isinstance(model_or_factory, MetaPolicyGradient):
        model = model_or_factory

        def configuration(mode: str, n: int) -> Configured:
            # the caller's model is not changed: the mode and N are arguments of each estimate
            return Configured(model, mode_named(model.gradient_mode, mode), n)

    else:
        factory = model_or_factory

        def configuration(mode: str, n: int) -> Configured:
            return Configured(factory(mode, n))

    return _measure(configuration, modes, sample_sizes, repeats, reference, reference_repeats)


def mode_named(mode: GradientMode, name: str) -> GradientMode:
    """:return: ``mode`` if it is called ``name`` (keeping its configuration), else the named mode with defaults"""
    return mode if mode.name == name else make_gradient_mode(name)


def _measure(
    configuration: Configuration,
    modes: Sequence[str],
    sample_sizes: Sequence[int],
    repeats: int,
    reference: ReferenceFn | str | None,
    reference_repeats: int,
) -> list[dict[str, Any]]:
    if reference is None or reference == "exact":
        probe = configuration(modes[0], sample_sizes[0]).model
        task = probe.task_sampler.sample(1, np.random.default_rng(0))[0]
        reference_fn = exact_reference(probe, task)
        if reference_fn is None and reference == "exact":
            raise ValueError("reference: no exact reference for this env; use reference='sf' or a function.")
        reference = reference_fn or "sf"
    if reference == "sf":
        reference = _sf_reference(configuration, reference_repeats)
    if not callable(reference):
        raise ValueError(f"reference: expected None, 'exact', 'sf' or a function of N, got {reference!r}.")

    rows = []
    for n in sample_sizes:
        reference_vector, reference_se = reference(n)
        for mode in modes:
            estimates, seconds = _estimates(configuration(mode, n), repeats)
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
