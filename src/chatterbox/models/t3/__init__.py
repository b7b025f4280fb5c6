from .modules.cond_enc import T3Cond
from .modules.t3_config import T3Config
from .t3 import T3

__all__ = ["T3", "T3Cond", "T3Config"]
