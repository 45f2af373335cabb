"""
Online meta-gradient RL (Xu et al. 2018, MGRL; Liu et al. 2022, Sec. 5.3): an A2C that learns its own discount,
GAE lambda, value and entropy coefficients by differentiating an outer objective through ``virtual_steps``
virtual A2C updates of its parameters (the "discard" strategy: the virtual parameters are thrown away, the real
update then uses the new meta-parameters).
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import A2C
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.utils import obs_as_tensor
from torch import nn
from torch.func import functional_call

from sb3_metarl.common.functional import Params
from sb3_metarl.gradient_modes import magic_box

#: the meta-parameters that can be learned (each kept in range by its transform: ``MetaParameters.value``)
META_PARAMETERS = ("gamma", "gae_lambda", "vf_coef", "ent_coef")
META_GRADIENTS = ("autodiff", "lvc")
VIRTUAL_UPDATES = ("optimizer", "sgd")


def _sqrt_where_positive(tensor: th.Tensor) -> th.Tensor:
    """sqrt, 0 where the argument is 0, with a finite derivative there (an unused parameter's second moment)"""
    positive = tensor > 0
    return th.where(positive, tensor, th.ones_like(tensor)).sqrt() * positive


class VirtualOptimizerStep:
    """
    The agent's own optimizer step (RMSprop, A2C's default; Adam; SGD), written as a differentiable function of the
    gradients, starting from the optimizer's current statistics: the virtual updates are the ones the agent makes
    (as Xu et al.'s and Liu et al.'s meta-gradient agents differentiate their own optimizer), with the same
    gradient-norm clipping. The statistics the virtual steps accumulate are their own (the optimizer is untouched).

    :param optimizer: the agent's optimizer (its first parameter group's settings are used)
    :param names: the names of the optimized parameters, in the optimizer's order
    :param learning_rate: the step size (the agent's current learning rate)
    :param max_grad_norm: the gradients' total norm is clipped to this (differentiated through, so the meta-gradient
        is the exact derivative of the virtual updates); None: no clip
    :raises ValueError: for optimizers or settings this step does not write out
    """

    def __init__(self, optimizer: th.optim.Optimizer, names: list[str], learning_rate: float, max_grad_norm: float | None):
        group = optimizer.param_groups[0]
        self.kind = type(optimizer).__name__
        unsupported = (
            self.kind not in ("RMSprop", "Adam", "SGD")
            or len(optimizer.param_groups) != 1
            or group.get("momentum", 0) != 0
            or group.get("centered", False)
            or group.get("amsgrad", False)
            or group.get("maximize", False)
            or group.get("nesterov", False)
        )
        if unsupported:
            raise ValueError(
                f"virtual_update='optimizer': {type(optimizer).__name__} with {sorted(k for k, v in group.items() if v)} "
                "is not written out (RMSprop without momentum or centering, Adam without amsgrad, plain SGD are); "
                "use virtual_update='sgd'."
            )
        self.group = group
        self.learning_rate = learning_rate
        self.max_grad_norm = max_grad_norm
        self.state: dict[str, dict[str, th.Tensor | float]] = {}
        for name, param in zip(names, group["params"]):
            state = optimizer.state.get(param, {})
            self.state[name] = {key: value.detach().clone() if th.is_tensor(value) else value for key, value in state.items()}

    def __call__(self, params: Params, grads: dict[str, th.Tensor]) -> Params:
        """:return: the parameters after one step with ``grads`` (differentiable in both)"""
        if self.max_grad_norm is not None:
            total_norm = _sqrt_where_positive(sum(g.pow(2).sum() for g in grads.values()))
            scale = th.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)  # as clip_grad_norm_
            grads = {name: g * scale for name, g in grads.items()}
        group, updated = self.group, {}
        for name, param in params.items():
            grad = grads.get(name)
            if grad is None:
                updated[name] = param
                continue
            if group.get("weight_decay", 0):
                grad = grad + group["weight_decay"] * param
            state = self.state.setdefault(name, {})
            if self.kind == "SGD":
                updated[name] = param - self.learning_rate * grad
            elif self.kind == "RMSprop":
                alpha = group["alpha"]
                square_avg = state.get("square_avg", th.zeros_like(param.detach()))
                state["square_avg"] = square_avg = alpha * square_avg + (1 - alpha) * grad * grad
                updated[name] = param - self.learning_rate * grad / (_sqrt_where_positive(square_avg) + group["eps"])
            else:  # Adam
                beta1, beta2 = group["betas"]
                step = float(state.get("step", 0.0)) + 1
                exp_avg = beta1 * state.get("exp_avg", th.zeros_like(param.detach())) + (1 - beta1) * grad
                exp_avg_sq = beta2 * state.get("exp_avg_sq", th.zeros_like(param.detach())) + (1 - beta2) * grad * grad
                state.update(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
                denominator = _sqrt_where_positive(exp_avg_sq) / math.sqrt(1 - beta2**step) + group["eps"]
                updated[name] = param - self.learning_rate / (1 - beta1**step) * exp_avg / denominator
        return updated


def rollout_advantages(
    rewards: th.Tensor,
    values: th.Tensor,
    episode_starts: th.Tensor,
    last_values: th.Tensor,
    last_dones: th.Tensor,
    gamma: th.Tensor | float,
    gae_lambda: th.Tensor | float,
) -> th.Tensor:
    """
    GAE(gamma, lambda) of a rollout of ``n_steps`` x ``n_envs``, as SB3's ``RolloutBuffer.compute_returns_and_advantage``
    computes it, but differentiable with respect to ``gamma`` and ``gae_lambda`` (tensors).

    :param rewards: (n_steps, n_envs)
    :param values: the value predictions (n_steps, n_envs)
    :param episode_starts: 1 where a step starts an episode (n_steps, n_envs)
    :param last_values: values of the observations after the last step (n_envs,)
    :param last_dones: whether the last step ended an episode (n_envs,)
    :return: the advantages (n_steps, n_envs); the returns are ``advantages + values``
    """
    advantages = []
    last = th.zeros_like(last_values)
    for step in reversed(range(rewards.shape[0])):
        if step == rewards.shape[0] - 1:
            next_non_terminal, next_values = 1.0 - last_dones, last_values
        else:
            next_non_terminal, next_values = 1.0 - episode_starts[step + 1], values[step + 1]
        delta = rewards[step] + gamma * next_values * next_non_terminal - values[step]
        last = delta + gamma * gae_lambda * next_non_terminal * last
        advantages.append(last)
    return th.stack(advantages[::-1])


class MetaParameters(nn.Module):
    """
    The meta-parameters in unconstrained form: gamma and lambda through a sigmoid, the coefficients through exp.

    :param values: initial values by name
    :param learned: the names that are learned (the others stay at their initial values)
    """

    def __init__(self, values: dict[str, float], learned: Sequence[str]):
        super().__init__()
        self.learned = tuple(learned)
        for name, value in values.items():
            raw = math.log(value / (1 - value)) if name in ("gamma", "gae_lambda") else math.log(value)
            self.register_parameter(name, nn.Parameter(th.tensor(raw, dtype=th.float32), requires_grad=name in self.learned))

    def value(self, name: str) -> th.Tensor:
        """:return: the meta-parameter ``name`` in its natural range (differentiable)"""
        raw = getattr(self, name)
        return th.sigmoid(raw) if name in ("gamma", "gae_lambda") else th.exp(raw)

    def values(self) -> dict[str, float]:
        """:return: every meta-parameter's current value"""
        with th.no_grad():
            return {name: self.value(name).item() for name in META_PARAMETERS}


class _EvaluateActions(nn.Module):
    """``policy.evaluate_actions`` as a module's forward, for ``functional_call`` with substituted parameters."""

    def __init__(self, policy: ActorCriticPolicy):
        super().__init__()
        self.policy = policy

    def forward(self, obs: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        return self.policy.evaluate_actions(obs, actions)


class MetaGradientA2C(A2C):
    """
    A2C whose discount, GAE lambda, value-loss and entropy coefficients are meta-parameters eta, learned online.
    After each rollout: ``virtual_steps`` updates of the A2C loss L(theta; eta) from the current parameters, by
    default the agent's own optimizer step (A2C's RMSprop with its current statistics, learning rate and gradient
    clipping; ``virtual_update="sgd"``: ``theta_{j+1} = theta_j - virtual_learning_rate * grad L(theta_j; eta)``),
    kept differentiable in eta; the outer objective, the policy-gradient surrogate with fixed reference values
    (``meta_objective_gamma``, ``meta_objective_gae_lambda``) weighted by the likelihood ratio of theta_k to the
    sampling policy, is differentiated with respect to eta and ascended with Adam (``meta_learning_rate``); the
    virtual parameters are discarded, the rollout's returns are recomputed with the new eta and A2C's real update
    follows.

    With ``meta_gradient="autodiff"`` the virtual steps differentiate the plain surrogate ``A log pi``; with
    ``"lvc"`` the surrogate ``A pi / pi_old`` (the same gradient at the sampling parameters, and the low-variance
    curvature of Rothfuss et al. for the later virtual steps: Liu et al.'s correction of the multi-step Hessian
    bias). With one virtual step both give the same meta-gradient.

    :param meta_parameters: the meta-parameters to learn (a subset of ``META_PARAMETERS``)
    :param virtual_steps: virtual A2C updates differentiated through (k; 3 in Liu et al.)
    :param meta_gradient: "autodiff" or "lvc"
    :param meta_learning_rate: Adam's learning rate on the unconstrained meta-parameters
    :param virtual_update: "optimizer": each virtual step is the agent's optimizer step (RMSprop, Adam or SGD written
        out, from the optimizer's statistics, with A2C's gradient-norm clipping), so the virtual updates are the
        agent's own and stay as stable as its real ones; "sgd": plain gradient steps of ``virtual_learning_rate``
    :param virtual_learning_rate: the virtual steps' size; None: the agent's current learning rate ("optimizer")
        or 0.1 ("sgd")
    :param meta_objective_gamma: the outer objective's discount (default: the initial ``gamma``)
    :param meta_objective_gae_lambda: the outer objective's GAE lambda
    :param gae_lambda: A2C's, 0.95 by default here (a learned lambda lives in (0, 1))
    :param ent_coef: A2C's, 0.01 by default here (a learned coefficient lives in log space)
    :param kwargs: the rest of A2C's arguments
    """

    meta_parameter_names: ClassVar[tuple[str, ...]] = META_PARAMETERS

    def __init__(
        self,
        policy: str | type[ActorCriticPolicy],
        env: GymEnv | str,
        meta_parameters: Sequence[str] = META_PARAMETERS,
        virtual_steps: int = 3,
        meta_gradient: str = "autodiff",
        meta_learning_rate: float = 1e-3,
        virtual_update: str = "optimizer",
        virtual_learning_rate: float | None = None,
        meta_objective_gamma: float | None = None,
        meta_objective_gae_lambda: float = 1.0,
        gae_lambda: float = 0.95,
        ent_coef: float = 0.01,
        _init_setup_model: bool = True,
        **kwargs: Any,
    ):
        unknown = [name for name in meta_parameters if name not in META_PARAMETERS]
        if unknown or isinstance(meta_parameters, str):
            raise ValueError(f"meta_parameters: {unknown or meta_parameters!r} not among {META_PARAMETERS}.")
        if meta_gradient not in META_GRADIENTS:
            raise ValueError(f"meta_gradient: must be one of {META_GRADIENTS}, got {meta_gradient!r}.")
        if virtual_update not in VIRTUAL_UPDATES:
            raise ValueError(f"virtual_update: must be one of {VIRTUAL_UPDATES}, got {virtual_update!r}.")
        if virtual_learning_rate is not None and not virtual_learning_rate > 0:
            raise ValueError(f"virtual_learning_rate: must be > 0 (or None), got {virtual_learning_rate!r}.")
        if not (isinstance(virtual_steps, int) and virtual_steps >= 1):
            raise ValueError(f"virtual_steps: must be an integer >= 1, got {virtual_steps!r}.")
        gamma, vf_coef = kwargs.get("gamma", 0.99), kwargs.get("vf_coef", 0.5)
        for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda)):
            if name in meta_parameters and not 0 < value < 1:
                raise ValueError(f"{name}: must be in (0, 1) to be meta-learned (through a sigmoid), got {value!r}.")
        for name, value in (("vf_coef", vf_coef), ("ent_coef", ent_coef)):
            if name in meta_parameters and not value > 0:
                raise ValueError(f"{name}: must be > 0 to be meta-learned (in log space), got {value!r}.")
        self.meta_parameter_list = tuple(meta_parameters)
        self.virtual_steps = virtual_steps
        self.meta_gradient = meta_gradient
        self.meta_learning_rate = meta_learning_rate
        self.virtual_update = virtual_update
        self.virtual_learning_rate = virtual_learning_rate
        self.meta_objective_gamma = gamma if meta_objective_gamma is None else meta_objective_gamma
        self.meta_objective_gae_lambda = meta_objective_gae_lambda
        super().__init__(policy, env, gae_lambda=gae_lambda, ent_coef=ent_coef, _init_setup_model=False, **kwargs)
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        super()._setup_model()
        initial = {name: float(getattr(self, name)) for name in META_PARAMETERS}
        # a value at the edge of its range (gamma = 1) cannot be written through a sigmoid: keep it just inside
        for name in ("gamma", "gae_lambda"):
            initial[name] = min(max(initial[name], 1e-6), 1 - 1e-6)
        for name in ("vf_coef", "ent_coef"):
            initial[name] = max(initial[name], 1e-8)
        self.meta_module = MetaParameters(initial, self.meta_parameter_list).to(self.device)
        learned = [p for p in self.meta_module.parameters() if p.requires_grad]
        self.meta_parameter_optimizer = th.optim.Adam(learned, lr=self.meta_learning_rate) if learned else None
        self._evaluate = _EvaluateActions(self.policy)
        if self.virtual_update == "optimizer":  # fail at construction, not at the first update
            self.virtual_step_function()

    def meta_parameter_values(self) -> dict[str, float]:
        """:return: the current gamma, gae_lambda, vf_coef and ent_coef"""
        return self.meta_module.values()

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        state_dicts, tensors = super()._get_torch_save_params()
        extra = ["meta_module"] + (["meta_parameter_optimizer"] if self.meta_parameter_optimizer is not None else [])
        return [*state_dicts, *extra], tensors

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "meta_module", "meta_parameter_optimizer", "_evaluate"]

    # ------------------------------------------------------------------ the meta-gradient

    def rollout_tensors(self) -> dict[str, th.Tensor]:
        """:return: the current rollout buffer's data as tensors, with the values and episode ends after its last step"""
        buffer = self.rollout_buffer
        tensors = {
            name: th.as_tensor(getattr(buffer, name), device=self.device).float()
            for name in ("rewards", "values", "episode_starts", "log_probs")
        }
        tensors["last_values"] = self._last_values()
        tensors["last_dones"] = th.as_tensor(self._last_episode_starts, device=self.device).float()
        observations = buffer.observations.reshape(-1, *buffer.obs_shape)
        tensors["observations"] = obs_as_tensor(observations, self.device)
        actions = th.as_tensor(buffer.actions.reshape(-1, buffer.action_dim), device=self.device)
        tensors["actions"] = actions.long().flatten() if isinstance(self.action_space, spaces.Discrete) else actions
        return tensors

    def _evaluate_with(self, params: Params, rollout: dict[str, th.Tensor]) -> tuple[th.Tensor, th.Tensor, th.Tensor | None]:
        # canonical names with tie_weights=False: SB3 registers a shared features extractor under three names, and
        # tied substitution would leave a substituted tensor on the policy (see common/functional.py)
        substituted = {"policy." + n: p for n, p in params.items()}
        inputs = (rollout["observations"], rollout["actions"])
        try:
            return functional_call(self._evaluate, substituted, inputs, tie_weights=False)
        except ValueError as error:  # torch's distributions reject non-finite parameters (overflowed virtual steps)
            if "invalid values" not in str(error):
                raise
            raise FloatingPointError(
                f"virtual update: the policy's outputs are non-finite at the virtual parameters ({self.virtual_update!r}, "
                f"learning rate {self.virtual_learning_rate}); lower virtual_learning_rate or use virtual_update='optimizer'."
            ) from error

    def _a2c_loss(self, params: Params, rollout: dict[str, th.Tensor], meta: dict[str, th.Tensor]) -> th.Tensor:
        values, log_prob, entropy = self._evaluate_with(params, rollout)
        advantages = rollout_advantages(
            rollout["rewards"], rollout["values"], rollout["episode_starts"], rollout["last_values"], rollout["last_dones"],
            meta["gamma"], meta["gae_lambda"],
        ).flatten()  # fmt: skip
        returns = advantages + rollout["values"].flatten()
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        if self.meta_gradient == "lvc":  # the likelihood ratio against the sampling policy: 1 at theta_0
            policy_term = magic_box(log_prob, rollout["log_probs"].flatten())
        else:
            policy_term = log_prob
        policy_loss = -(advantages * policy_term).mean()
        value_loss = (returns - values.flatten()).pow(2).mean()
        entropy_loss = -th.mean(-log_prob) if entropy is None else -th.mean(entropy)
        return policy_loss + meta["ent_coef"] * entropy_loss + meta["vf_coef"] * value_loss

    def virtual_step_function(self) -> Callable[[Params, dict[str, th.Tensor]], Params]:
        """:return: (parameters, their gradients) -> the parameters after one virtual update (differentiable)"""
        if self.virtual_update == "sgd":
            learning_rate = 0.1 if self.virtual_learning_rate is None else self.virtual_learning_rate

            def sgd(params: Params, grads: dict[str, th.Tensor]) -> Params:
                return {n: p if n not in grads else p - learning_rate * grads[n] for n, p in params.items()}

            return sgd
        names = {param: name for name, param in self.policy.named_parameters()}
        learning_rate = self.virtual_learning_rate or self.lr_schedule(self._current_progress_remaining)
        optimizer = self.policy.optimizer
        return VirtualOptimizerStep(optimizer, [names[p] for p in optimizer.param_groups[0]["params"]], learning_rate,
                                    self.max_grad_norm)  # fmt: skip

    def virtual_parameters(self, rollout: dict[str, th.Tensor], meta: dict[str, th.Tensor]) -> Params:
        """
        :param rollout: the rollout's tensors (:meth:`rollout_tensors`)
        :param meta: the meta-parameters' values by name (tensors, differentiable)
        :return: the policy's parameters after the ``virtual_steps`` virtual updates, differentiable in ``meta``
        """
        params = {n: p for n, p in self.policy.named_parameters() if p.requires_grad}
        step = self.virtual_step_function()
        with th.enable_grad():
            for _ in range(self.virtual_steps):
                loss = self._a2c_loss(params, rollout, meta)
                grads = th.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
                params = step(params, {n: g for n, g in zip(params, grads) if g is not None})
                if not all(bool(th.isfinite(p).all()) for p in params.values()):
                    raise FloatingPointError(
                        f"virtual update: non-finite parameters after a virtual step ({self.virtual_update!r}, learning "
                        f"rate {self.virtual_learning_rate}); lower virtual_learning_rate or use virtual_update='optimizer'."
                    )
        return params

    def meta_objective(self, rollout: dict[str, th.Tensor] | None = None) -> th.Tensor:
        """
        The outer objective after the virtual steps from the current parameters on the current rollout,
        differentiable with respect to the meta-parameters.

        :param rollout: the rollout's tensors (default: the current rollout buffer's)
        :return: the policy-gradient surrogate at theta_k with the reference gamma and lambda, weighted by
            the likelihood ratio of theta_k to the sampling policy (a scalar, to maximize)
        """
        rollout = rollout or self.rollout_tensors()
        meta = {name: self.meta_module.value(name) for name in META_PARAMETERS}
        params = self.virtual_parameters(rollout, meta)
        with th.enable_grad():
            _, log_prob, _ = self._evaluate_with(params, rollout)
        with th.no_grad():
            reference = rollout_advantages(
                rollout["rewards"], rollout["values"], rollout["episode_starts"], rollout["last_values"],
                rollout["last_dones"], self.meta_objective_gamma, self.meta_objective_gae_lambda,
            ).flatten()  # fmt: skip
        # SB3's distribution object keeps the last distribution it built: here one on the virtual parameters' graph
        self.policy.action_dist.distribution = None
        return (magic_box(log_prob, rollout["log_probs"].flatten()) * reference).mean()

    def train(self) -> None:
        """The meta-update of eta (virtual steps discarded), the rollout's returns under the new eta, A2C's update."""
        # the virtual steps are discarded: the policy, hence the bootstrap values, are the rollout's
        rollout = self.rollout_tensors() if self.meta_parameter_optimizer is not None else None
        if rollout is not None:
            self.policy.set_training_mode(True)
            objective = self.meta_objective(rollout)
            learned = [p for p in self.meta_module.parameters() if p.requires_grad]
            grads = th.autograd.grad(objective, learned, allow_unused=True)
            grads = [th.zeros_like(p) if g is None else g for p, g in zip(learned, grads)]
            if not all(th.isfinite(g).all() for g in grads):
                raise FloatingPointError(
                    f"meta-gradient: non-finite values for {list(self.meta_parameter_list)}; lower virtual_learning_rate "
                    "or meta_learning_rate."
                )
            self.meta_parameter_optimizer.zero_grad()
            for param, grad in zip(learned, grads):
                param.grad = -grad  # ascend the outer objective
            self.meta_parameter_optimizer.step()
            self.logger.record("meta/objective", objective.item())
            self.logger.record("meta/grad_norm", th.sqrt(sum(g.pow(2).sum() for g in grads)).item())
        self._apply_meta_parameters(self._last_values() if rollout is None else rollout["last_values"])
        super().train()

    def _last_values(self) -> th.Tensor:
        """:return: the value predictions of the observations after the rollout's last step (n_envs,)"""
        with th.no_grad():
            return self.policy.predict_values(obs_as_tensor(self._last_obs, self.device)).flatten()

    def _apply_meta_parameters(self, last_values: th.Tensor) -> None:
        values = self.meta_parameter_values()
        self.gamma, self.gae_lambda = values["gamma"], values["gae_lambda"]
        self.vf_coef, self.ent_coef = values["vf_coef"], values["ent_coef"]
        buffer = self.rollout_buffer
        buffer.gamma, buffer.gae_lambda = self.gamma, self.gae_lambda
        buffer.compute_returns_and_advantage(last_values=last_values, dones=np.asarray(self._last_episode_starts))
        for name, value in values.items():
            self.logger.record(f"meta/{name}", value)
