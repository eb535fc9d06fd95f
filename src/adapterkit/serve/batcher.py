"""An asyncio batcher: requests for any adapters that arrive close together share one forward pass.

Each request becomes a ``Job`` with a *lane* (what kind of forward it needs: sequence classification,
token classification, greedy generation of N tokens...) and an adapter. A batch is the oldest queued
job plus later jobs of the same lane, up to ``max_batch_size``; it is sent as soon as it is full or its
oldest job has waited ``max_wait_ms``. With ``cross_task=False`` jobs only batch with jobs of the same
adapter too: one batch per adapter, the baseline cross-task batching is measured against.

The queue is bounded (``max_queue`` jobs): ``submit`` raises ``QueueFull`` rather than letting work
pile up. Batches run one at a time in a single model thread; new jobs queue meanwhile, so under load
each batch starts full.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from .metrics import ServeMetrics


class QueueFull(RuntimeError):
    """The queue holds ``max_queue`` jobs; ``retry_after`` (seconds) estimates when it will have room."""

    def __init__(self, depth: int, retry_after: int):
        self.depth, self.retry_after = depth, retry_after
        super().__init__(f"server busy: {depth} requests are queued; retry in {retry_after} s")


@dataclass(eq=False)
class Job:
    """One request's row(s) for one batch. ``payload`` is what ``run_batch`` reads."""

    lane: Hashable
    adapter: str | None
    length: int  # tokens: batches are sorted by it
    payload: Any
    solo: bool = False  # can never have company: run at once
    future: asyncio.Future = field(repr=False, default=None)  # type: ignore[assignment]
    enqueued: float = 0.0


# run_batch(lane, jobs sorted by length) -> one result per job, or an exception instance per job.
RunBatch = Callable[[Hashable, Sequence[Job]], Sequence[Any]]


class Batcher:
    """Collect jobs into batches and run them with ``run_batch`` in ``executor`` (one thread).

    Args:
        run_batch: called in the executor with a lane and its jobs (sorted by length, shortest first);
            returns one result per job, in order; a result that is an ``Exception`` fails only its job.
        max_batch_size: most jobs in one batch.
        max_wait_ms: longest a job waits for company before its batch runs anyway.
        max_queue: most jobs waiting; more raise ``QueueFull``.
        cross_task: batch jobs of different adapters together (True) or never (False).
    """

    def __init__(
        self,
        run_batch: RunBatch,
        executor: Executor,
        *,
        max_batch_size: int = 32,
        max_wait_ms: float = 5.0,
        max_queue: int = 512,
        cross_task: bool = True,
        metrics: ServeMetrics | None = None,
    ):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.run_batch = run_batch
        self.executor = executor
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.cross_task = cross_task
        self.metrics = metrics or ServeMetrics()
        self._queue: deque[Job] = deque()
        self._counts: dict[Hashable, int] = {}  # queued jobs per group
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._batch_seconds = 0.05  # running mean, for Retry-After

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the batch that is running)."""
        return len(self._queue)

    def _group(self, job: Job) -> Hashable:
        return job.lane if self.cross_task else (job.lane, job.adapter)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the batching loop on the running event loop."""
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="adapterkit-batcher")

    async def stop(self) -> None:
        """Run every queued job, then stop. New submissions are refused from now on."""
        self._closing = True
        if self._task is not None:
            assert self._wakeup is not None
            self._wakeup.set()
            await self._task
            self._task = None

    # -- submitting -----------------------------------------------------------------------------

    async def submit(
        self, lane: Hashable, adapter: str | None, length: int, payload: Any, *, solo: bool = False
    ) -> Any:
        """Queue one job and wait for its result. Raises QueueFull, or what the batch raised.

        ``solo``: the job's lane is its own (no other job will ever share it), so it runs without
        waiting ``max_wait_ms`` for company.
        """
        if self._task is None or self._closing:
            raise QueueFull(len(self._queue), 1)
        if len(self._queue) >= self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(len(self._queue), self._retry_after())
        loop = asyncio.get_running_loop()
        job = Job(lane, adapter, length, payload, solo, loop.create_future(), loop.time())
        self._queue.append(job)
        key = self._group(job)
        self._counts[key] = self._counts.get(key, 0) + 1
        self.metrics.queue_depth.set(len(self._queue))
        assert self._wakeup is not None
        self._wakeup.set()
        return await job.future

    def _retry_after(self) -> int:
        batches_ahead = math.ceil(len(self._queue) / self.max_batch_size)
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    # -- the loop -------------------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            while not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
            first = self._queue[0]
            key = self._group(first)
            deadline = first.enqueued + self.max_wait
            # Wait for company until the batch is full or the oldest job's time is up (at once when
            # closing, or when the previous batch took longer than max_wait).
            while self._counts.get(key, 0) < self.max_batch_size and not self._closing and not first.solo:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch = self._take(key)
            self.metrics.queue_depth.set(len(self._queue))
            await self._run(first.lane, batch)

    def _take(self, key: Hashable) -> list[Job]:
        batch: list[Job] = []
        rest: deque[Job] = deque()
        for job in self._queue:
            if len(batch) < self.max_batch_size and self._group(job) == key:
                batch.append(job)
            else:
                rest.append(job)
        self._queue = rest
        left = self._counts[key] - len(batch)
        if left:
            self._counts[key] = left
        else:
            del self._counts[key]
        return batch

    async def _run(self, lane: Hashable, batch: list[Job]) -> None:
        live = [j for j in batch if not j.future.done()]  # a client that went away was cancelled
        if not live:
            return
        live.sort(key=lambda j: j.length)  # neighbours of similar length pad little when split
        start = time.perf_counter()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.run_batch, lane, live
            )
        except Exception as e:  # the whole batch failed: every job gets the error
            results = [e] * len(live)
        elapsed = time.perf_counter() - start
        self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
        lane_name = str(lane[0] if isinstance(lane, tuple) else lane)
        self.metrics.batch_size.observe(len(live), lane=lane_name)
        self.metrics.batch_adapters.observe(len({j.adapter for j in live}), lane=lane_name)
        self.metrics.batch_seconds.observe(elapsed, lane=lane_name)
        for job, result in zip(live, results, strict=True):
            if job.future.done():
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)
