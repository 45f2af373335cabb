"""
Throughput of a meta-iteration against bare environment stepping, measured in the same run.

    python benchmarks/throughput.py --env sb3_metarl/Navigation2D-v0 --mode lsf --iterations 5

"bare" steps the very VecEnv that meta-training uses (B x max(N, M) sub-envs) with random actions
(drawn with one numpy call per step); "meta" runs whole meta-iterations (sampling with the policy,
inner adaptation, outer sampling, the meta-gradient and the update). Both count environment steps
per second; their ratio is the cost of everything but the environment.
"""

import argparse
import json
import time

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_metarl import MetaPolicyGradient


def random_actions(space: spaces.Space, n: int, rng: np.random.Generator) -> np.ndarray:
    if isinstance(space, spaces.Box):
        return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(space.dtype)
    if isinstance(space, spaces.Discrete):
        return rng.integers(space.n, size=n)
    return np.stack([space.sample() for _ in range(n)])


def bare_steps_per_second(model: MetaPolicyGradient, n_steps: int) -> float:
    venv, rng = model.env, np.random.default_rng(0)
    tasks = venv.env_method("sample_tasks", venv.num_envs, rng, indices=[0])[0]
    for index, task in enumerate(tasks):  # a task env refuses to step without one
        venv.env_method("set_task", task, indices=[index])
    venv.reset()
    start, taken = time.perf_counter(), 0
    while taken < n_steps:
        venv.step(random_actions(venv.action_space, venv.num_envs, rng))
        taken += venv.num_envs
    return taken / (time.perf_counter() - start)


def meta_steps_per_second(model: MetaPolicyGradient, iterations: int) -> tuple[float, float]:
    model.learn(1)  # warm-up (allocations, first vmap trace)
    start_steps, start = model.num_timesteps, time.perf_counter()
    for _ in range(iterations):
        model.learn(1, reset_num_timesteps=False)
    elapsed = time.perf_counter() - start
    return (model.num_timesteps - start_steps) / elapsed, elapsed / iterations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="sb3_metarl/Navigation2D-v0")
    parser.add_argument("--mode", default="lsf")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hyperparams", type=json.loads, default={}, help="JSON, e.g. '{\"inner_steps\": 2}'")
    args = parser.parse_args()
    model = MetaPolicyGradient("MlpPolicy", args.env, gradient_mode=args.mode, device=args.device, seed=0, **args.hyperparams)
    meta, seconds_per_iteration = meta_steps_per_second(model, args.iterations)
    bare = bare_steps_per_second(model, n_steps=int(meta * seconds_per_iteration))
    result = {
        "env": args.env,
        "mode": args.mode,
        "device": str(model.device),
        "threads": th.get_num_threads(),
        "sub_envs": model.env.num_envs,
        "bare_env_steps_per_s": round(bare),
        "meta_env_steps_per_s": round(meta),
        "ratio_meta_to_bare": round(meta / bare, 3),
        "seconds_per_meta_iteration": round(seconds_per_iteration, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
