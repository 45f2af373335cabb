"""Acting with SB3's default MLP Gaussian actor layer by layer: a small network's forward costs its Python calls."""

import numpy as np
import torch as th
from stable_baselines3.common.policies import ActorCriticPolicy
from torch.nn import functional as F

from sb3_metarl.mlp.layout import MlpActorLayout


class LayeredActor:
    """
    The Gaussian actions of one policy copy, computed as ``extract_features -> mlp_extractor.forward_actor ->
    action_net`` and SB3's Gaussian sample compute them for this architecture (the same arithmetic, bit for bit),
    with the layers and the std read once per parameter load instead of on every call.

    :param layout: the actor's layout (``MlpActorLayout.of(policy)``)
    :param policy: the policy copy whose parameters are read (its tensors: a later in-place load is seen)
    """

    def __init__(self, layout: MlpActorLayout, policy: ActorCriticPolicy):
        params = dict(policy.named_parameters())
        self.hidden = [(params[weight], params[bias], activation.function) for weight, bias, activation in layout.hidden]
        self.output = (params[layout.output[0]], params[layout.output[1]])
        self.std = params[layout.log_std].exp()

    def sample(self, obs: np.ndarray, generator: th.Generator) -> th.Tensor:
        """
        :param obs: a batch of observations
        :param generator: the noise generator (CPU: the same noise on every device)
        :return: one sampled action per observation (before clipping)
        """
        # the layers' device (SB3's policy.device walks the parameters on every call)
        latent = th.as_tensor(obs, device=self.std.device)
        if latent.dtype != th.float32:
            latent = latent.float()
        if latent.dim() != 2:
            latent = latent.flatten(1)
        for weight, bias, function in self.hidden:
            latent = function(F.linear(latent, weight, bias))
        mean = F.linear(latent, *self.output)
        noise = th.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + self.std * noise
