"""LLM: requests in, text out. `step()` is four calls: schedule, run the model, sample, update.

    llm = LLM("path/to/checkpoint")
    outputs = llm.generate(["The capital of France is"], SamplingParams(max_tokens=32, temperature=0))

The incremental API (`add_request`, `step`, `abort`) is what a server streams from.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from dsv2 import gguf
from dsv2.checkpoint import load, planned_weight_bytes, read_config
from dsv2.config import ModelConfig
from dsv2.default_model import default_model_dir
from dsv2.hardware import check_device, warn_if_bf16_is_slow
from dsv2.infer.blocks import BlockAllocator
from dsv2.infer.cache import FP8, PagedLatentCache, available_memory
from dsv2.infer.grammar import Constraints
from dsv2.infer.runner import ModelRunner, transpose_weights_for_gemv_
from dsv2.infer.sampling import SamplerInput, SamplingParams, TokenLogprob, generation_defaults, sample
from dsv2.infer.scheduler import Scheduled, Scheduler
from dsv2.infer.scheduler import Sequence as SchedSeq
from dsv2.kernels import onednn, prepare, quant
from dsv2.model import Transformer
from dsv2.tokenizer import StreamDecoder, Tokenizer

Prompt = str | Sequence[int]
Message = Mapping[str, Any]

log = logging.getLogger("dsv2")

# A model that fails this many steps in a row is broken, not unlucky with one batch: the engine stops.
MAX_FAILED_STEPS_IN_A_ROW = 3


class EngineDeadError(RuntimeError):
    """The engine cannot go on (its bookkeeping broke, or every step fails); nothing it holds will finish."""


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"; None while generating
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    logprobs: list[TokenLogprob] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    error: str | None = None  # why the engine failed this request (finish_reason "error")

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState] = field(default_factory=list)
    error: str | None = None


@dataclass(eq=False)
class _SeqState:
    seq: SchedSeq
    request: _Request
    out: CompletionOutput
    generator: torch.Generator | None
    decoder: StreamDecoder | None
    matcher: Any = None  # llguidance matcher of the request's grammar, advanced token by token
    full_text: str = ""  # detokenized so far, before any stop-string trimming or hold-back


class LLM:
    def __init__(
        self,
        model: str | os.PathLike | Transformer | None = None,
        tokenizer: Tokenizer | str | os.PathLike | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        max_cache_tokens: int | None = None,
        max_model_len: int | None = None,
        cache_memory_fraction: float = 0.2,
        cache_dtype: torch.dtype | str | None = None,
        block_size: int = 16,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        prefix_caching: bool = True,
        gemv_layout: bool | None = None,
        compile: bool = False,
        gemm: str = "auto",
        quantization: str | None = None,
    ) -> None:
        """model: a checkpoint directory (config.json + safetensors, usually a tokenizer too), a llama.cpp GGUF
        file (dsv2.gguf; requantized to int8 or int4 as its types suggest unless quantization says otherwise, with
        the tokenizer from its metadata), a built model, or None for the model shipped in the package (dsv2-tiny).
        dtype: weights and activations (default: the checkpoint's torch_dtype). cache_dtype: the model
        dtype (default) or "fp8" (e4m3 with per-token scales). The cache holds max_cache_tokens tokens, or
        as many as cache_memory_fraction of the free memory allows. max_model_len: the longest sequence
        (prompt + output) a request may reach; default and upper bound the model's context, and never more
        than the cache holds, so that a lone request can always run to its end. gemv_layout: store weights column-major
        for faster one-row products on CPU (default: on for CPU when the engine loads the checkpoint itself;
        a model passed in is never re-laid-out unless asked). compile: run decode-only steps through a
        torch.compile'd graph of the model (faster decode after a compile of up to minutes on first use; see
        ModelRunner). gemm: "onednn" multiplies fp32 projections and experts through oneDNN with weights packed
        once (dsv2.kernels.onednn; gemv_layout is then moot), "torch" through F.linear; "auto" (default) packs on an
        x86 CPU when the engine loads the checkpoint itself and does not compile -- a model passed in is packed
        only if asked, since packing makes it inference-only. quantization: "int8" or "int4" weight-only
        projections and experts (dsv2.kernels.quant), quantized as the checkpoint streams in, or applied to a
        model passed in; a checkpoint written by `dsv2 quantize` loads in its own format without it. Before
        loading, the weights' size in the requested format is checked against the free memory. device: where
        the engine runs (default: a built model's own device, else the CPU); the cache and every step's tensors
        live there."""
        if isinstance(model, Transformer):
            own = next(model.parameters()).device
            asked = None if device is None else check_device(device)
            if asked is not None and (asked.type != own.type or asked.index not in (None, own.index)):
                raise ValueError(f"device={str(device)!r}, but the model passed in is on {own}: move it first "
                                 "(model.to(device)) or leave device unset")
            device = own
        self.device = check_device("cpu" if device is None else device)
        # What a request that leaves a sampling field unset gets (the server and the CLI read it): the
        # checkpoint's generation_config.json, as transformers and vLLM use it.
        self.generation_defaults: dict[str, Any] = {}
        scheme = quant.resolve(quantization)
        if isinstance(model, Transformer):
            self.model = model.eval()
            if scheme is not None:
                quant.quantize_(self.model, scheme)
        else:
            path = Path(model) if model is not None else default_model_dir()
            from_gguf = path.is_file() and gguf.is_gguf(path)
            if from_gguf and scheme is None:
                # the format nearest the file's own: what its users chose it for (Q8_0 -> int8, Q4_K -> int4)
                scheme = quant.resolve(gguf.suggested_quantization(path))
            else:
                self.generation_defaults = generation_defaults(path)
            _check_fits(path, _dtype(dtype), scheme, self.device)
            self.model = load(path, dtype=_dtype(dtype), device=self.device, quantization=scheme)
            if tokenizer is None and from_gguf:
                tokenizer = _gguf_tokenizer(path)
            elif tokenizer is None and (path / "tokenizer.json").is_file():
                tokenizer = path
        quantized = any(isinstance(m, quant.QuantLinear | quant.QuantExperts) for m in self.model.modules())
        if quantized and compile:
            raise ValueError("compile=True is not supported with quantized weights yet: their products run "
                             "eagerly through dsv2's or torch's int8/int4 kernels")
        own_cpu_model = self.device.type == "cpu" and not isinstance(model, Transformer)
        # With quantized weights, what stays dense (embedding, norms, router, wkv_b) is read a row or a head
        # at a time: neither packing nor a column-major layout would pay.
        packed = not quantized and onednn.wanted(gemm, self.device) and (
            gemm == "onednn" or (own_cpu_model and not compile))
        if packed:
            if compile:
                raise ValueError("compile=True and gemm='onednn' are alternatives: the compiled decode graph "
                                 "multiplies dense weights itself")
            onednn.pack_for_inference_(self.model)
        elif not quantized and (gemv_layout or (gemv_layout is None and own_cpu_model)):
            transpose_weights_for_gemv_(self.model)
        if self.device.type == "cpu" and (own_cpu_model or quantized):
            # Only for a model that is the engine's alone (loaded here, or made inference-only by quantization):
            # a model passed in may go on training, and the blocks are copies.
            prepare.prepare_(self.model, quant.kv_up_form(self.model.cfg, quantized))
        if self.device.type == "cuda" and not quantized:
            _use_triton_experts(self.model)
        self.cfg = self.model.cfg
        self.tokenizer = tokenizer if isinstance(tokenizer, Tokenizer | None) else Tokenizer.from_dir(tokenizer)
        self.dtype = next(self.model.parameters()).dtype
        warn_if_bf16_is_slow(self.dtype, self.device, "the engine runs", "pass dtype=\"float32\" (--dtype float32)")
        cache_dtype = _cache_dtype(cache_dtype, self.dtype)
        self.cache_bytes_per_token = PagedLatentCache.bytes_per_token(self.cfg, cache_dtype)
        context = self.cfg.max_position_embeddings
        if max_model_len is not None and not 0 < max_model_len <= context:
            raise ValueError(f"max_model_len={max_model_len} must be in [1, {context}] (the model's context)")
        self.max_model_len = max_model_len or context
        if max_cache_tokens is None:
            budget = int(cache_memory_fraction * available_memory(self.device)) // self.cache_bytes_per_token
            max_cache_tokens = min(budget, max_num_seqs * self.max_model_len)
        if max_cache_tokens < block_size:
            raise ValueError(f"max_cache_tokens={max_cache_tokens} is less than one block of {block_size} tokens")
        num_blocks = math.ceil(max_cache_tokens / block_size)
        if num_blocks * block_size < self.max_model_len:
            # A sequence longer than the cache could only preempt itself and wait forever for room.
            log.warning("the latent cache holds %d tokens, less than max_model_len %d: requests are capped at "
                        "%d tokens (prompt + output); give more cache (max_cache_tokens) for longer ones",
                        num_blocks * block_size, self.max_model_len, num_blocks * block_size)
            self.max_model_len = num_blocks * block_size
        self.cache = PagedLatentCache(self.cfg, num_blocks, block_size, cache_dtype, self.device)
        self.weight_bytes = quant.model_weight_bytes(self.model)
        log.info("weights %.2f GiB%s; latent cache %.2f GiB, %d tokens", self.weight_bytes / 2**30,
                 f" ({scheme.method})" if quantized and scheme else "",
                 num_blocks * block_size * self.cache_bytes_per_token / 2**30, num_blocks * block_size)
        self.allocator = BlockAllocator(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.allocator, max_num_seqs, max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache, compile_decode=compile)
        self.eos_ids = {i for i in (self.cfg.eos_token_id, getattr(self.tokenizer, "eos_id", None)) if i is not None}
        self._requests: dict[str, _Request] = {}
        self._states: dict[int, _SeqState] = {}  # by scheduler sequence id, while generating
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._rng = random.Random()
        self._failed_in_a_row = 0
        self.failed_steps = 0
        self._constraints: Constraints | None = None  # built on the first request with a grammar

    # ---------------------------------------------------------------- incremental API
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    suffix: str | None = None) -> str:
        """suffix: fill in the middle; the prompt (a string) is the text before the hole, `suffix` the text after
        it, and the completion is the middle (needs a tokenizer with FIM tokens, as Coder-V2's has)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self._tokenize(prompt, suffix)
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room for output in a context of "
                             f"{self.max_model_len} tokens (prompt + output)")
        bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.cfg.vocab_size}): {bad[:5]}")
        matchers = [self._matcher(params) for _ in range(params.n)]  # an invalid grammar fails here, whole
        request = _Request(request_id, text, ids, params)
        for index in range(params.n):
            seq = SchedSeq(next(self._seq_ids), list(ids), len(ids))
            self.scheduler.add(seq)
            decoder = StreamDecoder(self.tokenizer, params.skip_special_tokens) if self.tokenizer else None
            out = CompletionOutput(index, "", [], logprobs=[] if params.logprobs is not None else None)
            state = _SeqState(seq, request, out, self._generator(params, index), decoder, matchers[index])
            request.seqs.append(state)
            self._states[seq.seq_id] = state
        self._requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its cache blocks; returns its final output (None if unknown)."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return None
        for state in request.seqs:
            if state.out.finish_reason is None:
                self.scheduler.finish(state.seq)
                del self._states[state.seq.seq_id]
                state.out.finish_reason = "abort"
        return self._output(request)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns the requests that produced tokens, with everything they have so far.

        If the model or the sampler raises, the requests of this step finish with finish_reason "error" (their
        blocks freed) and the others go on; EngineDeadError when the engine itself cannot go on."""
        batch = self.scheduler.schedule()
        if not batch:
            if self._requests:  # every admitted request must be able to progress; never spin on it
                raise EngineDeadError(f"the scheduler made no progress with {len(self._requests)} requests held")
            return []
        sampled = [self._states[item.seq.seq_id] for item in batch if item.samples]
        try:
            logits = self.runner.run(batch)
            allowed = self._allowed(sampled)
            rows = [SamplerInput(s.request.params, s.generator, s.request.prompt_ids, s.out.token_ids, a)
                    for s, a in zip(sampled, allowed)]
            tokens, logprobs = sample(logits, rows)
        except Exception as e:  # noqa: BLE001 -- contained: only this step's requests fail
            return self._fail(batch, e)
        self._failed_in_a_row = 0
        self.scheduler.update(batch)
        touched: dict[str, _Request] = {}
        for state, token, logprob in zip(sampled, tokens, logprobs):
            self._append(state, token, logprob)
            touched[state.request.request_id] = state.request
        outputs = [self._output(r) for r in touched.values()]
        for out in outputs:
            if out.finished:
                del self._requests[out.request_id]
        return outputs

    def _fail(self, batch: list[Scheduled], error: Exception) -> list[RequestOutput]:
        """Finish every request with a sequence in the failed step, with finish_reason "error"."""
        self.failed_steps += 1
        self._failed_in_a_row += 1
        if self._failed_in_a_row >= MAX_FAILED_STEPS_IN_A_ROW:
            raise EngineDeadError(f"{self._failed_in_a_row} engine steps failed in a row; last: "
                                  f"{type(error).__name__}: {error}") from error
        log.error("engine step failed; its requests end with an error", exc_info=error)
        failed = {self._states[item.seq.seq_id].request.request_id: self._states[item.seq.seq_id].request
                  for item in batch}
        for request in failed.values():
            request.error = f"{type(error).__name__} while computing this request"
            for state in request.seqs:
                if state.out.finish_reason is None:
                    self.scheduler.finish(state.seq)
                    del self._states[state.seq.seq_id]
                    state.out.finish_reason = "error"
            del self._requests[request.request_id]
        return [self._output(r) for r in failed.values()]

    # ---------------------------------------------------------------- batch API
    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, use_tqdm: bool = False, suffix: str | Sequence[str] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion, batched continuously; outputs in order.

        suffix (one string, or one per prompt): fill in the middle, each prompt being the text before the hole
        and its suffix the text after it; the completions are the middles."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} SamplingParams")
        suffixes = [suffix] * len(prompts) if suffix is None or isinstance(suffix, str) else list(suffix)
        if len(suffixes) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(suffixes)} suffixes")
        ids = [self.add_request(p, sp, suffix=sf) for p, sp, sf in zip(prompts, params_list, suffixes)]
        return self._run_to_completion(ids, use_tqdm)

    def warm_up(self) -> None:
        """With compile=True, compile the decode graphs now (batch 1, then 2 or more sequences) instead of in
        the first requests; the two tiny generations leave nothing behind in the cache."""
        if not self.runner.compiles:
            return
        params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
        self.generate([[0, 1, 2]], params)
        if self.scheduler.max_num_seqs > 1:
            self.generate([[0, 1, 2], [3, 4, 5]], params)

    def chat(self, messages: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False
             ) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"} messages) or a batch of them, rendered with the
        tokenizer's chat template and answered as the assistant."""
        tokenizer = self._require_tokenizer()
        batch = [messages] if messages and isinstance(messages[0], Mapping) else messages
        prompts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=True) for m in batch]
        return self.generate(prompts, params, use_tqdm)

    def _run_to_completion(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(request_ids), disable=not use_tqdm, desc="generating") as bar:
            while len(done) < len(request_ids):
                for out in self.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in request_ids]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy new weights into the engine's model (e.g. the policy after an RL update), cast to its dtype and
        layout, and forget the prefix cache, whose latents the old weights computed. Only between requests:
        a sequence half-generated with the old weights would continue on stale latents."""
        if self._requests:
            raise RuntimeError("update_weights while requests are running; finish or abort them first")
        with torch.no_grad():
            self.model.load_state_dict(state_dict)
        self.allocator.clear_prefix_cache()

    # ---------------------------------------------------------------- introspection
    def stats(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "cache_blocks_total": self.allocator.num_blocks,
            "cache_blocks_used": self.allocator.num_blocks - self.allocator.num_free,
            "prefix_cache_hit_blocks": self.allocator.hits,
            "preemptions": self.scheduler.num_preemptions,
            "failed_steps": self.failed_steps,
        }

    # ---------------------------------------------------------------- internals
    def _tokenize(self, prompt: Prompt, suffix: str | None = None) -> tuple[str | None, list[int]]:
        if suffix is not None:
            if not isinstance(prompt, str) or not isinstance(suffix, str):
                raise ValueError("fill-in-the-middle takes the prefix and the suffix as strings")
            return prompt, self._require_tokenizer().fim_prompt(prompt, suffix)
        if isinstance(prompt, str):
            return prompt, self._require_tokenizer().encode(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt is a string or a list of integer token ids")
        return None, list(prompt)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in its directory): pass token ids, "
                             "or LLM(..., tokenizer=PATH)")
        return self.tokenizer

    def check_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar (cached) now: ValueError naming the problem if it is invalid."""
        self._matcher(params)

    def _matcher(self, params: SamplingParams) -> Any:  # noqa: ANN401 (an llguidance matcher)
        if params.grammar is None:
            return None
        if self._constraints is None:
            tokenizer = self._require_tokenizer()
            self._constraints = Constraints(tokenizer.backend.to_str(), self.cfg.vocab_size, sorted(self.eos_ids))
        return self._constraints.matcher(params.grammar)

    def _allowed(self, sampled: list[_SeqState]) -> list[torch.Tensor | None]:
        """Each constrained row's allowed next tokens (one parallel mask computation); None for the others."""
        constrained = [s for s in sampled if s.matcher is not None]
        if not constrained:
            return [None] * len(sampled)
        masks = iter(self._constraints.masks([s.matcher for s in constrained]))
        allowed = [next(masks) if s.matcher is not None else None for s in sampled]
        for s, a in zip(sampled, allowed):
            if a is not None and not a.any():  # cannot happen for a matcher that only consumed allowed tokens
                raise RuntimeError(f"the grammar allows no next token: {s.matcher.get_error() or 'no error'}")
        return allowed

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        # n > 1 completions of one seeded request need distinct, still reproducible streams.
        seed = self._rng.getrandbits(63) if params.seed is None else hash((params.seed, index)) & (2**63 - 1)
        return torch.Generator(device=self.device).manual_seed(seed)

    def _append(self, state: _SeqState, token: int, logprob: TokenLogprob | None) -> None:
        seq, out, params = state.seq, state.out, state.request.params
        seq.token_ids.append(token)
        out.token_ids.append(token)
        if logprob is not None:
            out.logprobs.append(logprob)
        before = len(state.full_text)
        if state.decoder is not None:
            state.full_text += state.decoder.push(token)
        reason: tuple[str, str | int | None] | None = None
        if state.matcher is not None:
            state.matcher.consume_token(token)
        if token in self.eos_ids and (not params.ignore_eos or state.matcher is not None):
            reason = ("stop", None)  # with a grammar, EOS is only allowed where the grammar may end
        elif state.matcher is not None and state.matcher.is_stopped():
            reason = ("stop", None)  # the grammar is complete: nothing but EOS could follow
        elif token in params.stop_token_ids:
            reason = ("stop", token)
        elif params.stop and (hit := _find_stop(state.full_text, params.stop, before)) is not None:
            state.full_text = state.full_text[: hit[0]]  # the stop string and anything after it are dropped
            reason = ("stop", hit[1])
        elif seq.num_generated >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            reason = ("length", None)
        if reason is not None:
            if state.decoder is not None and not isinstance(reason[1], str):
                state.full_text += state.decoder.flush()
            out.finish_reason, out.stop_reason = reason
            self.scheduler.finish(seq)
            del self._states[seq.seq_id]
        out.text = state.full_text if out.finish_reason else _hold_back(state.full_text, params.stop)

    def _output(self, request: _Request) -> RequestOutput:
        return RequestOutput(request.request_id, request.prompt, request.prompt_ids, [s.out for s in request.seqs],
                             request.error)


def _find_stop(text: str, stops: Iterable[str], new_from: int) -> tuple[int, str] | None:
    """Earliest stop string ending in the text added since `new_from` (earlier text was already checked)."""
    hits = [(i, s) for s in stops if (i := text.find(s, max(0, new_from - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _hold_back(text: str, stops: Sequence[str]) -> str:
    """Hide a tail that could be the start of a stop string, so a stream never shows text it must retract."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:k]):
                hold = k
                break
    return text[: len(text) - hold]


def _gguf_tokenizer(path: Path) -> Tokenizer | None:
    """The tokenizer a GGUF carries in its metadata (None if it has none)."""
    with tempfile.TemporaryDirectory() as tmp:
        return Tokenizer.from_dir(tmp) if gguf.write_tokenizer(path, tmp) else None


def _check_fits(path: Path, dtype: torch.dtype | None, scheme: quant.Scheme | None, device: torch.device) -> None:
    """Refuse, before loading, a checkpoint whose weights cannot fit in free memory (rather than be killed by
    the kernel halfway through)."""
    if not (path / "config.json").is_file() and not path.is_file():
        return  # load() says what is wrong
    need, peak, what = planned_weight_bytes(path, dtype, scheme)
    if device.type == "cpu":  # the inference-only forms the engine adds (kernels.prepare)
        cfg = ModelConfig.from_hf(read_config(path))
        extra = prepare.planned_bytes(cfg, dtype or getattr(torch, cfg.torch_dtype, torch.float32),
                                      quant.kv_up_form(cfg, scheme is not None))
        need, peak = need + extra, peak + extra
    free = available_memory(device)
    if peak > free:
        hint = "" if scheme is not None and scheme.method == "int4" else \
            "; try --quantization int8" if scheme is None else "; try --quantization int4"
        raise ValueError(f"{path} needs {need / 2**30:.1f} GiB as {what} ({peak / 2**30:.1f} GiB at the peak of "
                         f"loading), {free / 2**30:.1f} GiB available{hint}")


def _use_triton_experts(model: Transformer) -> None:
    """On CUDA the routed experts run as grouped GEMMs (dsv2.kernels.gpu.experts). Training through the model is
    unchanged (TritonExperts falls back to Experts' autograd paths), so a model passed in gets it too."""
    try:
        from dsv2.kernels.gpu.experts import use_triton_experts_
    except ImportError as e:
        log.warning("triton is not importable (%s): the routed experts run expert by expert", e)
        return
    use_triton_experts_(model)


_CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cache_dtype(value: torch.dtype | str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The latent cache's storage: the model dtype (default), another float dtype, or fp8 e4m3."""
    if value in ("fp8", "fp8_e4m3", FP8):
        return FP8
    try:
        dtype = _dtype(value) or model_dtype
    except ValueError:
        dtype = None
    if dtype not in _CACHE_DTYPES:
        raise ValueError(f"cache dtype {value!r} is not supported; use the model's dtype (default), float32, "
                         "bfloat16, float16 or fp8")
    return dtype


def _dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from its name; None (or "auto") keeps the checkpoint's own."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return None
    name = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}.get(value, value)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}")
    return dtype
