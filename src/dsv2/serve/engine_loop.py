"""The bridge between asyncio handlers and the engine: one thread owns the LLM and runs `step()`.

Handlers never touch the engine directly. They send commands (add, abort) through a queue; the engine
thread applies them between steps and hands each request's progress back to its asyncio.Queue as an
immutable snapshot, so a handler never reads an output the engine is still mutating.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from collections.abc import Sequence
from typing import Any

from dsv2.infer import LLM, RequestOutput, SamplingParams


class EngineLoop:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self.stats: dict[str, int] = llm.stats()
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is in flight (their streams end with finish_reason "abort") and join the thread."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join()

    def submit(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; its RequestOutput snapshots (or a ValueError) arrive on the returned queue."""
        updates: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), updates)
        self._commands.put(("add", request_id, list(prompt), params))
        return updates

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    # ---------------------------------------------------------------- engine thread
    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.llm.has_unfinished():
                self._apply(self._commands.get())  # idle: sleep until a command arrives
            while True:
                try:
                    self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            if self.llm.has_unfinished() and not self._stopping.is_set():
                for out in self.llm.step():
                    self._deliver(out)
            self.stats = self.llm.stats()
        for request_id in list(self._streams):
            self._abort(request_id)
        self.stats = self.llm.stats()

    def _apply(self, command: tuple[Any, ...]) -> None:
        if command[0] == "add":
            _, request_id, prompt, params = command
            try:
                self.llm.add_request(prompt, params, request_id=request_id)
            except ValueError as e:
                self._send(request_id, e, final=True)
        elif command[0] == "abort":
            self._abort(command[1])

    def _abort(self, request_id: str) -> None:
        out = self.llm.abort(request_id)
        if out is not None:
            self._deliver(out)
        self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        snapshot = dataclasses.replace(out, outputs=[dataclasses.replace(
            o, token_ids=list(o.token_ids), logprobs=None if o.logprobs is None else list(o.logprobs))
            for o in out.outputs])
        self._send(out.request_id, snapshot, final=out.finished)

    def _send(self, request_id: str, item: object, final: bool) -> None:
        target = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if target is not None:
            loop, updates = target
            loop.call_soon_threadsafe(updates.put_nowait, item)
