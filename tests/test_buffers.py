"""Episode storage: the packing of the valid steps that the learner's passes run over."""

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_metarl.adaptation import masked_log_prob
from sb3_metarl.common.buffers import EpisodeBatch, RowPacking, TaskRolloutBuffer


def _batch(lengths: np.ndarray, horizon: int, seed: int = 0) -> EpisodeBatch:
    """Random episodes of the given lengths (B, E) stored as the sampler stores them (zeros after an episode ends)."""
    n_tasks, n_episodes = lengths.shape
    observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
    buffer = TaskRolloutBuffer(horizon, n_tasks, n_episodes, observation_space, action_space, "cpu")
    rng = np.random.default_rng(seed)
    columns = np.arange(n_tasks * n_episodes)
    for step in range(horizon):
        running = columns[lengths.reshape(-1) > step]
        n = len(running)
        buffer.add_step(step, running, rng.normal(size=(n, 3)), rng.normal(size=(n, 2)), rng.normal(size=n), np.zeros(n))
    return buffer.to_batch()


def test_row_packing_keeps_each_task_s_valid_steps_in_order():
    lengths = np.array([[3, 1], [2, 2], [4, 0]])  # 4, 4 and 4 valid steps of 2 x 5 rows
    batch = _batch(lengths, horizon=5)
    packing = batch.row_packing
    assert packing is not None and packing.index.shape == (3, 4) and packing.n_rows == 10
    assert packing.index.tolist() == [[0, 1, 2, 5], [0, 1, 5, 6], [0, 1, 2, 3]]
    observations = batch.flat_observations()
    packed = batch.packed_observations()
    for task, rows in enumerate(packing.index.tolist()):
        assert th.equal(packed[task], observations[task, rows])
    # a value per packed row comes back at its stored step, and every padding step is an exact zero
    values = th.arange(12, dtype=th.float32).reshape(3, 4) + 1
    assert th.equal(batch.unpack_rows(values).reshape(3, -1).gather(1, packing.index), values)
    assert th.equal(batch.unpack_rows(values) != 0, batch.masks > 0)


def test_row_packing_pads_tasks_with_fewer_valid_steps():
    batch = _batch(np.array([[5, 1], [2, 0]]), horizon=5)
    packing = batch.row_packing
    assert packing.index.shape == (2, 6)
    assert packing.masks.tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    values = th.ones(2, 6)
    assert batch.unpack_rows(values).sum((1, 2)).tolist() == [6.0, 2.0]


def test_no_packing_where_a_task_has_no_padding():
    """Then every pass runs over the rows as stored (the bits of every batch whose episodes all run the horizon)."""
    batch = _batch(np.array([[5, 5], [2, 0]]), horizon=5)
    assert batch.row_packing is None
    assert batch.packed_observations().shape == (2, 10, 3)
    assert th.equal(batch.packed_masks(), batch.masks.reshape(2, -1))
    assert RowPacking.of(th.ones(2, 4)) is None


def test_log_likelihoods_over_packed_rows_are_those_over_the_stored_rows():
    from stable_baselines3.common.policies import ActorCriticPolicy

    from sb3_metarl.common.functional import FunctionalPolicy

    lengths = np.array([[7, 1, 3], [2, 2, 2], [9, 4, 1]])
    batch = _batch(lengths, horizon=10)
    assert batch.row_packing.index.shape == (3, 14)  # of 30
    th.manual_seed(0)
    box = spaces.Box(-1.0, 1.0, (3,), np.float32)
    policy = ActorCriticPolicy(box, spaces.Box(-1.0, 1.0, (2,), np.float32), lambda _: 1e-3, net_arch=[8])
    functional = FunctionalPolicy(policy)
    params = {n: p.detach() + 0.1 * th.randn(3, *p.shape) for n, p in functional.parameters().items()}
    packed = masked_log_prob(functional, params, batch)
    stored = functional.log_prob(params, batch.flat_observations(), batch.flat_actions()).reshape(batch.masks.shape)
    expected = stored * batch.masks
    assert packed.shape == (3, 3, 10) and th.equal(packed == 0, batch.masks == 0)
    th.testing.assert_close(packed, expected, rtol=1e-6, atol=1e-6)
