"""A blocking Table on a thread of its own, for an asyncio event loop.

Files block: an lmdb commit is synced to disk and waits for Postfix's
fcntl lock.  ThreadedTable runs one Table (an lmdb: backup, or any table
policyd is given) on one thread, and the event loop awaits the results.

Group commit: the thread takes every job waiting when it is free, and runs
adjacent updates as ONE ``update_many`` (an lmdb table: one transaction,
one sync), adjacent lookups as one ``lookup_many``; jobs keep the order in
which they were asked, so a lookup sees every update asked before it.
While one commit is being synced, the updates asked meanwhile gather for
the next: the busier the loop, the more each sync carries.  The results of
one group reach each waiting loop with one ``call_soon_threadsafe``.

An update_many completes when the table's update_many returned, i.e. when
its transaction is committed: the write-ahead guarantee of docs/design.md.

Lookups without the hop.  When every job asked has finished, a lookup
first tries the table's lookup_many_now() on the loop: an lmdb read whose
locks are free takes microseconds, far less than waking the thread and
being woken by it (docs/design.md, "Backup reads on the loop").  When the
file is busy (this thread's commit, another process's lock) it goes to
the thread as before.  A lookup never runs on the loop while a job asked
before it is unfinished, so it still sees every update asked before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from typing import Any

from memtable import limits
from memtable.errors import BackupError, MemtableError
from memtable.table import AsyncTable, Item, Table

log = logging.getLogger("memtable")

_LOOKUP, _UPDATE, _DELETE, _CLOSE = 0, 1, 2, 3


class _Job:
    __slots__ = ("error", "future", "kind", "loop", "payload", "result")

    def __init__(self, kind: int, payload: Any, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any]) -> None:
        self.kind = kind
        self.payload = payload
        self.loop = loop
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None


def _deliver(jobs: list[_Job]) -> None:
    """Runs on the event loop: complete the waiting futures."""
    for job in jobs:
        if job.future.done():  # the caller gave up (timeout, cancellation)
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.result)


class ThreadedTable(AsyncTable):
    """``table`` run by one thread (started at the first job).

    ``max_waiting`` bounds the jobs asked for and not yet taken up (beyond
    it, BackupError at once); ``max_group`` the items one transaction holds.
    """

    def __init__(self, table: Table, *,
                 max_waiting: int = limits.COMMIT_MAX_WAITING_JOBS,
                 max_group: int = limits.COMMIT_MAX_GROUP_ITEMS) -> None:
        self.table = table
        self.spec = table.spec
        self.max_waiting = max_waiting
        self.max_group = max(1, max_group)
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._asked = 0   # written by the loop only ...
        self._taken = 0   # ... and these by the thread only: no lock needed
        self._finished = 0
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Future[Any] | None = None

    @property
    def waiting(self) -> int:
        """Jobs asked for and not yet taken up by the thread."""
        return self._asked - self._taken

    # -- the event-loop side -------------------------------------------------

    def _ask(self, kind: int, payload: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closing is not None and kind != _CLOSE:
            future.set_exception(BackupError(f"{self.spec}: table is closed"))
            return future
        if kind != _CLOSE and self.waiting >= self.max_waiting:
            future.set_exception(BackupError(
                f"{self.spec}: more than {self.max_waiting} operations waiting"))
            return future
        if self._thread is None:
            self._thread = threading.Thread(target=self._take_jobs, daemon=True,
                                            name=f"commit {self.spec}")
            self._thread.start()
        self._asked += 1
        self._jobs.put(_Job(kind, payload, loop, future))
        return future

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        if self._closing is None and self._finished == self._asked:
            try:
                now = self.table.lookup_many_now(keys)
            except (MemtableError, OSError) as exc:
                error = _as_backup_error(self.spec, exc)  # as the thread gives it
                raise error from error.__cause__
            if now is not None:
                return now
        found: dict[str, str | None] = await self._ask(_LOOKUP, list(keys))
        return found

    async def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        errors: list[MemtableError | None] = await self.start_update_many(items)
        return errors

    def start_update_many(self, items: Sequence[Item]) -> asyncio.Future[Any]:
        """update_many, asked now: the commit starts while the caller does
        something else (a memcached round trip), then awaits the future."""
        return self._ask(_UPDATE, list(items))

    async def delete(self, key: str) -> bool:
        """Table.delete on the thread (one transaction of its own)."""
        found: bool = await self._ask(_DELETE, key)
        return found

    async def close(self, wait: float = limits.COMMIT_CLOSE_WAIT_SECONDS) -> None:
        """Finish the jobs asked for, close the table, end the thread; a
        thread still busy after ``wait`` seconds is abandoned with a
        warning (it is a daemon thread)."""
        if self._closing is None:
            if self._thread is None:
                self._closing = asyncio.get_running_loop().create_future()
                self._closing.set_result(None)
                self.table.close()
                return
            self._closing = self._ask(_CLOSE, None)
        try:
            await asyncio.wait_for(asyncio.shield(self._closing), wait)
        except TimeoutError:
            log.warning("%s: still busy after %g s; abandoning it", self.spec, wait)

    # -- the thread ------------------------------------------------------------

    def _take_jobs(self) -> None:
        while True:
            jobs = [self._jobs.get()]
            while True:
                try:
                    jobs.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            self._taken += len(jobs)
            start = 0
            while start < len(jobs):
                # A group: adjacent jobs of one kind, up to max_group items.
                kind = jobs[start].kind
                end, items = start + 1, _size(jobs[start])
                while (end < len(jobs) and jobs[end].kind == kind not in (_CLOSE, _DELETE)
                       and items + _size(jobs[end]) <= self.max_group):
                    items += _size(jobs[end])
                    end += 1
                group = jobs[start:end]
                self._run_group(kind, group)
                self._finished += len(group)
                self._send(group)
                if kind == _CLOSE:
                    return
                start = end

    def _run_group(self, kind: int, group: list[_Job]) -> None:
        try:
            if kind == _LOOKUP:
                keys = [key for job in group for key in job.payload]
                found = self.table.lookup_many(keys)
                for job in group:
                    job.result = {key: found.get(key) for key in job.payload}
            elif kind == _UPDATE:
                items = [item for job in group for item in job.payload]
                errors = self.table.update_many(items)
                at = 0
                for job in group:
                    job.result = errors[at:at + len(job.payload)]
                    at += len(job.payload)
            elif kind == _DELETE:
                group[0].result = self.table.delete(group[0].payload)
            else:
                self.table.close()
        except (MemtableError, OSError) as exc:
            for job in group:  # each caller its own exception object
                job.error = _as_backup_error(self.spec, exc)
        except BaseException as exc:  # a bug: the callers see it
            for job in group:
                job.error = exc

    @staticmethod
    def _send(group: list[_Job]) -> None:
        """ONE wakeup of each event loop waiting for ``group``."""
        by_loop: dict[int, list[_Job]] = {}
        for job in group:
            by_loop.setdefault(id(job.loop), []).append(job)
        for jobs in by_loop.values():
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                jobs[0].loop.call_soon_threadsafe(_deliver, jobs)


def _size(job: _Job) -> int:
    return len(job.payload) if job.kind in (_LOOKUP, _UPDATE) else 1


def _as_backup_error(spec: str, exc: BaseException) -> MemtableError:
    if isinstance(exc, MemtableError):
        return _copy(exc)
    error = BackupError(f"{spec}: {exc}")
    error.__cause__ = exc
    return error


def _copy(exc: MemtableError) -> MemtableError:
    # Each waiting caller raises its own exception object (a traceback is
    # attached to the object when raised); keep the class callers test for.
    try:
        clone = type(exc)(*exc.args)
    except TypeError:
        clone = BackupError(str(exc))
    clone.__cause__ = exc.__cause__
    return clone
