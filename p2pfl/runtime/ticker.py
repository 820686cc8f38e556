"""A daemon thread that calls a function at a fixed interval (the heartbeats)."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger()


class Ticker:
    """Calls `tick()` every `interval_s` from one daemon thread until `stop` (heartbeats).

    An exception in `tick` is logged and the ticking goes on: liveness must not die
    with one bad call.
    """

    def __init__(self, interval_s: float, tick: Callable[[], None]) -> None:
        self._interval_s = interval_s
        self._tick = tick
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="p2pfl-ticker", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self._tick()
            except Exception:  # logged, and the next tick tries again
                log.exception("tick_failed")

    def stop(self) -> None:
        """Stop ticking and wait for a tick in progress to finish."""
        self._stopped.set()
        self._thread.join()
