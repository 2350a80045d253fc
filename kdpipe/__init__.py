"""kdpipe: declarative pipelines for knowledge distillation and model compression."""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# `${kdpipe.one_minus:${..alpha}}`: the CE weight of classic KD, 1 - alpha (conf/base/offline.yaml).
OmegaConf.register_new_resolver("kdpipe.one_minus", lambda x: 1.0 - float(x), replace=True)
