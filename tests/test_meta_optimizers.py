"""Meta-optimizers: TRPO's trust region, ProMP's clipped epochs, and every mode with every optimizer."""

import copy

import numpy as np
import pytest
import torch as th

from sb3_metarl import MetaPolicyGradient
from sb3_metarl.common.functional import FunctionalPolicy, grad_params
from sb3_metarl.gradient_modes import GRADIENT_MODES, MAML, GradientMode
from sb3_metarl.meta_optimizers import META_OPTIMIZERS, ProMP, TrustRegion, make_meta_optimizer
from sb3_metarl.meta_optimizers.surrogates import clipped_surrogate, ratio_surrogate

SMALL = dict(meta_batch_size=3, inner_episodes=4, outer_episodes=4, inner_lr=2e-3, policy_kwargs=dict(net_arch=[16]))


def _parameters(model):
    return th.cat([p.detach().flatten() for p in model.policy.parameters()])


def _model(mode="lvc", meta_optimizer="trpo", inner_steps=1, seed=0, **kwargs):
    return MetaPolicyGradient(
        "MlpPolicy",
        "sb3_metarl/Navigation2D-v0",
        gradient_mode=mode,
        meta_optimizer=meta_optimizer,
        inner_steps=inner_steps,
        seed=seed,
        **{**SMALL, **kwargs},
    )


def _sample(model):
    tasks = model.task_sampler.sample(model.meta_batch_size, np.random.default_rng(0))
    return model.collect_meta_sample(tasks)


@pytest.mark.parametrize("meta_optimizer", sorted(META_OPTIMIZERS))
@pytest.mark.parametrize("mode", sorted(GRADIENT_MODES))
def test_every_mode_composes_with_every_optimizer(mode, meta_optimizer):
    model = _model(mode, meta_optimizer, meta_batch_size=2, inner_episodes=2, outer_episodes=2)
    before = _parameters(model)
    model.learn(2 * 800)  # two meta-iterations of 2 tasks x (2 + 2) episodes x 100 steps
    after = _parameters(model)
    assert model.n_updates == 2 and th.isfinite(after).all()
    assert not th.equal(before, after)


@pytest.mark.parametrize("mode", ["lvc", "maml", "sf", "dice", "fomaml"])
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_trpo_step_respects_the_kl_bound_and_improves_the_surrogate(mode, inner_steps):
    model = _model(mode, meta_optimizer_kwargs=dict(max_kl=0.01), inner_steps=inner_steps)
    sample = _sample(model)
    old_adapted = {n: p.detach().clone() for n, p in sample.adapted.items()}
    before = _parameters(model)
    stats = model.meta_optimizer.step(model.adaptation, sample, model.policy.optimizer)
    assert stats["step_accepted"] == 1.0
    # measured independently: the adaptation re-run from the new parameters on the same inner samples
    replay = model.adaptation.replay(sample, create_graph=False)
    with th.no_grad():
        kl = model.adaptation.mean_kl(old_adapted, replay.adapted, sample.outer_batch).item()
        objective = TrustRegion.surrogate(model.adaptation, replay, sample).item()
        old_objective = TrustRegion.surrogate(model.adaptation, sample.replay, sample).item()
    assert 0 < kl <= 0.01
    assert objective > old_objective
    # the line search's KL comes from the layered adaptation, this one from autograd's replay: the same adapted
    # parameters up to rounding, which DiCE's cumulative-score inner gradient amplifies (layered against autograd,
    # measured on an AVX-512 Xeon, seeds 0-2: KL within 3e-6 relative at one inner step and 1.6e-4 at two for dice,
    # 1e-6 for the other modes)
    assert stats["kl"] == pytest.approx(kl, rel=1e-3 if mode == "dice" else 1e-4)
    assert stats["surrogate_improvement"] == pytest.approx(objective - old_objective, rel=1e-3, abs=1e-6)
    assert not th.equal(before, _parameters(model))


@pytest.mark.parametrize("inner_steps", [1, 2])
def test_trpo_hessian_vector_product_and_step_length(inner_steps):
    """H v matches finite differences of the KL's gradient; the full step reaches about max_kl."""
    model = _model("lvc", inner_steps=inner_steps, meta_optimizer_kwargs=dict(max_kl=1e-3, cg_damping=0.0, cg_max_steps=20))
    sample = _sample(model)
    natural = model.meta_optimizer.search_direction(model.adaptation, sample)
    params, old_values = natural.params, [p.detach().clone() for p in natural.params]
    old_adapted = {n: p.detach() for n, p in sample.adapted.items()}
    generator = th.Generator().manual_seed(0)
    vector = th.randn(natural.full_step.shape, generator=generator) * 1e-3
    product = natural.hessian_vector_product(vector).detach()  # before the parameters move

    def kl_gradient_at(offset):
        TrustRegion.set_parameters(params, old_values, offset)
        replay = model.adaptation.replay(sample)
        kl = model.adaptation.mean_kl(old_adapted, replay.adapted, sample.outer_batch)
        return th.cat([g.reshape(-1) for g in th.autograd.grad(kl, params)])

    epsilon = 1e-2
    finite_difference = (kl_gradient_at(epsilon * vector) - kl_gradient_at(-epsilon * vector)) / (2 * epsilon)
    assert th.nn.functional.cosine_similarity(product, finite_difference, dim=0) > 0.99
    assert product.norm() == pytest.approx(finite_difference.norm().item(), rel=0.05)
    # the step is scaled so that the KL's quadratic model 0.5 s^T H s reaches max_kl at the full step;
    # check that model where it holds, at a fifth of the step (predicted KL: max_kl / 25)
    TrustRegion.set_parameters(params, old_values, 0.2 * natural.full_step)
    with th.no_grad():
        replay = model.adaptation.replay(sample, create_graph=False)
        kl = model.adaptation.mean_kl(old_adapted, replay.adapted, sample.outer_batch).item()
    assert 0.5 < kl / (1e-3 / 25) < 2
    # the step ascends: its inner product with the meta-gradient is positive
    assert (natural.policy_gradient @ natural.full_step).item() > 0


def test_conjugate_gradient_solves_and_returns_the_product_of_its_solution():
    from sb3_metarl.meta_optimizers.trpo import conjugate_gradient

    generator = th.Generator().manual_seed(0)
    factor = th.randn(30, 30, generator=generator, dtype=th.float64)
    matrix = factor @ factor.T + 0.5 * th.eye(30, dtype=th.float64)
    b = th.randn(30, generator=generator, dtype=th.float64)
    calls = []

    def product(vector):
        calls.append(1)
        return matrix @ vector

    x, x_product = conjugate_gradient(product, b, max_iter=8)
    assert len(calls) == 8  # one product per iteration, none for A x
    th.testing.assert_close(x_product, matrix @ x, rtol=1e-10, atol=1e-10)  # the step length's x^T A x, exactly
    x, _ = conjugate_gradient(product, b, max_iter=60, residual_tol=1e-24)  # enough iterations: the solution
    th.testing.assert_close(matrix @ x, b, rtol=1e-6, atol=1e-6)


def test_trpo_rejects_every_step_when_the_surrogate_cannot_improve():
    model = _model("maml", meta_optimizer_kwargs=dict(line_search_max_iter=3))
    sample = _sample(model)
    for batch in [sample.outer_batch]:
        batch.advantages = th.zeros_like(batch.advantages)  # a flat surrogate: no step improves it
    before = _parameters(model)
    sample.objective = sample.objective * 0 + 1e-3 * sum(p.sum() for p in sample.adapted.values())
    stats = model.meta_optimizer.step(model.adaptation, sample, model.policy.optimizer)
    assert stats["step_accepted"] == 0.0 and stats["surrogate_improvement"] == 0.0
    assert th.equal(before, _parameters(model))


@pytest.mark.parametrize("mode", sorted(GRADIENT_MODES))
def test_ppo_first_epoch_gradient_is_the_meta_gradient(mode):
    """At the sampling parameters the clipped objective (with its KL penalty) has the mode's meta-gradient."""
    model = _model(mode, "ppo", inner_steps=2)
    sample = _sample(model)
    names = list(sample.task_theta)
    grads = th.autograd.grad(
        sample.objective.sum(), [sample.task_theta[n] for n in names], retain_graph=True, allow_unused=True
    )
    expected = {n: g.mean(0) for n, g in zip(names, grads) if g is not None}
    objective, clip_fraction, inner_kls = model.meta_optimizer.objective(
        model.adaptation, sample.replay, sample, sample.inner_params
    )
    loss = objective - sum(inner_kls)
    got = grad_params(loss, model.functional_policy.parameters())
    got, expected = th.cat([got[n].flatten() for n in expected]), th.cat([g.flatten() for g in expected.values()])
    # float32 sums in another order; lsf's whole-trajectory scores cancel, so compare against the norm
    assert (got - expected).norm() <= 1e-4 * expected.norm()
    assert clip_fraction.item() == 0.0
    assert all(abs(kl.item()) < 1e-6 for kl in inner_kls)


@pytest.mark.parametrize("mode", ["lvc", "lsf", "dice", "loaded_dice", "sf"])
def test_boxes_are_importance_weights_after_a_parameter_change(mode):
    """Re-evaluated away from the sampling parameters, boxes and ratios are not 1 and match exp(x - x_old)."""
    model = _model(mode, "ppo")
    sample = _sample(model)
    with th.no_grad():
        for param in model.policy.parameters():
            param.add_(0.05 * th.randn_like(param))
    replay = model.adaptation.replay(sample, create_graph=False)
    batch = sample.inner_batches[0]
    log_prob = replay.inner_log_probs[0].detach()
    value = model.gradient_mode.inner_surrogate(log_prob, batch)
    weights = th.exp(log_prob - batch.log_probs)
    if mode == "lvc":
        expected = (weights * batch.advantages).sum((1, 2)) / batch.n_episodes
    elif mode == "lsf":
        expected = (weights.prod(2) * batch.trajectory_advantages).sum(1) / batch.n_episodes
    else:
        expected = None
    if expected is not None:
        # lsf's weight is a product of 100 float32 ratios (its mode takes exp of a sum of log-ratios): ~1e-4 apart
        th.testing.assert_close(value, expected, rtol=1e-3, atol=1e-4)
    # the correction of sf / the inner surrogate of the boxed modes now differs from its value at sampling
    at_sampling = model.gradient_mode.inner_surrogate(batch.log_probs, batch)
    assert not th.allclose(value, at_sampling, rtol=1e-3)


def test_outer_surrogates_at_the_sampling_parameters():
    model = _model("maml", "ppo")
    sample = _sample(model)
    batch, log_prob = sample.outer_batch, sample.replay.outer_log_prob
    plain = (batch.advantages.sum((1, 2)) / batch.n_episodes).detach()
    th.testing.assert_close(ratio_surrogate(log_prob, batch).detach(), plain)
    clipped, fraction = clipped_surrogate(log_prob, batch, 0.2)
    th.testing.assert_close(clipped.detach(), plain)
    # a ratio of 2 on every step is clipped at 1.2 where the advantage is positive
    doubled, fraction = clipped_surrogate(log_prob.detach() + np.log(2.0), batch, 0.2)
    positive, negative = batch.advantages.clamp(min=0), batch.advantages.clamp(max=0)
    th.testing.assert_close(doubled, (1.2 * positive + 2.0 * negative).sum((1, 2)) / batch.n_episodes)
    assert fraction.item() == pytest.approx(1.0)


def test_ppo_epochs_improve_the_surrogate_and_adapt_the_inner_kl_penalty():
    model = _model("lvc", "ppo", learning_rate=3e-3, meta_optimizer_kwargs=dict(n_epochs=4, inner_kl_coef=1.0))
    sample = _sample(model)
    stats = model.meta_optimizer.step(model.adaptation, sample, model.policy.optimizer)
    assert stats["surrogate_improvement"] > 0
    assert 0 < stats["inner_kl"] < 0.01 / 1.5
    assert model.meta_optimizer.inner_kl_coefs == [0.5]  # a small inner KL halves the penalty
    assert stats["meta_grad_norm"] > 0


def test_ppo_inner_kl_penalty_doubles_when_the_pre_update_policy_moves_too_far():
    model = _model("lvc", "ppo", learning_rate=0.05, meta_optimizer_kwargs=dict(n_epochs=5, target_inner_kl=1e-6))
    model.meta_optimizer.step(model.adaptation, _sample(model), model.policy.optimizer)
    assert model.meta_optimizer.inner_kl_coefs == [2 * 5e-4]


@pytest.mark.parametrize("meta_optimizer", ["trpo", "ppo"])
def test_learn_logs_the_optimizer_statistics(meta_optimizer):
    model = _model("lsf", meta_optimizer, inner_steps=2, meta_batch_size=2, inner_episodes=2, outer_episodes=2)
    recorded = {}

    def record(key, value, exclude=None):
        recorded[key] = value

    model.learn(1, log_interval=None)
    model.logger.record = record
    model.train(_sample(model))
    assert recorded["train/surrogate_improvement"] >= 0
    assert np.isfinite(recorded["train/meta_grad_norm"])
    if meta_optimizer == "trpo":
        assert recorded["train/kl"] <= 0.01 and "train/learning_rate" not in recorded
    else:
        assert {"train/clip_fraction", "train/inner_kl", "train/inner_kl_coef", "train/learning_rate"} <= set(recorded)


class _ExplodingMode(MAML):
    name = "exploding"

    def correction(self, inner_log_probs, inner_batches, outer_batch):
        return inner_log_probs[0].sum((1, 2)) * float("nan")


@pytest.mark.parametrize("meta_optimizer", sorted(META_OPTIMIZERS))
def test_non_finite_meta_gradient_raises_and_keeps_the_training_state(meta_optimizer):
    assert isinstance(_ExplodingMode(), GradientMode)  # a user-defined mode
    model = _model(_ExplodingMode(), meta_optimizer, meta_batch_size=2, inner_episodes=2, outer_episodes=2)
    before = _parameters(model)
    optimizer_state = copy.deepcopy(model.policy.optimizer.state_dict())
    with pytest.raises(FloatingPointError, match=r"non-finite values in .*meta-update 1, after"):
        model.learn(10_000)
    assert th.equal(before, _parameters(model))
    assert model.policy.optimizer.state_dict()["state"] == optimizer_state["state"]


class _ExplodingOnReplay(MAML):
    """Finite at the sampling parameters, NaN once the parameters moved (PPO's later epochs)."""

    name = "exploding_on_replay"

    def correction(self, inner_log_probs, inner_batches, outer_batch):
        moved = (inner_log_probs[0] - inner_batches[0].log_probs).abs().max().detach() > 0
        return inner_log_probs[0].sum((1, 2)) * (float("nan") if moved else 0.0)


def test_ppo_later_epoch_failure_restores_the_state_before_the_update():
    """A failure after some optimizer steps undoes all of them, optimizer state included."""
    model = _model(_ExplodingOnReplay(), "ppo", meta_batch_size=2, inner_episodes=2, outer_episodes=2)
    before = _parameters(model)
    # epoch 0 (at the sampling parameters) is finite and takes an Adam step; epoch 1 fails
    with pytest.raises(FloatingPointError, match="non-finite"):
        model.learn(800)
    assert th.equal(before, _parameters(model))
    assert model.policy.optimizer.state_dict()["state"] == {}


def test_save_load_keeps_the_meta_optimizer_and_its_state(tmp_path):
    model = _model("lvc", "ppo", meta_batch_size=2, inner_episodes=2, outer_episodes=2, meta_optimizer_kwargs=dict(n_epochs=2))
    model.learn(800)
    coefs = list(model.meta_optimizer.inner_kl_coefs)
    model.save(tmp_path / "ppo.zip")
    loaded = MetaPolicyGradient.load(tmp_path / "ppo.zip", env="sb3_metarl/Navigation2D-v0")
    assert isinstance(loaded.meta_optimizer, ProMP)
    assert loaded.meta_optimizer.n_epochs == 2 and loaded.meta_optimizer.inner_kl_coefs == coefs
    loaded.learn(800, reset_num_timesteps=False)
    assert loaded.n_updates == model.n_updates + 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(meta_optimizer="natural"), "meta_optimizer: unknown"),
        (dict(meta_optimizer="trpo", meta_optimizer_kwargs=dict(max_kl=0)), "max_kl"),
        (dict(meta_optimizer="trpo", meta_optimizer_kwargs=dict(n_epochs=3)), "meta_optimizer_kwargs"),
        (dict(meta_optimizer="ppo", meta_optimizer_kwargs=dict(clip_range=-1)), "clip_range"),
        (dict(meta_optimizer="ppo", meta_optimizer_kwargs=dict(n_epochs=0)), "n_epochs"),
        (dict(meta_optimizer=ProMP(), meta_optimizer_kwargs=dict(n_epochs=3)), "meta_optimizer_kwargs"),
        (dict(meta_optimizer="ppo", policy_kwargs=dict(optimizer_class=th.optim.SGD)), "optimizer_class"),
    ],
)
def test_bad_meta_optimizer_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaPolicyGradient("MlpPolicy", "sb3_metarl/Navigation2D-v0", **kwargs)


def test_make_meta_optimizer_returns_instances_as_is():
    trpo = TrustRegion(max_kl=0.05)
    assert make_meta_optimizer(trpo) is trpo
    assert make_meta_optimizer("ppo", dict(n_epochs=3)).n_epochs == 3
    assert isinstance(FunctionalPolicy, type)


@pytest.mark.parametrize("layered", [True, False])
def test_trpo_s_fisher_subsample_takes_the_kl_hessian_on_the_first_outer_episodes_only(layered):
    kwargs = dict(max_kl=1e-3, cg_damping=0.0, cg_max_steps=20, layered_hessian=layered)
    directions = {}
    for fraction in (1.0, 0.5, 0.25):  # models of the same seed: the same sample
        model = _model("lvc", outer_episodes=8, meta_optimizer_kwargs=dict(fisher_subsample=fraction, **kwargs))
        sample = _sample(model)
        adaptation = model.adaptation if layered else model.adaptation.autograd()
        directions[fraction] = model.meta_optimizer.search_direction(adaptation, sample)
    full, subsampled = directions[1.0], directions[0.25]
    # the gradient is the whole sample's; the direction is that of the full products, up to the subsample's noise
    # (3 tasks x 8 episodes, seeds 0-2: cosine 0.82-0.97 at half the episodes, -0.01-0.73 at a quarter)
    assert th.equal(full.policy_gradient, subsampled.policy_gradient)
    assert th.nn.functional.cosine_similarity(full.full_step, directions[0.5].full_step, dim=0) > 0.7
    # the products are those of the KL's Hessian on the first 2 of the 8 outer episodes: finite differences of that
    # KL's gradient (the gradient itself, and the line search, keep all 8)
    first = sample.outer_batch.select_episodes(th.arange(8) < 2)
    params, old_values = subsampled.params, [p.detach().clone() for p in subsampled.params]
    old_adapted = {n: p.detach() for n, p in sample.adapted.items()}
    vector = th.randn(subsampled.full_step.shape, generator=th.Generator().manual_seed(0)) * 1e-3
    product = subsampled.hessian_vector_product(vector).detach()

    def kl_gradient_at(offset, batch):
        TrustRegion.set_parameters(params, old_values, offset)
        replay = model.adaptation.replay(sample)
        kl = model.adaptation.mean_kl(old_adapted, replay.adapted, batch)
        return th.cat([g.reshape(-1) for g in th.autograd.grad(kl, params)])

    on_first = (kl_gradient_at(1e-2 * vector, first) - kl_gradient_at(-1e-2 * vector, first)) / 2e-2
    on_all = (kl_gradient_at(1e-2 * vector, sample.outer_batch) - kl_gradient_at(-1e-2 * vector, sample.outer_batch)) / 2e-2
    assert th.nn.functional.cosine_similarity(product, on_first, dim=0) > 0.99
    assert product.norm() == pytest.approx(on_first.norm().item(), rel=0.05)
    assert (product - on_first).norm() < 0.2 * (product - on_all).norm()  # not the whole batch's Hessian
    with pytest.raises(ValueError, match="fisher_subsample"):
        TrustRegion(fisher_subsample=0.0)
