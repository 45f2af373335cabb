"""
A2C against meta-gradient A2C (MGRL, autodiff or LVC meta-gradients; Xu et al. 2018, Liu et al. 2022 Sec. 5.3):
training return and the meta-parameters' trajectories (their Fig. 4, 10, 11, in spirit).

The paper ran 8 Atari games for 40M frames with 64 processes; this machine's default is two classic-control
tasks at 100k steps and 3 seeds (Atari ids such as ``ALE/Breakout-v5`` run with ``--envs`` where ``ale-py``
is installed, with SB3's Atari wrappers and ``CnnPolicy``).

    python benchmarks/mgrl.py                         # writes docs/results/mgrl.{md,csv,png}
    python benchmarks/mgrl.py --timesteps 4000 --seeds 1 --out /tmp/mgrl.md   # a quick run
"""

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np

from sb3_metarl.estimators.study import write_csv

ALGORITHMS = ("a2c", "mgrl", "mgrl_lvc")


def run(job: tuple[str, str, int, int]) -> dict:
    """:return: the run's rollout-by-rollout mean training return and meta-parameters"""
    import torch as th
    from stable_baselines3 import A2C
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_atari_env, make_vec_env
    from stable_baselines3.common.vec_env import VecFrameStack

    from sb3_metarl import MetaGradientA2C

    th.set_num_threads(1)
    algorithm, env_id, seed, timesteps = job
    atari = env_id.startswith("ALE/")
    if atari:  # gymnasium 1.x registers the ALE ids only on request
        import ale_py
        import gymnasium as gym

        gym.register_envs(ale_py)
    env = VecFrameStack(make_atari_env(env_id, n_envs=8, seed=seed), 4) if atari else make_vec_env(env_id, n_envs=8, seed=seed)
    kwargs = dict(n_steps=5, seed=seed, device="cpu", ent_coef=0.01, gae_lambda=0.95)
    policy = "CnnPolicy" if atari else "MlpPolicy"
    if algorithm == "a2c":
        model = A2C(policy, env, **kwargs)
    else:
        model = MetaGradientA2C(policy, env, meta_gradient="lvc" if algorithm == "mgrl_lvc" else "autodiff", **kwargs)
    rows: list[dict] = []

    class Record(BaseCallback):
        def _on_rollout_end(self) -> None:
            returns = [info["r"] for info in self.model.ep_info_buffer]
            values = model.meta_parameter_values() if hasattr(model, "meta_parameter_values") else {}
            rows.append(
                dict(timesteps=self.num_timesteps, mean_return=float(np.mean(returns)) if returns else np.nan, **values)
            )

        def _on_step(self) -> bool:
            return True

    start = time.perf_counter()
    model.learn(timesteps, callback=Record())
    return dict(algorithm=algorithm, env=env_id, seed=seed, rows=rows, seconds=time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1"])
    parser.add_argument("--timesteps", type=int, default=100_000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default="docs/results/mgrl.md")
    args = parser.parse_args(argv)
    jobs = [
        (algorithm, env_id, seed, args.timesteps)
        for env_id in args.envs
        for algorithm in ALGORITHMS
        for seed in range(args.seeds)
    ]
    if args.processes == 1:  # in this process (the runs are independent and seeded: the same results)
        results = list(map(run, jobs))
    else:
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            results = pool.map(run, jobs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = ("gamma", "gae_lambda", "vf_coef", "ent_coef")
    csv_rows = [
        dict(env=result["env"], algorithm=result["algorithm"], seed=result["seed"], timesteps=row["timesteps"],
             mean_return=f"{row['mean_return']:.2f}", **{k: f"{row.get(k, np.nan):.5f}" for k in keys})
        for result in results
        for row in result["rows"][::10]
    ]  # fmt: skip
    write_csv(csv_rows, str(out.with_suffix(".csv")))
    command = " ".join(["python benchmarks/mgrl.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# A2C and meta-gradient A2C (MGRL)",
        "",
        f"`{command}`: {', '.join(args.envs)}, {args.timesteps} steps, {args.seeds} seeds, 8 envs x 5 steps per update, "
        "A2C's defaults otherwise (RMSprop 7e-4), ent_coef 0.01 and gae_lambda 0.95 for all; MGRL learns gamma, "
        "gae_lambda, vf_coef and ent_coef through 3 virtual updates (the agent's own RMSprop step, meta lr 1e-3)"
        + (f"; Atari: SB3's Atari wrappers, CnnPolicy, 4 frames per step ({4 * args.timesteps:,} frames)" if any(
            env_id.startswith("ALE/") for env_id in args.envs) else "")
        + ". A budget cut: the paper ran 8 Atari games for 40M frames with 64 processes.",
        "",
        "| env | algorithm | training return, last 10 % | final gamma | final lambda | final ent_coef | s / run |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for env_id in args.envs:
        for algorithm in ALGORITHMS:
            runs = [r for r in results if r["env"] == env_id and r["algorithm"] == algorithm]
            finals = [np.nanmean([row["mean_return"] for row in r["rows"][-max(1, len(r["rows"]) // 10) :]]) for r in runs]
            meta = {k: np.mean([r["rows"][-1].get(k, np.nan) for r in runs]) for k in ("gamma", "gae_lambda", "ent_coef")}
            lines.append(
                f"| {env_id} | {algorithm} | {np.mean(finals):.1f} ± {np.std(finals):.1f} | {meta['gamma']:.4f} | "
                f"{meta['gae_lambda']:.4f} | {meta['ent_coef']:.4f} | {np.mean([r['seconds'] for r in runs]):.0f} |"
            )
    plot(results, args.envs, out.with_suffix(".png"))
    lines += ["", f"![curves]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(results: list[dict], envs: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(envs), 3, figsize=(15, 3.5 * len(envs)), squeeze=False)
    for row_axes, env_id in zip(axes, envs):
        for algorithm in ALGORITHMS:
            runs = [r for r in results if r["env"] == env_id and r["algorithm"] == algorithm]
            length = min(len(r["rows"]) for r in runs)
            steps = [row["timesteps"] for row in runs[0]["rows"][:length]]
            curve = np.nanmean([[row["mean_return"] for row in r["rows"][:length]] for r in runs], axis=0)
            row_axes[0].plot(steps, curve, label=algorithm)
            if algorithm != "a2c":
                for axis, key in zip(row_axes[1:], ("gamma", "ent_coef")):
                    axis.plot(
                        steps, np.mean([[row[key] for row in r["rows"][:length]] for r in runs], axis=0), label=algorithm
                    )
                    axis.set_title(f"{env_id}: {key}")
        row_axes[0].set_title(f"{env_id}: training return")
        for axis in row_axes:
            axis.legend(fontsize=8)
            axis.set_xlabel("steps")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
