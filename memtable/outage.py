"""How a memcache table logs trouble with its server: once, not per operation.

A memcached that is down, hung or refusing writes makes every operation
fail; a busy caller (policyd) would log a warning per operation, thousands a
second.  An OutageLog turns the failures of one server into a few lines:

- one when the trouble starts (``unavailable: REASON; answering from the
  backup lmdb:...``);
- while it lasts, at most one per limits.MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS,
  with what happened since the line before (``still unavailable after 75 s:
  REASON; 5210 failed commands, 10417 operations answered from the backup
  since the last report``);
- one when it ends (``available again after 81 s, 11002 operations answered
  from the backup``).

Trouble that starts again within the interval after the last line (a
flapping server) is not announced again: its failures are counted into the
next line, so the log stays bounded whatever the server does.
"""

from __future__ import annotations

import logging
import math

from memtable import clock
from memtable.limits import MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS

log = logging.getLogger("memtable.wire")


class OutageLog:
    """The log lines of one kind of trouble with one memcache server.

    ``subject`` names the server (and table), ``trouble`` says what is wrong
    ("unavailable", "refusing writes"), ``fallback`` what answers meanwhile
    ("answering from the backup lmdb:..."; empty: nothing does, callers get
    the errors) and ``recovered`` what the end line says ("available again").
    """

    def __init__(self, subject: str, *, trouble: str, fallback: str, recovered: str) -> None:
        self.subject = subject
        self.trouble = trouble
        self.fallback = fallback
        self.recovered = recovered
        self.since: float | None = None   # when the current trouble started
        self._announced = False           # its start line was logged
        self._last_line = -math.inf       # when any line was last logged
        self._failures = 0                # failed commands since the last line
        self._answered = 0                # operations answered by the backup since then
        self._answered_total = 0          # ... during the current trouble

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, reason: str) -> None:
        """One command failed for good (all its attempts, or held down)."""
        now = clock.monotonic()
        self._failures += 1
        if self.since is None:
            self.since = now
            self._answered_total = 0
        if now - self._last_line < MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS:
            return
        if not self._announced:
            self._announced = True
            earlier = self._failures - 1
            log.warning("memcache server %s: %s: %s%s%s", self.subject, self.trouble, reason,
                        f"; {self.fallback}" if self.fallback else "",
                        f" ({earlier} more failed commands since the last report)"
                        if earlier else "")
        else:
            answered = (f", {self._answered} operations answered from the backup"
                        if self.fallback else "")
            log.warning("memcache server %s: still %s after %.0f s: %s; %d failed commands%s "
                        "since the last report", self.subject, self.trouble, now - self.since,
                        reason, self._failures, answered)
        self._last_line = now
        self._failures = 0
        self._answered = 0

    def answered_by_backup(self, count: int) -> None:
        """``count`` operations that the failures made go to the backup."""
        self._answered += count
        self._answered_total += count

    def succeeded(self) -> None:
        """A command succeeded: the trouble, if any, is over."""
        if self.since is None:
            return
        now = clock.monotonic()
        if self._announced:
            answered = (f", {self._answered_total} operations answered from the backup"
                        if self.fallback else "")
            log.warning("memcache server %s: %s after %.0f s%s", self.subject, self.recovered,
                        now - self.since, answered)
            self._last_line = now
            self._failures = 0
            self._answered = 0
        self.since = None
        self._announced = False
