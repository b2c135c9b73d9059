"""AsyncLLMEngine: the engine behind asyncio streams, for the HTTP server.

    engine = AsyncLLMEngine.from_pretrained("path/to/hf_dir", max_num_seqs=64)
    stream = engine.add_request("req-1", prompt_ids, SamplingParams(max_tokens=64))  # raises now if invalid
    async for delta in stream:                    # RequestOutput with only the new text/tokens
        send(delta.outputs[0].text)               # delta.finished on the last one
    engine.abort("req-1")                         # any time; the stream then ends with finish_reason "abort"
    engine.stats()                                # EngineStats for a metrics exporter

One background task owns the LLMEngine: between steps it applies queued adds and aborts, then
runs `LLMEngine.step()` in a worker thread (torch releases the GIL, so the event loop keeps
serving) and routes each output to its request's queue. When no request is left it sleeps
until the next add. A stream that its consumer closes early (client gone) aborts its request.
If a step raises, every open stream raises EngineDeadError and the engine takes no more requests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ember.engine.engine import EngineStats, LLMEngine, RequestError
from ember.engine.request import RequestOutput
from ember.engine.sampling_params import SamplingParams
from ember.errors import EmberError


class EngineDeadError(RuntimeError):
    """The engine loop failed; requests cannot be served until it is restarted."""


class AsyncLLMEngine:
    """Streams of RequestOutput deltas over one LLMEngine (see the module docstring)."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._streams: dict[str, asyncio.Queue] = {}
        self._pending: list[tuple[str, Any]] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ember-engine")
        self.errored: BaseException | None = None

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                        **kwargs: Any) -> "AsyncLLMEngine":
        """Load like LLM(model, tokenizer, dtype=..., device=..., **EngineConfig fields)."""
        from ember.engine.llm import LLM

        return cls(LLM(model, tokenizer, **kwargs).engine)

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; returns the async iterator of its output deltas.

        Call from the event loop's thread. Bad requests raise here (EmberError subclasses:
        SamplingParamsError, RequestError), before anything is queued.
        """
        if self.errored is not None:
            raise EngineDeadError(f"the engine is stopped: {self.errored}")
        if request_id in self._streams:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = self.engine.tokenize(prompt)
        self.engine.check_request(ids, params)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        self._pending.append(("add", (request_id, ids, params, arrival_time, prompt)))
        self._start()
        return self._stream(request_id, queue)

    def generate(self, prompt: str | list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:
        """vLLM's spelling of add_request."""
        return self.add_request(request_id, prompt, params)

    def abort(self, request_id: str) -> None:
        """Abort a request (no-op if it already finished); its stream ends with finish_reason "abort"."""
        if request_id in self._streams:
            self._pending.append(("abort", request_id))
            try:
                asyncio.get_running_loop()
            except RuntimeError:  # a stream closed outside the loop (garbage collection)
                if self._loop is not None and not self._loop.is_closed():
                    self._loop.call_soon_threadsafe(self._wakeup.set)
                return
            self._start()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def num_unfinished(self) -> int:
        """Requests added (queued or in the engine) whose stream has not ended: a server's admission count."""
        return len(self._streams)

    @property
    def is_running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def shutdown(self) -> None:
        """Stop the loop (an in-flight step completes first) and fail the streams still open."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)
        self.engine.close()  # a parallel engine's worker ranks stop with it
        self.errored = EngineDeadError("the engine was shut down")
        self._fail_all(self.errored)

    # ---- the loop ------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        if self._task is None or self._task.done():
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run())
        self._wakeup.set()

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:  # the consumer left early: free the request's blocks
                self.abort(request_id)

    def _apply_pending(self) -> None:
        pending, self._pending = self._pending, []
        for kind, arg in pending:
            if kind == "add":
                request_id, ids, params, arrival, prompt = arg
                if request_id not in self._streams:
                    continue  # aborted before it was queued
                try:
                    self.engine.add_request(request_id, ids, params, arrival, stream=True)
                except EmberError as e:  # raced with another request of the same id
                    self._streams.pop(request_id).put_nowait(e)
                    continue
                if isinstance(prompt, str):
                    self.engine.groups[request_id].prompt = prompt
            else:
                out = self.engine.abort(arg)
                queue = self._streams.pop(arg, None)
                if queue is not None and out is not None:
                    queue.put_nowait(out)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._apply_pending()
            if not self.engine.has_unfinished():
                self._wakeup.clear()
                if not self._pending:
                    await self._wakeup.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug: fail loudly on every stream rather than hang them
                self.errored = e
                self._fail_all(EngineDeadError(f"engine step failed: {e!r}"))
                raise
            for out in outputs:
                queue = self._streams.get(out.request_id)
                if queue is not None:
                    queue.put_nowait(out)
                    if out.finished:
                        del self._streams[out.request_id]
            await asyncio.sleep(0)  # let handlers run between steps

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._streams.values():
            queue.put_nowait(error)
        self._streams.clear()
