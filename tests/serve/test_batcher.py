"""The batcher alone, with a fake model: grouping, cross-task switch, bounds, deadlines, draining."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from adapterkit.serve.batcher import Batcher, QueueFull
from adapterkit.serve.runner import split_by_length


class Recorder:
    """A run_batch that records each batch and answers each job with (adapter, payload)."""

    def __init__(self):
        self.batches: list[tuple[object, list[tuple[str | None, int]]]] = []

    def __call__(self, lane, jobs):
        self.batches.append((lane, [(j.adapter, j.length) for j in jobs]))
        return [ValueError("bad row") if j.payload == "fail" else (j.adapter, j.payload) for j in jobs]


async def run_jobs(batcher: Batcher, jobs: list[tuple]):
    batcher.start()
    try:
        tasks = [asyncio.create_task(batcher.submit(*job)) for job in jobs]
        return await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.stop()


@pytest.fixture
def executor():
    with ThreadPoolExecutor(max_workers=1) as ex:
        yield ex


def test_mixed_adapters_share_a_batch_sorted_by_length_and_answers_route_back(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=4, max_wait_ms=1000)
    jobs = [
        ("classify", "a", 9, 0),
        ("classify", "b", 3, 1),
        ("classify", "c", 5, 2),
        ("classify", "a", 1, 3),
    ]
    results = asyncio.run(run_jobs(batcher, jobs))
    assert results == [("a", 0), ("b", 1), ("c", 2), ("a", 3)]
    assert rec.batches == [
        ("classify", [("a", 1), ("b", 3), ("c", 5), ("a", 9)])
    ]  # one batch, shortest first


def test_lanes_never_mix(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=8, max_wait_ms=0)
    jobs = [("classify", "a", 1, 0), ("tag", "b", 1, 1), ("classify", "b", 1, 2)]
    asyncio.run(run_jobs(batcher, jobs))
    lanes = sorted((lane, len(rows)) for lane, rows in rec.batches)
    assert ("tag", 1) in lanes and all(lane != "tag" or n == 1 for lane, n in lanes)
    assert sum(n for _, n in lanes) == 3


def test_cross_task_off_makes_one_batch_per_adapter(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=8, max_wait_ms=50, cross_task=False)
    jobs = [("classify", a, 1, i) for i, a in enumerate("abab")]
    results = asyncio.run(run_jobs(batcher, jobs))
    assert results == [("a", 0), ("b", 1), ("a", 2), ("b", 3)]
    assert sorted(rows for _, rows in rec.batches) == [[("a", 1), ("a", 1)], [("b", 1), ("b", 1)]]


def test_max_batch_size_splits(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=2, max_wait_ms=50)
    asyncio.run(run_jobs(batcher, [("classify", "a", 1, i) for i in range(5)]))
    assert [len(rows) for _, rows in rec.batches] == [2, 2, 1]


def test_a_lone_job_runs_after_max_wait(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=8, max_wait_ms=20)

    async def scenario():
        batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit("classify", "a", 1, 0), timeout=10)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == ("a", 0)


def test_full_queue_raises_and_errors_stay_with_their_job(executor):
    rec = Recorder()
    batcher = Batcher(rec, executor, max_batch_size=8, max_wait_ms=10_000, max_queue=2)

    async def scenario():
        batcher.start()
        first = [asyncio.create_task(batcher.submit("classify", "a", 1, p)) for p in ("ok", "fail")]
        await asyncio.sleep(0)  # let both enqueue
        with pytest.raises(QueueFull) as e:
            await batcher.submit("classify", "a", 1, "late")
        assert e.value.retry_after >= 1
        await batcher.stop()  # drains: the queued jobs still run
        return await asyncio.gather(*first, return_exceptions=True)

    ok, failed = asyncio.run(scenario())
    assert ok == ("a", "ok") and isinstance(failed, ValueError)
    assert batcher.metrics.rejected.value() == 1


def test_a_crashing_batch_fails_only_its_jobs(executor):
    calls = []

    def run(lane, jobs):
        calls.append(len(jobs))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return [j.payload for j in jobs]

    batcher = Batcher(run, executor, max_batch_size=1, max_wait_ms=0)
    results = asyncio.run(run_jobs(batcher, [("classify", "a", 1, 0), ("classify", "a", 1, 1)]))
    assert isinstance(results[0], RuntimeError) and results[1] == 1


@pytest.mark.parametrize(
    "lengths, overhead, max_tokens, runs",
    [
        ([8] * 17, 48, 16384, [(0, 17)]),  # equal lengths: never worth a second pass
        ([6, 7, 8, 9, 10, 20, 25, 28, 30, 30], 48, 16384, [(0, 5), (5, 10)]),  # short and long apart
        ([6, 7, 8, 9, 10, 20, 25, 28, 30, 30], 10**9, 16384, [(0, 10)]),  # passes too dear to split
        ([5, 100], 48, 16384, [(0, 1), (1, 2)]),
        ([10] * 10, 48, 30, [(0, 3), (3, 6), (6, 9), (9, 10)]),  # at most 30 padded tokens a pass
        ([500], 48, 30, [(0, 1)]),  # one row over the cap still runs
        ([], 48, 30, []),
    ],
)
def test_split_by_length(lengths, overhead, max_tokens, runs):
    assert split_by_length(lengths, overhead, max_tokens) == runs
