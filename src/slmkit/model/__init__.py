"""The model: one Transformer assembled from a `ModelConfig`."""

from slmkit.config import PRESETS, ModelConfig
from slmkit.model.attention import KVCache
from slmkit.model.cache import Cache
from slmkit.model.transformer import ModelOutput, Transformer

__all__ = ["PRESETS", "Cache", "KVCache", "ModelConfig", "ModelOutput", "Transformer"]
