from dsv2.infer.engine import LLM, CompletionOutput, EngineDeadError, RequestOutput
from dsv2.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["LLM", "CompletionOutput", "EngineDeadError", "RequestOutput", "SamplingParams", "TokenLogprob"]
