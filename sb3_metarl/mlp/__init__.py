"""
The layered twin of SB3's default MLP Gaussian actor: one detector (``MlpActorLayout.of``), one activation table,
and the passes written out layer by layer where autograd's per-call cost dominates: acting (``LayeredActor``),
the line search's evaluations and TRPO's KL-Hessian products (``LayeredAdaptation``). A twin gives the values of
what it twins (bit for bit when acting, up to float rounding for the derivatives); an actor the detector does not
recognise takes the autograd path.
"""

from sb3_metarl.mlp.acting import LayeredActor
from sb3_metarl.mlp.adaptation import LayeredAdaptation, make_adaptation
from sb3_metarl.mlp.layout import ACTIVATIONS, Activation, MlpActorLayout

__all__ = ["ACTIVATIONS", "Activation", "LayeredActor", "LayeredAdaptation", "MlpActorLayout", "make_adaptation"]
