"""The meta-gradient decomposed into Liu et al.'s three pieces (inner policy gradient, its Hessian, outer gradient),
each sampled or exact: the compositional and the multi-step Hessian biases, measured."""

from typing import Any

import torch as th

from sb3_metarl.common.functional import FunctionalPolicy, grad_params, inner_update
from sb3_metarl.estimators.exact import tabular_value_function
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode, policy_gradient_surrogate
from sb3_metarl.meta_pg import MetaPolicyGradient

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
    inner_lr = model.calibrate_inner_lr()
    adaptation = model.adaptation
    value_mode = hessian_mode or model.gradient_mode
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
        params = inner_update(params, inner_value, inner_lr, derivative=derivative)
    if outer == "exact":
        objective = values(params).sum()
    else:
        outer_batch = model.sample_episodes(tasks, params, model.outer_episodes)
        assert outer_batch is not None
        objective = policy_gradient_surrogate(adaptation.log_prob(params, outer_batch), outer_batch).sum()
    grads = grad_params(objective, task_theta)
    return {n: (g if per_task else g.mean(0)).float() for n, g in grads.items()}


