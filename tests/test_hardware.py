"""What the machine does fast: the bf16 warning (raised where bf16 GEMMs would run in software, and only there) and
the allocator setting of the training commands."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from dsv2 import Transformer
from dsv2 import hardware
from dsv2.infer import LLM
from tests.conftest import small_config


@pytest.mark.parametrize("native", [False, True])
def test_engine_warns_for_bf16_only_without_bf16_gemm(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_cpu_has_bf16_gemm", lambda: native)
    model = Transformer(small_config()).eval()
    with warnings.catch_warnings(record=True) as fp32_warnings:
        warnings.simplefilter("always")
        LLM(model, max_cache_tokens=64)
    assert not [w for w in fp32_warnings if "bfloat16" in str(w.message)]
    with warnings.catch_warnings(record=True) as bf16_warnings:
        warnings.simplefilter("always")
        LLM(model.to(torch.bfloat16), max_cache_tokens=64)
    messages = [str(w.message) for w in bf16_warnings if "bfloat16" in str(w.message)]
    assert len(messages) == (0 if native else 1)
    if messages:
        assert 'dtype="float32"' in messages[0]


def test_only_cpus_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hardware, "_cpu_has_bf16_gemm", lambda: False)
    assert hardware.bf16_gemm_is_emulated("cpu")
    assert not hardware.bf16_gemm_is_emulated("cuda")
    assert not hardware.bf16_gemm_is_emulated("meta")


FAULTS = """
import ctypes, resource, sys
from dsv2.hardware import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
def faults_of_64mb_block() -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)  # written once, freed at once
    libc.free(block)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_64mb_block()
print(applied, min(faults_of_64mb_block() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_large_blocks_page_faulting_each_time() -> None:
    """A 64 MiB block allocated again costs ~16,000 page faults every time by default (glibc maps and unmaps
    it); after keep_freed_memory() its freed pages are reused. DSV2_MALLOC=default opts out. Measured on a plain
    malloc: a torch tensor (64-byte aligned) misses the freed block in about one process in five, when a small
    live allocation sits right after it (see dsv2.hardware.keep_freed_memory)."""
    def run(mode: str, **env: str) -> tuple[bool, int]:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env=os.environ | env).stdout.split()
        return out[0] == "True", int(out[1])

    default_applied, default_faults = run("default")
    kept_applied, kept_faults = run("keep")
    assert not default_applied and default_faults > 8000
    assert kept_applied and kept_faults < 1000
    assert run("keep", DSV2_MALLOC="default")[0] is False


def test_release_freed_memory_returns_the_heaps_free_pages() -> None:
    """malloc_trim(0) after many freed mid-sized blocks (below the mmap threshold, so they sit in the heap): the
    resident set shrinks. What keeps a long-running server's memory from creeping (benchmarks/soak.py)."""
    import ctypes
    import sys

    from dsv2.hardware import release_freed_memory

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))

    blocks = [libc.malloc(100_000) for _ in range(1000)]  # ~100 MB of heap
    for b in blocks:
        ctypes.memset(b, 1, 100_000)
    keep = blocks[-1]  # a live block at the top, so free() alone cannot shrink the heap
    for b in blocks[:-1]:
        libc.free(b)
    before = rss_kib()
    assert release_freed_memory()
    assert before - rss_kib() > 50_000
    libc.free(keep)
