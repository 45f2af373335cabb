"""Policy aliases: any SB3 actor-critic policy can be meta-trained."""

from stable_baselines3.common.policies import ActorCriticCnnPolicy, ActorCriticPolicy

MlpPolicy = ActorCriticPolicy
CnnPolicy = ActorCriticCnnPolicy
