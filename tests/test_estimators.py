import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.estimators.callbacks import MetaGradientDiagnosticsCallback
from sb3_metarl.estimators.decomposition import decomposed_meta_gradient
from sb3_metarl.estimators.exact import exact_meta_gradient
from sb3_metarl.estimators.setups import BANDIT_LOG_STD, BANDIT_MEAN, bandit_estimates, make_bandit_model, make_tabular_model
from sb3_metarl.estimators.study import (
    compare_with_exact,
    exact_reference,
    flat_gradient,
    flat_per_task_gradient,
    measure_estimators,
    write_csv,
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
    assert -1 <= result["cosine_mean"] <= 1 and -1 <= result["cosine_single"] <= 1 and result["relative_error"] >= 0


@pytest.mark.slow
def test_measure_estimators_on_the_bandit_reference():
    model = make_bandit_model("sf", inner_episodes=4, outer_episodes=16, meta_batch_size=200)
    rows = measure_estimators(model, ["sf", "maml"], sample_sizes=[4, 16], repeats=2)
    assert model.gradient_mode.name == "sf" and model.inner_episodes == 4  # left as it was
    by_key = {(row["mode"], row["inner_episodes"]): row for row in rows}
    assert set(by_key) == {("sf", 4), ("maml", 4), ("sf", 16), ("maml", 16)}
    assert by_key[("sf", 4)]["n_estimates"] == 400
    # sf is unbiased for the N-sample objective, plain autodiff is not; sf's variance grows with N
    assert by_key[("sf", 4)]["max_abs_z"] < 4 and by_key[("sf", 16)]["max_abs_z"] < 4
    assert by_key[("maml", 16)]["max_abs_z"] > 4
    assert by_key[("sf", 16)]["variance"] > 2 * by_key[("sf", 4)]["variance"]
    assert by_key[("sf", 4)]["reference_se"] > 0 and by_key[("sf", 4)]["seconds_per_estimate"] > 0


def test_measure_estimators_with_a_factory_and_the_sf_reference(tmp_path):
    def factory(mode, n):
        return make_tabular_model(mode, n, meta_batch_size=4)[0]

    rows = measure_estimators(factory, ["lvc"], sample_sizes=[10], repeats=1, reference="sf", reference_repeats=2)
    assert rows[0]["mode"] == "lvc" and rows[0]["reference_se"] > 0 and rows[0]["n_estimates"] == 4
    write_csv(rows, tmp_path / "rows.csv")
    assert (tmp_path / "rows.csv").read_text().startswith("mode,inner_episodes,n_estimates")
    with pytest.raises(ValueError, match="reference"):
        measure_estimators(factory, ["lvc"], [10], 1, reference="bootstrap")


def test_exact_reference_of_the_tabular_model_is_the_maml_gradient():
    model, task = make_tabular_model("lvc", 10, meta_batch_size=2)
    reference, se = exact_reference(model, task)(10)
    assert se is None and th.allclose(reference, flat_gradient(exact_meta_gradient(model, [task])).double().cpu())


def test_diagnostics_callback_logs_mode_comparisons(tmp_path):
    model = make_tabular_model("lsf", 10, meta_batch_size=3, inner_lr=1.0)[0]
    model.set_logger(configure(str(tmp_path), ["csv"]))
    callback = MetaGradientDiagnosticsCallback(modes=["lvc", "maml"], every=2)
    model.learn(3 * 10 * 20 * 2 * 4, callback=callback)  # 4 iterations
    assert callback.iterations == 4
    assert set(callback.last) >= {
        "diagnostics/variance_across_tasks/lsf",
        "diagnostics/grad_norm/maml",
        "diagnostics/cosine/lsf_vs_lvc",
        "diagnostics/cosine/lvc_vs_maml",
    }
    # maml and lvc share the inner step's value; with a near-uniform tabular policy they nearly agree
    assert callback.last["diagnostics/cosine/lvc_vs_maml"] > 0.5
    header = (tmp_path / "progress.csv").read_text().splitlines()[0]
    assert "diagnostics/cosine/lsf_vs_maml" in header
    with pytest.raises(ValueError, match="every"):
        MetaGradientDiagnosticsCallback(every=0)


# ------------------------------------------------------------------------------------------ decomposition


def _decomposed_estimates(model, task, pieces, calls):
    """(estimates, exact) over the actor's parameters: ``calls * meta_batch_size`` independent estimates of one task"""
    reference = exact_meta_gradient(model, [task])
    names = [n for n in sorted(reference) if n in model.functional_policy.actor_names]
    tasks = [task] * model.meta_batch_size
    estimates = [decomposed_meta_gradient(model, tasks, *pieces, per_task=True) for _ in range(calls)]
    flat = th.cat([th.cat([g[n].flatten(1) for n in names], dim=1) for g in estimates]).double()
    return flat, th.cat([reference[n].flatten() for n in names]).double()


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_decomposition_with_every_piece_exact_is_the_exact_meta_gradient(inner_steps):
    model, task = make_tabular_model("lvc", inner_episodes=2, inner_steps=inner_steps, meta_batch_size=2)
    decomposed = decomposed_meta_gradient(model, [task, task], inner="exact", hessian="exact", outer="exact")
    reference = exact_meta_gradient(model, [task])
    for name, value in reference.items():
        th.testing.assert_close(decomposed[name], value, rtol=1e-5, atol=1e-7)
    assert flat_gradient(reference).norm() > 0.1


def test_decomposition_sampled_outer_piece_is_unbiased():
    # N = 40: the linear baseline, fitted on the outer batch itself, has an O(1/N) bias, small here
    model, task = make_tabular_model("lvc", inner_episodes=40, meta_batch_size=20)
    estimates, exact = _decomposed_estimates(model, task, ("exact", "exact", "sampled"), calls=4)
    variance_of_mean = (estimates.var(0) / len(estimates)).sum()
    # unbiased: the squared error of the mean is its variance (a chi-square over 105 coordinates: within 1.5x)
    assert (estimates.mean(0) - exact).pow(2).sum() < 1.5 * variance_of_mean
    # and the test can see a wrong mean: the gradient is much longer than the mean's noise
    assert exact.pow(2).sum() > 10 * variance_of_mean


def test_decomposition_sampled_inner_piece_has_a_compositional_bias_that_shrinks_with_samples():
    """Liu et al.'s compositional bias: the inner step's value from samples biases an otherwise exact meta-gradient."""
    relative_bias = {}
    for n_episodes in (5, 40):
        model, task = make_tabular_model("lvc", inner_episodes=n_episodes, meta_batch_size=20)
        estimates, exact = _decomposed_estimates(model, task, ("sampled", "exact", "exact"), calls=3)
        standard_error = estimates.std(0) / len(estimates) ** 0.5
        if n_episodes == 5:
            assert ((estimates.mean(0) - exact).abs() / standard_error).max() > 6
        relative_bias[n_episodes] = ((estimates.mean(0) - exact).norm() / exact.norm()).item()
    assert relative_bias[40] < 0.5 * relative_bias[5]


def test_decomposition_rejects_what_it_cannot_decompose():
    model, task = make_tabular_model("lvc", inner_episodes=2, meta_batch_size=2)
    with pytest.raises(ValueError, match="correction term"):
        decomposed_meta_gradient(model, [task], hessian="sf")
    with pytest.raises(ValueError, match="inner: must be one of"):
        decomposed_meta_gradient(model, [task], inner="analytic")
    navigation = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", meta_batch_size=2, inner_episodes=2,
                                    outer_episodes=2, inner_lr=0.01, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="TabularMDP"):
        decomposed_meta_gradient(navigation, [np.zeros(2)], outer="exact")
    # all sampled works anywhere
    tasks = navigation.get_env().env_method("sample_tasks", 2, np.random.default_rng(0), indices=[0])[0]
    grads = decomposed_meta_gradient(navigation, tasks)
    assert all(th.isfinite(g).all() for g in grads.values()) and flat_gradient(grads).norm() > 0
