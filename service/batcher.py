"""Dynamic micro-batching: concurrent requests share one model run.

Requests wait in a queue; a single worker task takes the first, then keeps collecting until the
batch holds ``max_batch_size`` images or ``max_delay`` seconds (monotonic clock) have passed since
the first arrived. It only waits while more requests are on their way (``arriving()``: requests
still being decoded), so a lone request at low load runs at once instead of paying the delay;
under load, requests that queue while a batch runs are taken together at once. One batch = one trunk and one clustifier run over every image, the activator
per image (each request keeps its own τ), each head run once on just the images routed to it
(``PackageRunner`` groups by head), then the predictions are cut back into per-request slices.
Requests in original mode are batched the same way, separately. A failure fails only the
requests of that run, each with its own error; the worker keeps going.

Requests are grouped by a key (the runner and the mode), so a batch never mixes two packages
(during a hot reload) or the conditional and original paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import anyio
import anyio.to_thread
import numpy as np

from modelpack.runner import BatchResult, Prediction

logger = logging.getLogger(__name__)

# (key, images (N, H, W, 3) uint8, per-image τ) -> BatchResult; runs in a worker thread
RunBatch = Callable[[Hashable, np.ndarray, np.ndarray], BatchResult]


@dataclass
class BatchSlice:
    """One request's share of a model run."""

    predictions: list[Prediction]
    timings: dict[str, float]  # stage seconds of the whole run, plus "queue" for this request
    batch_size: int  # images in the run this request was part of


@dataclass
class _Pending:
    images: np.ndarray
    tau: float
    key: Hashable
    future: asyncio.Future[BatchSlice]
    enqueued: float = field(default_factory=time.monotonic)


class MicroBatcher:
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_delay: float,
                 on_batch: Callable[[Hashable, int], None] | None = None,
                 arriving: Callable[[], int] = lambda: 1) -> None:
        if max_batch_size < 1 or max_delay < 0:
            raise ValueError("max_batch_size must be >= 1 and max_delay >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay
        self._on_batch = on_batch
        self._arriving = arriving
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._running = False  # a batch taken from the queue has not finished yet

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Finish what is queued, then stop the worker."""
        if self._worker is None:
            return
        await self._queue.join()
        self._worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._worker
        self._worker = None

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running: a request now would run alone."""
        return not self._running and self._queue.empty()

    async def submit(self, images: np.ndarray, tau: float, key: Hashable) -> BatchSlice:
        """Queue one request's images; resolves when its batch has run."""
        if self._worker is None:
            raise RuntimeError("MicroBatcher.start() was not called")
        future: asyncio.Future[BatchSlice] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(images, tau, key, future))
        return await future

    async def _collect(self) -> list[_Pending]:
        first = await self._queue.get()
        batch, count = [first], len(first.images)
        deadline = first.enqueued + self.max_delay
        while count < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if self._queue.empty() and self._arriving() <= 0:
                break  # nobody else is coming: waiting would only add latency
            try:
                item = self._queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(
                    self._queue.get(), remaining)
            except (TimeoutError, asyncio.QueueEmpty):
                break
            batch.append(item)
            count += len(item.images)
        return batch

    async def _loop(self) -> None:
        while True:
            batch = await self._collect()
            self._running = True
            try:
                groups: dict[Hashable, list[_Pending]] = {}
                for p in batch:
                    if not p.future.cancelled():
                        groups.setdefault(p.key, []).append(p)
                for key, group in groups.items():
                    await self._run(group, key)
            finally:
                self._running = False
                for _ in batch:
                    self._queue.task_done()

    async def _run(self, group: list[_Pending], key: Hashable) -> None:
        images = np.concatenate([p.images for p in group]) if len(group) > 1 else group[0].images
        taus = np.concatenate([np.full(len(p.images), p.tau) for p in group])
        started = time.monotonic()
        try:
            result = await anyio.to_thread.run_sync(self._run_batch, key, images, taus)
        except Exception as e:  # every request of this run gets the error; the loop survives
            for p in group:
                if not p.future.done():
                    p.future.set_exception(e)
            return
        if self._on_batch is not None:
            self._on_batch(key, len(images))
        start = 0
        for p in group:
            n = len(p.images)
            timings = dict(result.timings, queue=started - p.enqueued)
            if not p.future.done():
                p.future.set_result(BatchSlice(result.predictions[start:start + n], timings,
                                               len(images)))
            start += n
