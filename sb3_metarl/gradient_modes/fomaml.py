"""First-order MAML: the inner step is a constant, the meta-gradient is the outer gradient."""

from sb3_metarl.gradient_modes.maml import MAML


class FOMAML(MAML):
    """Same inner surrogate as ``maml``, without differentiating through the inner step."""

    name = "fomaml"
    differentiate_inner_step = False
