"""Continuous batching: which sequences run this step and how many tokens each computes (no torch).

Each step spends a token budget, first come first served: running sequences first (one token each when
decoding, a chunk of their prompt when still prefilling), then waiting sequences in arrival order, their
prompts split into chunks that fit the budget (chunked prefill), reusing cached prefix blocks. When the
cache runs out of blocks, the most recently admitted running sequence is preempted: its blocks are freed
and it goes back to the front of the queue, to be recomputed from its tokens later (its output so far is
kept, so the result is the same).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from dsv2.infer.blocks import BlockAllocator, block_hashes


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt then generated tokens
    prompt_len: int
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose latents are in the cache
    blocks: list[int] = field(default_factory=list)
    num_registered: int = 0  # full blocks already entered in the prefix cache
    hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks seen so far
    num_preemptions: int = 0

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len


@dataclass(frozen=True)
class Scheduled:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last known token, so a new token is sampled."""
        return self.start + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048
                 ) -> None:
        if max_num_seqs <= 0 or max_num_batched_tokens <= 0:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, seq: Sequence) -> None:
        if math.ceil(len(seq.token_ids) / self.block_size) > self.allocator.num_blocks:
            raise ValueError(f"sequence of {len(seq.token_ids)} tokens cannot fit in a cache of "
                             f"{self.allocator.num_blocks * self.block_size} tokens")
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        batch: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
                continue  # retry the same sequence with one victim fewer
            batch.append(Scheduled(seq, seq.num_computed, n))
            budget -= n
            i += 1
        if not preempted:
            budget = self._admit(batch, budget)
        return batch

    def _admit(self, batch: list[Scheduled], budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.blocks:
                self._match_prefix(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if not self._grow(seq, seq.num_computed + n):
                self._release(seq)  # drop the prefix references too; try again next step, in order
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append(Scheduled(seq, seq.num_computed, n))
            budget -= n
        return budget

    def _match_prefix(self, seq: Sequence) -> None:
        # The last token is always recomputed (its logits are needed), so at most the full blocks before it.
        full = (len(seq.token_ids) - 1) // self.block_size
        seq.hashes = block_hashes(seq.token_ids, self.block_size, full)
        seq.blocks = self.allocator.match_prefix(seq.hashes)
        seq.num_computed = len(seq.blocks) * self.block_size
        seq.num_registered = len(seq.blocks)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        need = math.ceil(num_tokens / self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.blocks += self.allocator.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks, seq.num_computed, seq.num_registered = [], 0, 0

    # ------------------------------------------------------------------ after the model ran
    def update(self, batch: list[Scheduled]) -> None:
        """Record the computed tokens; newly completed blocks enter the prefix cache."""
        for item in batch:
            seq = item.seq
            seq.num_computed = item.start + item.num_tokens
            full = seq.num_computed // self.block_size
            for b in range(seq.num_registered, full):
                if b >= len(seq.hashes):
                    parent = seq.hashes[-1] if seq.hashes else 0
                    chunk = tuple(seq.token_ids[b * self.block_size:(b + 1) * self.block_size])
                    seq.hashes.append(hash((parent, chunk)))
                self.allocator.register(seq.blocks[b], seq.hashes[b])
            seq.num_registered = max(seq.num_registered, full)
