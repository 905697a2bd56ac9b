"""dsv2: DeepSeek-V2 (MLA + DeepSeekMoE) in PyTorch."""

from dsv2.checkpoint import CheckpointError, load, save
from dsv2.config import ModelConfig
from dsv2.model import LatentCache, Transformer

__all__ = ["CheckpointError", "LatentCache", "ModelConfig", "Transformer", "load", "save"]
