"""Dynamic batching: faces from every stream recognised together.

Each stream hands over its faces one at a time; the batcher gathers them until a batch holds
`max_faces` or its first face has waited `max_delay_ms`, then runs the whole batch in a worker
thread (decode, align, recognise, search) - the scheme of Triton's dynamic batcher. The event
loop never runs a model: it only moves requests and futures, so health checks and gallery
calls are answered while every stream is busy. At most `workers` batches run at once, which
bounds the memory of decoded pictures too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from facelink.config import BatchingConfig

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """`await batcher.submit(item)` -> that item's entry of `run(items)`.

    `run` is called from worker threads with a list of N items and returns N outcomes, each a
    result or the exception that item gets (one bad face does not fail its batch); if `run`
    itself raises, every item of the batch gets that exception.
    """

    def __init__(
        self, run: Callable[[list[Item]], Sequence[Result | BaseException]], config: BatchingConfig, name: str = "batch"
    ) -> None:
        self._run = run
        self.config = config
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(config.workers, thread_name_prefix=f"facelink-{name}")
        self._slots = asyncio.Semaphore(config.workers)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.faces = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="facelink-batcher")

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()  # a worker is free: gather its batch now, not earlier
            batch = [await self._queue.get()]
            deadline = loop.time() + self.config.max_delay_ms / 1000
            while len(batch) < self.config.max_faces:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                # Polled rather than wait_for(queue.get()): a get cancelled by its timeout can lose
                # the face it had just taken.
                await asyncio.sleep(min(remaining, 0.0005))
            task = loop.create_task(self._execute(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _execute(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            live = [(item, future) for item, future in batch if not future.done()]  # a stream may have gone
            if not live:
                return
            try:
                outcomes = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._run, [item for item, _ in live]
                )
            except Exception as error:  # noqa: BLE001 - every face of the batch learns why
                outcomes = [error] * len(live)
            self.batches += 1
            self.faces += len(live)
            for (_, future), outcome in zip(live, outcomes, strict=True):
                if future.done():
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in list(self._running):
            task.cancel()
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
