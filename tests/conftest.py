import contextlib
import signal

import pytest

from sb3_metarl import MetaPolicyGradient


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging CI) if the block takes longer than ``seconds``: every wait must be bounded."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: a wait is not bounded")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def make_model():
    """
    A factory of small models: ``make_model(env=..., **overrides)`` is ``MetaPolicyGradient("MlpPolicy", env, ...)``
    with B = N = M = 2 and a 16-unit policy on Navigation2D unless overridden.
    """

    def make(env="sb3_metarl/Navigation2D-v0", policy="MlpPolicy", **overrides) -> MetaPolicyGradient:
        arguments = dict(meta_batch_size=2, inner_episodes=2, outer_episodes=2, policy_kwargs=dict(net_arch=[16]))
        return MetaPolicyGradient(policy, env, **{**arguments, **overrides})

    return make


@pytest.fixture
def tiny_navigation_model(make_model):
    return make_model(inner_lr=0.01, seed=0)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """
    The fast lane (``-m "not slow"``) runs each parametrized test's first case only: the further cases are marked slow
    (the full suite, CI's, runs them all), except for tests marked ``all_cases`` (cheap cases, each its own check).
    """
    first_cases = set()
    for item in items:
        function = item.nodeid.split("[")[0]
        if "[" in item.nodeid and function in first_cases and item.get_closest_marker("all_cases") is None:
            item.add_marker(pytest.mark.slow)
        first_cases.add(function)
