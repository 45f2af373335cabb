"""Policy aliases: any SB3 actor-critic policy can be meta-trained."""

from typing import Any

from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

#: the actor initializations ``MlpPolicy`` takes (``actor_init``)
ACTOR_INITS = (None, "xavier_uniform")


class MlpPolicy(ActorCriticPolicy):
    """
    SB3's ``ActorCriticPolicy`` with one more option: how the actor's layers are initialized.

    :param actor_init: None (default): SB3's (orthogonal with ``ortho_init``, gain 0.01 on the action head, so the
        initial mean action is about 0 in every state); ``"xavier_uniform"``: Glorot-uniform weights and zero biases on
        every linear layer of the actor, its hidden layers and its action head, as the meta-RL reference codes initialize
        their policies (pytorch-maml-rl ``maml_rl/policies/policy.py:6-9``; maml_zoo, ProMP's and SG-MRL's,
        ``maml_zoo/policies/networks/mlp.py:12-13``; metaworld-algorithms ``examples/meta_learning/maml_trpo_ml10.py:55-63``).
        The critic and ``log_std`` keep SB3's initialization either way.
    :param args: SB3's ``ActorCriticPolicy`` arguments
    :param kwargs: SB3's ``ActorCriticPolicy`` keyword arguments
    """

    def __init__(self, *args: Any, actor_init: str | None = None, **kwargs: Any):
        if actor_init not in ACTOR_INITS:
            raise ValueError(
                f"actor_init: must be one of {ACTOR_INITS} (None: SB3's initialization), got {actor_init!r}; pass it as "
                "policy_kwargs=dict(actor_init='xavier_uniform')."
            )
        # read by _build, which the parent's constructor calls
        self.actor_init = actor_init
        super().__init__(*args, **kwargs)

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        if self.actor_init == "xavier_uniform":
            actor = [*self.mlp_extractor.policy_net.modules(), self.action_net]
            for layer in (module for module in actor if isinstance(module, nn.Linear)):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "actor_init": self.actor_init}


CnnPolicy = ActorCriticCnnPolicy
