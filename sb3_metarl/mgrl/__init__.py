"""The meta-gradient RL wing: an A2C that learns its own discount, GAE lambda and loss coefficients (Xu et al. 2018)."""

from sb3_metarl.mgrl.meta_gradient_a2c import MetaGradientA2C, MetaParameters, VirtualOptimizerStep, rollout_advantages

__all__ = ["MetaGradientA2C", "MetaParameters", "VirtualOptimizerStep", "rollout_advantages"]
