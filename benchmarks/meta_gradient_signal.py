"""
How much of one meta-batch's meta-gradient is signal, per gradient mode, at a published run's setting.

At given parameters (the initial policy of a suite, or a run's checkpoint), each mode estimates the meta-gradient
from ``--batches`` independent meta-batches of the suite's size (40 tasks x 20 + 20 episodes for the SG-MRL suites;
other tasks and episodes in each batch, the same tasks for every mode), per task. With ``G`` one batch's per-task
estimates (B x d) and ``g`` their mean (the update's direction):

* ``between-batch cosine``: the cosine between two batches' ``g``. For independent ``g1 = m + e1``, ``g2 = m + e2``
  it estimates ``|m|^2 / E|g|^2``, the share of an update that is the expected meta-gradient ``m`` (near 0: the
  update is noise, and Adam's normalised steps are a random walk; 1: noise-free);
* ``within-batch share = max(0, |g|^2 - tr Cov(G) / B) / |g|^2``, the same share from one batch's spread (noisier);
* ``cosine to maml``: the cosine between the mode's ``g`` and ``maml``'s from the same tasks (other episodes),
  averaged over the batches.

    python benchmarks/meta_gradient_signal.py --suite sgmrl-dir --points initial sgmrl-dir_sf_adam_s0 \
        --out docs/results                                   # writes meta_gradient_signal.md / .jsonl
    python benchmarks/meta_gradient_signal.py --quick        # a smoke run (2 tasks, horizon 10), temporary folder

With ``--inner`` it measures the inner step instead (``inner_gradient_signal.md`` / ``.jsonl``): per mode, the share
of an N-episode inner gradient's squared norm that is signal (``sb3_metarl.meta_pg.inner_lr.signal_fraction`` of two
independent N-episode batches of the same tasks at the point's parameters) and its norm. A mode's inner step is the
plain policy gradient with its own weights (GAE advantages for ``maml``, ``lvc`` and ``sf``, the whole trajectory's
return for ``lsf``, causal returns for ``dice``), so this is how much one step of that mode adapts toward its task:

    python benchmarks/meta_gradient_signal.py --inner --suite sgmrl-dir --points initial sgmrl-dir_lsf_adam_s0 \
        sgmrl-dir_maml_adam_s0 --modes maml lvc lsf dice --out docs/results

Every process runs one torch thread and one physics thread; a point's checkpoint is read from
``<out>/runs/<run>/model.zip`` (read only: a run in progress is not disturbed).
"""

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import SUITES, make_model, suite_runs

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.estimators.study import flat_per_task_gradient, mode_named
from sb3_metarl.meta_pg.inner_lr import inner_direction, signal_fraction

MODES = ["sf", "maml", "lvc", "lsf"]


def signal(per_task: th.Tensor) -> dict[str, float]:
    """:param per_task: (B, d) per-task estimates :return: ``|g|``, the noise, the signal share"""
    n_tasks = len(per_task)
    mean = per_task.mean(0)
    squared = float(mean.pow(2).sum())
    noise = float(per_task.var(0).sum()) / n_tasks
    return {"norm": squared**0.5, "noise": noise, "signal_share": max(0.0, squared - noise) / max(squared, 1e-300)}


def measure_point(model: MetaPolicyGradient, modes: list[str], seed: int, batches: int = 2) -> list[dict[str, Any]]:
    """:return: one row per mode at ``model``'s parameters (per batch, the same tasks for every mode, fresh episodes)"""
    cosine = th.nn.functional.cosine_similarity
    saved = model.gradient_mode
    means: dict[str, list[th.Tensor]] = {mode: [] for mode in modes}
    within: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    seconds = dict.fromkeys(modes, 0.0)
    try:
        for batch in range(batches):
            tasks = model.sample_tasks(model.meta_batch_size, np.random.default_rng([seed, batch]))
            for mode in modes:
                model.gradient_mode = mode_named(saved, mode)
                start = time.perf_counter()
                per_task = flat_per_task_gradient(model.estimate_meta_gradient(tasks, per_task=True)).double().cpu()
                seconds[mode] += time.perf_counter() - start
                means[mode].append(per_task.mean(0))
                within[mode].append(signal(per_task))
    finally:
        model.gradient_mode = saved
    rows = []
    for mode in modes:
        row: dict[str, Any] = {
            "mode": mode,
            "norm": float(np.mean([batch["norm"] for batch in within[mode]])),
            "within_batch_share": float(np.mean([batch["signal_share"] for batch in within[mode]])),
            "seconds_per_batch": round(seconds[mode] / batches, 1),
        }
        if batches > 1:
            pairs = [(i, j) for i in range(batches) for j in range(i + 1, batches)]
            row["between_batch_cosine"] = float(np.mean([cosine(means[mode][i], means[mode][j], dim=0) for i, j in pairs]))
        if "maml" in means:
            row["cosine_to_maml"] = float(np.mean([cosine(g, m, dim=0) for g, m in zip(means[mode], means["maml"])]))
        rows.append(row)
    return rows


def measure_inner(model: MetaPolicyGradient, modes: list[str], seed: int) -> list[dict[str, Any]]:
    """
    :return: one row per mode: the signal share of its N-episode inner gradient at ``model``'s parameters (two
        independent batches of the same tasks, drawn from streams of their own: a run's streams are not touched)
        and the gradient's norm (root mean square over tasks)
    """
    tasks = model.sample_tasks(model.meta_batch_size, np.random.default_rng([seed, 0]))
    params = model.initial_task_params(len(tasks))
    stream_seed = int(np.random.SeedSequence([3, seed]).generate_state(1)[0])
    with model.streams.isolated(model.env, stream_seed) as generator:
        pair = [model.sample_episodes(tasks, params, model.inner_episodes, generator=generator) for _ in range(2)]
    rows = []
    for mode in modes:
        gradient_mode = mode_named(model.gradient_mode, mode)
        gradients = [inner_direction(model.functional_policy, gradient_mode, params, batch) for batch in pair]
        squared = sum(float(g.double().pow(2).sum()) for g in gradients[0].values()) / len(tasks)
        rows.append({"mode": mode, "inner_signal_share": signal_fraction(*gradients), "inner_norm": squared**0.5})
    return rows


def load_point(point: str, suite: str, out: str, quick: bool) -> tuple[MetaPolicyGradient, int | None]:
    """:return: the model at ``point`` ("initial": the suite's initial policy, seed 0; else a run's checkpoint)"""
    if point == "initial":
        run = suite_runs(suite, ["maml"], [0])[0]
        if quick:
            run.kwargs.update(meta_batch_size=2, inner_episodes=2, outer_episodes=2, max_episode_steps=10)
        return make_model(run, "vec_env", None), 0
    path = os.path.join(out, "runs", point, "model.zip")
    state = json.load(open(os.path.join(out, "runs", point, "run.json")))
    model = MetaPolicyGradient.load(path, env=state["config"]["env_id"], sampler_kwargs=dict(num_threads=1))
    return model, state["iterations_done"]


def rows_at_points(
    args: argparse.Namespace, out: str, measure: Callable[[MetaPolicyGradient], list[dict[str, Any]]]
) -> list[dict[str, Any]]:
    """:return: ``measure``'s rows at every point of ``args.points``, each with its suite, point and iteration"""
    rows = []
    for point in args.points:
        model, iteration = load_point(point, args.suite, out, args.quick)
        for row in measure(model):
            rows.append({"suite": args.suite, "point": point, "iteration": iteration, **row})
            print(json.dumps(rows[-1]), flush=True)
        model.get_env().close()
    return rows


def write_results(out: str, stem: str, rows: list[dict[str, Any]], lines: list[str]) -> None:
    """Write ``<out>/<stem>.jsonl`` (the rows) and ``<out>/<stem>.md`` (the page's lines)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{stem}.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(out, f"{stem}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"written to {out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", default="sgmrl-dir", choices=sorted(SUITES))
    parser.add_argument("--points", nargs="+", default=["initial"], help='"initial" and/or run names under <out>/runs')
    parser.add_argument("--modes", nargs="+", default=MODES)
    parser.add_argument("--seed", type=int, default=0, help="seed of the tasks drawn at every point")
    parser.add_argument("--batches", type=int, default=2, help="independent meta-batches per point and mode")
    parser.add_argument("--inner", action="store_true", help="measure the inner gradients (inner_gradient_signal.md)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    out = args.out or (tempfile.mkdtemp() if args.quick else "docs/results")
    th.set_num_threads(1)
    if args.inner:
        inner_main(args, out)
        return
    rows = rows_at_points(args, out, lambda model: measure_point(model, args.modes, args.seed, args.batches))
    lines = [
        "# How much of a meta-batch's meta-gradient is signal",
        "",
        f"`python benchmarks/meta_gradient_signal.py --suite {args.suite} --points {' '.join(args.points)} --modes "
        f"{' '.join(args.modes)} --seed {args.seed} --batches {args.batches}` (one torch thread, one physics thread). "
        f"Per point and mode, {args.batches} independent meta-batches at the suite's setting (the same tasks for every "
        "mode): |g| (the norm of a batch's mean estimate), the cosine between two batches' g (the share of an update "
        "that is the expected meta-gradient), the same share from one batch's spread, max(0, |g|^2 - tr Cov / B) / "
        "|g|^2, and the cosine to maml's g from the same tasks.",
        "",
        "| point | iteration | mode | abs g | between-batch cosine | within-batch share | cosine to maml |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]

    def cell(row: dict[str, Any], key: str) -> str:
        return f"{row[key]:.3f}" if key in row else "—"

    for row in rows:
        lines.append(
            f"| {row['point']} | {row['iteration']} | {row['mode']} | {row['norm']:.4g} | "
            f"{cell(row, 'between_batch_cosine')} | {cell(row, 'within_batch_share')} | {cell(row, 'cosine_to_maml')} |"
        )
    write_results(out, "meta_gradient_signal", rows, lines)


def inner_main(args: argparse.Namespace, out: str) -> None:
    rows = rows_at_points(args, out, lambda model: measure_inner(model, args.modes, args.seed))
    lines = [
        "# How much of an inner gradient is signal",
        "",
        f"`python benchmarks/meta_gradient_signal.py --inner --suite {args.suite} --points {' '.join(args.points)} "
        f"--modes {' '.join(args.modes)} --seed {args.seed}` (one torch thread, one physics thread). Per point, two "
        "independent batches of the suite's N episodes for each of its B tasks at the point's parameters (the same "
        "batches for every mode); per mode, the share of its inner gradient's squared norm that is signal (the "
        "agreement of the two batches' per-task gradients over their mean squared norm) and the gradient's norm "
        "(root mean square over tasks). A mode's inner step is a plain policy gradient with its own weights: GAE "
        "advantages for maml, lvc and sf (the same inner step), the trajectory's return for lsf, causal returns for "
        "dice.",
        "",
        "| point | iteration | mode | inner signal share | inner gradient norm |",
        "|---|---:|---|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['point']} | {row['iteration']} | {row['mode']} | {row['inner_signal_share']:.3f} | "
            f"{row['inner_norm']:.4g} |"
        )
    write_results(out, "inner_gradient_signal", rows, lines)


if __name__ == "__main__":
    main()
