"""
What a Swimmer Rand Vel policy has learned, and whether MuJoCo's capsule inertias change it.

maml_zoo's ``SwimmerRandVelEnv`` (the suite ``sgmrl-swimmer``) adds ``|v_x - v*|`` to the reward, v* ~ U[0.1, 0.2]: any
speed away from the target pays, backward and forward alike. This rolls out saved models' (pre-update) policies on
random tasks and reports, per episode, the return, the mean of |v_x| and of v_x, the net displacement of the head and
how often v_x changes sign: a policy that swims has a net displacement near its mean speed times the episode's time; one
that surges back and forth has a large mean |v_x| and a small displacement.

Each policy runs on two models of the same XML: MuJoCo's (3.x: a capsule's mass and inertia computed exactly) and the
capsule bodies as MuJoCo before 2.1.2 computed them (a cylinder extended by half the radius at each end: MuJoCo 2.1.2's
changelog, "Computed capsule inertias are now exact"), which is what SG-MRL's mujoco-py 1.5 simulated. The inertia-based
fluid model of Swimmer (``density``, ``viscosity``) reads the bodies' inertias, so this is the physics difference that can
be measured here. The two runs share their tasks, resets and action noise, so their difference is paired.

    python benchmarks/swimmer_gait.py --models docs/results/runs/sgmrl-swimmer_maml_adam_s0_xavier/model.zip \
        docs/results/runs/sgmrl-swimmer_maml_adam_s0/model.zip --episodes 20 --out docs/results
"""

import argparse
import json
import os
import sys
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce_published import suite_runs, write_atomically

#: the two physics compared, by their table label
PHYSICS = ("MuJoCo 3 (exact capsules)", "capsules as MuJoCo < 2.1.2 (cylinders)")


def use_cylinder_capsules(model: Any) -> list[int]:
    """
    Give every body made of one capsule geom the mass and inertia MuJoCo computed for it before 2.1.2: a cylinder of the
    capsule's radius r and length L + r, at the same density, centered where the capsule is. The principal axes (and
    ``body_iquat``) are kept: the capsule's own axis is the one of least inertia.

    :param model: a compiled ``mujoco.MjModel`` (changed in place; ``mj_setConst`` is left to the caller)
    :return: the ids of the bodies changed
    """
    import mujoco

    changed = []
    for body in range(1, model.nbody):
        geoms = [geom for geom in range(model.ngeom) if model.geom_bodyid[geom] == body]
        if len(geoms) != 1 or model.geom_type[geoms[0]] != mujoco.mjtGeom.mjGEOM_CAPSULE:
            continue
        radius, half_length = model.geom_size[geoms[0], :2]
        exact_volume = np.pi * radius**2 * 2 * half_length + 4 / 3 * np.pi * radius**3
        density = model.body_mass[body] / exact_volume
        length = 2 * half_length + radius
        mass = density * np.pi * radius**2 * length
        axial, transverse = mass * radius**2 / 2, mass * (3 * radius**2 + length**2) / 12
        axis = int(np.argmin(model.body_inertia[body]))
        model.body_mass[body] = mass
        model.body_inertia[body] = [axial if index == axis else transverse for index in range(3)]
        changed.append(body)
    return changed


def gait(meta_model: Any, cylinders: bool, episodes: int, seed: int) -> list[dict[str, float]]:
    """
    :param meta_model: a loaded ``sgmrl-swimmer`` model, whose pre-update policy acts
    :return: per episode, its task, return, mean |v_x|, mean v_x, net displacement and sign changes of v_x
    """
    import gymnasium as gym
    import mujoco
    import torch as th

    (run,) = suite_runs("sgmrl-swimmer", ["maml"], [0])
    env = gym.make(run.env_id, max_episode_steps=run.kwargs["max_episode_steps"], **run.kwargs["env_kwargs"])
    simulation = env.unwrapped
    if cylinders:
        use_cylinder_capsules(simulation.model)
        mujoco.mj_setConst(simulation.model, simulation.data)
    rng = np.random.default_rng(seed)
    th.manual_seed(seed)  # the same action noise under both physics
    rows = []
    for episode in range(episodes):
        task = simulation.sample_tasks(1, rng)[0]
        simulation.set_task(task)
        observation, _ = env.reset(seed=seed * 10_000 + episode)
        start, total, velocities, done = float(simulation.data.qpos[0]), 0.0, [], False
        while not done:
            action, _ = meta_model.policy.predict(observation, deterministic=False)
            observation, reward, terminated, truncated, info = env.step(action)
            total += float(reward)
            velocities.append(float(info["x_velocity"]))
            done = terminated or truncated
        velocity = np.asarray(velocities)
        rows.append(
            {
                "task": float(task),
                "return": total,
                "mean_abs_velocity": float(np.abs(velocity).mean()),
                "mean_velocity": float(velocity.mean()),
                "displacement": float(simulation.data.qpos[0]) - start,
                "sign_changes": int(np.count_nonzero(np.diff(np.sign(velocity)))),
                "steps": len(velocities),
                "seconds": len(velocities) * float(simulation.dt),
            }
        )
    env.close()
    return rows


def mean_and_error(values: list[float]) -> str:
    array = np.asarray(values, dtype=np.float64)
    error = array.std(ddof=1) / np.sqrt(len(array)) if len(array) > 1 else float("nan")
    return f"{array.mean():.2f} ± {error:.2f}"


def table(results: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """:return: Markdown, a row per model and physics (mean ± standard error over episodes) and the paired difference"""
    lines = [
        "| model | physics | return | mean abs(v_x) | mean v_x | net displacement | sign changes of v_x |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, by_physics in results.items():
        for physics, rows in by_physics.items():
            keys = ("return", "mean_abs_velocity", "mean_velocity", "displacement", "sign_changes")
            cells = [mean_and_error([row[key] for row in rows]) for key in keys]
            lines.append(f"| {label} | {physics} | " + " | ".join(cells) + " |")
        exact, cylinder = (by_physics[physics] for physics in PHYSICS)
        difference = [b["return"] - a["return"] for a, b in zip(exact, cylinder)]
        lines.append(f"| {label} | paired difference (cylinders - exact) | {mean_and_error(difference)} | | | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="saved sgmrl-swimmer models (model.zip of a run)")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", default="docs/results")
    args = parser.parse_args(argv)

    import torch as th

    from sb3_metarl import MetaPolicyGradient

    th.set_num_threads(args.threads)
    results = {}
    for path in args.models:
        meta_model = MetaPolicyGradient.load(path, device="cpu")  # once per model, for both physics
        results[os.path.basename(os.path.dirname(os.path.abspath(path)))] = {
            physics: gait(meta_model, physics == PHYSICS[1], args.episodes, args.seed) for physics in PHYSICS
        }
    first = next(iter(next(iter(results.values())).values()))[0]
    text = (
        "# What the Swimmer Rand Vel policies learned\n\n"
        f"`python benchmarks/swimmer_gait.py --models {' '.join(args.models)} --episodes {args.episodes}"
        f" --seed {args.seed} --out {args.out}`\n\n"
        f"Suite `sgmrl-swimmer` (reward `|v_x - v*| - 1e-4 |a|^2`, v* ~ U[0.1, 0.2]), {args.episodes} episodes of "
        f"{first['steps']} steps ({first['seconds']:g} s) per row, stochastic actions of the pre-update policy, "
        f"{args.threads} torch thread(s); "
        "mean ± standard error over episodes. The two physics share tasks, resets and action noise.\n\n"
        + table(results) + "\n"
    )  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    write_atomically(os.path.join(args.out, "swimmer_gait.md"), text)
    write_atomically(os.path.join(args.out, "swimmer_gait.json"), json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
