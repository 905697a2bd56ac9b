"""Scheduled batch -> tensors -> model -> logits: the engine's only hot loop.

All scheduled tokens run as one flat sequence of N tokens through the projections and experts. Attention
splits them: single-token rows (decodes) attend through the absorbed weights straight over their latents, which
a decode kernel reads from the paged cache through the block tables (dsv2's own on the CPU, Triton's on CUDA) or
the torch path gathers into padded contexts; each multi-token chunk (a prefill) decompresses keys and values
of its own cached prefix plus new tokens and attends causally, unpadded: at once when its context fits in one key
block, block by block beyond (dsv2.infer.attention), so that long contexts run in bounded memory. Only the rows that
sample get logits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch._dynamo.exc
import torch._inductor.exc

from dsv2.infer.attention import KEY_BLOCK, chunk_attention
from dsv2.infer.cache import PagedLatentCache
from dsv2.infer.scheduler import Scheduled
from dsv2.model import Transformer
from dsv2.model.mla import MLA
from dsv2.model.moe import Experts


@dataclass
class _Decodes:
    """The single-token rows, first in the flat batch, and where their latents live."""

    block_tables: torch.Tensor  # (B, max_blocks)
    ctx_lens: torch.Tensor  # (B,) tokens visible to each query (cached prefix + itself)


@dataclass
class _Chunk:
    """One prefill chunk: rows first_row .. first_row + n of the flat batch, the last n of its ctx tokens."""

    first_row: int
    n: int
    slots: torch.Tensor  # (1, ctx) the flat cache slots of its tokens 0 .. ctx - 1
    # (1, 1, n, ctx) bool for a chunk after the sequence's start that attends at once (ctx <= key_block); None when
    # the chunk is the whole sequence (plain causal) or goes block by block (which masks only the diagonal blocks)
    mask: torch.Tensor | None


class PagedAttention:
    """The AttentionCache the model sees during an engine step. What every layer shares (the slots behind the
    block tables, the masks) is computed once here, not once per layer."""

    def __init__(self, cache: PagedLatentCache, slots: torch.Tensor, decode: _Decodes | None,
                 chunks: list[_Chunk], key_block: int = KEY_BLOCK, decode_kernel: DecodeKernel | None = None
                 ) -> None:
        self.cache, self.slots, self.decode, self.chunks = cache, slots, decode, chunks
        self.key_block, self.decode_kernel = key_block, decode_kernel
        self.num_decode = 0
        if decode is not None:
            self.num_decode = len(decode.ctx_lens)
        if decode is not None and decode_kernel is None:  # the gather path's slots and mask; the kernel needs neither
            self.decode_slots = cache.slots_of(decode.block_tables)  # (B, S)
            key_pos = torch.arange(self.decode_slots.shape[1], device=slots.device)
            self.decode_mask = (key_pos < decode.ctx_lens[:, None])[:, None, None, :]  # (B, 1, 1, S)

    def attend(self, layer: int, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor,
               k_pe: torch.Tensor) -> torch.Tensor:
        # (1, N, ...) in; every token's latent is written before anyone reads, so chunks see themselves.
        self.cache.write(layer, self.slots, torch.cat([c_kv[0], k_pe[0]], dim=-1))
        q_nope, q_pe = q_nope[0], q_pe[0]  # (N, nh, d)
        d = self.num_decode
        if not self.chunks:  # decodes only: their rows are the whole batch
            return self._decode(layer, attn, q_nope, q_pe)[None]
        out = q_nope.new_empty(q_nope.shape[0], attn.n_heads, attn.v_dim)
        if self.decode is not None:
            out[:d] = self._decode(layer, attn, q_nope[:d], q_pe[:d])
        # One attention per chunk, at its own length. Padding all chunks to the longest (queries, keys) and
        # masking took 2.7x the SDPA time in a 2,048-token step of benchmarks/generate.py (269 vs 100 ms): the
        # padding, and a full mask where a whole-sequence chunk can run as plain causal attention.
        for c in self.chunks:
            rows = slice(c.first_row, c.first_row + c.n)
            ctx = c.slots.shape[1]
            if ctx > self.key_block:  # block by block, each block's latents gathered only when it is attended
                out[rows] = chunk_attention(
                    attn, q_nope[rows], q_pe[rows],
                    lambda k0, k1: self.cache.gather(layer, c.slots[:, k0:k1], q_nope.dtype)[0],  # (k1 - k0, W)
                    ctx, self.key_block)
                continue
            latent = self.cache.gather(layer, c.slots, q_nope.dtype)  # (1, ctx, W)
            out[rows] = attn.attend_naive(q_nope[None, rows], q_pe[None, rows], latent[..., : attn.kv_rank],
                                          latent[..., attn.kv_rank :], c.mask)[0]
        return out[None]

    def _decode(self, layer: int, attn: MLA, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        """The single-token rows (B, nh, d) -> (B, nh, dv), absorbed: through the decode kernel, which reads the
        latents through the block tables, or over the gathered padded contexts."""
        if self.decode_kernel is None:
            latent = self.cache.gather(layer, self.decode_slots, q_nope.dtype)  # (B, S, W)
            return attn.attend_absorbed(q_nope[:, None], q_pe[:, None], latent, self.decode_mask)[:, 0]
        q = torch.cat([attn.absorb_query(q_nope[:, None])[:, 0], q_pe], dim=-1)  # (B, nh, dc + dr)
        scales = self.cache.scales[layer] if self.cache.fp8 else None
        o_lat = self.decode_kernel(q, self.cache.layers[layer], scales, self.decode.block_tables,
                                   self.decode.ctx_lens, self.cache.block_size, attn.kv_rank, attn.softmax_scale)
        return attn.absorb_output(o_lat[:, None].to(q.dtype))[:, 0].to(q_nope.dtype)


# (q (B, nh, dc + dr), cache layer (slots, W), fp8 scales (slots, 2) or None, block tables (B, N), context lengths
# (B,), block size, kv_rank, softmax scale) -> (B, nh, dc) fp32: dsv2.kernels.gpu.mla_decode's signature
DecodeKernel = Callable[..., torch.Tensor]


def decode_kernel_for(choice: str, device: torch.device, cache_dtype: torch.dtype) -> DecodeKernel | None:
    """The paged decode attention: "native" (dsv2's CPU kernel, dsv2.kernels.native.mla_decode), "triton"
    (dsv2.kernels.gpu.mla_decode), "torch" (gather + attend_absorbed), or "auto": Triton on CUDA, the native
    kernel on the CPU where it is built and reads the cache's dtype, torch otherwise (on the CPU Triton runs only
    under its interpreter, for tests). None means torch."""
    if choice not in ("auto", "native", "triton", "torch"):
        raise ValueError(f"decode attention {choice!r}: expected 'auto', 'native', 'triton' or 'torch'")
    if choice == "torch":
        return None
    if choice == "native" or (choice == "auto" and device.type == "cpu"):
        from dsv2.kernels import native

        if device.type != "cpu":
            problem = f"it runs on the CPU, the model is on {device}"
        elif cache_dtype not in native.MLA_CACHE_TYPES:
            problem = f"it does not read {cache_dtype} caches"
        elif not native.available():
            problem = "it is not built (no C++ compiler, or DSV2_NATIVE=0)"
        else:
            return native.mla_decode
        if choice == "native":
            raise ValueError(f"decode attention 'native': {problem}")
        return None
    if choice == "auto" and device.type != "cuda":
        return None
    try:
        from dsv2.kernels.gpu.mla_decode import mla_decode
    except ImportError as e:
        if choice == "triton":
            raise ValueError(f"decode attention 'triton' needs triton ({e}); pip install 'dsv2[gpu]'") from e
        warnings.warn(f"triton is not importable ({e}): CUDA decode attention gathers the padded contexts "
                      "instead", stacklevel=2)
        return None
    return mla_decode


def transpose_weights_for_gemv_(model: Transformer) -> None:
    """Store every projection (out, in) matrix column-major, keeping its logical shape.

    F.linear computes x @ W.T; with W column-major, W.T is a plain row-major (in, out) matrix, and on CPU
    BLAS's one-row product (decode) streams that layout much faster than the transposed one -- the
    difference is measured in benchmarks/generate.py. Values, shapes and state_dict are unchanged.
    kv_b_proj stays as is: the absorbed attention views it per head.
    """
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and not name.endswith("wkv_b"):
                module.weight.data = module.weight.data.t().contiguous().t()
            elif isinstance(module, Experts):
                module.w13.data = module.w13.data.transpose(1, 2).contiguous().transpose(1, 2)
                module.w2.data = module.w2.data.transpose(1, 2).contiguous().transpose(1, 2)


# What torch.compile raises when it cannot build the graph (dynamo wraps inductor's and the C++ compiler's
# failures in BackendCompilerFailed). Anything else -- a bug, out of memory -- is the step's own error.
_COMPILER_ERRORS = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


class ModelRunner:
    def __init__(self, model: Transformer, cache: PagedLatentCache, compile_decode: bool = False,
                 key_block: int = KEY_BLOCK, decode_attention: str = "auto") -> None:
        """compile_decode: run decode-only steps through one torch.compile'd graph of the whole model (steps
        with prefill tokens run eagerly). The first step of batch size 1, and the first of 2 or more, compile
        (seconds to minutes); later ones skip the ~2,000 per-op dispatches of an eager decode step. key_block: a
        prefill chunk whose context is longer attends block by block over that many keys at a time.
        decode_attention: see decode_kernel_for."""
        self.model, self.cache, self.key_block = model, cache, key_block
        self.device = next(model.parameters()).device
        self.decode_kernel = decode_kernel_for(decode_attention, self.device, cache.dtype)
        self._compiled = (torch.compile(model.hidden_states, dynamic=True, fullgraph=True)
                          if compile_decode else None)
        self.compiled_steps = 0

    @property
    def compiles(self) -> bool:
        """Whether decode-only steps go through the compiled graph (False after a failed compilation)."""
        return self._compiled is not None

    @torch.inference_mode()
    def run(self, batch: list[Scheduled]) -> torch.Tensor:
        """Compute the scheduled tokens; fp32 logits (n_sampling, V) for the items with `samples`, in order."""
        decodes = [s for s in batch if s.num_tokens == 1]
        prefills = [s for s in batch if s.num_tokens > 1]
        order = decodes + prefills
        compiled = self._compiled is not None and not prefills
        hidden = self._hidden(decodes, prefills, compiled)
        last_row, row = {}, 0
        for s in order:
            row += s.num_tokens
            last_row[id(s)] = row - 1
        rows = [last_row[id(s)] for s in batch if s.samples]  # logits in the caller's batch order
        return self.model.logits(hidden[torch.tensor(rows, device=self.device, dtype=torch.long)])

    def _hidden(self, decodes: list[Scheduled], prefills: list[Scheduled], compiled: bool) -> torch.Tensor:
        """Final hidden states (N, H) of the scheduled tokens, decodes' rows first."""
        ids, pos, slots = [], [], []
        bs = self.cache.block_size
        for s in decodes + prefills:
            p = range(s.start, s.start + s.num_tokens)
            ids += s.seq.token_ids[s.start:s.start + s.num_tokens]
            pos += p
            slots += [s.seq.blocks[i // bs] * bs + i % bs for i in p]
        dev = self.device
        backend = PagedAttention(self.cache, torch.tensor(slots, device=dev), self._decodes(decodes),
                                 self._chunks(prefills, first_row=len(decodes)), self.key_block, self.decode_kernel)
        ids_t, pos_t = torch.tensor([ids], device=dev), torch.tensor([pos], device=dev)
        if compiled:
            try:
                hidden = self._compiled(ids_t, pos_t, cache=backend)[0]
                self.compiled_steps += 1
                return hidden
            except _COMPILER_ERRORS as e:  # e.g. no C++ compiler for inductor: decode eagerly instead
                warnings.warn(f"compiled decode failed ({type(e).__name__}: {e}); decoding eagerly from now on",
                              stacklevel=2)
                self._compiled = None
        return self.model.hidden_states(ids_t, pos_t, cache=backend)[0]

    def _decodes(self, items: list[Scheduled]) -> _Decodes | None:
        if not items:
            return None
        max_blocks = max(len(s.seq.blocks) for s in items)
        tables = [s.seq.blocks + [0] * (max_blocks - len(s.seq.blocks)) for s in items]
        return _Decodes(torch.tensor(tables, device=self.device),
                        torch.tensor([s.start + 1 for s in items], device=self.device))

    def _chunks(self, items: list[Scheduled], first_row: int) -> list[_Chunk]:
        chunks, dev = [], self.device
        for s in items:
            n, ctx = s.num_tokens, s.start + s.num_tokens
            table = torch.tensor([s.seq.blocks[: -(-ctx // self.cache.block_size)]], device=dev)
            slots = self.cache.slots_of(table)[:, :ctx]
            mask = None
            if s.start and ctx <= self.key_block:  # queries ctx - n .. ctx - 1 over keys 0 .. ctx - 1
                key_pos = torch.arange(ctx, device=dev)
                mask = (key_pos[None, :] <= torch.arange(s.start, ctx, device=dev)[:, None])[None, None]
            chunks.append(_Chunk(first_row, n, slots, mask))
            first_row += n
        return chunks
