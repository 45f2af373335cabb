import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import configure

from sb3_metarl.diagnostics import (
    BANDIT_LOG_STD,
    BANDIT_MEAN,
    MetaGradientDiagnosticsCallback,
    bandit_estimates,
    compare_with_exact,
    exact_reference,
    flat_gradient,
    flat_per_task_gradient,
    make_bandit_model,
    make_tabular_model,
    measure_estimators,
    write_csv,
)
from sb3_metarl.exact import exact_meta_gradient


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
