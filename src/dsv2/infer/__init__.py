from dsv2.infer.engine import LLM, CompletionOutput, EngineDeadError, RequestOutput
from dsv2.infer.grammar import Grammar
from dsv2.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["LLM", "CompletionOutput", "EngineDeadError", "Grammar", "RequestOutput", "SamplingParams", "TokenLogprob"]
