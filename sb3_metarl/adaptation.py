"""
The differentiable adaptation theta -> theta_zeta(theta): the inner step, its replay on stored
samples, the meta-objective O + C and the KL between per-task policies.

This room sits above ``common`` and ``gradient_modes`` and below the meta-optimizers, which get an
:class:`Adaptation`, a :class:`MetaSample` and a torch optimizer (never the algorithm). Sampling is
not its job: :meth:`Adaptation.unroll` asks a callable for each inner batch, which either samples
fresh episodes (a meta-iteration, meta-test adaptation) or returns stored ones (a replay).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution

from sb3_metarl.common.baselines import Baseline
from sb3_metarl.common.buffers import EpisodeBatch
from sb3_metarl.common.functional import FunctionalPolicy, Params, grad_params, inner_update, kl_divergence
from sb3_metarl.gradient_modes import GradientMode, policy_gradient_surrogate

#: (log-likelihoods (B, E, H) under the adapted parameters, the outer batch) -> outer surrogate per task (B,)
OuterSurrogate = Callable[[th.Tensor, EpisodeBatch], th.Tensor]
#: (inner step k, the parameters theta_k) -> the inner batch D_k (sampled with theta_k, or stored), None to stop
InnerBatchSource = Callable[[int, Params], EpisodeBatch | None]


def masked_log_prob(policy: FunctionalPolicy, task_params: Params, batch: EpisodeBatch) -> th.Tensor:
    """:return: log-likelihoods (B, E, H) of the batch's actions under ``task_params``, zero where masked"""
    return batch.unpack_rows(policy.log_prob(task_params, batch.packed_observations(), batch.packed_actions()))


def per_task_norm(grads: Params) -> th.Tensor:
    """:return: the Euclidean norm of each task's gradient (B,), over all parameters"""
    return th.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


@dataclass
class Weighting:
    """How an episode batch gets its policy-gradient weights (discount, GAE lambda, baseline)."""

    observation_space: spaces.Space
    gamma: float
    gae_lambda: float
    baseline: Baseline | None
    normalize_advantage: bool = False
    discount_from_start: bool = True

    def __call__(self, batch: EpisodeBatch) -> EpisodeBatch:
        """:return: ``batch`` with its weights filled in (see ``EpisodeBatch.compute_weights``)"""
        return batch.compute_weights(
            self.observation_space, self.gamma, self.gae_lambda, self.baseline, self.normalize_advantage,
            self.discount_from_start,
        )  # fmt: skip


@dataclass
class Replay:
    """An adaptation from the current parameters on given samples, with its graph."""

    #: per-task views of the current parameters theta; gradients with respect to them are per task
    task_theta: Params
    #: theta_k(theta) at which each inner batch was evaluated, theta_0 .. theta_{zeta-1} (graph-carrying)
    inner_params: list[Params]
    #: log-likelihoods (B, E, H) of each inner batch under theta_k(theta)
    inner_log_probs: list[th.Tensor]
    #: theta_zeta(theta), the adapted parameters
    adapted: Params
    #: each inner step's per-task gradient norms (B,) before clipping (detached)
    inner_grad_norms: list[th.Tensor]
    #: log-likelihoods (B, E, H) of the outer batch under theta_zeta(theta) (None before the outer batch exists)
    outer_log_prob: th.Tensor | None = None
    #: the adapted policies' action distribution on the outer batch, where the replay computed it anyway
    #: (:meth:`Adaptation.evaluate`; see :meth:`Adaptation.mean_kl`)
    outer_distribution: Distribution | None = None


@dataclass
class MetaSample:
    """One meta-iteration's samples and the graph of its meta-objective."""

    #: the gradient mode that adapted while sampling (and whose meta-objective ``objective`` is)
    mode: GradientMode
    #: the adaptation that collected the samples, with its graph
    replay: Replay
    #: the meta-objective per task, O + C (B,), with the policy-gradient outer surrogate
    objective: th.Tensor
    inner_batches: list[EpisodeBatch]
    outer_batch: EpisodeBatch
    #: mean over inner steps and tasks of the inner gradient's norm (before clipping)
    inner_grad_norm: float

    @property
    def task_theta(self) -> Params:
        """Per-task copies of theta; the objective's gradient with respect to them is the per-task meta-gradient."""
        return self.replay.task_theta

    @property
    def adapted(self) -> Params:
        """The adapted parameters theta_zeta (graph-carrying)."""
        return self.replay.adapted

    @property
    def inner_params(self) -> list[Params]:
        """The (detached) parameters each inner batch was sampled with, theta_0 .. theta_{zeta-1}."""
        # cloned: theta_0 is a view of the live parameters, which the meta-update changes in place
        return [{n: p.detach().clone() for n, p in params.items()} for params in self.replay.inner_params]


class Adaptation:
    """
    The inner loop ``theta_{k+1} = theta_k + eta * clip(grad S(theta_k; D_k))`` for B tasks at once,
    differentiable with respect to theta (see ``docs/meta-gradients.md``), and what is computed from it.

    :param policy: the functional policy whose parameters are adapted
    :param inner_lr: the inner step size eta
    :param inner_grad_clip: each task's inner gradient is scaled down to this norm when longer (a
        constant factor, not differentiated: the step is the spec's with a smaller eta); None: no clipping
    :param weighting: gives sampled batches their policy-gradient weights
    """

    def __init__(self, policy: FunctionalPolicy, inner_lr: float, inner_grad_clip: float | None, weighting: Weighting):
        self.policy = policy
        self.inner_lr = float(inner_lr)
        self.inner_grad_clip = inner_grad_clip
        self.weighting = weighting

    def parameters(self) -> Params:
        """:return: the meta-parameters theta (the live policy parameters) by name"""
        return self.policy.parameters()

    def task_parameters(self, n_tasks: int, detach: bool = False) -> Params:
        """:return: per-task views of theta (leading dim ``n_tasks``), graph-carrying unless ``detach``"""
        params = self.parameters()
        if detach:
            params = {n: p.detach() for n, p in params.items()}
        return FunctionalPolicy.expand(params, n_tasks)

    def log_prob(self, task_params: Params, batch: EpisodeBatch) -> th.Tensor:
        """:return: log-likelihoods (B, E, H) of the batch under ``task_params``, zero where masked"""
        return masked_log_prob(self.policy, task_params, batch)

    def inner_step(
        self, task_params: Params, batch: EpisodeBatch, mode: GradientMode, create_graph: bool, at_sampling: bool = False
    ) -> tuple[Params, th.Tensor, th.Tensor]:
        """
        One adaptation step per task.

        :param mode: the gradient mode whose inner surrogate S is ascended
        :param create_graph: keep the step's graph (to differentiate through it)
        :param at_sampling: ``task_params`` are the parameters ``batch`` was sampled with: store the
            recomputed log-likelihoods as the batch's sampling log-likelihoods (see ``EpisodeBatch.log_probs``)
        :return: the new per-task parameters, the batch's log-likelihoods under ``task_params`` and each
            task's inner-gradient norm before clipping (B,)
        """
        log_prob = self.log_prob(task_params, batch)
        if at_sampling:
            # reused episodes keep their behaviour policy's log-likelihoods: their boxes are importance weights
            fresh = log_prob.detach()
            batch.log_probs = fresh if batch.reused is None else th.where(batch.reused.unsqueeze(-1), batch.log_probs, fresh)
        surrogate = mode.inner_surrogate(log_prob, batch)
        grads = grad_params(surrogate.sum(), task_params, create_graph=create_graph)
        norms = per_task_norm({n: g.detach() for n, g in grads.items()})
        return inner_update(task_params, grads, self.inner_lr, self.clip_factor(norms)), log_prob, norms

    def clip_factor(self, norms: th.Tensor) -> th.Tensor | None:
        """:return: the per-task factor (B,) the inner gradients of norms ``norms`` are scaled by; None without clipping"""
        if self.inner_grad_clip is None:
            return None
        return (self.inner_grad_clip / norms.clamp(min=1e-30)).clamp(max=1.0)

    def clip_scale(self, norms: th.Tensor) -> th.Tensor:
        """:return: :meth:`clip_factor` as a tensor (B,): ones without clipping"""
        factor = self.clip_factor(norms)
        return th.ones_like(norms) if factor is None else factor

    def unroll(
        self,
        task_theta: Params,
        n_steps: int,
        inner_batch: InnerBatchSource,
        mode: GradientMode,
        create_graph: bool,
        at_sampling: bool = False,
    ) -> tuple[Replay, list[EpisodeBatch], list[float]] | None:
        """
        The inner loop (the only one): ``n_steps`` inner steps from ``task_theta``.

        :param inner_batch: gives D_k for step k at theta_k: fresh samples, or a stored batch (replay)
        :param create_graph: differentiate through the steps (if ``mode`` does)
        :param at_sampling: the batches were sampled with the parameters they are evaluated at
        :return: the adaptation (no outer log-likelihoods yet), the inner batches and each step's mean
            inner-gradient norm; None if ``inner_batch`` returned None (a callback stopped sampling)
        """
        # the inner steps are gradients: they need autograd even when the caller evaluates under no_grad
        with th.enable_grad():
            params, inner_params, batches, log_probs, norms = task_theta, [], [], [], []
            for k in range(n_steps):
                batch = inner_batch(k, params)
                if batch is None:
                    return None
                inner_params.append(params)
                params, log_prob, norm = self.inner_step(
                    params, batch, mode, create_graph and mode.differentiate_inner_step, at_sampling
                )
                batches.append(batch)
                log_probs.append(log_prob)
                norms.append(norm)
        return Replay(task_theta, inner_params, log_probs, params, norms), batches, [n.mean().item() for n in norms]

    def replay(self, sample: MetaSample, mode: GradientMode | None = None, create_graph: bool = True) -> Replay:
        """
        Re-run the adaptation from the current parameters on ``sample``'s stored inner episodes.

        :param mode: the gradient mode whose inner steps to run (default: the sample's)
        :param create_graph: differentiate through the inner steps (if the mode does); False to only evaluate
        :return: the adaptation's graph and the outer batch's log-likelihoods under the adapted parameters
        """
        mode = mode or sample.mode
        with th.enable_grad():  # the views must carry the graph even when the caller evaluates under no_grad
            task_theta = self.task_parameters(sample.outer_batch.n_tasks)
        unrolled = self.unroll(task_theta, len(sample.inner_batches), lambda k, _: sample.inner_batches[k], mode, create_graph)
        assert unrolled is not None  # stored batches never stop
        replay = unrolled[0]
        replay.outer_log_prob = self.log_prob(replay.adapted, sample.outer_batch)
        return replay

    def evaluate(self, sample: MetaSample) -> Replay:
        """
        The values of :meth:`replay` without any graph (a line search's points): the same adaptation, inner
        log-likelihoods, gradient norms and outer log-likelihoods. The layered twin of SB3's default MLP actor
        (``sb3_metarl.mlp.LayeredAdaptation``) computes them layer by layer, with the outer batch's action
        distribution.

        :return: a replay whose tensors are all detached
        """
        with th.no_grad():
            replay = self.replay(sample, create_graph=False)

        def detach(params: Params) -> Params:
            return {n: p.detach() for n, p in params.items()}

        return Replay(
            detach(replay.task_theta), [detach(params) for params in replay.inner_params],
            [log_prob.detach() for log_prob in replay.inner_log_probs], detach(replay.adapted),
            replay.inner_grad_norms, replay.outer_log_prob.detach(),
        )  # fmt: skip

    def autograd(self) -> "Adaptation":
        """:return: this adaptation computed through autograd only (itself; a twin returns its reference)"""
        return self

    @staticmethod
    def objective(
        replay: Replay,
        inner_batches: list[EpisodeBatch],
        outer_batch: EpisodeBatch,
        mode: GradientMode,
        outer: OuterSurrogate = policy_gradient_surrogate,
    ) -> th.Tensor:
        """
        The meta-objective per task (B,), ``O(theta_zeta(theta)) + C(theta)``: the one place outer
        surrogate and correction are combined.

        :param outer: the outer surrogate O: the policy gradient's (default), or a meta-optimizer's
            (TRPO's importance ratio, PPO's clipped ratio); all have the same gradient at the sampling
            parameters
        """
        objective = outer(replay.outer_log_prob, outer_batch)
        correction = mode.correction(replay.inner_log_probs, inner_batches, outer_batch)
        return objective if correction is None else objective + correction

    def sample_objective(
        self, sample: MetaSample, replay: Replay | None = None, outer: OuterSurrogate | None = None
    ) -> th.Tensor:
        """:return: ``objective`` for ``sample``'s batches and mode, on ``replay`` (default: the sample's own graph)"""
        replay = replay or sample.replay
        return self.objective(
            replay, sample.inner_batches, sample.outer_batch, sample.mode, outer or policy_gradient_surrogate
        )

    def per_task_meta_gradient(self, sample: MetaSample, mode: GradientMode | None = None) -> Params:
        """
        Another mode on the same samples: the inner batches were drawn with the parameters adapted by
        ``sample``'s own mode; where ``mode``'s inner step has a different value (``lsf`` against the
        advantage-weighted modes, ``loaded_dice`` with lambda < 1), the samples of later inner steps and the outer
        samples are slightly off-policy for it. Its magic boxes and LVC ratios then weigh the later inner samples
        by their importance weights (taken against the stored sampling log-likelihoods); the policy-gradient terms
        get no correction. With one inner step the inner samples are on-policy for every mode.

        :param mode: a gradient mode to evaluate on the same samples, on a replayed graph of its own; None: the
            sample's own objective (whose graph this consumes)
        :return: parameter name -> (B, ...) per-task ascent directions of the meta-objective
        """
        if mode is None:
            return grad_params(sample.objective.sum(), sample.task_theta)
        replay = self.replay(sample, mode)
        objective = self.objective(replay, sample.inner_batches, sample.outer_batch, mode)
        return grad_params(objective.sum(), replay.task_theta)

    def batch_distribution(self, task_params: Params, batch: EpisodeBatch) -> Distribution:
        """
        :return: the per-task policies' action distribution on ``batch``'s observations (task-major, flattened), at its
            packed rows (``EpisodeBatch.row_packing``)
        """
        return self.policy.distribution(task_params, batch.packed_observations())

    def mean_kl(
        self,
        old_params: Params,
        new_params: Params,
        batch: EpisodeBatch,
        old_distribution: Distribution | None = None,
        new_distribution: Distribution | None = None,
    ) -> th.Tensor:
        """
        :param old_params: per-task parameters of the reference policy (detached here)
        :param new_params: per-task parameters (graph-carrying or not)
        :param batch: episodes whose observations the KL is averaged over
        :param old_distribution: the reference policy's :meth:`batch_distribution` on ``batch`` if already computed
            (a line search compares many points with the same reference)
        :param new_distribution: ``new_params``' :meth:`batch_distribution` on ``batch`` if already computed
            (:attr:`Replay.outer_distribution`)
        :return: KL(pi_old || pi_new) averaged over the batch's steps and tasks (a scalar)
        """
        if old_distribution is None:
            old_distribution = self.batch_distribution({n: p.detach() for n, p in old_params.items()}, batch)
        new = new_distribution if new_distribution is not None else self.batch_distribution(new_params, batch)
        masks = batch.packed_masks().reshape(-1)
        return (kl_divergence(old_distribution, new) * masks).sum() / masks.sum()

    def kl_hessian_product(self, sample: MetaSample, names: list[str]) -> Callable[[Params], Params]:
        """
        Products with the Hessian H, at the sampling parameters, of the adapted policies' mean KL
        ``mean_kl(theta'_old, theta'(theta), outer batch)``, theta' the adaptation replayed on the stored
        inner batches (TRPO's trust region). Call it while the parameters are the sample's.

        At the sampling parameters the KL's gradient with respect to theta' is exactly zero, so
        ``H = sum_b J_b^T G_b J_b``, with ``J_b`` the inner step's Jacobian and ``G_b`` the KL's
        Hessian in theta'_b (the outer Fisher information). Here H is differentiated twice through the
        sample's graph (double backward); the layered twin writes the products out (``sb3_metarl.mlp``).

        :param names: the parameters of the tangents (those the meta-objective depends on)
        :return: v (shared tangents by name) -> H v (by name)
        """
        params = self.parameters()
        old_adapted = {n: p.detach() for n, p in sample.adapted.items()}
        kl = self.mean_kl(old_adapted, sample.adapted, sample.outer_batch)
        kl_gradient = th.autograd.grad(kl, [params[n] for n in names], create_graph=True, allow_unused=True)

        def product(vector: Params) -> Params:
            inner = sum((g * vector[n]).sum() for n, g in zip(names, kl_gradient) if g is not None)
            return grad_params(inner, {n: params[n] for n in names}, retain_graph=True)

        return product

    def kl_hessian_needs_graph(self, sample: MetaSample) -> bool:
        """:return: whether :meth:`kl_hessian_product` differentiates ``sample``'s graph (keep it until then)"""
        return True

    def adapt(self, task_params: Params, batch: EpisodeBatch, mode: GradientMode) -> Params:
        """
        One inner step at meta-test time (no meta-graph): the public way to adapt parameters on a batch.

        :param task_params: per-task parameters the batch was sampled with
        :param batch: the episodes, with weights (``weighting``)
        :param mode: the gradient mode whose inner step to take
        :return: the adapted per-task parameters (detached)
        """
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in task_params.items()}
        with th.enable_grad():
            adapted, _, _ = self.inner_step(leaves, batch, mode, create_graph=False, at_sampling=True)
        return {n: p.detach() for n, p in adapted.items()}
