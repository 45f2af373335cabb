"""Early, named errors for ``MetaPolicyGradient``'s arguments."""

import math
from numbers import Integral, Real
from typing import Any

import torch as th

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
    dice_lambda: Any,
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
    for name, value in [("gae_lambda", gae_lambda), ("dice_lambda", dice_lambda)]:
        if not (_is_real(value) and 0.0 <= value <= 1.0):
            raise ValueError(f"{name}: must be a number in [0, 1], got {value!r}.")
    if not isinstance(normalize_advantage, bool):
        raise ValueError(f"normalize_advantage: must be True or False, got {normalize_advantage!r}.")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed: must be None or an integer, got {seed!r}.")
    check_device(device)


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
