"""
Meta-train a policy on 2-D navigation with MetaPolicyGradient, then adapt it to a new goal.

    python examples/navigation_2d.py --timesteps 24000000

Prints the mean return on held-out goals before and after 1..3 inner steps, and the path of the
pre- and post-adaptation policies towards one goal.
"""

import argparse

import numpy as np

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.meta_pg import format_adaptation_table


def rollout_positions(policy, goal: np.ndarray, steps: int = 100) -> np.ndarray:
    """Deterministic path of a policy from the origin (positions only, as the env's dynamics are x += clip(a))."""
    position, path = np.zeros(2, dtype=np.float32), []
    for _ in range(steps):
        action, _ = policy.predict(position, deterministic=True)
        position = position + np.clip(action, -0.1, 0.1)
        path.append(position.copy())
        if np.all(np.abs(position - goal) < 0.01):
            break
    return np.array(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timesteps", type=int, default=24_000_000)
    parser.add_argument("--gradient-mode", default="lsf")
    parser.add_argument("--meta-batch-size", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=20, help="inner and outer episodes per task")
    parser.add_argument("--eval-tasks", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    model = MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        gradient_mode=args.gradient_mode,
        meta_batch_size=args.meta_batch_size,
        inner_episodes=args.episodes,
        outer_episodes=args.episodes,
        inner_lr=1e-3,
        learning_rate=3e-3,
        policy_kwargs=dict(log_std_init=-1.0),
        seed=args.seed,
    )
    model.learn(args.timesteps, progress_bar=True)
    table = model.evaluate_adaptation(n_tasks=args.eval_tasks, inner_steps=3)
    print(format_adaptation_table(table))

    goal = np.array([0.4, -0.3])
    before = rollout_positions(model.policy, goal)
    after = rollout_positions(model.adapt(goal, inner_steps=1), goal)
    print(
        f"goal {goal}: final distance {np.linalg.norm(before[-1] - goal):.3f} before adaptation, "
        f"{np.linalg.norm(after[-1] - goal):.3f} after one inner step"
    )


if __name__ == "__main__":
    main()
