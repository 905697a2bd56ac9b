from dsv2.infer.engine import LLM, CompletionOutput, RequestOutput
from dsv2.infer.sampling import SamplingParams, TokenLogprob

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "TokenLogprob"]
