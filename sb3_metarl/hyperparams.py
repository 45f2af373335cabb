"""Default hyperparameters per built-in task family, in the spirit of rl-baselines3-zoo."""

from typing import Any

DEFAULT_TIMESTEPS = 1_000_000

#: env id -> (total timesteps, MetaPolicyGradient keyword arguments)
#: Navigation2D: B = N = M = 20 and horizon 100 as in MAML / pytorch-maml-rl / SG-MRL; inner_lr, the
#: meta learning rate and the initial log-std were picked by ``benchmarks/sweep.py`` (docs/results/navigation_sweep.csv).
HYPERPARAMS: dict[str, tuple[int, dict[str, Any]]] = {
    "sb3_metarl/Navigation2D-v0": (
        24_000_000,
        dict(
            meta_batch_size=20,
            inner_episodes=20,
            outer_episodes=20,
            inner_lr=1e-3,
            learning_rate=3e-3,
            policy_kwargs=dict(log_std_init=-1.0),
        ),
    ),
    "sb3_metarl/GaussianBandit-v0": (200_000, dict(meta_batch_size=20, inner_episodes=10, outer_episodes=10, inner_lr=0.1)),
    "sb3_metarl/TabularMDP-v0": (
        2_000_000,
        dict(
            meta_batch_size=10, inner_episodes=20, outer_episodes=20, inner_lr=1.0, gamma=0.8, policy_kwargs=dict(net_arch=[])
        ),
    ),
}


def default_hyperparams(env_id: str) -> tuple[int, dict[str, Any]]:
    """:return: (total timesteps, keyword arguments) for ``env_id``; generic defaults for other ids"""
    timesteps, kwargs = HYPERPARAMS.get(env_id, (DEFAULT_TIMESTEPS, {}))
    return timesteps, dict(kwargs)
