"""An asyncio face on a blocking memtable Table.

memtable's tables block (sockets to memcached, lmdb file locks); the policy
server's event loop must never wait on them.  A Store owns ONE worker
thread that performs every operation of its table, in the order they were
asked for, and hands each result back to the event loop.

Coalescing: the worker takes everything waiting in its queue at once (up to
STORE_MAX_BATCH operations) and runs it as a batch; a run of consecutive
gets becomes a single ``table.lookup_many(keys)`` call when the table has
that method (memcache: one ``get k1 k2 ...`` round trip), else one lookup
each.  Order is kept, so a get queued after a put of the same key sees it.
Under load this turns N round trips into one; when idle, a batch is one op.

Every failure of the table (memtable's MemtableError: TemporaryError,
AccessError, KeySkippedError, ...) reaches the caller as StoreError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from memtable import clock
from memtable.errors import MemtableError
from memtable.table import Table
from policyd import limits
from policyd.errors import PolicydError
from policyd.metrics import Metrics, NullMetrics

log = logging.getLogger(__name__)

# How long close() waits for the worker to finish what is queued and close
# the table (memtable bounds every operation by its own timeouts).
STORE_CLOSE_TIMEOUT = 30.0


class StoreError(PolicydError):
    """A store could not answer now (memcached down, timeout, backup failure,
    full queue, closed store); nothing is known about the key."""


_GET, _PUT, _CLOSE = "get", "put", "close"


@dataclass
class _Op:
    kind: str
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    key: str = ""
    value: str = ""
    ttl: int = 0
    result: Any = None
    error: BaseException | None = field(default=None)


def _deliver(op: _Op) -> None:
    """Runs on the event loop: complete the caller's future."""
    if op.future.done():  # the caller gave up (timeout, cancellation)
        return
    if op.error is not None:
        op.future.set_exception(op.error)
    else:
        op.future.set_result(op.result)


class Store:
    """Async get/put over one Table, run in one dedicated worker thread."""

    def __init__(self, table: Table, *, max_pending: int = limits.STORE_MAX_PENDING,
                 max_batch: int = limits.STORE_MAX_BATCH, name: str = "",
                 metrics: Metrics | NullMetrics | None = None) -> None:
        self.table = table
        self.spec = table.spec
        self.name = name or table.spec
        self._metrics = metrics or NullMetrics()
        self._max_pending = max_pending
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._closed = False
        self._close_future: asyncio.Future[Any] | None = None
        self._lookup_many = getattr(table, "lookup_many", None)
        self._thread = threading.Thread(target=self._run, name=f"store {self.spec}",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, spec: str, *, read_write: bool) -> Store:
        """Open ``spec`` with memtable's registry (blocking: call at start-up).
        ConfigError and friends propagate unchanged."""
        from memtable.registry import open_table

        return cls(open_table(spec, read_write=read_write))

    @property
    def closed(self) -> bool:
        return self._closed

    # --- the event-loop side ----------------------------------------------

    def _submit(self, kind: str, key: str = "", value: str = "", ttl: int = 0) -> \
            asyncio.Future[Any]:
        if self._closed:
            raise StoreError(f"{self.spec}: store is closed")
        if self._queue.qsize() >= self._max_pending:
            raise StoreError(f"{self.spec}: more than {self._max_pending} operations waiting")
        loop = asyncio.get_running_loop()
        op = _Op(kind, loop, loop.create_future(), key, value, ttl)
        self._queue.put(op)
        return op.future

    async def get(self, key: str) -> str | None:
        """The value stored under key, or None when there is none."""
        result: str | None = await self._submit(_GET, key)
        return result

    async def put(self, key: str, value: str, ttl: int) -> None:
        """Store key = value for ttl seconds (tables without expiry keep it)."""
        await self._submit(_PUT, key, value, ttl)

    async def close(self) -> None:
        """Finish what is queued, close the table, end the worker.  Idempotent."""
        if self._close_future is None:
            self._closed = True
            loop = asyncio.get_running_loop()
            op = _Op(_CLOSE, loop, loop.create_future())
            self._close_future = op.future
            self._queue.put(op)
        try:
            await asyncio.wait_for(asyncio.shield(self._close_future), STORE_CLOSE_TIMEOUT)
        except TimeoutError:
            log.warning("%s: worker did not finish within %ss; abandoning it",
                        self.spec, STORE_CLOSE_TIMEOUT)

    # --- the worker thread ------------------------------------------------

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < self._max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not self._run_batch(batch):
                return

    def _run_batch(self, batch: list[_Op]) -> bool:
        """Run a batch in order; False once the close operation ran."""
        i = 0
        while i < len(batch):
            op = batch[i]
            if op.kind == _GET:
                j = i + 1
                while j < len(batch) and batch[j].kind == _GET:
                    j += 1
                self._run_gets(batch[i:j])
                i = j
                continue
            if op.kind == _PUT:
                self._call(op, "put", self.table.update, op.key, op.value, op.ttl)
            else:  # _CLOSE: nothing can be queued after it (submit refuses)
                self._call(op, "close", self.table.close)
                self._send(op)
                return False
            self._send(op)
            i += 1
        return True

    def _run_gets(self, ops: list[_Op]) -> None:
        if len(ops) > 1 and self._lookup_many is not None:
            keys = list(dict.fromkeys(op.key for op in ops))
            started = clock.monotonic()
            try:
                values = _as_mapping(keys, self._lookup_many(keys))
                self._metrics.store_latency(self.name, "get", clock.monotonic() - started)
            except Exception as exc:
                self._metrics.store_error(self.name)
                error = _translate(self.spec, exc)
                for op in ops:
                    op.error = error
            else:
                for op in ops:
                    op.result = values.get(op.key)
            for op in ops:
                self._send(op)
            return
        for op in ops:
            self._call(op, "get", self.table.lookup, op.key)
            self._send(op)

    def _call(self, op: _Op, name: str, fn: Any, *args: Any) -> None:
        started = clock.monotonic()
        try:
            op.result = fn(*args)
        except Exception as exc:  # handed to the caller
            self._metrics.store_error(self.name)
            op.error = _translate(self.spec, exc)
        else:
            self._metrics.store_latency(self.name, name, clock.monotonic() - started)

    @staticmethod
    def _send(op: _Op) -> None:
        # A closed loop (RuntimeError) means nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            op.loop.call_soon_threadsafe(_deliver, op)


def _as_mapping(keys: Sequence[str], found: Any) -> Mapping[str, str | None]:
    """lookup_many may answer a mapping or a list in key order."""
    if isinstance(found, Mapping):
        return found
    return dict(zip(keys, found, strict=True))


def _translate(spec: str, exc: Exception) -> Exception:
    if isinstance(exc, MemtableError | OSError):
        error = StoreError(f"{spec}: {exc}")
        error.__cause__ = exc
        return error
    return exc
