"""Dynamic batching: faces from every stream recognised together.

Each stream hands over aligned crops one at a time; the batcher gathers them until a batch
holds `max_faces` or its first face has waited `max_delay_ms`, then runs the whole batch
through the recogniser and the gallery search in a worker thread - the scheme of Triton's
dynamic batcher. The event loop never runs a model: it only moves crops and futures, so health
checks and gallery calls are answered while every stream is busy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

import numpy as np

from facelink.config import BatchingConfig

log = logging.getLogger(__name__)

Result = TypeVar("Result")


class Batcher(Generic[Result]):
    """`await batcher.submit(crop)` -> that crop's row of `run(np.stack(crops))`.

    `run` is called from worker threads with a (N, ...) array and returns N results; if it
    raises, every face of that batch gets the exception.
    """

    def __init__(self, run: Callable[[np.ndarray], Sequence[Result]], config: BatchingConfig, name: str = "batch") -> None:
        self._run = run
        self.config = config
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[Result]]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(config.inference_workers, thread_name_prefix=f"facelink-{name}")
        self._slots = asyncio.Semaphore(config.inference_workers)
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.faces = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._collect(), name="facelink-batcher")

    async def submit(self, crop: np.ndarray) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        await self._queue.put((crop, future))
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

    async def _execute(self, batch: list[tuple[np.ndarray, asyncio.Future[Result]]]) -> None:
        try:
            live = [(crop, future) for crop, future in batch if not future.done()]  # a stream may have gone
            if not live:
                return
            crops = np.stack([crop for crop, _ in live])
            try:
                results = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, crops)
            except Exception as error:  # noqa: BLE001 - every face of the batch learns why
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                return
            self.batches += 1
            self.faces += len(live)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
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
