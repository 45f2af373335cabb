"""TRPO meta-updates (MAML, pytorch-maml-rl): a trust region on the KL of the adapted policies."""

import dataclasses
import math
import warnings
from collections.abc import Callable

import torch as th

from sb3_metarl.adaptation import Adaptation, MetaSample, Replay
from sb3_metarl.meta_optimizers.base import MetaOptimizer, check_finite_gradient, restore_on_failure
from sb3_metarl.meta_optimizers.surrogates import ratio_surrogate


def _flat(tensors: list[th.Tensor | None], like: list[th.Tensor]) -> th.Tensor:
    return th.cat([(th.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(tensors, like)])


def _unflat(vector: th.Tensor, names: list[str], like: list[th.Tensor]) -> dict[str, th.Tensor]:
    sizes = [p.numel() for p in like]
    return {n: part.view_as(p) for n, part, p in zip(names, vector.split(sizes), like)}


def conjugate_gradient(
    matrix_vector_product: Callable[[th.Tensor], th.Tensor], b: th.Tensor, max_iter: int, residual_tol: float = 1e-10
) -> tuple[th.Tensor, th.Tensor]:
    """
    Solve ``A x = b`` for a symmetric positive-definite ``A`` given as a product, starting from x = 0
    (as pytorch-maml-rl and garage do; sb3-contrib's solver starts from a random point drawn from
    torch's global generator, which would make every TRPO step depend on the caller's random state).

    :param matrix_vector_product: v -> A v
    :param b: the right-hand side
    :param max_iter: iterations at most (each one product)
    :param residual_tol: stop when the squared residual norm falls below this
    :return: the approximate solution x, and ``A x`` as the same combination of the products already computed
        (x is a combination of the search directions): TRPO's step length needs ``x^T A x`` without one more product
    """
    x = th.zeros_like(b)
    x_product = th.zeros_like(b)
    residual = b.clone()
    direction = b.clone()
    residual_sq = residual @ residual
    for _ in range(max_iter):
        if residual_sq.item() < residual_tol:
            break
        product = matrix_vector_product(direction)
        alpha = residual_sq / (direction @ product)
        x = x + alpha * direction
        x_product = x_product + alpha * product
        residual = residual - alpha * product
        new_residual_sq = residual @ residual
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return x, x_product


@dataclasses.dataclass
class NaturalStep:
    """TRPO's search direction at the sampling parameters."""

    #: the policy parameters the step applies to (in the flat vectors' order)
    params: list[th.Tensor]
    #: the meta-objective's gradient (flat)
    policy_gradient: th.Tensor
    #: the step to the trust region's boundary, ``sqrt(2 max_kl / s^T H s) s`` with ``s = H^-1 g`` (flat)
    full_step: th.Tensor
    #: the surrogate's value at the sampling parameters
    objective: float
    #: v -> (H + damping I) v, H the Hessian of the adapted policies' mean KL
    hessian_vector_product: Callable[[th.Tensor], th.Tensor]


class TrustRegion(MetaOptimizer):
    """
    Maximize the meta-objective with the outer surrogate ``r_t Psi_t`` (r: the adapted policy's
    likelihood ratio against the outer samples' sampling policy) subject to
    ``mean KL(pi_{theta'_old} || pi_{theta'(theta)}) <= max_kl`` on the outer observations, where
    theta' is the adaptation re-run on the stored inner samples. The natural-gradient direction
    comes from conjugate gradient with Hessian-vector products of that KL (through the inner steps);
    a backtracking line search accepts the first step that improves the surrogate and keeps the KL
    within bound, and otherwise leaves the parameters unchanged.

    :param max_kl: the trust region's radius (0.01 in MAML and pytorch-maml-rl)
    :param cg_max_steps: conjugate gradient iterations
    :param cg_damping: damping added to the KL Hessian (``H + damping * I``)
    :param line_search_shrinking_factor: step shrinking factor of the line search
    :param line_search_max_iter: step sizes tried by the line search
    :param layered_hessian: for SB3's default MLP actor, write the update's derivatives out layer by layer:
        the products with the KL's Hessian (one inner step) from cached activations (the same products; the
        speed-up is measured in docs/results/profile_update.md) and the line search's points
        (``sb3_metarl.mlp.LayeredAdaptation``); False: double backward
        through the adaptation's graph and autograd replays (as pytorch-maml-rl), for comparison
    :param fisher_subsample: the fraction of each task's outer episodes whose states the KL's Hessian (the
        conjugate gradient's products) is taken on, the first ``ceil(fraction * M)`` (episodes are independent: an
        unbiased subset); the gradient, the line search and its KL bound use every episode. rllab, garage and ProMP
        subsample the Fisher products so; each product costs the fraction of the outer part, and the direction
        changes with the subsample's noise, much on a small batch (3 tasks x 8 episodes on Navigation2D: cosine with
        the exact direction 0.82-0.97 at half the episodes, about 0 to 0.73 at a quarter). 1.0 (default): every
        episode, the exact products
    """

    name = "trpo"
    uses_learning_rate = False
    # zips saved before the option existed unpickle without the attribute: they take every episode, as they did
    fisher_subsample: float = 1.0

    def __init__(
        self,
        max_kl: float = 0.01,
        cg_max_steps: int = 10,
        cg_damping: float = 0.01,
        line_search_shrinking_factor: float = 0.8,
        line_search_max_iter: int = 15,
        layered_hessian: bool = True,
        fisher_subsample: float = 1.0,
    ):
        if not max_kl > 0:
            raise ValueError(f"max_kl: must be > 0, got {max_kl}.")
        if cg_max_steps < 1 or line_search_max_iter < 1:
            raise ValueError(
                f"cg_max_steps and line_search_max_iter: must be >= 1, got {cg_max_steps} and {line_search_max_iter}."
            )
        fraction_given = isinstance(fisher_subsample, (int, float)) and not isinstance(fisher_subsample, bool)
        if not fraction_given or not 0 < fisher_subsample <= 1:
            raise ValueError(f"fisher_subsample: must be a fraction in (0, 1], got {fisher_subsample!r}.")
        if cg_damping < 0 or not 0 < line_search_shrinking_factor < 1:
            raise ValueError(
                "cg_damping must be >= 0 and line_search_shrinking_factor in (0, 1), "
                f"got {cg_damping} and {line_search_shrinking_factor}."
            )
        self.max_kl = max_kl
        self.cg_max_steps = cg_max_steps
        self.cg_damping = cg_damping
        self.line_search_shrinking_factor = line_search_shrinking_factor
        self.line_search_max_iter = line_search_max_iter
        self.layered_hessian = layered_hessian
        self.fisher_subsample = float(fisher_subsample)

    @staticmethod
    def surrogate(adaptation: Adaptation, replay: Replay, sample: MetaSample) -> th.Tensor:
        """:return: the meta-objective with TRPO's outer surrogate (the importance ratio), averaged over tasks"""
        return adaptation.sample_objective(sample, replay, ratio_surrogate).mean()

    def search_direction(self, adaptation: Adaptation, sample: MetaSample) -> NaturalStep:
        """
        The natural-gradient step at the sampling parameters, scaled to the trust region's boundary
        under the KL's quadratic model.

        :raises FloatingPointError: on a non-finite meta-gradient or a non-positive curvature
        """
        all_params = adaptation.parameters()
        # the sample's own graph is the adaptation at the current parameters: reuse it (and free it where
        # the KL's Hessian does not need it)
        objective = self.surrogate(adaptation, sample.replay, sample)
        keep_graph = adaptation.kl_hessian_needs_graph(sample)
        grads = th.autograd.grad(objective, list(all_params.values()), retain_graph=keep_graph, allow_unused=True)
        check_finite_gradient({n: g for n, g in zip(all_params, grads) if g is not None})
        # the policy's parameters: the value head receives no gradient and stays out of the solve
        names = [n for n, g in zip(all_params, grads) if g is not None]
        params = [all_params[n] for n in names]
        policy_gradient = th.cat([g.reshape(-1) for g in grads if g is not None])
        # the KL's gradient is 0 at the old parameters; its Hessian (through the inner steps) is the
        # Fisher information of the adapted policies pulled back to theta
        kl_hessian_product = adaptation.kl_hessian_product(self.curvature_sample(sample), names)

        def hessian_vector_product(vector: th.Tensor) -> th.Tensor:
            product = kl_hessian_product(_unflat(vector, names, params))
            return _flat([product[n] for n in names], params) + self.cg_damping * vector

        if not bool(policy_gradient.any()):  # a flat objective: no direction to move in
            zero = th.zeros_like(policy_gradient)
            return NaturalStep(params, zero, zero, objective.item(), hessian_vector_product)
        direction, direction_product = conjugate_gradient(hessian_vector_product, policy_gradient.detach(), self.cg_max_steps)
        curvature = (direction @ direction_product).item()
        if not (math.isfinite(curvature) and curvature > 0):
            raise FloatingPointError(
                f"meta-update: the KL curvature along the TRPO direction is {curvature}; the parameters were left "
                "unchanged. Raise cg_damping or lower inner_lr."
            )
        full_step = math.sqrt(2.0 * self.max_kl / curvature) * direction.detach()
        return NaturalStep(params, policy_gradient.detach(), full_step, objective.item(), hessian_vector_product)

    def curvature_sample(self, sample: MetaSample) -> MetaSample:
        """:return: ``sample`` with the outer episodes the KL's Hessian is taken on (``fisher_subsample``)"""
        if self.fisher_subsample == 1.0:
            return sample
        outer = sample.outer_batch
        n_episodes = outer.masks.shape[1]
        kept = th.arange(n_episodes, device=outer.masks.device) < math.ceil(self.fisher_subsample * n_episodes)
        return dataclasses.replace(sample, outer_batch=outer.select_episodes(kept))

    def step(self, adaptation: Adaptation, sample: MetaSample, optimizer: th.optim.Optimizer) -> dict[str, float]:
        # the layered twin (SB3's default MLP actor) or, for comparison, its autograd reference
        adaptation = adaptation if self.layered_hessian else adaptation.autograd()
        return self.line_search(adaptation, sample, self.search_direction(adaptation, sample), optimizer)

    def line_search(
        self, adaptation: Adaptation, sample: MetaSample, natural: NaturalStep, optimizer: th.optim.Optimizer
    ) -> dict[str, float]:
        """
        Backtrack along ``natural.full_step`` from the sampling parameters; set the parameters to the first
        point that improves the surrogate within the trust region, or leave them unchanged.

        :param natural: the search direction at the sampling parameters (:meth:`search_direction`)
        :return: values to log under ``train/``
        :raises FloatingPointError: if no point of the line search has a finite surrogate and KL
        """
        params = natural.params
        old_adapted = {n: p.detach() for n, p in sample.adapted.items()}
        old_values = [p.detach().clone() for p in params]
        with th.no_grad():  # the trust region's reference, the same at every point
            old_distribution = adaptation.batch_distribution(old_adapted, sample.outer_batch)
        accepted, coefficient, new_objective, new_kl, any_finite = False, 1.0, natural.objective, 0.0, False
        with restore_on_failure(adaptation.parameters(), optimizer):
            for _ in range(self.line_search_max_iter):
                self.set_parameters(params, old_values, coefficient * natural.full_step)
                # no graph: the points are only compared (layer by layer for SB3's default MLP actor)
                replay = adaptation.evaluate(sample)
                with th.no_grad():
                    new_objective = self.surrogate(adaptation, replay, sample).item()
                    new_kl = adaptation.mean_kl(
                        old_adapted, replay.adapted, sample.outer_batch, old_distribution, replay.outer_distribution
                    ).item()
                any_finite = any_finite or (math.isfinite(new_objective) and math.isfinite(new_kl))
                if math.isfinite(new_objective) and new_objective > natural.objective and new_kl <= self.max_kl:
                    accepted = True
                    break
                coefficient *= self.line_search_shrinking_factor
            if not accepted:
                self.set_parameters(params, old_values, th.zeros_like(natural.full_step))
            if not any_finite:
                # not a rejected step but a broken objective: never a silent "no step" at every iteration
                raise FloatingPointError(
                    "meta-update: every line search point's surrogate or KL is non-finite; the parameters were left "
                    "unchanged. Lower inner_lr or max_kl."
                )
        return {
            "meta_grad_norm": natural.policy_gradient.norm().item(),
            "surrogate_improvement": new_objective - natural.objective if accepted else 0.0,
            "expected_improvement": (natural.policy_gradient @ natural.full_step).item(),
            "kl": new_kl if accepted else 0.0,
            "line_search_coefficient": coefficient if accepted else 0.0,
            "step_accepted": float(accepted),
        }

    @staticmethod
    def set_parameters(params: list[th.Tensor], old_values: list[th.Tensor], flat_step: th.Tensor) -> None:
        """Set ``params`` to ``old_values`` plus the flat vector ``flat_step``, in place."""
        offset = 0
        with th.no_grad():
            for param, old in zip(params, old_values):
                size = param.numel()
                param.copy_(old + flat_step[offset : offset + size].view_as(param))
                offset += size

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(max_kl={self.max_kl}, cg_max_steps={self.cg_max_steps}, cg_damping={self.cg_damping}, "
            f"layered_hessian={self.layered_hessian})"
        )


def __getattr__(name: str) -> type:
    # the class's name in 0.1 (its zips, tests/data/v0_1_0 among them, pickle it by that name): a pickle path only
    if name == "TRPO":
        warnings.warn("sb3_metarl.meta_optimizers.TRPO is deprecated; use TrustRegion.", DeprecationWarning, stacklevel=2)
        return TrustRegion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
