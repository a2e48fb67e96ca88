"""The model: one Transformer assembled from a `ModelConfig`."""

from slmkit.config import PRESETS, ModelConfig
from slmkit.model.attention import KVCache
from slmkit.model.transformer import Transformer

__all__ = ["PRESETS", "KVCache", "ModelConfig", "Transformer"]
