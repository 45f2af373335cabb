"""
The batched twins of the MuJoCo task families against the per-env step, in one run with alternating rounds.

Two measurements per family of ``--envs`` (default: HalfCheetahDir, AntDir, Walker2dVel, HopperRandParams, all with
``action_scale=10``), each as steps per second and as the ratio to the per-env step of the same round:

* stepping alone: ``--sub-envs`` sub-envs, random actions, stepped by each
  sub-env's own Gymnasium ``step`` (below the bookkeeping wrappers, as the sampler calls it), by the twin on 1 and on
  ``--threads`` threads, and by a bare ``mujoco.mj_step`` loop on the same data (MuJoCo's own speed, no rewards);
* sampling: one phase's episodes of the published batch shape scaled by ``--tasks``
  (``--tasks`` x 20 episodes x horizon 200) through ``MetaPolicyGradient.sample_episodes``, with
  ``batched_physics`` True and False; the two batches are checked to be identical.

    python benchmarks/batched_physics.py                    # writes docs/results/batched_physics.md
    python benchmarks/batched_physics.py --quick            # a smoke run, into a temporary folder

torch runs on one intra-op thread (acting always does); the machine's load is printed with the results, since
on a shared machine only the ratios of one run mean anything.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable

import gymnasium as gym
import mujoco
import numpy as np
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.samplers.runner import step_without_bookkeeping
from sb3_metarl.tasks.twins import batched_stepper

#: family -> its arguments in the measurement (the papers' action scale; HalfCheetah at SG-MRL's control cost)
FAMILIES = {
    "HalfCheetahDir": dict(action_scale=10.0, ctrl_cost_weight=0.05),
    "AntDir": dict(action_scale=10.0),
    "Walker2dVel": dict(action_scale=10.0),
    "HopperRandParams": dict(action_scale=10.0),
}


def _make(family: str) -> gym.Env:
    return gym.make(f"sb3_metarl/{family}-v0", **FAMILIES[family])


def _stepper(way: str, envs: list[gym.Env], actions: np.ndarray, threads: int) -> Callable[[int], None]:
    """:return: a function that takes step t of every sub-env of ``envs`` the way ``way`` names"""
    rows = np.arange(len(envs))
    if way == "per_env_step":
        functions = [step_without_bookkeeping(env)[0] for env in envs]
        return lambda t: [function(actions[t, index]) for index, function in enumerate(functions)] and None
    if way == "bare_mj_step":
        unwrapped = [env.unwrapped for env in envs]
        low, high, scale = unwrapped[0].control_low, unwrapped[0].control_high, unwrapped[0].action_scale
        controls = low + (actions + scale) * (high - low) / (2 * scale)  # (mapped outside the timing)

        def bare(t: int) -> None:
            for index, env in enumerate(unwrapped):
                env.data.ctrl[:] = controls[t, index]
                mujoco.mj_step(env.model, env.data, nstep=env.frame_skip)
                mujoco.mj_rnePostConstraint(env.model, env.data)

        return bare
    twin = batched_stepper([env.unwrapped for env in envs], 1 if way == "twin_1_thread" else threads)
    assert twin is not None
    return lambda t: twin.step(rows, actions[t]) and None


def stepping_round(family: str, n_envs: int, steps: int, threads: int, seed: int) -> dict[str, float]:
    """:return: steps per second of each way of stepping ``n_envs`` fresh sub-envs ``steps`` times"""
    rates = {}
    rng = np.random.default_rng(seed)
    probe = _make(family)
    tasks = probe.unwrapped.sample_tasks(n_envs, rng)
    actions = rng.uniform(-10, 10, size=(steps, n_envs, *probe.action_space.shape)).astype(np.float32)
    for way in ["per_env_step", "twin_1_thread", f"twin_{threads}_threads", "bare_mj_step"]:
        envs = [_make(family) for _ in range(n_envs)]
        for index, env in enumerate(envs):
            env.unwrapped.set_task(tasks[index])
            env.reset(seed=seed + index)
        step = _stepper(way, envs, actions, threads)
        step(0)
        start = time.perf_counter()
        for t in range(1, steps):
            step(t)
        rates[way] = n_envs * (steps - 1) / (time.perf_counter() - start)
        for env in envs:
            env.close()
    return rates


def sampling_round(family: str, n_tasks: int, horizon: int, threads: int, seed: int) -> dict[str, float]:
    """:return: env steps per second of one batch of 20 episodes per task, with and without the twin"""
    rates, batches = {}, {}
    for batched in (False, True):
        model = MetaPolicyGradient(
            "MlpPolicy", f"sb3_metarl/{family}-v0", meta_batch_size=n_tasks, inner_episodes=20, outer_episodes=20,
            inner_lr=0.1 / horizon, max_episode_steps=horizon, env_kwargs=FAMILIES[family], seed=seed,
            sampler_kwargs=dict(batched_physics=batched, num_threads=threads),
        )  # fmt: skip
        tasks = model.sample_tasks(n_tasks, np.random.default_rng(seed))
        start = time.perf_counter()
        batch = model.sample_episodes(tasks, None, 20)
        rates["twin" if batched else "per_env_step"] = float(batch.masks.sum()) / (time.perf_counter() - start)
        batches[batched] = batch
        model.get_env().close()
    assert th.equal(batches[True].observations, batches[False].observations)
    assert th.equal(batches[True].rewards, batches[False].rewards)
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--sub-envs", type=int, default=400)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=10, help="tasks of the sampling measurement (20 episodes each)")
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run, written to a temporary folder")
    parser.add_argument("--out", default=None, help="folder of batched_physics.md and .jsonl (default docs/results)")
    args = parser.parse_args(argv)
    if args.quick:
        args.sub_envs, args.steps, args.tasks, args.horizon, args.rounds = 8, 5, 2, 10, 1
    out = args.out or (tempfile.mkdtemp() if args.quick else "docs/results")
    th.set_num_threads(1)
    rows = []
    for round_index in range(args.rounds):
        for family in args.envs:
            stepping = stepping_round(family, args.sub_envs, args.steps, args.threads, seed=round_index)
            sampling = sampling_round(family, args.tasks, args.horizon, args.threads, seed=round_index)
            row = {"round": round_index, "env": family, "stepping": stepping, "sampling": sampling}
            rows.append({**row, "load": os.getloadavg()[0]})
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "batched_physics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    ways = list(rows[0]["stepping"])
    lines = [
        "# Batched physics: the MuJoCo families' twins against the per-env step",
        "",
        f"`python benchmarks/batched_physics.py --envs {' '.join(args.envs)} --sub-envs {args.sub_envs} --steps "
        f"{args.steps} --threads {args.threads} --tasks {args.tasks} --horizon {args.horizon} --rounds {args.rounds}` on "
        f"{platform.node() or 'this machine'} ({os.cpu_count()} cores; load average "
        f"{min(r['load'] for r in rows):.1f}-{max(r['load'] for r in rows):.1f} during the rounds), torch on one thread. "
        "Steps per second; in brackets the ratio to the per-env step of the same round.",
        "",
        f"Stepping {args.sub_envs} sub-envs (action_scale 10), random actions:",
        "",
        "| round | env | " + " | ".join(ways) + " |",
        "|---:|---|" + "---:|" * len(ways),
    ]
    for row in rows:
        base = row["stepping"]["per_env_step"]
        cells = [f"{row['stepping'][w]:.0f} ({row['stepping'][w] / base:.2f})" for w in ways]
        lines.append(f"| {row['round']} | {row['env']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Sampling one batch of {args.tasks} tasks x 20 episodes x horizon {args.horizon} through `sample_episodes` "
        f"(the same episodes, checked, with and without the twin; the twin on {args.threads} threads):",
        "",
        "| round | env | per-env step | twin |",
        "|---:|---|---:|---:|",
    ]
    for row in rows:
        base, twin = row["sampling"]["per_env_step"], row["sampling"]["twin"]
        lines.append(f"| {row['round']} | {row['env']} | {base:.0f} | {twin:.0f} ({twin / base:.2f}) |")
    with open(os.path.join(out, "batched_physics.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
