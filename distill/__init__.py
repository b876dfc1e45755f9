"""distill: knowledge distillation for language models.

``distill.train(config)`` runs a training job from a :class:`distill.Config`, a dict or a YAML path.
"""

__version__ = "0.1.0"

__all__ = ["Config", "load_config", "train"]


def __getattr__(name):  # lazy, so `distill --help` does not import torch
    if name == "train":
        from distill.training import train

        return train
    if name in ("Config", "load_config"):
        from distill import config

        return getattr(config, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")
