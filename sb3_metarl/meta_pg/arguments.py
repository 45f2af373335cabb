"""Early, named errors for ``MetaPolicyGradient``'s arguments."""

import inspect
import math
from numbers import Integral, Real
from typing import Any

import torch as th

from sb3_metarl.common.vec_env import GuardedSubprocVecEnv, check_timeout, resolve_vec_env_cls
from sb3_metarl.gradient_modes import GradientMode
from sb3_metarl.samplers import SAMPLER_NAMES, EpisodeSampler, ShardedVecEnv

#: what ``sampler_kwargs`` may hold for "subproc" and "ray": ``ShardedVecEnv``'s arguments beyond those the
#: algorithm sets (the sub-envs, the groups, the horizon and the backend)
SHARDED_SAMPLER_ARGUMENTS = tuple(inspect.signature(ShardedVecEnv.__init__).parameters)[5:]
#: the ``sampler_kwargs`` of ``sampler="vec_env"`` with ``vec_env_cls=SubprocVecEnv`` (bounded waits)
SUBPROC_VEC_ENV_ARGUMENTS = ("timeout", "close_timeout")

#: ``inner_lr="auto"``: calibrate the inner step size on the first batch (see ``MetaPolicyGradient.resolved_inner_lr``)
AUTO = "auto"


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def check_arguments(
    *,
    meta_batch_size: Any,
    inner_episodes: Any,
    outer_episodes: Any,
    inner_steps: Any,
    inner_lr: Any,
    learning_rate: Any,
    gamma: Any,
    gae_lambda: Any,
    normalize_advantage: Any,
    n_envs: Any,
    max_episode_steps: Any,
    seed: Any,
    device: Any,
) -> None:
    """
    :raises ValueError: naming the first argument of the wrong type or out of range, and what it accepts
    """
    for name, value in [
        ("meta_batch_size", meta_batch_size),
        ("inner_episodes", inner_episodes),
        ("outer_episodes", outer_episodes),
        ("inner_steps", inner_steps),
    ]:
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name}: must be a positive integer, got {value!r}.")
    for name, value in [("n_envs", n_envs), ("max_episode_steps", max_episode_steps)]:
        if value is not None and (not _is_int(value) or value < 1):
            raise ValueError(f"{name}: must be None or a positive integer, got {value!r}.")
    if inner_lr != AUTO and not (_is_real(inner_lr) and inner_lr >= 0):
        raise ValueError(f"inner_lr: must be 'auto' or a finite number >= 0, got {inner_lr!r}.")
    if not callable(learning_rate) and not (_is_real(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate: must be a finite number > 0 or a schedule (a callable), got {learning_rate!r}.")
    if not (_is_real(gamma) and 0.0 < gamma <= 1.0):
        raise ValueError(f"gamma: must be a number in (0, 1], got {gamma!r}.")
    if not (_is_real(gae_lambda) and 0.0 <= gae_lambda <= 1.0):
        raise ValueError(f"gae_lambda: must be a number in [0, 1], got {gae_lambda!r}.")
    if not isinstance(normalize_advantage, bool):
        raise ValueError(f"normalize_advantage: must be True or False, got {normalize_advantage!r}.")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed: must be None or an integer, got {seed!r}.")
    check_device(device)


def check_sample_reuse(inner_sample_reuse: Any, reuse_importance_clip: Any, mode: GradientMode) -> None:
    """:raises ValueError: on a reuse count or clip out of range, or reuse with a mode that cannot importance-weight"""
    if not (_is_int(inner_sample_reuse) and inner_sample_reuse >= 0):
        raise ValueError(f"inner_sample_reuse: must be an integer >= 0, got {inner_sample_reuse!r}.")
    if inner_sample_reuse and not mode.weighs_by_likelihood_ratio:
        raise ValueError(
            f"inner_sample_reuse: mode {mode.name!r} does not weigh samples by their likelihood ratio, so reused "
            "(off-policy) episodes would bias its inner step; use lsf, lvc, dice or loaded_dice, or inner_sample_reuse=0."
        )
    if not (_is_real(reuse_importance_clip) and reuse_importance_clip >= 1):
        raise ValueError(f"reuse_importance_clip: must be a number >= 1, got {reuse_importance_clip!r}.")


def check_device(device: Any) -> None:
    """:raises ValueError: if ``device`` asks for an accelerator that this machine lacks (SB3 would silently use the CPU)"""
    if isinstance(device, str) and device == "auto":
        return
    try:
        device = th.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: {device!r} is not a torch device ({error}); use 'auto', 'cpu' or 'cuda'.") from None
    if device.type == "cuda" and not th.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for but torch sees no CUDA GPU here; use device='auto' or 'cpu'.")


def check_sampler(sampler: Any, sampler_kwargs: Any, vec_env_cls: Any) -> None:
    """
    :raises ValueError: on an unknown sampler, sampler_kwargs that are not a dict (or given to "vec_env", which
        takes none), or ``vec_env_cls`` with a sampler whose workers build their own sub-envs
    """
    if isinstance(sampler, EpisodeSampler):
        if sampler_kwargs:
            raise ValueError("sampler_kwargs: only for a named sampler; configure the EpisodeSampler instance instead.")
        return
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"sampler: unknown sampler {sampler!r}; use one of {list(SAMPLER_NAMES)} or an EpisodeSampler.")
    if sampler_kwargs is not None and not isinstance(sampler_kwargs, dict):
        raise ValueError(f"sampler_kwargs: must be a dict or None, got {sampler_kwargs!r}.")
    subproc_vec_env = resolve_vec_env_cls(vec_env_cls) is GuardedSubprocVecEnv
    bounded_waits_only = subproc_vec_env and set(sampler_kwargs or {}) <= set(SUBPROC_VEC_ENV_ARGUMENTS)
    if sampler == "vec_env" and sampler_kwargs and not bounded_waits_only:
        takes = f"only {list(SUBPROC_VEC_ENV_ARGUMENTS)} with vec_env_cls=SubprocVecEnv" if subproc_vec_env else "none"
        raise ValueError(
            f"sampler_kwargs: sampler='vec_env' takes {takes} (got {sorted(sampler_kwargs)}); use sampler='subproc' or "
            "'ray' for num_workers."
        )
    for name in ("timeout", "close_timeout"):
        if name in (sampler_kwargs or {}):
            check_timeout(name, sampler_kwargs[name], allow_none=name == "timeout")
    unknown = sorted(set(sampler_kwargs or {}) - set(SHARDED_SAMPLER_ARGUMENTS)) if sampler != "vec_env" else []
    if unknown:
        raise ValueError(
            f"sampler_kwargs: unknown argument(s) {unknown} for sampler={sampler!r}; "
            f"valid keys: {list(SHARDED_SAMPLER_ARGUMENTS)}."
        )
    if sampler != "vec_env" and vec_env_cls is not None:
        raise ValueError(
            f"vec_env_cls: sampler={sampler!r} builds the sub-envs in its own workers; leave vec_env_cls unset."
        )
