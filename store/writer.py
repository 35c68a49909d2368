"""The asyncio face of the store: a bounded queue drained in batches off the event loop.

`put` never drops: when the queue is full it waits (back-pressure). `submit` waits until
its op is committed and returns the op's result, so an acknowledged outcome is durable.
Ops are applied in the order they were queued. `close` writes everything queued first.

Every DuckDB statement costs about a millisecond whatever its size, so the writer lets a
batch fill for up to `linger_s` before committing; anyone awaiting a commit (`submit`,
`flush`) cuts the wait short.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from flywheel.store.db import Store
from flywheel.store.records import StoreOp

log = logging.getLogger("flywheel.store")

_FLUSH = object()  # a barrier: resolved once everything queued before it is committed


class BatchWriter:
    def __init__(self, store: Store, queue_size: int = 10_000, batch_max: int = 512, linger_s: float = 0.05):
        self.store = store
        self.batch_max = batch_max
        self.linger_s = linger_s
        self._someone_waits = asyncio.Event()
        self._queue: asyncio.Queue[tuple[Any, asyncio.Future | None]] = asyncio.Queue(queue_size)
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix="flywheel-writer")
        self._read_threads = ThreadPoolExecutor(4, thread_name_prefix="flywheel-reader")
        self._drainer: asyncio.Task | None = None

    def start(self) -> None:
        self._drainer = asyncio.get_running_loop().create_task(self._drain(), name="store-writer")

    async def put(self, op: StoreOp) -> None:
        await self._queue.put((op, None))

    async def submit(self, op: StoreOp) -> Any:
        """Queue `op` and wait for its commit; re-raises the op's error, if any."""
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((op, done))
        self._someone_waits.set()
        result = await done
        if isinstance(result, Exception):
            raise result
        return result

    async def flush(self) -> None:
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((_FLUSH, done))
        self._someone_waits.set()
        await done

    async def read(self, fn, *args) -> Any:
        """Run a read-only Store method on a reader thread."""
        return await asyncio.get_running_loop().run_in_executor(self._read_threads, fn, *args)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def close(self) -> None:
        """Write everything queued, then stop the threads and close the store."""
        if self._drainer is not None:
            await self.flush()
            self._drainer.cancel()
            try:
                await self._drainer
            except asyncio.CancelledError:
                pass
        self._write_thread.shutdown(wait=True)
        self._read_threads.shutdown(wait=True)
        self.store.close()

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            if self._queue.qsize() < self.batch_max and not self._someone_waits.is_set():
                try:
                    await asyncio.wait_for(self._someone_waits.wait(), self.linger_s)
                except asyncio.TimeoutError:
                    pass
            self._someone_waits.clear()
            while len(batch) < self.batch_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            ops = [op for op, _ in batch if op is not _FLUSH]
            try:
                results = await loop.run_in_executor(self._write_thread, self.store.apply, ops)
            except Exception as failure:  # apply reports per-op errors; this is a crash
                log.exception("store writer failed")
                results = [failure] * len(ops)
            op_results = iter(results)
            for op, done in batch:
                result = None if op is _FLUSH else next(op_results)
                if done is not None and not done.done():
                    done.set_result(result)
