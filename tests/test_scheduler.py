"""Scheduler and block allocator alone: integers in, integers out, a fake model that 'computes' instantly."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from dsv2.infer.blocks import BlockAllocator, block_hashes
from dsv2.infer.scheduler import Scheduler, Sequence, Status


def _seq(i: int, n: int, base: int = 0) -> Sequence:
    return Sequence(i, [base + t for t in range(n)], n)


def _fake_step(sched: Scheduler, rng: random.Random | None = None) -> list:
    """Schedule, mark computed, append a token to every sequence that samples."""
    batch = sched.schedule()
    sched.update(batch)
    for item in batch:
        if item.samples:
            item.seq.token_ids.append(rng.randrange(1000) if rng else 7)
    return batch


@pytest.mark.parametrize("module", ["scheduler.py", "blocks.py"])
def test_no_torch_in_the_orchestration(module: str) -> None:
    tree = ast.parse((Path(__file__).parents[1] / "src/dsv2/infer" / module).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in imported


def test_token_budget_and_chunked_prefill() -> None:
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = _seq(0, 7), _seq(1, 12, base=100)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.start, s.num_tokens) for s in batch] == [(0, 0, 7), (1, 0, 3)]
    assert [s.samples for s in batch] == [True, False]
    sched.update(batch)
    a.token_ids.append(5)
    batch = sched.schedule()  # a decodes one token, b continues its prompt with the rest of the budget
    assert [(s.seq.seq_id, s.start, s.num_tokens) for s in batch] == [(0, 7, 1), (1, 3, 9)]
    assert sum(s.num_tokens for s in batch) <= 10


def test_preemption_takes_the_newest_and_requeues_it_first() -> None:
    sched = Scheduler(BlockAllocator(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    old, new = _seq(0, 8), _seq(1, 7, base=50)
    sched.add(old)
    sched.add(new)
    _fake_step(sched)  # both prefilled: 2 + 2 blocks, cache full
    assert sched.allocator.num_free == 0
    _fake_step(sched)  # old needs a third block at token 9 -> new is preempted
    assert new.status is Status.WAITING and sched.waiting[0] is new and new.blocks == []
    assert old.status is Status.RUNNING and new.num_preemptions == 1
    sched.finish(old)
    batch = _fake_step(sched)  # new comes back: its first full block is still in the prefix cache,
    assert batch[0].seq is new and batch[0].start == 4 and batch[0].num_tokens == 4  # the rest is recomputed


def test_prefix_blocks_are_shared_and_the_last_token_recomputed() -> None:
    alloc = BlockAllocator(16, 4)
    sched = Scheduler(alloc, max_num_batched_tokens=64)
    first = _seq(0, 10)
    sched.add(first)
    _fake_step(sched)
    same = Sequence(1, list(range(8)), 8)  # exactly two full cached blocks: only the first may be reused
    longer = Sequence(2, list(range(10)) + [99], 11)
    sched.add(same)
    sched.add(longer)
    batch = {s.seq.seq_id: s for s in sched.schedule()}
    assert same.blocks[0] == first.blocks[0] and batch[1].start == 4
    assert longer.blocks[:2] == first.blocks[:2] and batch[2].start == 8
    assert alloc.ref_counts[first.blocks[0]] == 3


def test_freed_prefix_survives_until_reused() -> None:
    alloc = BlockAllocator(3, 2)
    blocks = alloc.allocate(2)
    h = block_hashes([1, 2, 3, 4], 2, 2)
    for b, x in zip(blocks, h):
        alloc.register(b, x)
    alloc.free(blocks)
    assert alloc.num_free == 3 and alloc.match_prefix(h) == blocks and alloc.num_free == 1
    alloc.free(blocks)
    alloc.allocate(3)  # evicts everything, least recently freed first
    assert alloc.match_prefix(h) == []
    alloc.check_invariants()


def test_thousand_random_sequences_keep_allocator_invariants() -> None:
    rng = random.Random(1)
    alloc = BlockAllocator(24, 4)
    sched = Scheduler(alloc, max_num_seqs=6, max_num_batched_tokens=20)
    live: list[Sequence] = []
    budget = {}
    for i in range(1000):
        seq = Sequence(i, [rng.randrange(50) for _ in range(rng.randint(1, 30))], 0)
        seq.prompt_len = len(seq.token_ids)
        budget[i] = rng.randint(1, 8)
        sched.add(seq)
        live.append(seq)
        for _ in range(rng.randint(0, 3)):
            _fake_step(sched, rng)
            for s in list(live):
                if s.status is Status.RUNNING and s.num_generated >= budget[s.seq_id]:
                    sched.finish(s)
                    live.remove(s)
            if live and rng.random() < 0.2:
                sched.finish(live.pop(rng.randrange(len(live))))  # abort
            alloc.check_invariants()
            assert sum(len(s.blocks) for s in sched.running) == alloc.num_blocks - alloc.num_free - sum(
                len(s.blocks) for s in sched.waiting)
    while live:
        sched.finish(live.pop())
    alloc.check_invariants()
    assert alloc.num_free == alloc.num_blocks and set(alloc.ref_counts) == {0}
    assert sched.num_preemptions > 0
