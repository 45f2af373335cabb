"""
The estimators wing: exact references of the meta-gradient (``exact``), the estimator study against them
(``study``, on the reference set-ups of ``setups``), Liu et al.'s bias decomposition (``decomposition``) and a
callback that compares modes during training (``callbacks``).
"""

from sb3_metarl.estimators.callbacks import MetaGradientDiagnosticsCallback
from sb3_metarl.estimators.decomposition import decomposed_meta_gradient
from sb3_metarl.estimators.exact import exact_meta_gradient, exact_value
from sb3_metarl.estimators.setups import make_bandit_model, make_tabular_model
from sb3_metarl.estimators.study import compare_with_exact, measure_estimators, summarize, write_csv

__all__ = [
    "MetaGradientDiagnosticsCallback",
    "compare_with_exact",
    "decomposed_meta_gradient",
    "exact_meta_gradient",
    "exact_value",
    "make_bandit_model",
    "make_tabular_model",
    "measure_estimators",
    "summarize",
    "write_csv",
]
