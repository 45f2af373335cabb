"""Command-line interface: ``python -m sb3_metarl train|evaluate``."""

import argparse
import ast
import sys
import time
from collections.abc import Sequence
from typing import Any

from sb3_metarl.gradient_modes import GRADIENT_MODES
from sb3_metarl.hyperparams import default_hyperparams
from sb3_metarl.meta_optimizers import META_OPTIMIZERS
from sb3_metarl.meta_pg import MetaPolicyGradient, format_adaptation_table
from sb3_metarl.samplers import SAMPLER_NAMES

DEFAULT_ENV = "sb3_metarl/Navigation2D-v0"
#: the seed of the held-out evaluation tasks: ``train``'s final table and ``evaluate`` show the same numbers
EVAL_SEED = 0


def parse_hyperparams(pairs: Sequence[str]) -> dict[str, Any]:
    """
    :param pairs: ``key=value`` strings; values are Python literals where they parse as one, else strings
    :return: the keyword arguments
    """
    parsed = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hyperparams: expected key=value, got {pair!r}")
        try:
            parsed[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed[key] = value
    return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sb3_metarl",
        description="Meta-train a policy (train) or evaluate a saved one before and after adaptation (evaluate).",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="meta-train, then print returns before and after adaptation")
    train.add_argument("--env", default=DEFAULT_ENV, help="registered env id of a task family")
    train.add_argument("--gradient-mode", default="lsf", choices=sorted(GRADIENT_MODES))
    train.add_argument("--meta-optimizer", default=None, choices=sorted(META_OPTIMIZERS), help="default: the env's (adam)")
    train.add_argument("--timesteps", type=int, default=None, help="environment steps (default: per-env)")
    train.add_argument("--save-path", default=None, help="where to save the model (.zip)")
    train.add_argument("--hyperparams", nargs="*", default=[], metavar="KEY=VALUE", help="MetaPolicyGradient arguments")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-tasks", type=int, default=40, help="held-out tasks for the final table")
    train.add_argument("--eval-inner-steps", type=int, default=3)
    train.add_argument("--eval-seed", type=int, default=EVAL_SEED, help="seed of the held-out tasks (as evaluate's --seed)")
    train.add_argument("--no-progress-bar", action="store_true")
    train.add_argument("--verbose", type=int, default=0)
    train.add_argument("--device", default="auto")
    train.add_argument(
        "--sampler",
        default="vec_env",
        choices=list(SAMPLER_NAMES),
        help="vec_env (this process), subproc (worker processes), ray (Ray actors)",
    )
    train.add_argument("--num-workers", type=int, default=None, help="workers of --sampler subproc/ray (default: the cores)")

    evaluate = commands.add_parser("evaluate", help="returns of a saved model before and after adaptation")
    evaluate.add_argument("path", help="saved model (.zip)")
    evaluate.add_argument("--env", default=DEFAULT_ENV)
    evaluate.add_argument("--inner-steps", type=int, default=3)
    evaluate.add_argument("--n-tasks", type=int, default=40)
    evaluate.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the held-out tasks")
    evaluate.add_argument("--device", default="auto")
    return parser


def train(args: argparse.Namespace) -> MetaPolicyGradient:
    timesteps, kwargs = default_hyperparams(args.env)
    kwargs.update(parse_hyperparams(args.hyperparams))
    kwargs["gradient_mode"] = args.gradient_mode
    if args.meta_optimizer is not None:
        kwargs["meta_optimizer"] = args.meta_optimizer
    policy = kwargs.pop("policy", "MlpPolicy")
    if args.sampler != "vec_env":
        kwargs["sampler"] = args.sampler
        kwargs["sampler_kwargs"] = {**kwargs.get("sampler_kwargs", {}), "num_workers": args.num_workers}
    elif args.num_workers is not None:
        raise SystemExit("--num-workers: only with --sampler subproc or ray")
    model = MetaPolicyGradient(policy, args.env, seed=args.seed, verbose=args.verbose, device=args.device, **kwargs)
    before = model.evaluate_adaptation(n_tasks=args.eval_tasks, inner_steps=args.eval_inner_steps, seed=args.eval_seed)
    start = time.time()
    model.learn(args.timesteps or timesteps, progress_bar=not args.no_progress_bar)
    elapsed = time.time() - start
    after = model.evaluate_adaptation(n_tasks=args.eval_tasks, inner_steps=args.eval_inner_steps, seed=args.eval_seed)
    print(f"\n{args.env}, gradient mode {args.gradient_mode}: {model.num_timesteps} env steps in {elapsed:.0f} s")
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
    model = MetaPolicyGradient.load(args.path, env=args.env, device=args.device)
    table = model.evaluate_adaptation(n_tasks=args.n_tasks, inner_steps=args.inner_steps, seed=args.seed)
    print(f"{args.path} on {args.env}: mean return on {args.n_tasks} held-out tasks\n")
    print(format_adaptation_table(table))
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        train(args)
    else:
        evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
