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

Every trouble is announced so, however soon after the last one: a hang that
stalls requests for seconds must be in the log when the operator looks.
Only a server that flaps more than MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL
times per interval has its further troubles summed up instead, in one line
(``unavailable 45 more times since the last report, 3 s in all: ...;
available again``) logged as soon as the interval allows: at the first
command after that, or when the table is closed.  So the log stays bounded
whatever the server does, and no trouble goes unreported.
"""

from __future__ import annotations

import collections
import logging
import math

from memtable import clock
from memtable.limits import (
    MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS,
    MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL,
)

log = logging.getLogger("memtable.wire")


def _times(count: int) -> str:
    return "1 more time" if count == 1 else f"{count} more times"


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
        # When the last starts (and summaries) were logged: the flapping bound.
        self._starts: collections.deque[float] = collections.deque(
            maxlen=MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL)
        self._failures = 0                # failed commands since the last line
        self._answered = 0                # operations answered by the backup since then
        self._answered_total = 0          # ... during the current trouble
        self._hidden = 0                  # troubles since the last line, not announced
        self._hidden_seconds = 0.0        # ... how long they lasted in all

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
        if not self._announced:
            if not self._may_start(now):
                return  # flapping: summed up later
            self._announced = True
            self._starts.append(now)
            log.warning("memcache server %s: %s: %s%s%s", self.subject, self.trouble, reason,
                        f"; {self.fallback}" if self.fallback else "", self._unreported())
        elif now - self._last_line >= MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS:
            log.warning("memcache server %s: still %s after %.0f s: %s; %d failed commands%s "
                        "since the last report", self.subject, self.trouble, now - self.since,
                        reason, self._failures, self._answered_text(self._answered))
        else:
            return
        self._logged(now)

    def answered_by_backup(self, count: int) -> None:
        """``count`` operations that the failures made go to the backup."""
        self._answered += count
        self._answered_total += count

    def succeeded(self) -> None:
        """A command succeeded: the trouble, if any, is over."""
        if self.since is None and not self._hidden:
            return
        now = clock.monotonic()
        if self.since is not None:
            if self._announced:
                log.warning("memcache server %s: %s after %.0f s%s", self.subject,
                            self.recovered, now - self.since,
                            self._answered_text(self._answered_total))
                self._logged(now)
            else:
                self._hidden += 1
                self._hidden_seconds += now - self.since
            self.since = None
            self._announced = False
        if self._hidden and self._may_start(now):
            self._starts.append(now)
            self._summary(now, self.recovered)

    def close(self) -> None:
        """The table closes: troubles not reported yet are, in one line."""
        now = clock.monotonic()
        if self.since is not None and not self._announced:
            self._hidden += 1
            self._hidden_seconds += now - self.since
            self.since = None
            self._summary(now, f"still {self.trouble} at close")
        elif self._hidden:
            self._summary(now, self.recovered)

    # -- helpers -------------------------------------------------------------

    def _may_start(self, now: float) -> bool:
        """Fewer than MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL troubles were
        announced (or summed up) within the last interval."""
        starts = self._starts
        return (len(starts) < MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL
                or now - starts[0] >= MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS)

    def _answered_text(self, count: int) -> str:
        return f", {count} operations answered from the backup" if self.fallback else ""

    def _unreported(self) -> str:
        """What a start line announced late adds: the failures before it."""
        earlier = self._failures - 1
        parts = []
        if self._hidden:
            parts.append(f"{self.trouble} {_times(self._hidden)}, "
                         f"{self._hidden_seconds:.0f} s in all")
        if earlier:
            parts.append(f"{earlier} more failed commands")
        if self._answered and self.fallback:
            parts.append(f"{self._answered} operations answered from the backup")
        return f" ({', '.join(parts)} since the last report)" if parts else ""

    def _summary(self, now: float, tail: str) -> None:
        log.warning("memcache server %s: %s %s since the last report, %.0f s in all: "
                    "%d failed commands%s; %s", self.subject, self.trouble,
                    _times(self._hidden), self._hidden_seconds, self._failures,
                    self._answered_text(self._answered), tail)
        self._logged(now)

    def _logged(self, now: float) -> None:
        self._last_line = now
        self._failures = 0
        self._answered = 0
        self._hidden = 0
        self._hidden_seconds = 0.0
