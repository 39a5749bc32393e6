"""Uptraining: turn a Hugging Face causal LM into a hypervocab model (``hypervocab train``)."""

from .config import DataSource, LoraSettings, TrainConfig

__all__ = ["DataSource", "LoraSettings", "TrainConfig", "train"]


def __getattr__(name: str):
    if name == "train":  # the trainer needs torch: import it only when asked for
        from .trainer import train

        return train
    raise AttributeError(f"module 'hypervocab.training' has no attribute {name!r}")
