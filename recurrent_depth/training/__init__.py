"""Training: typed config, depth samplers, truncated-backprop steps, AdamW schedules, checkpoints, DDP/FSDP2."""

from recurrent_depth.depth_sampler import FixedDepth, NonRecurrent, PoissonLogNormalFilling, make_sampler
from recurrent_depth.training.config import ConfigError, TrainConfig, config_from_dict, load_config


def train(*args, **kwargs):
    """See `recurrent_depth.training.loop.train` (imported lazily: it loads torch and transformers)."""
    from recurrent_depth.training.loop import train as _train

    return _train(*args, **kwargs)


__all__ = ["ConfigError", "FixedDepth", "NonRecurrent", "PoissonLogNormalFilling", "TrainConfig", "config_from_dict",
           "load_config", "make_sampler", "train"]
