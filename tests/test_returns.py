import numpy as np
import pytest
import torch as th

from sb3_metarl.common.baselines import LinearFeatureBaseline, make_baseline
from sb3_metarl.common.returns import generalized_advantages, returns_to_go


def _loop_gae(rewards, values, length, gamma, lam):
    advantages = np.zeros(length)
    running = 0.0
    for t in reversed(range(length)):
        next_value = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_value - values[t]
        running = delta + gamma * lam * running
        advantages[t] = running
    return advantages


def test_returns_to_go_and_gae_match_a_plain_loop():
    rng = np.random.default_rng(0)
    rewards = th.tensor(rng.normal(size=(2, 3, 6)), dtype=th.float64)
    values = th.tensor(rng.normal(size=(2, 3, 6)), dtype=th.float64)
    lengths = np.array([[6, 4, 1], [2, 6, 5]])
    masks = th.tensor(np.arange(6) < lengths[..., None], dtype=th.float64)
    rewards, values = rewards * masks, values * masks
    go = returns_to_go(rewards, masks, 0.9)
    gae = generalized_advantages(rewards, values, masks, 0.9, 0.7)
    for b in range(2):
        for e in range(3):
            n = lengths[b, e]
            expected_go = [sum(0.9 ** (k - t) * rewards[b, e, k].item() for k in range(t, n)) for t in range(n)]
            np.testing.assert_allclose(go[b, e, :n].numpy(), expected_go)
            expected_gae = _loop_gae(rewards[b, e].numpy(), values[b, e].numpy(), n, 0.9, 0.7)
            np.testing.assert_allclose(gae[b, e, :n].numpy(), expected_gae)
            assert th.all(gae[b, e, n:] == 0) and th.all(go[b, e, n:] == 0)


def test_linear_baseline_fits_per_task_and_respects_masks():
    rng = np.random.default_rng(0)
    features = th.tensor(rng.normal(size=(2, 8, 5, 2)), dtype=th.float32)
    time = th.arange(5, dtype=th.float32) / 100
    # each task's target is a different linear function of the baseline's features
    targets = th.stack([features[0, ..., 0] * 2 + time, -features[1, ..., 1] + 3.0])
    masks = th.ones(2, 8, 5)
    masks[:, :, 4] = 0
    garbage = targets.clone()
    garbage[:, :, 4] = 1e6  # masked steps must not influence the fit
    predictions = LinearFeatureBaseline().fit_predict(features, garbage, masks)
    np.testing.assert_allclose(predictions[..., :4].numpy(), targets[..., :4].numpy(), atol=1e-3)
    assert th.all(predictions[..., 4] == 0)


def test_the_linear_baseline_fits_wide_features_on_any_thread_count():
    """
    Ant's 107 observation features make a 218-column ridge system: MKL's threaded batched LU failed on it on 2 threads
    on an AMD EPYC (a false "singular"). The fit matches numpy's least squares per task, on 1 and 2 threads, bit for
    bit between the two.
    """
    rng = np.random.default_rng(0)
    features = th.tensor(rng.normal(size=(2, 4, 60, 107)), dtype=th.float32)
    features[..., 50:] = 0.0  # contact forces that stay zero: columns that only the ridge keeps regular
    returns = th.tensor(rng.normal(size=(2, 4, 60)), dtype=th.float32)
    masks = th.ones(2, 4, 60)
    baseline = LinearFeatureBaseline()
    previous = th.get_num_threads()
    try:
        th.set_num_threads(1)
        one_thread = baseline.fit_predict(features, returns, masks)
        th.set_num_threads(2)
        two_threads = baseline.fit_predict(features, returns, masks)
    finally:
        th.set_num_threads(previous)
    assert th.equal(one_thread, two_threads)
    x = LinearFeatureBaseline.design_matrix(features.double()).numpy()
    for task in range(2):
        design = x[task].reshape(-1, x.shape[-1])
        ridge = design.T @ design + 1e-5 * np.eye(design.shape[1])
        expected = design @ np.linalg.solve(ridge, design.T @ returns[task].double().numpy().reshape(-1))
        np.testing.assert_allclose(one_thread[task].double().numpy().reshape(-1), expected, rtol=1e-4, atol=1e-5)


def test_a_singular_baseline_regression_is_an_error_naming_the_baseline():
    features = th.zeros(1, 2, 5, 3)  # constant features and no ridge: singular at every ridge it tries
    with pytest.raises(FloatingPointError, match=r"baseline.*singular"):
        LinearFeatureBaseline(reg_coeff=0.0).fit_predict(features, th.ones(1, 2, 5), th.ones(1, 2, 5))


def test_make_baseline_rejects_unknown_names():
    assert make_baseline(None) is None
    assert isinstance(make_baseline("linear"), LinearFeatureBaseline)
    with pytest.raises(ValueError, match="baseline"):
        make_baseline("critic")


def test_the_linear_baseline_fits_each_task_on_its_valid_steps_only():
    """
    Episodes of different lengths (every task has padding, so the fit runs over the packed valid steps): numpy's
    ridge regression over each task's valid steps, with their steps within the episode as the time features.
    """
    rng = np.random.default_rng(1)
    lengths = np.array([[25, 12, 30], [5, 30, 18]])
    masks = th.tensor(np.arange(30) < lengths[..., None], dtype=th.float32)
    features = th.tensor(rng.normal(size=(2, 3, 30, 4)), dtype=th.float32) * masks.unsqueeze(-1)
    returns = th.tensor(rng.normal(size=(2, 3, 30)), dtype=th.float32) * masks
    predictions = LinearFeatureBaseline().fit_predict(features, returns, masks)
    assert th.all(predictions[masks == 0] == 0)
    x = LinearFeatureBaseline.design_matrix(features.double()).numpy()
    for task in range(2):
        valid = masks[task].numpy().reshape(-1) > 0
        design = x[task].reshape(-1, x.shape[-1])[valid]
        ridge = design.T @ design + 1e-5 * np.eye(design.shape[1])
        expected = design @ np.linalg.solve(ridge, design.T @ returns[task].double().numpy().reshape(-1)[valid])
        np.testing.assert_allclose(predictions[task].double().numpy().reshape(-1)[valid], expected, rtol=1e-5, atol=1e-6)
