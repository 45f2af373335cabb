"""Command-line interface: ``python -m sb3_metarl train|evaluate``."""

import argparse
import ast
import difflib
import inspect
import sys
import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym

from sb3_metarl.gradient_modes import GRADIENT_MODES
from sb3_metarl.hyperparams import default_hyperparams
from sb3_metarl.meta_optimizers import META_OPTIMIZERS
from sb3_metarl.meta_pg import MetaPolicyGradient, format_adaptation_table
from sb3_metarl.samplers import SAMPLER_NAMES

DEFAULT_ENV = "sb3_metarl/Navigation2D-v0"
#: the seed of the held-out evaluation tasks: ``train``'s final table and ``evaluate`` show the same numbers
EVAL_SEED = 0


class CliError(ValueError):
    """An error in the command's arguments: printed as ``error: ...``, exit status 2 (as argparse's own)."""


#: what ``--hyperparams`` may set: MetaPolicyGradient's arguments (the command sets env, seed, verbose and device)
HYPERPARAMETERS = [name for name in inspect.signature(MetaPolicyGradient.__init__).parameters if name not in ("self", "env")]
#: characters of a Python literal's syntax: a value holding one of them that does not parse is a typo, not a string
LITERAL_SYNTAX = set("{}[]()'\",:")


def parse_hyperparams(pairs: Sequence[str]) -> dict[str, Any]:
    """
    :param pairs: ``key=value`` strings; values are Python literals where they parse as one, else strings (a value
        with brackets, quotes, commas or colons must parse)
    :return: the keyword arguments
    :raises CliError: on a pair without ``=``, a key that is not an argument of MetaPolicyGradient (with the closest
        one), or a value that looks like a literal but does not parse
    """
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--hyperparams: expected key=value, got {pair!r}")
        if key not in HYPERPARAMETERS:
            close = difflib.get_close_matches(key, HYPERPARAMETERS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; the arguments are {', '.join(HYPERPARAMETERS)}"
            raise CliError(f"--hyperparams: {key!r} is not an argument of MetaPolicyGradient{hint}")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as error:
            if LITERAL_SYNTAX & set(value):
                raise CliError(
                    f"--hyperparams: the value of {key} is not a Python literal ({type(error).__name__}: {error}): "
                    f"{value!r}; quote the whole pair for the shell, e.g. \"policy_kwargs={{'net_arch': [64, 64]}}\""
                ) from None
            parsed[key] = value
    return parsed


def checked_env_id(env_id: str) -> str:
    """
    :return: ``env_id`` if Gymnasium knows it (the ``module:id`` form imports the module first)
    :raises CliError: naming the built-in id it may have meant (the families are in the ``sb3_metarl/`` namespace)
    """
    if ":" in env_id or env_id in gym.registry:
        return env_id
    ours = sorted(name for name in gym.registry if name.startswith("sb3_metarl/"))
    if f"sb3_metarl/{env_id}" in gym.registry:
        raise CliError(f"--env: {env_id!r} is not registered; the built-in task families are in the sb3_metarl namespace: "
                       f"did you mean 'sb3_metarl/{env_id}'?")  # fmt: skip
    close = difflib.get_close_matches(env_id, ours, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise CliError(
        f"--env: {env_id!r} is not registered; {hint}the built-in task families are {', '.join(ours)} (an env of "
        "another package: 'package.module:env-id' imports the module first)"
    )


def merge_hyperparams(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """
    :return: ``defaults`` updated by ``given``; where both hold a dict (``policy_kwargs``, ``env_kwargs``, ...) the two
        are merged, so ``policy_kwargs={'net_arch': [8]}`` keeps the env's default ``log_std_init``
    """
    merged = dict(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


EXAMPLES = """examples:
  python -m sb3_metarl train
  python -m sb3_metarl train --env sb3_metarl/HalfCheetahVel-v0 --gradient-mode lvc --meta-optimizer trpo \\
      --timesteps 2000000 --save-path cheetah.zip --hyperparams inner_steps=2 "policy_kwargs={'net_arch': [100, 100]}"
  python -m sb3_metarl evaluate cheetah.zip --inner-steps 3
"""


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an argument's default, unless it has none worth showing (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == [] or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_metarl",
        description="Meta-train a policy (train) or evaluate a saved one before and after adaptation (evaluate).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    formatter = _DefaultsHelpFormatter
    train = commands.add_parser(
        "train",
        help="meta-train, then print returns before and after adaptation",
        description="Meta-train with MetaPolicyGradient (per-env defaults from sb3_metarl/hyperparams.py, printed before "
        "training), then print the mean return on held-out tasks before and after 1..K inner steps.",
        formatter_class=formatter,
    )
    train.add_argument(
        "--env", default=DEFAULT_ENV, help="env id of a task family (sb3_metarl/...; 'module:id' imports module first)"
    )
    train.add_argument(
        "--gradient-mode",
        default=None,
        choices=sorted(GRADIENT_MODES),
        help="meta-gradient estimator (default: the env's, or lsf)",
    )
    train.add_argument(
        "--meta-optimizer", default=None, choices=sorted(META_OPTIMIZERS), help="default: the env's (adam; trpo for MuJoCo)"
    )
    train.add_argument("--timesteps", type=int, default=None, help="environment steps (default: per-env)")
    train.add_argument("--save-path", default=None, help="where to save the model (.zip)")
    train.add_argument(
        "--hyperparams",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="MetaPolicyGradient arguments as Python literals, merged into the env's defaults (dicts key by key)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of the run")
    train.add_argument("--eval-tasks", type=int, default=40, help="held-out tasks for the final table")
    train.add_argument("--eval-inner-steps", type=int, default=3, help="inner steps of the final table (0..K)")
    train.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the held-out tasks (as evaluate's --seed)")
    train.add_argument("--no-progress-bar", action="store_true", help="no progress bar")
    train.add_argument("--verbose", type=int, default=0, help="0: quiet, 1: SB3's training logs")
    train.add_argument("--device", default="auto", help="torch device of the policy and the meta-update")
    train.add_argument(
        "--sampler",
        default="vec_env",
        choices=list(SAMPLER_NAMES),
        help="vec_env (this process), subproc (worker processes), ray (Ray actors)",
    )
    train.add_argument("--num-workers", type=int, default=None, help="workers of --sampler subproc/ray (default: the cores)")

    evaluate = commands.add_parser(
        "evaluate",
        help="returns of a saved model before and after adaptation",
        description="Evaluate a saved model before and after adaptation. Loading a zip unpickles its data (SB3's format): "
        "evaluate only files you trust (MetaPolicyGradient.load_parameters reads a file's tensors only).",
        formatter_class=formatter,
    )
    evaluate.add_argument("path", help="saved model (.zip)")
    evaluate.add_argument("--env", default=None, help="env id (default: the one the model was trained on)")
    evaluate.add_argument("--inner-steps", type=int, default=3, help="inner steps (0..K)")
    evaluate.add_argument("--n-tasks", type=int, default=40, help="held-out tasks")
    evaluate.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out tasks")
    evaluate.add_argument("--device", default="auto", help="torch device")
    return parser


def train(args: argparse.Namespace) -> MetaPolicyGradient:
    checked_env_id(args.env)
    timesteps, kwargs = default_hyperparams(args.env)
    kwargs = merge_hyperparams(kwargs, parse_hyperparams(args.hyperparams))
    if args.gradient_mode is not None:
        kwargs["gradient_mode"] = args.gradient_mode
    kwargs.setdefault("gradient_mode", "lsf")
    if args.meta_optimizer is not None:
        kwargs["meta_optimizer"] = args.meta_optimizer
    policy = kwargs.pop("policy", "MlpPolicy")
    if args.sampler != "vec_env":
        kwargs["sampler"] = args.sampler
        kwargs["sampler_kwargs"] = {**kwargs.get("sampler_kwargs", {}), "num_workers": args.num_workers}
    elif args.num_workers is not None:
        raise CliError("--num-workers: only with --sampler subproc or ray")
    effective = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    print(f"MetaPolicyGradient({policy!r}, {args.env!r}, seed={args.seed}, {effective})", flush=True)
    model = MetaPolicyGradient(policy, args.env, seed=args.seed, verbose=args.verbose, device=args.device, **kwargs)
    print(
        f"Evaluating the initial policy on {args.eval_tasks} held-out tasks (0..{args.eval_inner_steps} inner steps)...",
        flush=True,
    )
    before = model.evaluate_adaptation(n_tasks=args.eval_tasks, inner_steps=args.eval_inner_steps, seed=args.eval_seed)
    start = time.time()
    model.learn(args.timesteps or timesteps, progress_bar=not args.no_progress_bar)
    elapsed = time.time() - start
    print(f"Evaluating the meta-trained policy on the same {args.eval_tasks} tasks...", flush=True)
    after = model.evaluate_adaptation(n_tasks=args.eval_tasks, inner_steps=args.eval_inner_steps, seed=args.eval_seed)
    print(f"\n{args.env}, gradient mode {kwargs['gradient_mode']}: {model.num_timesteps} env steps in {elapsed:.0f} s")
    print(f"Mean return on {args.eval_tasks} held-out tasks (std over tasks):\n")
    print("| inner steps | before meta-training | after meta-training |")
    print("|---:|---:|---:|")
    for steps in before["inner_steps"]:
        print(
            f"| {steps} | {before['mean'][steps]:.2f} ({before['std'][steps]:.2f}) "
            f"| {after['mean'][steps]:.2f} ({after['std'][steps]:.2f}) |"
        )
    if args.save_path:
        model.save(args.save_path)
        print(f"\nsaved to {args.save_path}")
    return model


def evaluate(args: argparse.Namespace) -> dict:
    if args.env is not None:
        checked_env_id(args.env)
    model = MetaPolicyGradient.load(args.path, device=args.device)
    env = args.env or getattr(model, "env_id", None)
    if env is None:
        raise CliError(f"--env: {args.path} was trained on an env given as an object, not an id; pass --env ENV_ID.")
    model.set_env(env)
    table = model.evaluate_adaptation(n_tasks=args.n_tasks, inner_steps=args.inner_steps, seed=args.seed)
    print(f"{args.path} on {env}: mean return on {args.n_tasks} held-out tasks\n")
    print(format_adaptation_table(table))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    """:return: the exit status (2 after an error in the arguments, the files or the env, printed without a traceback)"""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        else:
            evaluate(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, gym.error.Error) as error:
        if args.traceback:
            raise
        print(f"error: {error}\n(run with --traceback for the full traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
