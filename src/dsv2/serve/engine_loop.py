"""The bridge between asyncio handlers and the engine: one thread owns the LLM and runs `step()`.

Handlers never touch the engine directly. They send commands (add, abort) through a queue; the engine
thread applies them between steps and hands each request's progress back to its asyncio.Queue as an
immutable snapshot, so a handler never reads an output the engine is still mutating.

A step that fails finishes its own requests with an error (the engine does that); anything that escapes
`step()` means the engine cannot go on: every waiting handler gets an EngineDeadError at once, later
submissions too, and `on_fatal` tells the server to stop, so a supervisor can restart the process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from dsv2.hardware import release_freed_memory
from dsv2.infer import LLM, EngineDeadError, RequestOutput, SamplingParams

log = logging.getLogger("dsv2")

TRIM_EVERY_S = 10.0  # how often the engine thread returns the heap's free pages (between two steps)


class EngineLoop:
    def __init__(self, llm: LLM, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.llm = llm
        self.stats: dict[str, int] = llm.stats()
        self.dead: EngineDeadError | None = None  # set once, when the engine thread ends by an error
        self._on_fatal = on_fatal
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()  # `dead` and `_streams` change together: no stream registers after death
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dsv2-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Abort whatever is in flight (the engine finishes them with "abort") and join the thread."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join()

    @property
    def healthy(self) -> bool:
        return self.dead is None and self._thread.is_alive()

    def submit(self, request_id: str, prompt: Sequence[int], params: SamplingParams) -> asyncio.Queue:
        """Queue a request; its RequestOutput snapshots (or a ValueError, or an EngineDeadError) arrive on the
        returned queue, the last one final."""
        updates: asyncio.Queue = asyncio.Queue()
        with self._lock:
            if self.dead is not None:
                updates.put_nowait(self.dead)
                return updates
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
        try:
            self._serve()
        except BaseException as e:  # noqa: BLE001 -- whatever it was, the engine is gone: say so to everyone
            self._die(e)

    def _serve(self) -> None:
        trimmed, stepped = time.monotonic(), False  # stepped: steps ran since the last trim
        while not self._stopping.is_set():
            idle = not self.llm.has_unfinished()
            # Every TRIM_EVERY_S under load, and on going idle (a server that waits should not hold its peak);
            # not again while idle, where commands such as no-op aborts would each pay for a heap walk.
            if stepped and (idle or time.monotonic() - trimmed > TRIM_EVERY_S):
                release_freed_memory()
                trimmed, stepped = time.monotonic(), False
            if idle:
                self._apply(self._commands.get())  # idle: sleep until a command arrives
            while True:
                try:
                    self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            if self.llm.has_unfinished() and not self._stopping.is_set():
                stepped = True
                for out in self.llm.step():
                    self._deliver(out)
            self.stats = self.llm.stats()
        for request_id in list(self._streams):
            self._abort(request_id)
        self.stats = self.llm.stats()

    def _die(self, error: BaseException) -> None:
        log.critical("the engine stopped: %s: %s", type(error).__name__, error, exc_info=error)
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"{type(error).__name__}: {error}")
        with self._lock:
            self.dead = dead
            streams, self._streams = self._streams, {}
        for loop, updates in streams.values():
            _put(loop, updates, dead)
        if self._on_fatal is not None:
            self._on_fatal(dead)

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
        with self._lock:
            self._streams.pop(request_id, None)

    def _deliver(self, out: RequestOutput) -> None:
        snapshot = dataclasses.replace(out, outputs=[dataclasses.replace(
            o, token_ids=list(o.token_ids), logprobs=None if o.logprobs is None else list(o.logprobs))
            for o in out.outputs])
        self._send(out.request_id, snapshot, final=out.finished)

    def _send(self, request_id: str, item: object, final: bool) -> None:
        with self._lock:
            target = self._streams.pop(request_id, None) if final else self._streams.get(request_id)
        if target is not None:
            _put(*target, item)


def _put(loop: asyncio.AbstractEventLoop, updates: asyncio.Queue, item: object) -> None:
    try:
        loop.call_soon_threadsafe(updates.put_nowait, item)
    except RuntimeError:  # the event loop already closed (the server is exiting): nobody is waiting
        pass
