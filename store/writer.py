"""The asyncio face of the store: a byte-bounded queue drained in batches off the event loop.

`put` never drops while the store works: when the queue holds `max_queue_bytes` it waits
(back-pressure). `submit` waits until its op is committed and returns the op's result, so an
acknowledged outcome is durable. Ops are applied in the order they were queued. `close`
writes everything queued first.

Every DuckDB statement costs about a millisecond whatever its size, so the writer lets a
batch fill for up to `linger_s` before committing; anyone awaiting a commit (`submit`,
`flush`) cuts the wait short. A hard kill loses what was queued and not yet committed: at
most `linger_s` of calls (acknowledged feedback is never among them).

When the store cannot write (StoreUnavailable: memory, disk), the batch is kept and retried
with a back-off, and `failing` says why, for /readyz and /metrics. Meanwhile `put` waits as
usual, unless `serve_without_store`: then calls are counted in `dropped` and not kept, so
inference goes on without the store.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from flywheel.store.db import Store
from flywheel.store.records import StoreOp, StoreUnavailable, approx_bytes

log = logging.getLogger("flywheel.store")

_FLUSH = object()  # a barrier: resolved once everything queued before it is committed
_RETRY_S = (0.2, 10.0)  # back-off between retries of a batch the store could not write: first, longest


def _as_is(op: StoreOp) -> StoreOp:
    return op


class ReadersBusy(RuntimeError):
    """Every SQL slot is taken by a running query."""


class BatchWriter:
    def __init__(self, store: Store, max_queue_bytes: int = 256 << 20, batch_max: int = 512, linger_s: float = 0.05,
                 sql_concurrency: int = 2, serve_without_store: bool = False):
        self.store = store
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.max_queue_bytes = max_queue_bytes
        self.serve_without_store = serve_without_store
        # a store in a child process (store/process.py) takes its ops pickled: each one as it is
        # queued, rather than a whole batch at once on the writer thread, holding the GIL that long
        self._encode: Callable[[StoreOp], Any] = getattr(store, "encode", _as_is)
        self._queue: collections.deque[tuple[Any, asyncio.Future | None, int, float]] = collections.deque()  # op, done, bytes, queued at
        self.queued_bytes = 0
        self._changed = asyncio.Condition()  # something was queued, or room was made
        self._someone_waits = asyncio.Event()
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="flywheel-writer")
        self._read_threads = ThreadPoolExecutor(4, thread_name_prefix="flywheel-reader")
        # users' SQL on threads of its own: slow queries never hold up the feed's or the routes' reads
        self._sql_threads = ThreadPoolExecutor(sql_concurrency, thread_name_prefix="flywheel-sql")
        self._sql_slots = asyncio.Semaphore(sql_concurrency)
        self._drainer: asyncio.Task | None = None
        self.failing: str | None = None  # why the store cannot write now; None while it can
        self.dropped = 0  # records not kept while failing, with serve_without_store
        self.committed = 0  # ops committed since start

    def start(self) -> None:
        self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="store-writer")

    async def put(self, op: StoreOp) -> None:
        """Queue `op`; waits while the queue is full (or, with serve_without_store, drops it
        while the store is failing)."""
        if self.failing is not None and self.serve_without_store:
            self.dropped += 1
            return
        await self._enqueue(self._encode(op), None, approx_bytes(op))

    async def submit(self, op: StoreOp) -> Any:
        """Queue `op` and wait for its commit; re-raises the op's error, if any."""
        done = asyncio.get_running_loop().create_future()
        await self._enqueue(self._encode(op), done, approx_bytes(op))
        self._someone_waits.set()
        result = await done
        if isinstance(result, Exception):
            raise result
        return result

    async def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything queued before now is committed; False if that took longer than
        `timeout_s` (the store cannot write: what is queued stays queued)."""
        done = asyncio.get_running_loop().create_future()
        await self._enqueue(_FLUSH, done, 0)
        self._someone_waits.set()
        try:
            await asyncio.wait_for(done, timeout_s)
            return True
        except TimeoutError:
            return False

    async def _enqueue(self, op: Any, done: asyncio.Future | None, size: int) -> None:
        async with self._changed:
            # one op larger than the bound still goes in once the queue is empty
            await self._changed.wait_for(lambda: not self._queue or self.queued_bytes + size <= self.max_queue_bytes)
            self._queue.append((op, done, size, time.monotonic()))
            self.queued_bytes += size
            self._changed.notify_all()

    async def read(self, fn, *args) -> Any:
        """Run a read-only Store method on a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, fn, *args)

    async def user_query(self, wait_s: float, fn, *args) -> Any:
        """Run a user's query (a read-only Store method) on a SQL thread; ReadersBusy if none
        frees up within `wait_s`."""
        try:
            await asyncio.wait_for(self._sql_slots.acquire(), wait_s)
        except TimeoutError:
            raise ReadersBusy(f"every SQL slot stayed busy for {wait_s:g} s") from None
        running = asyncio.get_running_loop().run_in_executor(self._sql_threads, fn, *args)
        # the slot is the thread's: it frees when the query ends, even if the caller gave up first
        running.add_done_callback(lambda _: self._sql_slots.release())
        return await asyncio.shield(running)

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def lag_s(self) -> float:
        """How long the oldest queued op has waited for its commit."""
        return time.monotonic() - self._queue[0][3] if self._queue else 0.0

    async def close(self, timeout_s: float = 60.0) -> None:
        """Write everything queued (for up to `timeout_s` while the store cannot write), then stop
        the threads and close the store."""
        if self._drainer is not None:
            if not await self.flush(timeout_s):
                log.error("store still cannot write (%s): %d queued records lost at shutdown", self.failing,
                          self.pending)
            self._drainer.cancel()
            try:
                await self._drainer
            except asyncio.CancelledError:
                pass
        self._write_thread.shutdown(wait=True)
        self._read_threads.shutdown(wait=True)
        self._sql_threads.shutdown(wait=True)
        self.store.close()

    async def _drain(self) -> None:
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._queue))
            if len(self._queue) < self.batch_max and not self._someone_waits.is_set():
                try:
                    await asyncio.wait_for(self._someone_waits.wait(), self.linger_s)
                except asyncio.TimeoutError:
                    pass
            self._someone_waits.clear()
            batch = [self._queue[i] for i in range(min(self.batch_max, len(self._queue)))]
            results = await self._commit([op for op, _, _, _ in batch if op is not _FLUSH])
            async with self._changed:
                for _ in batch:
                    self._queue.popleft()
                self.queued_bytes -= sum(size for _, _, size, _ in batch)
                self._changed.notify_all()
            op_results = iter(results)
            for op, done, _, _ in batch:
                result = None if op is _FLUSH else next(op_results)
                if done is not None and not done.done():
                    done.set_result(result)

    async def _commit(self, ops: list[StoreOp]) -> list[Any]:
        """Apply `ops`, retrying what the store could not write until it can; per-op results.
        Ops it committed before failing are not applied again."""
        loop = asyncio.get_running_loop()
        delay = _RETRY_S[0]
        results: list[Any] = []
        while True:
            try:
                results += await loop.run_in_executor(self._write_thread, self.store.apply, ops[len(results):])
            except StoreUnavailable as unavailable:
                results += unavailable.committed
                if self.failing is None:
                    log.error("store cannot write (%s); %d ops kept and retried", unavailable, len(ops) - len(results))
                self.failing = str(unavailable)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_S[1])
                continue
            except Exception as failure:  # a bug in apply: report it per op rather than stop writing
                log.exception("store writer failed")
                results += [failure] * (len(ops) - len(results))
            if self.failing is not None:
                log.warning("store writes again (after: %s)", self.failing)
                self.failing = None
            self.committed += len(ops)
            return results
