"""Default hyperparameters per built-in task family, in the spirit of rl-baselines3-zoo."""

import copy
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


#: the MuJoCo families: pytorch-maml-rl's MAML-TRPO configuration (configs/maml/halfcheetah-dir.yaml and its siblings):
#: 40 tasks x 20 episodes, horizon 100, the policy acting in [-10, 10] mapped onto the actuators (``action_scale=10``:
#: with the actuators' own range the inner gradient at N = 20 is almost pure noise, docs/results/reproduce_published.md),
#: inner step 0.1 on the mean over steps, no gamma^t step weights, TRPO with max KL 0.01; 50 batches (8e6 env steps),
#: where its HalfCheetahDir run adapts from -1.6 to 61.8 after one inner step (docs/results/cli_defaults.md)
MUJOCO_TIMESTEPS = 8_000_000
MUJOCO_SETTING: dict[str, Any] = dict(
    gradient_mode="maml",
    meta_optimizer="trpo",
    meta_optimizer_kwargs=dict(
        max_kl=0.01, cg_damping=1e-5, cg_max_steps=10, line_search_shrinking_factor=0.8, line_search_max_iter=15
    ),
    meta_batch_size=40,
    inner_episodes=20,
    outer_episodes=20,
    inner_lr=0.1 / 100,
    normalize_advantage=True,
    discount_from_start=False,
    max_episode_steps=100,
)
#: the families' reward terms as pytorch-maml-rl's envs weigh them (its HalfCheetah's and Ant's; the others keep
#: Gymnasium's), always with actions in [-10, 10]
ANT_TERMS = dict(
    ctrl_cost_weight=0.005,
    contact_cost_weight=5e-4,
    contact_force_range=(-1.0, 1.0),
    healthy_reward=0.05,
    healthy_z_range=(0.2, 1.0),
)
MUJOCO_ENV_KWARGS: dict[str, dict[str, Any]] = {
    "sb3_metarl/HalfCheetahVel-v0": dict(ctrl_cost_weight=0.05),
    "sb3_metarl/HalfCheetahDir-v0": dict(ctrl_cost_weight=0.05),
    "sb3_metarl/AntVel-v0": ANT_TERMS,
    "sb3_metarl/AntDir-v0": ANT_TERMS,
    "sb3_metarl/AntDir2D-v0": ANT_TERMS,
    "sb3_metarl/AntGoal-v0": ANT_TERMS,
    "sb3_metarl/Walker2dVel-v0": {},
    "sb3_metarl/SwimmerVel-v0": {},
    "sb3_metarl/HopperRandParams-v0": {},
    "sb3_metarl/Walker2dRandParams-v0": {},
}
for _env_id, _terms in MUJOCO_ENV_KWARGS.items():
    HYPERPARAMS[_env_id] = (MUJOCO_TIMESTEPS, dict(MUJOCO_SETTING, env_kwargs=dict(action_scale=10.0, **_terms)))


def default_hyperparams(env_id: str) -> tuple[int, dict[str, Any]]:
    """:return: (total timesteps, keyword arguments) for ``env_id``; generic defaults for other ids"""
    timesteps, kwargs = HYPERPARAMS.get(env_id, (DEFAULT_TIMESTEPS, {}))
    return timesteps, copy.deepcopy(kwargs)
