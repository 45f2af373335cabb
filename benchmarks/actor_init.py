"""
The actor's initialization at a published suite's setting: SB3's (orthogonal, gain 0.01 on the action head) against the
papers' codes' (Xavier-uniform weights, zero biases: ``MlpPolicy(actor_init="xavier_uniform")``), the same seeds and
batches otherwise, for a few meta-iterations (a pilot: the tasks per meta-batch can be cut with ``--meta-batch-size``).
Writes ``<out>/actor_init_<suite>.md`` (the training tasks' return before and after the inner step along the runs) and
``<out>/actor_init_<suite>.json``.

    python benchmarks/actor_init.py --suite sgmrl-swimmer --iterations 40 --meta-batch-size 10 --seeds 0 --out docs/results
"""

import argparse
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import SUITES, make_model, suite_runs, write_atomically

#: the two initializations compared, by their table label
INITS: dict[str, str | None] = {"SB3 (orthogonal)": None, "Xavier uniform (papers' codes)": "xavier_uniform"}


def returns_along(suite: str, actor_init: str | None, seed: int, iterations: int, meta_batch_size: int | None) -> list[dict]:
    """:return: per meta-iteration, the mean return of the training tasks' inner (before) and outer (after) episodes"""
    from stable_baselines3.common.callbacks import BaseCallback

    (run,) = suite_runs(suite, ["maml"], [seed], actor_init=actor_init)
    if meta_batch_size is not None:
        run.kwargs["meta_batch_size"] = meta_batch_size
    model = make_model(run, "vec_env", None, 1)
    rows: list[dict[str, Any]] = []

    class Record(BaseCallback):
        def _on_rollout_end(self) -> None:
            sample = self.locals["sample"]
            rows.append(
                {
                    "iteration": len(rows) + 1,
                    "before": round(sample.inner_batches[0].episode_returns.mean().item(), 3),
                    "after": round(sample.outer_batch.episode_returns.mean().item(), 3),
                }
            )

        def _on_step(self) -> bool:
            return True

    steps_per_iteration = run.steps_per_iteration
    model.learn(iterations * steps_per_iteration, callback=Record())
    model.get_env().close()
    return rows[:iterations]


def table(results: dict[str, dict[int, list[dict]]], checkpoints: list[int]) -> str:
    """:return: Markdown: the return after the inner step at ``checkpoints`` (mean of the 5 iterations up to each)"""
    lines = [
        "| initialization | seed | " + " | ".join(f"it. {c}" for c in checkpoints) + " |",
        "|---|---:|" + "---:|" * len(checkpoints),
    ]
    for label, by_seed in results.items():
        for seed, rows in by_seed.items():
            cells = []
            for checkpoint in checkpoints:
                window = [row["after"] for row in rows if checkpoint - 5 < row["iteration"] <= checkpoint]
                cells.append(f"{sum(window) / len(window):.1f}" if window else "—")
            lines.append(f"| {label} | {seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--meta-batch-size", type=int, default=None, help="tasks per meta-batch (default: the suite's)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)

    import torch as th

    th.set_num_threads(args.threads)
    results = {
        label: {seed: returns_along(args.suite, init, seed, args.iterations, args.meta_batch_size) for seed in args.seeds}
        for label, init in INITS.items()
    }
    checkpoints = sorted({min(c, args.iterations) for c in (5, 10, 20, 40, args.iterations)})
    batch = args.meta_batch_size or suite_runs(args.suite, ["maml"], [0])[0].kwargs["meta_batch_size"]
    text = (
        f"# The actor's initialization, `{args.suite}`\n\n"
        f"`python benchmarks/actor_init.py --suite {args.suite} --iterations {args.iterations} --seeds "
        f"{' '.join(map(str, args.seeds))}" + (f" --meta-batch-size {args.meta_batch_size}" if args.meta_batch_size else "")
        + f" --out {args.out}`\n\n"
        f"`maml` + the suite's meta-optimizer at the suite's setting, {batch} tasks per meta-batch, {args.threads} torch "
        "thread(s). The training tasks' mean return after the inner step (the outer episodes), averaged over the 5 "
        "meta-iterations up to each column's.\n\n" + table(results, checkpoints) + "\n"
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    write_atomically(os.path.join(args.out, f"actor_init_{args.suite}.md"), text)
    write_atomically(os.path.join(args.out, f"actor_init_{args.suite}.json"), json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
