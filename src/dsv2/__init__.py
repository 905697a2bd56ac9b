"""dsv2: DeepSeek-V2 (MLA + DeepSeekMoE) in PyTorch."""

from dsv2.checkpoint import CheckpointError, load, save
from dsv2.config import ModelConfig
from dsv2.infer import LLM, SamplingParams
from dsv2.model import LatentCache, Transformer
from dsv2.tokenizer import Tokenizer

__all__ = ["LLM", "CheckpointError", "LatentCache", "ModelConfig", "SamplingParams", "Tokenizer", "Transformer",
           "load", "save"]
