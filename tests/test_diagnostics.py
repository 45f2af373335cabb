import numpy as np
import pytest
import torch as th

from sb3_metarl.diagnostics import (
    BANDIT_LOG_STD,
    BANDIT_MEAN,
    bandit_estimates,
    compare_with_exact,
    flat_gradient,
    flat_per_task_gradient,
    make_bandit_model,
    make_tabular_model,
)


def test_bandit_model_starts_at_the_reference_point_and_gives_independent_estimates():
    model = make_bandit_model("lsf", inner_episodes=2, outer_episodes=2, meta_batch_size=5)
    assert model.policy.action_net.bias.item() == pytest.approx(BANDIT_MEAN)
    assert model.policy.log_std.item() == pytest.approx(BANDIT_LOG_STD)
    estimates = bandit_estimates(model, calls=2)
    assert estimates.shape == (10, 2) and len(np.unique(estimates[:, 0])) == 10


def test_flatteners_keep_name_order():
    grads = {"b": th.tensor([[1.0, 2.0]]), "a": th.tensor([[3.0]])}
    assert flat_gradient({k: v[0] for k, v in grads.items()}).tolist() == [3.0, 1.0, 2.0]
    assert flat_per_task_gradient(grads).tolist() == [[3.0, 1.0, 2.0]]


def test_compare_with_exact_reports_bounded_metrics():
    model, task = make_tabular_model("lvc", inner_episodes=20, meta_batch_size=2)
    result = compare_with_exact(model, task, calls=1)
    assert -1 <= result["cosine"] <= 1 and -1 <= result["single_cosine"] <= 1 and result["relative_error"] >= 0
