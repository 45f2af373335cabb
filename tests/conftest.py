import pytest

from sb3_metarl import MetaPolicyGradient


@pytest.fixture
def tiny_navigation_model():
    return MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        meta_batch_size=2,
        inner_episodes=2,
        outer_episodes=2,
        inner_lr=0.01,
        policy_kwargs=dict(net_arch=[16]),
        seed=0,
    )
