"""``inner_lr="auto"``: the inner step size whose first step moves a task's policy by a given KL."""

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch as th

from sb3_metarl.adaptation import masked_log_prob, per_task_norm
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import FunctionalPolicy, Params, grad_params, inner_update, kl_divergence
from sb3_metarl.common.returns import returns_to_go, step_discounts
from sb3_metarl.gradient_modes import GradientMode

if TYPE_CHECKING:  # (the model's type for the checker only: at run time this room sits below the class)
    from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient

#: the mean KL(pi_theta || pi_theta') of a step along a task's plain policy gradient that ``inner_lr="auto"`` aims at
#: (median over tasks); the modes' own, baselined inner steps move less
AUTO_INNER_KL = 0.5
#: ``inner_lr="auto"`` calibrates on at least this many (task, batch) pairs
AUTO_CALIBRATION_TASKS = 16
#: ``inner_lr="auto"`` clips each task's inner gradient at this multiple of the calibration's median norm
AUTO_INNER_CLIP_FACTOR = 4.0
#: ``inner_lr="auto"`` multiplies the KL-calibrated step by the inner gradient's signal fraction to this power
#: (measured, docs/results/auto_inner_lr_defaults.md: with power 1 a step at N = 10 still made adaptation worse)
AUTO_SIGNAL_POWER = 2.0


def per_task_step_kl(
    policy: FunctionalPolicy, task_params: Params, direction: Params, step_sizes: th.Tensor, batch: EpisodeBatch
) -> th.Tensor:
    """
    :param policy: the functional policy
    :param task_params: per-task parameters (B, ...) the batch was sampled with
    :param direction: per-task inner gradients (B, ...)
    :param step_sizes: eta per task (B,)
    :param batch: the inner episodes, whose states the KL is averaged over
    :return: per task, the mean over the batch's steps of KL(pi_theta || pi_{theta + eta g}) (B,)
    """
    obs, masks = batch.packed_observations(), batch.packed_masks()
    with th.no_grad():
        old = policy.distribution(task_params, obs)
        moved = inner_update(task_params, direction, 1.0, scale=step_sizes)
        kl = kl_divergence(old, policy.distribution(moved, obs)).reshape(batch.n_tasks, -1)
        return (kl * masks).sum(1) / masks.sum(1).clamp(min=1)


def _per_task_gradient(
    policy: FunctionalPolicy, task_params: Params, batch: EpisodeBatch, surrogate: Callable[[th.Tensor], th.Tensor]
) -> Params:
    """:return: the per-task gradient (detached) of ``surrogate(masked log-likelihoods of batch)`` at ``task_params``"""
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in task_params.items()}
    with th.enable_grad():
        objective = surrogate(masked_log_prob(policy, leaves, batch))
        return {n: g.detach() for n, g in grad_params(objective.sum(), leaves).items()}


def inner_direction(policy: FunctionalPolicy, mode: GradientMode, task_params: Params, batch: EpisodeBatch) -> Params:
    """:return: the per-task gradient of ``mode``'s inner surrogate on ``batch`` at ``task_params`` (detached)"""
    return _per_task_gradient(policy, task_params, batch, lambda log_prob: mode.inner_surrogate(log_prob, batch))


def reference_direction(policy: FunctionalPolicy, task_params: Params, batch: EpisodeBatch, gamma: float) -> Params:
    """
    The per-task policy gradient that calibrates ``inner_lr="auto"``, the same for every gradient mode:
    ``(1/E) sum_e sum_t grad log pi(a_t|s_t) gamma^t (G_t - mean_e G_t)``, with the returns-to-go G_t
    minus their mean over the task's episodes at the same t. That baseline removes constant reward
    offsets (an alive bonus) and, unlike a fitted baseline, cannot absorb the whole return on a small
    batch (a linear baseline with more features than steps leaves a near-zero gradient, and an eta
    calibrated on it would be huge).

    :return: parameter name -> (B, ...) gradients (detached)
    """
    go = returns_to_go(batch.rewards, batch.masks, gamma)
    count = batch.masks.sum(1, keepdim=True).clamp(min=1)
    centred = (go - (go * batch.masks).sum(1, keepdim=True) / count) * batch.masks
    weights = step_discounts(batch.masks.shape[-1], gamma, batch.masks.device) * centred
    return _per_task_gradient(
        policy, task_params, batch, lambda log_prob: (log_prob * weights).sum(dim=(1, 2)) / batch.n_episodes
    )


def step_sizes_for_kl(
    policy: FunctionalPolicy,
    direction: Params,
    task_params: Params,
    batch: EpisodeBatch,
    target_kl: float,
    tolerance: float = 0.05,
    max_iter: int = 30,
) -> th.Tensor:
    """
    Per task, the step size eta at which a step of ``eta * direction`` moves the task's policy by a
    mean KL of ``target_kl`` over the batch's states. The KL of a step grows like eta^2 for small
    steps, so each eta is refined by eta * sqrt(target / KL) until every KL is within ``tolerance``
    (relative) of the target.

    :param policy: the functional policy
    :param direction: per-task directions (B, ...), e.g. ``reference_direction``
    :param task_params: per-task parameters (B, ...) the batch was sampled with (detached)
    :param batch: the episodes whose states the KL is averaged over
    :param target_kl: the KL the step should have
    :param tolerance: relative tolerance on the KL
    :param max_iter: refinements at most
    :return: eta per task (B,; NaN for a task whose direction is zero)
    """
    params = {n: p.detach() for n, p in task_params.items()}
    norms = per_task_norm(direction).double()
    if not th.isfinite(norms).all():
        raise FloatingPointError(
            "inner_lr='auto': the inner gradient on the calibration batch is not finite; check the env's rewards."
        )
    moving = norms > 0
    # start each task with a step of parameter norm 1e-2
    step_sizes = th.where(moving, 1e-2 / norms.clamp(min=1e-30), th.zeros_like(norms))
    for _ in range(max_iter):
        kl = per_task_step_kl(policy, params, direction, step_sizes, batch).double()
        ratio = th.where(kl > 0, target_kl / kl.clamp(min=1e-30), th.full_like(kl, 1e4))
        ratio = th.where(th.isfinite(kl), ratio, th.full_like(kl, 1e-4))
        if bool(((ratio - 1.0).abs() <= tolerance)[moving].all()):
            break
        step_sizes = step_sizes * ratio.sqrt().clamp(0.01, 100.0)
    return th.where(moving, step_sizes, th.full_like(step_sizes, math.nan))


def signal_fraction(first: Params, second: Params) -> float:
    """
    The fraction of an inner gradient's squared norm that is signal, from two independent gradients of the
    same tasks on batches of the same size: ``E<g1, g2> = |grad J|^2`` and ``E|g|^2 = |grad J|^2 + noise / N``, so
    ``sum_tasks <g1, g2> / sum_tasks (|g1|^2 + |g2|^2) / 2`` estimates ``|grad J|^2 / E|g|^2`` at that batch size
    (pooled over tasks; clipped to [0, 1]).

    :param first: per-task gradients (B, ...) on one batch
    :param second: per-task gradients (B, ...) on an independent batch of the same tasks and size
    :return: the estimate
    """
    agreement = sum(float((first[n].double() * second[n].double()).sum()) for n in first)
    energy = sum(float((first[n].double() ** 2).sum() + (second[n].double() ** 2).sum()) / 2 for n in first)
    if energy <= 0:
        return 1.0
    return min(1.0, max(0.0, agreement / energy))


def calibrate_inner_lr(
    policy: FunctionalPolicy,
    mode: GradientMode,
    gamma: float,
    batches: list[tuple[Params, EpisodeBatch, EpisodeBatch]],
    target_kl: float,
    clip_factor: float,
    min_signal_fraction: float = 0.05,
    signal_power: float = 1.0,
) -> tuple[float, float | None, float]:
    """
    ``inner_lr="auto"`` on calibration batches of the initial policy (see ``MetaPolicyGradient.calibrate_inner_lr``):
    the median over tasks of the step size whose step along the reference direction has a mean KL of
    ``target_kl``, times the signal fraction of the inner gradient at this batch size. A noisy gradient's
    step should be shorter: in a quadratic model of the return, the best step along a gradient of which a
    fraction s of the squared norm is signal is s times the best step along the signal alone (at N = 4
    episodes per task the KL-calibrated step alone made adaptation worse on Navigation2D).

    :param policy: the functional policy
    :param mode: the gradient mode whose inner gradients set the clip
    :param gamma: the discount of the reference direction
    :param batches: (per-task parameters, a batch sampled with them, an independent batch of the same size and
        tasks) triples
    :param target_kl: the first step's KL along the reference direction (median over tasks)
    :param clip_factor: each task's inner gradient is clipped at this multiple of the median norm
    :param min_signal_fraction: the signal fraction is taken at least this large (a batch with no measurable
        signal still adapts a little)
    :param signal_power: eta is multiplied by the signal fraction to this power
    :return: eta, the inner-gradient clip and the signal fraction (0.1, None and 1 when every calibration
        gradient is zero, as with constant rewards: any step size then gives the same first step)
    """
    step_sizes, norms, firsts, seconds = [], [], [], []
    for params, batch, independent in batches:
        direction = reference_direction(policy, params, batch, gamma)
        step_sizes.append(step_sizes_for_kl(policy, direction, params, batch, target_kl))
        norms.append(per_task_norm(inner_direction(policy, mode, params, batch)))
        firsts.append(direction)
        seconds.append(reference_direction(policy, params, independent, gamma))
    step_sizes, norms = th.cat(step_sizes), th.cat(norms)
    moving = th.isfinite(step_sizes)
    if not moving.any():
        return 0.1, None, 1.0
    fraction = signal_fraction(*({n: th.cat([d[n] for d in group]) for n in group[0]} for group in (firsts, seconds)))
    fraction = max(fraction, min_signal_fraction)
    return float(step_sizes[moving].median()) * fraction**signal_power, clip_factor * float(norms.median()), fraction


@dataclasses.dataclass(frozen=True)
class InnerStepSize:
    """What ``inner_lr="auto"`` calibrates (``calibrate_model``)."""

    #: the inner step size eta
    lr: float
    #: each task's inner gradient is clipped to this norm (None: no clipping)
    grad_clip: float | None
    #: the measured fraction of the inner gradient's squared norm that is signal at N episodes
    signal_fraction: float


def calibrate_model(model: "MetaPolicyGradient") -> InnerStepSize:
    """
    ``inner_lr="auto"``: the inner step size, clip and signal fraction for ``model`` (which it leaves as it was:
    ``MetaPolicyGradient.calibrate_inner_lr`` sets them).

    On at least ``AUTO_CALIBRATION_TASKS`` (16) tasks, ``inner_episodes`` episodes each of the initial policy
    (drawn from streams of their own, so training's samples are not changed), it finds per task the eta at which a
    step along the task's policy gradient (returns-to-go minus their mean over the task's episodes: the same for
    every mode, and never degenerate as a fitted baseline on a small batch can be) moves the policy by a mean
    KL(pi_theta || pi_theta') of ``AUTO_INNER_KL`` (0.5) on the batch's states, and takes the median, times the
    square (``AUTO_SIGNAL_POWER``) of the inner gradient's signal fraction at N episodes, measured on a second,
    independent batch of N episodes per task (``signal_fraction``): a noisy small-N gradient takes a shorter step.
    Because sampled inner gradients are heavy-tailed, every inner step then clips each task's gradient at
    ``AUTO_INNER_CLIP_FACTOR`` (4) times its median norm on the calibration batches. The rule depends neither on
    the horizon nor on the reward scale, both of which the sum-over-time gradient grows with.

    :param model: a model with an env
    :return: the calibrated step size
    """
    seed = None if model.seed is None else int(np.random.SeedSequence([2, model.seed]).generate_state(1)[0])
    batches = []
    with model.streams.isolated(model.env, seed) as generator:
        task_rng = np.random.default_rng(seed)
        for _ in range(math.ceil(AUTO_CALIBRATION_TASKS / model.meta_batch_size)):
            tasks = model.sample_tasks(model.meta_batch_size, task_rng)
            params = model.initial_task_params(len(tasks))
            # two independent batches of N episodes per task: the noise of an N-episode inner gradient
            pair = [model.sample_episodes(tasks, params, model.inner_episodes, generator=generator) for _ in range(2)]
            assert pair[0] is not None and pair[1] is not None
            batches.append((params, *pair))
    step_size = InnerStepSize(
        *calibrate_inner_lr(
            model.functional_policy,
            model.gradient_mode,
            model.gamma,
            batches,
            AUTO_INNER_KL,
            AUTO_INNER_CLIP_FACTOR,
            signal_power=AUTO_SIGNAL_POWER,
        )
    )
    if model.verbose >= 1:
        print(
            f"inner_lr='auto': calibrated to {step_size.lr:.4g} (median first-step KL {AUTO_INNER_KL}, times the "
            f"inner gradient's signal fraction {step_size.signal_fraction:.3g} at N={model.inner_episodes}), "
            f"inner gradient norm clipped at {step_size.grad_clip}"
        )
    return step_size
