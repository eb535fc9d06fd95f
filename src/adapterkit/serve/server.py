"""uvicorn, taught to tell the app when a shutdown starts."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server; on SIGTERM / SIGINT it marks the app's service draining, so ``/health``
    answers 503 while in-flight requests finish. uvicorn itself stops accepting connections, waits for
    the open requests (up to ``timeout_graceful_shutdown``), then runs the app's shutdown, which
    empties the batch queue and stops the model thread."""

    def __init__(self, config: uvicorn.Config, app: Any):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.app.state.service.draining = True
        if sig == signal.SIGTERM and not self.should_exit:
            print(
                "adapterkit serve: SIGTERM: finishing in-flight requests, then exiting",
                file=sys.stderr,
                flush=True,
            )
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured SIGTERM once it has shut down, so the process would die "killed
        # by SIGTERM" even after a clean drain; a clean drain exits 0 instead.
        with super().capture_signals():
            try:
                yield
            finally:
                captured = getattr(self, "_captured_signals", None)
                if isinstance(captured, list) and not self.force_exit:
                    captured.clear()
