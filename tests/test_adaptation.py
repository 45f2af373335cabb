"""The adaptation room: the KL's Hessian through the inner step, written out layer by layer, against double backward."""

import dataclasses

import numpy as np
import pytest
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.gradient_modes import GRADIENT_MODES

SMALL = dict(meta_batch_size=3, inner_episodes=3, outer_episodes=3, policy_kwargs=dict(net_arch=[16, 16]))


def _model_and_sample(mode, seed=0, **kwargs):
    """A sample whose inner step clips the gradient of some tasks (at the median norm) and not of others."""
    model = MetaPolicyGradient(
        "MlpPolicy", "sb3_metarl/Navigation2D-v0", gradient_mode=mode, seed=seed, **{**SMALL, "inner_lr": 0.05, **kwargs}
    )
    tasks = model.get_env().env_method("sample_tasks", model.meta_batch_size, np.random.default_rng(seed), indices=[0])[0]
    norms = model.collect_meta_sample(tasks).replay.inner_grad_norms[0]
    model.inner_grad_clip = norms.median().item()
    adaptation = model.adaptation
    sample = model.collect_meta_sample(tasks)
    return model, adaptation, sample


def _relative_error(actual, expected):
    return max(((actual[n] - expected[n]).norm() / expected[n].norm()).item() for n in expected)


def _scaled_error(actual, expected):
    """:return: the largest difference relative to the largest magnitude (log-likelihoods span many scales)"""
    return ((actual - expected.detach()).abs().max() / expected.detach().abs().max().clamp(min=1e-30)).item()


@pytest.mark.parametrize("mode", sorted(GRADIENT_MODES))
@pytest.mark.parametrize("block_elements", [2**19, 200])
def test_layered_kl_hessian_product_equals_double_backward(mode, block_elements, monkeypatch):
    """Also in blocks of rows (200 elements: 60 blocks of 5 rows of 3 tasks x 16 units)."""
    import sb3_metarl.mlp.adaptation
    from sb3_metarl.mlp import LayeredAdaptation

    monkeypatch.setattr(sb3_metarl.mlp.adaptation, "_BLOCK_ELEMENTS", block_elements)
    _, adaptation, sample = _model_and_sample(mode)
    scales = adaptation.clip_scale(sample.replay.inner_grad_norms[0])
    assert isinstance(adaptation, LayeredAdaptation) and (scales < 1).any() and (scales == 1).any()
    assert not adaptation.kl_hessian_needs_graph(sample) and adaptation.autograd().kl_hessian_needs_graph(sample)
    names = adaptation.layout.names
    layered = adaptation.kl_hessian_product(sample, names)
    double_backward = adaptation.autograd().kl_hessian_product(sample, names)
    generator = th.Generator().manual_seed(1)
    for _ in range(2):  # the second product reuses the first one's workspace
        vector = {n: th.randn(p.shape, generator=generator) for n, p in adaptation.parameters().items() if n in names}
        expected = double_backward(vector)
        assert _relative_error(layered(vector), expected) < 1e-4
    # the products are not a constant: the damping-free Hessian is positive along the vector
    assert sum((expected[n] * vector[n]).sum() for n in names) > 0


def _rounded_differently(kl_hessian_product):
    def rounded(*args, **kwargs):
        product = kl_hessian_product(*args, **kwargs)
        return lambda vector: {n: h / 3 for n, h in product({n: 3 * v for n, v in vector.items()}).items()}

    return rounded


@pytest.mark.parametrize("mode", ["lsf", "dice"])
def test_trpo_step_is_the_same_with_the_layered_product(mode):
    """
    The same step and the same accepted line-search point. Conjugate gradient amplifies rounding (the KL's
    Hessian is ill-conditioned), so the tolerance is measured: the spread of the double-backward solve
    itself when its products are rounded differently (H (3 v) / 3 instead of H v).
    """
    steps, stats, params = {}, {}, {}
    for path in ("layered", "double backward", "double backward, rounded differently"):
        model, adaptation, sample = _model_and_sample(mode, meta_optimizer="trpo")
        model.meta_optimizer.layered_hessian = path == "layered"
        if path.endswith("differently"):
            adaptation.kl_hessian_product = _rounded_differently(adaptation.kl_hessian_product)
        natural = model.meta_optimizer.search_direction(adaptation, sample)
        steps[path] = natural.full_step
        stats[path] = model.meta_optimizer.line_search(adaptation, sample, natural, model.policy.optimizer)
        params[path] = th.cat([p.detach().flatten() for p in model.policy.parameters()])
    reference = steps["double backward"]
    rounding = (steps["double backward, rounded differently"] - reference).norm()
    assert 0 < rounding < 0.1 * reference.norm()
    assert (steps["layered"] - reference).norm() < 3 * rounding
    assert stats["layered"]["step_accepted"] == stats["double backward"]["step_accepted"] == 1.0
    assert stats["layered"]["line_search_coefficient"] == stats["double backward"]["line_search_coefficient"]
    assert (params["layered"] - params["double backward"]).norm() < 3 * rounding


@pytest.mark.parametrize("mode", sorted(GRADIENT_MODES))
@pytest.mark.parametrize("block_elements", [2**19, 200])
def test_layered_evaluation_is_the_replay_s_values(mode, block_elements, monkeypatch):
    """
    Two inner steps (per-task parameters in the second), some tasks clipped, also in blocks of rows. Both sum
    the inner gradient over rows in float32, each in its own order. Measured largest differences (relative to
    the largest magnitude): 5e-7 for the modes linear in the log-likelihoods; with DiCE's and LSF's boxes, whose
    weights cancel, 1.2e-5 after the first step, 9e-5 after the second and 1.8e-4 on the outer batch.
    Tolerances: 1e-4 and 1e-3.
    """
    import sb3_metarl.mlp.adaptation
    from sb3_metarl.mlp import LayeredAdaptation

    monkeypatch.setattr(sb3_metarl.mlp.adaptation, "_BLOCK_ELEMENTS", block_elements)
    _, adaptation, sample = _model_and_sample(mode, inner_steps=2, inner_lr=0.005)
    assert isinstance(adaptation, LayeredAdaptation)
    assert (adaptation.clip_scale(sample.replay.inner_grad_norms[0]) < 1).any()
    with th.no_grad():  # away from the sampling parameters, where every term of the inner gradient counts
        for param in adaptation.parameters().values():
            param.add_(0.002 * th.randn(param.shape, generator=th.Generator().manual_seed(param.numel())))
        expected = adaptation.replay(sample, create_graph=False)
        expected_distribution = adaptation.batch_distribution(expected.adapted, sample.outer_batch).distribution
    evaluated = adaptation.evaluate(sample)
    for step, tolerance in enumerate([1e-4, 1e-3]):
        assert _relative_error(evaluated.inner_params[step], expected.inner_params[step]) < tolerance
        assert _scaled_error(evaluated.inner_log_probs[step], expected.inner_log_probs[step]) < tolerance
        assert _scaled_error(evaluated.inner_grad_norms[step], expected.inner_grad_norms[step]) < tolerance
    assert _relative_error(evaluated.adapted, {n: p.detach() for n, p in expected.adapted.items()}) < 1e-3
    assert _scaled_error(evaluated.outer_log_prob, expected.outer_log_prob) < 1e-3
    assert _scaled_error(evaluated.outer_distribution.distribution.mean, expected_distribution.mean) < 1e-3
    assert _scaled_error(evaluated.outer_distribution.distribution.stddev, expected_distribution.stddev) < 1e-3
    # the adaptation moved the parameters: the comparison is not of theta with itself
    assert _relative_error(evaluated.adapted, evaluated.task_theta) > 1e-2
    assert not any(t.requires_grad for t in [evaluated.outer_log_prob, *evaluated.adapted.values()])


def test_the_autograd_reference_evaluates_by_replay():
    _, layered, sample = _model_and_sample("lvc")
    adaptation = layered.autograd()
    assert type(adaptation).__name__ == "Adaptation" and adaptation.autograd() is adaptation
    with th.no_grad():
        expected = adaptation.replay(sample, create_graph=False)
    evaluated = adaptation.evaluate(sample)
    assert th.equal(evaluated.outer_log_prob, expected.outer_log_prob) and evaluated.outer_distribution is None


def test_the_layered_twin_is_chosen_by_the_one_detector():
    """SB3's default MLP actor gets the twin, in training and in sampling; an activation the twin does not write out
    (ELU) gets the autograd adaptation and the policy's own modules when acting."""
    from sb3_metarl.mlp import LayeredAdaptation, MlpActorLayout

    for activation, layered in ((th.nn.Tanh, True), (th.nn.ReLU, True), (th.nn.ELU, False)):
        kwargs = {**SMALL, "policy_kwargs": dict(net_arch=[8], activation_fn=activation)}
        model = MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", inner_lr=0.05, seed=0, **kwargs)
        assert isinstance(model.adaptation, LayeredAdaptation) is layered
        assert (MlpActorLayout.of(model.policy) is not None) is layered
        assert (model.episode_sampler.policies.layout is not None) is layered


def _as_stored(batch):
    """``batch`` with every pass over its E*H stored rows: the reference that packing the valid steps is checked against"""
    stored = EpisodeBatch(**{field.name: getattr(batch, field.name) for field in dataclasses.fields(batch)})
    vars(stored)["row_packing"] = None  # the cached property's value
    return stored


@pytest.mark.parametrize("mode", sorted(GRADIENT_MODES))
def test_packed_rows_change_only_the_rounding(mode):
    """
    Episodes that end early (Navigation2D with a success radius of 0.45: in every batch each task has padding, so
    the passes run over the packed valid steps): the meta-gradient (autograd), the layered evaluation, the KL's
    Hessian products and the mean KL against the same computations over the stored rows. The per-row values are
    the same up to the matrix product's rounding (a few 1e-7); the sums over rows add in another order. Measured
    largest relative differences over the modes: 8e-7 (meta-gradient), 3e-7 (adapted parameters), 2e-7 (outer
    log-likelihoods), 7e-7 (Hessian products), 1e-4 of a mean KL of 3e-6 (a difference of near-equal terms).
    Tolerances: 1e-5, and 1e-3 for the KL.
    """
    _, adaptation, sample = _model_and_sample(mode, env_kwargs=dict(success_radius=0.45))
    batches = [*sample.inner_batches, sample.outer_batch]
    assert all(b.row_packing is not None and b.row_packing.index.shape[1] < b.masks[0].numel() for b in batches)
    stored = dataclasses.replace(
        sample, inner_batches=[_as_stored(b) for b in sample.inner_batches], outer_batch=_as_stored(sample.outer_batch)
    )
    reference = adaptation.autograd()
    gradient_error = _relative_error(
        reference.per_task_meta_gradient(sample, sample.mode), reference.per_task_meta_gradient(stored, sample.mode)
    )
    assert gradient_error < 1e-5
    with th.no_grad():  # away from the sampling parameters, where every term of the inner gradient counts
        for param in adaptation.parameters().values():
            param.add_(0.002 * th.randn(param.shape, generator=th.Generator().manual_seed(param.numel())))
    packed, expected = adaptation.evaluate(sample), adaptation.evaluate(stored)
    assert _relative_error(packed.adapted, expected.adapted) < 1e-5
    assert _scaled_error(packed.outer_log_prob, expected.outer_log_prob) < 1e-5
    old = {n: p.detach() for n, p in sample.adapted.items()}
    kl = adaptation.mean_kl(old, packed.adapted, sample.outer_batch, new_distribution=packed.outer_distribution)
    expected_kl = adaptation.mean_kl(old, expected.adapted, stored.outer_batch, new_distribution=expected.outer_distribution)
    assert 0 < expected_kl and abs(kl - expected_kl) < 1e-3 * expected_kl
    names = adaptation.layout.names
    generator = th.Generator().manual_seed(1)
    vector = {n: th.randn(p.shape, generator=generator) for n, p in adaptation.parameters().items() if n in names}
    products = [adaptation.kl_hessian_product(s, names)(vector) for s in (sample, stored)]
    assert _relative_error(*products) < 1e-5
