from sb3_metarl.meta_pg.evaluation import format_adaptation_table
from sb3_metarl.meta_pg.meta_pg import MetaPolicyGradient
from sb3_metarl.meta_pg.policies import CnnPolicy, MlpPolicy

__all__ = ["CnnPolicy", "MetaPolicyGradient", "MlpPolicy", "format_adaptation_table"]
