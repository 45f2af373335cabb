"""
Meta-World ML1, ML10 and ML45 at metaworld-algorithms' MAML-TRPO configuration (docs/results/metaworld.md has it, cited
by file and line), in the published-budget runner's resumable sittings (``reproduce_published.run_sitting``: a
checkpoint every ``--checkpoint-every`` meta-iterations, continued bit for bit when the command is run again).

Suites (``--meta-optimizer ppo --modes lvc`` runs ProMP at the same setting and budget):

* ``ml10``: 20 tasks of ML10's 10 training classes x (10 inner + 10 outer) episodes of 500 steps, 100 meta-iterations
  (2e7 env steps), 512 x 512 tanh policy, gamma 0.99, GAE lambda 1.0, standardized advantages, one inner step of 0.1 on
  the mean over steps, TRPO (max KL 0.01, 10 CG iterations, backtracking 0.8 x 15).
* ``ml45``: the same with 45 tasks, 200 meta-iterations (9e7 env steps).
* ``ml1-reach``, ``ml1-push``, ``ml1-pick-place``: ML1 with 10 tasks, 20 meta-iterations (2e6 env steps).

Every ``--eval-every`` iterations, ``evals.jsonl`` gets the return and success rate after 0 and 1 inner steps on
``EVAL_TASKS`` test tasks and as many training tasks (sampled actions, whole episodes; fixed tasks and seeds).
``--final-eval`` runs Meta-World's own protocol on a finished run (every task-goal pair of the test split once, the
evaluation episodes counted per sub-env: ``metaworld_evaluation``) and writes ``final_eval.json``. A finished run is
appended to ``<out>/metaworld_runs.jsonl`` (``benchmark``, ``mode``, ``meta_optimizer``, ``seed``, ``env_steps``,
``train_success``, ``test_success``, ``best_test_success``, ``fixes``, ``paper``).

``--actor-init xavier_uniform`` initializes the policy as the configuration does (Xavier-uniform layers, zero biases:
``maml_trpo_ml10.py:55-63``), a run of its own (``_xavier``); without it, SB3's initialization (the first runs').

    python benchmarks/reproduce_metaworld.py --suite ml10 --modes maml --seeds 0 --actor-init xavier_uniform --out docs/results
"""

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import (
    ACTOR_INITS,
    TRPO_KWARGS,
    PublishedRun,
    append_jsonl,
    read_jsonl,
    read_run,
    run_sitting,
    sampler_kwargs_for,
    update_page,
    write_atomically,
    write_jsonl,
)

#: the held-out evaluation during training: tasks per split, inner steps, seed (fixed for every run and checkpoint)
EVAL_TASKS, EVAL_STEPS, EVAL_SEED = 20, 1, 1000
#: metaworld-algorithms' MAML-TRPO (examples/meta_learning/maml_trpo_ml10.py and its siblings)
MAML_TRPO = dict(
    inner_episodes=10,
    outer_episodes=10,
    inner_steps=1,
    inner_lr=0.1 / 500,  # 0.1 on the mean over a task's steps; our inner loss sums over an episode's 500 steps
    gamma=0.99,
    gae_lambda=1.0,
    normalize_advantage=True,
    discount_from_start=False,
    max_episode_steps=500,
    policy_kwargs=dict(net_arch=[512, 512]),
)
#: suite -> (benchmark, ML1's env name, tasks per meta-batch, meta-iterations, sub-envs per task)
#: (ML10 and ML45 keep 5 sub-envs per task, episodes in 2 waves: 200 Meta-World sub-envs hold about 8 GB)
SUITES: dict[str, tuple[str, str | None, int, int, int]] = {
    "ml10": ("ML10", None, 20, 100, 5),
    "ml45": ("ML45", None, 45, 200, 5),
    "ml1-reach": ("ML1", "reach-v3", 10, 20, 10),
    "ml1-push": ("ML1", "push-v3", 10, 20, 10),
    "ml1-pick-place": ("ML1", "pick-place-v3", 10, 20, 10),
}
#: the Meta-World bugs this library handles, as the runs use them (docs/tasks.md)
FIXES = {"count_per_sub_env": True, "PR_573_test_goals_apart": True, "PR_575_checked_inert": True, "mujoco": "3.3.x"}


def suite_runs(
    suite: str, modes: list[str], seeds: list[int], meta_optimizer: str = "trpo", actor_init: str | None = None
) -> list[PublishedRun]:
    """
    :param actor_init: ``MlpPolicy``'s ``actor_init``: None (SB3's initialization) or ``"xavier_uniform"``, the
        configuration's (``maml_trpo_ml10.py:55-63``: Xavier-uniform kernels, zero biases, head included); a run of its
        own (``_xavier``)
    :return: the runs of ``suite`` (all modes of a seed before the next seed)
    """
    if suite not in SUITES:
        raise ValueError(f"--suite: unknown suite {suite!r}; use one of {sorted(SUITES)}.")
    benchmark, env_name, tasks, iterations, sub_envs_per_task = SUITES[suite]
    env_kwargs = {"seed": 0} if env_name is None else {"env_name": env_name, "seed": 0}
    kwargs = dict(MAML_TRPO, meta_batch_size=tasks, n_envs=tasks * sub_envs_per_task, env_kwargs=env_kwargs)
    if meta_optimizer == "trpo":
        kwargs["meta_optimizer_kwargs"] = TRPO_KWARGS
    else:
        kwargs["learning_rate"] = 1e-3  # ProMP's and Adam's step size
    if actor_init is not None:
        kwargs["policy_kwargs"] = {**kwargs["policy_kwargs"], "actor_init": actor_init}
    env_id = f"sb3_metarl/MetaWorld{benchmark}-v0"
    return [
        PublishedRun(suite, env_id, mode, meta_optimizer, seed, iterations, dict(kwargs)) for seed in seeds for mode in modes
    ]


ALL_MODES = ["maml", "lvc", "dice", "loaded_dice", "lsf", "sf", "fomaml"]


def existing_runs(out: str) -> list[PublishedRun]:
    """:return: every run of every suite (the modes and meta-optimizers this runner takes, seeds 0-3) with a checkpoint in
    ``out``"""
    return [
        run
        for suite in SUITES
        for meta_optimizer in ("trpo", "ppo", "adam")
        for actor_init in ACTOR_INITS
        for run in suite_runs(suite, ALL_MODES, [0, 1, 2, 3], meta_optimizer, actor_init)
        if os.path.exists(os.path.join(out, "runs", run.name, "run.json"))
    ]


def benchmark_of(run: PublishedRun) -> tuple[str, str | None]:
    """:return: the run's Meta-World benchmark and ML1's env name"""
    benchmark, env_name = SUITES[run.suite][:2]
    return benchmark, env_name


def success_evaluation(run: PublishedRun):
    """:return: ``run_sitting``'s evaluation: returns and success rates on fixed test and training tasks"""
    from sb3_metarl.tasks.meta_world import MetaWorldTaskSampler

    benchmark, env_name = benchmark_of(run)
    test_tasks = MetaWorldTaskSampler(benchmark, env_name, split="test").sample(EVAL_TASKS, np.random.default_rng(EVAL_SEED))

    def evaluate(model) -> dict[str, Any]:
        test = model.evaluate_adaptation(tasks=test_tasks, inner_steps=EVAL_STEPS, seed=EVAL_SEED)
        train = model.evaluate_adaptation(n_tasks=EVAL_TASKS, inner_steps=EVAL_STEPS, seed=EVAL_SEED)
        rounded = lambda values: [round(float(value), 4) for value in values]  # noqa: E731
        return {
            "returns": rounded(test["mean"]),
            "success_rates": rounded(test["success_rate"]),
            "train_returns": rounded(train["mean"]),
            "train_success_rates": rounded(train["success_rate"]),
        }

    return evaluate


def metaworld_record(run: PublishedRun, finished: dict[str, Any], evals: list[dict], final: dict | None) -> dict[str, Any]:
    """:return: the run's line of ``metaworld_runs.jsonl`` (the issue's fields; success after one inner step)"""
    benchmark, env_name = benchmark_of(run)
    last = evals[-1] if evals else None
    return {
        "name": run.name,
        "benchmark": benchmark,
        "env_name": env_name,
        "mode": run.gradient_mode,
        "meta_optimizer": run.meta_optimizer,
        "actor_init": run.actor_init,  # None: SB3's initialization; "xavier_uniform": the configuration's
        "seed": run.seed,
        "env_steps": finished["env_steps"],
        "train_success": last["train_success_rates"][EVAL_STEPS] if last else None,
        # Meta-World's protocol on the whole test split when the run has its final evaluation, else the last sampled one
        "test_success": final["success_rate"] if final else (last["success_rates"][EVAL_STEPS] if last else None),
        "test_success_protocol": final is not None,
        "best_test_success": max(row["success_rates"][EVAL_STEPS] for row in evals) if evals else None,
        "fixes": FIXES,
        "paper": None,
        "wall_seconds": finished["wall_seconds"],
    }


def refresh_record(records_path: str, out: str, run: PublishedRun) -> None:
    """Rewrite ``run``'s line of ``records_path`` from its folder (after its final evaluation), if it has one."""
    files = read_run(out, run)
    rows = read_jsonl(records_path) if os.path.exists(records_path) else []
    if files is None or not any(row["name"] == run.name for row in rows):
        return
    state, curve, evals, final = files
    finished = {"env_steps": curve[-1]["env_steps"] if curve else 0, "wall_seconds": state["wall_seconds"]}
    record = metaworld_record(run, finished, evals, final)
    write_jsonl(records_path, [record if row["name"] == run.name else row for row in rows])


def final_evaluation(run: PublishedRun, out: str, physics_threads: int = 1) -> dict[str, Any] | None:
    """Meta-World's protocol on a finished run's last checkpoint (``final_eval.json``); None if it has not finished."""
    from sb3_metarl import MetaPolicyGradient
    from sb3_metarl.meta_pg.metaworld import metaworld_evaluation

    files = read_run(out, run)
    if files is None or files[0]["iterations_done"] < run.iterations:
        return None
    folder = os.path.join(out, "runs", run.name)
    benchmark, env_name = benchmark_of(run)
    model = MetaPolicyGradient.load(os.path.join(folder, "model.zip"), env=run.env_id,
                                    sampler_kwargs=sampler_kwargs_for("vec_env", None, physics_threads))  # fmt: skip
    try:
        result = metaworld_evaluation(
            model, benchmark, env_name, seed=EVAL_SEED, meta_batch_size=run.kwargs["meta_batch_size"],
            max_episode_steps=run.kwargs["max_episode_steps"],
        )  # fmt: skip
    finally:
        model.get_env().close()
    write_atomically(os.path.join(folder, "final_eval.json"), json.dumps(result, indent=1))
    return result


def summarize(out: str, runs: list[PublishedRun]) -> str:
    """:return: a Markdown table of every run with a checkpoint: iterations, env steps, success after one inner step"""
    lines = [
        "| run | iterations | env steps | train success | test success (last / best) | protocol test success |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        files = read_run(out, run)
        if files is None:
            continue
        state, curve, evals, final = files
        protocol = f"{final['success_rate']:.3f}" if final else "—"
        last = evals[-1] if evals else None
        test = (
            f"{last['success_rates'][EVAL_STEPS]:.3f} / {max(e['success_rates'][EVAL_STEPS] for e in evals):.3f}"
            if last
            else "—"
        )
        train = f"{last['train_success_rates'][EVAL_STEPS]:.3f}" if last else "—"
        steps = curve[-1]["env_steps"] if curve else 0
        lines.append(
            f"| {run.name} | {state['iterations_done']} of {run.iterations} | {steps:.3g} | {train} | {test} | {protocol} |"
        )
    return "\n".join(lines)


#: the page's block of every evaluation (rewritten by every invocation of this script, ``--summarize-only`` included)
EVALS_START = "<!-- evaluations: written by benchmarks/reproduce_metaworld.py -->"
EVALS_END = "<!-- end of evaluations -->"


def _success(before: float, after: float) -> str:
    return f"{before:.3f} → {after:.3f}"


def evaluations_by_suite(out: str, runs: list[PublishedRun]) -> dict[str, dict[str, list[dict]]]:
    """:return: suite -> run name -> the run's evaluations up to its last checkpoint (runs without any left out)"""
    by_suite: dict[str, dict[str, list[dict]]] = {}
    for run in runs:
        files = read_run(out, run)
        if files is not None and files[2]:
            by_suite.setdefault(run.suite, {})[run.name] = files[2]
    return by_suite


def evaluations_table(by_suite: dict[str, dict[str, list[dict]]]) -> str:
    """
    :param by_suite: ``evaluations_by_suite``'s
    :return: Markdown, one table per suite: at each evaluation (rows) of each run (columns), the success rate before and
        after one inner step on the fixed test tasks and on as many training tasks
    """
    sections = []
    for suite, by_run in by_suite.items():
        evals = {name: {row["iteration"]: row for row in rows} for name, rows in by_run.items()}
        iterations = sorted({iteration for rows in evals.values() for iteration in rows})
        lines = [
            f"**{suite}**: success rate before → after {EVAL_STEPS} inner step, test tasks / training tasks "
            f"({EVAL_TASKS} each, fixed)",
            "",
            "| iteration | env steps | " + " | ".join(f"`{name}`" for name in evals) + " |",
            "|---:|---:|" + "---|" * len(evals),
        ]
        for iteration in iterations:
            cells, steps = [], None
            for rows in evals.values():
                row = rows.get(iteration)
                if row is None:
                    cells.append("")
                    continue
                steps = row["env_steps"]
                test, train = row["success_rates"], row["train_success_rates"]
                cells.append(f"{_success(test[0], test[EVAL_STEPS])} / {_success(train[0], train[EVAL_STEPS])}")
            lines.append(f"| {iteration} | {steps:.3g} | " + " | ".join(cells) + " |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) if sections else "(no evaluation yet)"


def plot_success(by_suite: dict[str, dict[str, list[dict]]], path: str) -> None:
    """Success rate against env steps, one panel per suite (``evaluations_by_suite``'s): the test tasks after one inner
    step (solid) and before it (dotted), the training tasks after it (dashed), a colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(by_suite), figsize=(6 * len(by_suite), 4), squeeze=False)
    for ax, (suite, by_run) in zip(axes[0], by_suite.items()):
        for name, evals in by_run.items():
            steps = [row["env_steps"] for row in evals]
            line = ax.plot(steps, [row["success_rates"][EVAL_STEPS] for row in evals], "o-", ms=3, label=name)[0]
            ax.plot(steps, [row["success_rates"][0] for row in evals], ":", color=line.get_color())
            ax.plot(steps, [row["train_success_rates"][EVAL_STEPS] for row in evals], "--", color=line.get_color())
        ax.set(title=f"{suite}: test after 1 step (solid), before (dotted); training after (dashed)", xlabel="env steps",
               ylabel="success rate", ylim=(-0.02, 1.02))  # fmt: skip
        ax.title.set_fontsize(9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_summaries(out: str) -> str:
    """Rewrite the evaluations' block of ``<out>/metaworld.md`` and ``<out>/metaworld_success.png`` from every run in
    ``out``; :return: the block"""
    by_suite = evaluations_by_suite(out, existing_runs(out))  # each run's files read once, for the table and the figure
    table = evaluations_table(by_suite)
    update_page(os.path.join(out, "metaworld.md"), table, EVALS_START, EVALS_END)
    if by_suite:
        plot_success(by_suite, os.path.join(out, "metaworld_success.png"))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--modes", nargs="+", default=["maml"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--meta-optimizer", default="trpo", choices=["trpo", "ppo", "adam"])
    parser.add_argument("--actor-init", default=None, choices=ACTOR_INITS[1:],
                        help="the actor's initialization (default: SB3's); xavier_uniform: the configuration's")  # fmt: skip
    parser.add_argument("--checkpoint-every", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=5, help="meta-iterations between evaluations (1M env steps on ML10)")
    parser.add_argument("--sampler", default="vec_env", choices=["vec_env", "subproc", "ray"])
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the learner")
    parser.add_argument("--stop-after", type=int, default=None, help="end this sitting after this many iterations in all")
    parser.add_argument("--final-eval", action="store_true", help="Meta-World's protocol on the finished runs")
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)

    import torch as th

    th.set_num_threads(args.threads)
    runs = suite_runs(args.suite, args.modes, args.seeds, args.meta_optimizer, args.actor_init)
    records_path = os.path.join(args.out, "metaworld_runs.jsonl")
    os.makedirs(args.out, exist_ok=True)
    for run in runs:
        if args.summarize_only:
            break
        if args.final_eval:
            final = final_evaluation(run, args.out)
            if final is not None:
                refresh_record(records_path, args.out, run)  # its test success is now the protocol's
                print(run.name, json.dumps(final), flush=True)
            continue
        if any(row["name"] == run.name for row in read_jsonl(records_path)):
            continue
        finished = run_sitting(run, args.out, args.checkpoint_every, args.eval_every, args.sampler, args.num_workers,
                               args.stop_after, evaluation=success_evaluation(run))  # fmt: skip
        if finished is None:
            break
        _, _, evals, final = read_run(args.out, run)
        append_jsonl(records_path, metaworld_record(run, finished, evals, final))
        print(json.dumps(read_jsonl(records_path)[-1]), flush=True)
    print(summarize(args.out, runs))
    print(write_summaries(args.out))


if __name__ == "__main__":
    main()
