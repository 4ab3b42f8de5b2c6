"""A failing database, told to the operator once per burst rather than once per request."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("proxy.store")

# A burst of store errors is logged once, then again at most this often.
FAULT_LOG_INTERVAL = 60.0


class FaultLog:
    def __init__(self, where: str) -> None:
        self._where = where  # the file or the database, as the operator names it
        self._faults = 0
        self._logged_at = 0.0
        self.last = ""

    @property
    def failing(self) -> bool:
        return self._faults > 0

    def fault(self, error: str) -> None:
        self._faults += 1
        self.last = error
        now = time.monotonic()
        if self._faults == 1 or now - self._logged_at >= FAULT_LOG_INTERVAL:
            log.error(
                "store %s failing: %s (%d failed operation(s) so far)", self._where, error, self._faults
            )
            self._logged_at = now

    def success(self) -> None:
        if self._faults:
            log.warning("store recovered after %d failed operation(s)", self._faults)
            self._faults = 0
