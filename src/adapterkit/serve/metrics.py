"""Prometheus metrics in the text exposition format (version 0.0.4), written by hand.

Three instrument kinds, each with optional labels, safe to update from the event loop and from the
model's worker thread at once. Hand-written rather than ``prometheus_client`` so serving needs no
extra dependency; the format is small and stable.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A value that only goes up."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        super().__init__(name, help_text, labels)
        self._values: dict[tuple[str, ...], float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def _samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    """Observations counted into cumulative buckets, plus their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ):
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(buckets))
        self._data: dict[
            tuple[str, ...], tuple[list[int], list[float]]
        ] = {}  # counts per bucket, [sum, count]

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0, 0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1
            total[0] += value
            total[1] += 1

    def count(self, **labels: str) -> int:
        data = self._data.get(self._key(labels))
        return int(data[1][1]) if data else 0

    def _samples(self) -> list[str]:
        out = []
        with self._lock:
            items = sorted((k, (list(c), list(t))) for k, (c, t) in self._data.items())
        for key, (counts, (total, n)) in items:
            running = 0
            for bound, c in zip((*self.buckets, math.inf), counts, strict=True):
                running += c
                le = f'le="{_number(bound)}"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {int(n)}")
        return out


class ServeMetrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.requests = Counter(
            "adapterkit_requests_total", "HTTP requests answered.", ("endpoint", "status")
        )
        self.latency = Histogram(
            "adapterkit_request_seconds",
            "Request latency, arrival to answer.",
            ("endpoint",),
            LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "adapterkit_batch_size", "Rows per forward batch.", ("lane",), BATCH_BUCKETS
        )
        self.batch_adapters = Histogram(
            "adapterkit_batch_adapters", "Distinct adapters per forward batch.", ("lane",), BATCH_BUCKETS
        )
        self.batch_seconds = Histogram(
            "adapterkit_batch_seconds", "Model time per batch.", ("lane",), LATENCY_BUCKETS
        )
        self.queue_depth = Gauge("adapterkit_queue_depth", "Requests waiting for a batch.")
        self.rejected = Counter(
            "adapterkit_queue_rejected_total", "Requests refused because the queue was full."
        )
        self.adapters_loaded = Gauge("adapterkit_adapters_loaded", "Adapters in the model now.")
        self.adapter_bytes = Gauge(
            "adapterkit_adapter_bytes", "Bytes of loaded adapters in the model now: weights plus their mixed-batch stack copy."
        )
        self.loads = Counter("adapterkit_adapter_loads_total", "Adapters loaded into the model.")
        self.evictions = Counter(
            "adapterkit_adapter_evictions_total", "Adapters evicted to stay under the memory budget."
        )
        self.load_failures_remembered = Counter(
            "adapterkit_adapter_load_failures_remembered_total",
            "Requests answered from the memory of a failed load, without loading again.",
        )
        self.queue_depth.set(0)
        self.adapters_loaded.set(0)
        self.adapter_bytes.set(0)

    def render(self) -> str:
        metrics = [v for v in vars(self).values() if isinstance(v, _Metric)]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
