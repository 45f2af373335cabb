"""Early, named errors for ``MetaPolicyGradient``'s arguments."""

import difflib
import importlib.util
import inspect
import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import torch as th

from sb3_metarl.common.baselines import make_baseline
from sb3_metarl.gradient_modes import GradientMode, make_gradient_mode
from sb3_metarl.meta_optimizers import MetaOptimizer, make_meta_optimizer
from sb3_metarl.samplers import SAMPLER_NAMES, EpisodeSampler, ShardedVecEnv
from sb3_metarl.samplers.processes import GuardedSubprocVecEnv, check_timeout, resolve_vec_env_cls
from sb3_metarl.samplers.runner import RUNNER_ARGUMENTS, check_runner_arguments

#: what ``sampler_kwargs`` may hold for "subproc" and "ray": ``ShardedVecEnv``'s arguments beyond those the
#: algorithm sets (the sub-envs, the groups, the horizon and the backend)
SHARDED_SAMPLER_ARGUMENTS = tuple(inspect.signature(ShardedVecEnv.__init__).parameters)[5:]
#: the ``sampler_kwargs`` of ``sampler="vec_env"`` with ``vec_env_cls=SubprocVecEnv`` (bounded waits)
SUBPROC_VEC_ENV_ARGUMENTS = ("timeout", "close_timeout")

#: ``inner_lr="auto"``: calibrate the inner step size on the first batch (see ``MetaPolicyGradient.calibrate_inner_lr``)
AUTO = "auto"


#: how a user with Dict observations gets a model that runs
DICT_OBSERVATION_HINT = (
    "flatten them into a Box with gymnasium.wrappers.FlattenObservation (e.g. env=lambda: "
    "FlattenObservation(gym.make(env_id))) and use 'MlpPolicy'."
)


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
    discount_from_start: Any,
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
    if not isinstance(discount_from_start, bool):
        raise ValueError(f"discount_from_start: must be True or False, got {discount_from_start!r}.")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed: must be None or an integer, got {seed!r}.")
    check_device(device)


def check_sample_reuse(inner_sample_reuse: Any, reuse_importance_clip: Any, mode: GradientMode | None) -> None:
    """
    :param mode: the gradient mode (None: check the two values alone)
    :raises ValueError: on a reuse count or clip out of range, or reuse with a mode that cannot importance-weight
    """
    if not (_is_int(inner_sample_reuse) and inner_sample_reuse >= 0):
        raise ValueError(f"inner_sample_reuse: must be an integer >= 0, got {inner_sample_reuse!r}.")
    if inner_sample_reuse and mode is not None and not mode.weighs_by_likelihood_ratio:
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
    :raises ValueError: on an unknown sampler, sampler_kwargs that are not a dict (or that "vec_env" does not take: it
        takes the runner's ``batched_physics`` and ``num_threads``, and with ``SubprocVecEnv`` its waits), bad runner
        arguments, or ``vec_env_cls`` with a sampler whose workers build their own sub-envs
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
    allowed = set(RUNNER_ARGUMENTS) | (set(SUBPROC_VEC_ENV_ARGUMENTS) if subproc_vec_env else set())
    if sampler == "vec_env" and not set(sampler_kwargs or {}) <= allowed:
        takes = list(RUNNER_ARGUMENTS) + (list(SUBPROC_VEC_ENV_ARGUMENTS) if subproc_vec_env else [])
        raise ValueError(
            f"sampler_kwargs: sampler='vec_env' takes only {takes} (got {sorted(sampler_kwargs)}); use sampler='subproc' "
            "or 'ray' for num_workers."
        )
    if sampler_kwargs:
        check_runner_arguments(sampler_kwargs.get("batched_physics", True), sampler_kwargs.get("num_threads"))
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


def check_model_choices(
    *,
    policy: Any,
    mode: GradientMode,
    normalize_advantage: bool,
    discount_from_start: bool,
    n_envs: int | None,
    meta_batch_size: int,
    task_sampler: Any,
    tensorboard_log: str | None,
    inner_sample_reuse: int = 0,
    reuse_importance_clip: float = 2.0,
) -> None:
    """:raises ValueError: (ImportError for TensorBoard) on choices that do not go together or cannot run here"""
    check_sample_reuse(inner_sample_reuse, reuse_importance_clip, mode)
    if normalize_advantage and not mode.supports_normalized_advantage:
        raise ValueError(
            f"normalize_advantage: mode {mode.name!r} uses raw rewards and cannot standardize them; "
            "use normalize_advantage=False, or 'loaded_dice' with gradient_mode_kwargs=dict(dice_lambda=1) "
            "(DiCE with a baseline)."
        )
    if not discount_from_start and not mode.supports_normalized_advantage:
        raise ValueError(
            f"discount_from_start: mode {mode.name!r} weighs raw discounted rewards, not advantages; use "
            "discount_from_start=True, or 'loaded_dice' with gradient_mode_kwargs=dict(dice_lambda=1)."
        )
    if n_envs is not None and n_envs % meta_batch_size != 0:
        raise ValueError(f"n_envs: must be a positive multiple of meta_batch_size={meta_batch_size}, got {n_envs}.")
    if task_sampler is not None and not callable(getattr(task_sampler, "sample", None)):
        raise ValueError(
            f"task_sampler: must be a TaskSampler (with sample(n, rng)), got {type(task_sampler).__name__}; for a "
            "fixed list of tasks use sb3_metarl.FixedTaskSampler(tasks)."
        )
    if tensorboard_log is not None and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(
            'tensorboard_log: TensorBoard is not installed; pip install "sb3_metarl[tensorboard]" (or pip install '
            "tensorboard), or leave tensorboard_log=None."
        )
    if policy == "MultiInputPolicy":
        raise ValueError(f"policy: 'MultiInputPolicy' (Dict observations) is not supported; {DICT_OBSERVATION_HINT}")


def policy_kwargs_for(
    policy_kwargs: dict[str, Any] | None, meta_updater: MetaOptimizer, meta_optimizer: Any
) -> dict[str, Any]:
    """
    :return: the policy's arguments with the meta-optimizer's torch optimizer class (Adam with eps 1e-5, as
        SB3's on-policy algorithms)
    :raises ValueError: if ``policy_kwargs`` asks for another optimizer class, or for gSDE
    """
    policy_kwargs = dict(policy_kwargs or {})
    optimizer_class = meta_updater.torch_optimizer_class
    if policy_kwargs.setdefault("optimizer_class", optimizer_class) is not optimizer_class:
        raise ValueError(
            f"policy_kwargs: optimizer_class={policy_kwargs['optimizer_class'].__name__} conflicts with "
            f"meta_optimizer={meta_optimizer!r}; set only one of them."
        )
    if optimizer_class is th.optim.Adam:
        policy_kwargs.setdefault("optimizer_kwargs", {"eps": 1e-5})
    if policy_kwargs.get("use_sde", False):
        raise ValueError("policy_kwargs: use_sde=True is not supported (the inner step needs plain Gaussian actions).")
    return policy_kwargs


#: the arguments that ``check_arguments`` checks one by one
SCALAR_ARGUMENTS = tuple(inspect.signature(check_arguments).parameters)


def check_each_argument(arguments: dict[str, Any]) -> tuple[MetaOptimizer, GradientMode]:
    """
    The checks of ``MetaPolicyGradient``'s arguments one at a time (those that need no other argument's value).

    :param arguments: every argument ``check_arguments`` takes, plus ``gradient_mode``, ``gradient_mode_kwargs``,
        ``meta_optimizer``, ``meta_optimizer_kwargs``, ``baseline``, ``sampler``, ``sampler_kwargs``, ``vec_env_cls``,
        ``inner_sample_reuse`` and ``reuse_importance_clip``
    :return: the meta-optimizer and the gradient mode they name
    :raises ValueError: naming the first argument of the wrong type or out of range, and what it accepts
    """
    check_arguments(**{name: arguments[name] for name in SCALAR_ARGUMENTS})
    check_sampler(arguments["sampler"], arguments["sampler_kwargs"], arguments["vec_env_cls"])
    meta_updater = make_meta_optimizer(arguments["meta_optimizer"], arguments["meta_optimizer_kwargs"])
    mode = make_gradient_mode(arguments["gradient_mode"], arguments["gradient_mode_kwargs"])
    make_baseline(arguments["baseline"])  # fail early on an unknown baseline
    check_sample_reuse(arguments["inner_sample_reuse"], arguments["reuse_importance_clip"], None)
    return meta_updater, mode


#: the model's attributes that ``check_model_choices`` checks together (beside the policy and the gradient mode)
COMBINED_ATTRIBUTES = tuple(inspect.signature(check_model_choices).parameters)[2:]


#: constructor arguments that ``load`` does not take as keyword arguments (it has arguments of its own for them)
NOT_LOAD_ARGUMENTS = ("self", "policy", "env", "device", "_init_setup_model")


def check_load_arguments(constructors: Sequence[Any], given: dict[str, Any]) -> dict[str, Any]:
    """
    ``load(path, env, **kwargs)``'s arguments, checked one by one as the constructor checks them (same messages), before
    anything is loaded; what needs the loaded model's other values is checked after (``check_model_choices``).

    :param constructors: the ``__init__`` of the algorithm's class and of its bases (their named parameters are what
        ``load`` may change: a subclass's own ``__init__(self, policy, env, **kwargs)`` adds none)
    :param given: the keyword arguments given to ``load``
    :return: the arguments as the model holds them (a gradient mode or meta-optimizer by name becomes the object,
        ``inner_lr`` a float unless "auto")
    :raises ValueError: on an argument that is not the constructor's (with the closest name) or that the
        constructor would refuse
    """
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = {
        name: parameter
        for constructor in reversed(constructors)
        for name, parameter in inspect.signature(constructor).parameters.items()
        if name not in NOT_LOAD_ARGUMENTS and parameter.kind in named
    }
    for name in given:
        if name not in parameters:
            close = difflib.get_close_matches(name, list(parameters), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{name}: not an argument of the model, so load cannot change it.{hint}")
    if "gradient_mode_kwargs" in given and "gradient_mode" not in given:
        raise ValueError("gradient_mode_kwargs: pass gradient_mode with it (the mode the arguments are for).")
    if "meta_optimizer_kwargs" in given and "meta_optimizer" not in given:
        raise ValueError("meta_optimizer_kwargs: pass meta_optimizer with it (the optimizer the arguments are for).")
    arguments = {name: p.default for name, p in parameters.items()} | {"device": "auto"} | given
    meta_updater, mode = check_each_argument(arguments)
    checked = dict(given)
    if "gradient_mode" in given:
        checked["gradient_mode"] = mode
    if "meta_optimizer" in given:
        checked["meta_optimizer"] = meta_updater
    for name in ("gamma", "gae_lambda", "reuse_importance_clip"):
        if name in given:
            checked[name] = float(given[name])
    for name in ("meta_batch_size", "inner_episodes", "outer_episodes", "inner_steps"):
        if name in given:
            checked[name] = int(given[name])
    if "inner_lr" in given and given["inner_lr"] != AUTO:
        checked["inner_lr"] = float(given["inner_lr"])
    return checked
