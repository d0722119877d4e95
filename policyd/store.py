"""policyd's stores: get and put for the event loop, over one AsyncTable.

A Store wraps one memtable AsyncTable (``memtable.registry.as_async``
makes it from a Table) and gives the greylisting policy two operations,
get() and put(), each returning at once a future to await.  Nothing here blocks the
event loop or owns a thread; policyd.greylist gives each of its tables
(triplets, clients, postscreen's cache) its own Store, so their round trips
and backup commits overlap.

Batching.  A store runs one batch at a time, in one task (started by the
first operation asked, ended when nothing waits).  A batch's gets are ONE
``table.lookup_many`` (a key asked twice is looked up once), its puts ONE
``table.update_many`` (in the order asked), started together and awaited
together.  Operations asked while a batch is in flight wait and form the
next batch.  So a lone request goes out at once, and under load each round
trip to memcached and each synced backup commit carries every request that
arrived meanwhile, with no timer and no batch size to tune.

Order.  A get sees every put of its key asked before it: while such a put
waits or is in flight, the get is not looked up but answered with the put's
value when the put completes (a StoreError when the put fails).  Puts of
one key land in the order asked: update_many writes its items in order, and
a batch starts only when the one before it has completed.  A get asked
before a put of its key, both waiting for the same batch, may see it or
not: they were pending together.

Write-ahead guarantee (docs/design.md): a put's future completes only after
update_many returned without an error for its item, i.e. memcached answered
STORED and the backup transaction holding the item was committed (lmdb:
synced).  policyd answers a request only after its puts completed, so a
reply never claims state that a crash of policyd (kill -9) or of memcached
can lose; batching only makes several requests share one commit.

Failures.  Every failure of the table (memtable's MemtableError: a
TemporaryError, AccessError, KeySkippedError, ...; or an OSError) reaches
each caller as its own StoreError: a failed call fails each of its
operations, a per-item error of update_many only its put and the gets
answered by it.  ``max_pending`` bounds the operations asked and not yet
answered; beyond it, and once the store is closed, StoreError at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TypeVar

from memtable import clock
from memtable.errors import CorruptError, MemtableError
from memtable.table import AsyncTable, Item, Table
from policyd import limits
from policyd.errors import PolicydError
from policyd.metrics import Metrics, NullMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class StoreError(PolicydError):
    """A store could not answer now (memcached down, timeout, backup failure,
    too many operations waiting, closed store); nothing is known about the
    key."""


class _Put:
    """A put waiting or in flight, and the gets its value answers."""

    __slots__ = ("future", "item", "readers")

    def __init__(self, item: Item, future: asyncio.Future[None]) -> None:
        self.item = item
        self.future = future
        self.readers: list[asyncio.Future[str | None]] = []


class _Batch:
    """The operations waiting for the next batch."""

    __slots__ = ("gets", "puts")

    def __init__(self) -> None:
        self.gets: dict[str, list[asyncio.Future[str | None]]] = {}
        self.puts: list[_Put] = []

    def __bool__(self) -> bool:
        return bool(self.gets or self.puts)


class Store:
    """get/put over one AsyncTable, batched (see the module docstring).

    ``max_pending`` bounds the operations asked and not yet answered;
    ``close_wait`` how long close() waits for the table to finish.
    """

    def __init__(self, table: AsyncTable, *, name: str = "",
                 metrics: Metrics | NullMetrics | None = None,
                 max_pending: int = limits.STORE_MAX_PENDING,
                 close_wait: float = limits.STORE_CLOSE_WAIT_SECONDS) -> None:
        self.table = table
        self.spec = table.spec
        self.name = name or table.spec
        self.max_pending = max_pending
        self.close_wait = close_wait
        self._metrics = metrics or NullMetrics()
        self._next = _Batch()
        self._unanswered = 0
        # Per key, the last put asked and not yet completed.
        self._last_put: dict[str, _Put] = {}
        self._running: asyncio.Task[None] | None = None  # runs the batches
        self._closing: asyncio.Task[None] | None = None
        self._close_error: Exception | None = None

    @property
    def closed(self) -> bool:
        return self._closing is not None

    def get(self, key: str) -> asyncio.Future[str | None]:
        """The value stored under key (None when there is none), as a future
        to await.  Asked at once: gets and puts asked before awaiting any
        go out together."""
        future: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        if self._refused(future):
            return future
        put = self._last_put.get(key)
        if put is not None:
            put.readers.append(future)
        else:
            self._next.gets.setdefault(key, []).append(future)
            self._run_batches()
        return future

    def put(self, key: str, value: str, ttl: int) -> asyncio.Future[None]:
        """Store key = value for ttl seconds (tables without expiry keep
        it); the future completes once the write is committed (the
        write-ahead guarantee)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._refused(future):
            return future
        put = _Put((key, value, ttl), future)
        self._next.puts.append(put)
        self._last_put[key] = put
        self._run_batches()
        return future

    async def close(self) -> None:
        """Finish what was asked, then close the table.  Waits at most
        ``close_wait`` seconds, then abandons the table with a warning (its
        thread, stuck on a hung memcached, is a daemon; an lmdb commit cut
        short by the exit is rolled back by LMDB).  Idempotent; StoreError
        when the table fails to close."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._finish())
        try:
            await asyncio.wait_for(asyncio.shield(self._closing), self.close_wait)
        except TimeoutError:
            log.warning("%s: not finished within %gs; abandoning it", self.spec,
                        self.close_wait)
            return
        if self._close_error is not None:
            raise _translate(self.spec, self._close_error)

    # --- the batches ----------------------------------------------------------

    def _refused(self, future: asyncio.Future[T]) -> bool:
        """Fail ``future`` at once when the store takes no more operations."""
        if self._closing is not None:
            future.set_exception(StoreError(f"{self.spec}: store is closed"))
        elif self._unanswered >= self.max_pending:
            future.set_exception(StoreError(
                f"{self.spec}: more than {self.max_pending} operations waiting"))
        else:
            self._unanswered += 1
            return False
        return True

    def _run_batches(self) -> None:
        """Start the task that runs the batches, unless it runs already.
        It takes its first batch in the next loop iteration, so everything
        asked in this one goes out together."""
        if self._running is None:
            self._running = asyncio.create_task(self._batches(), name=f"store {self.name}")

    async def _batches(self) -> None:
        try:
            while self._next:
                batch, self._next = self._next, _Batch()
                if batch.gets and batch.puts:
                    await asyncio.gather(self._lookup(batch.gets), self._update(batch.puts))
                elif batch.gets:
                    await self._lookup(batch.gets)
                else:
                    await self._update(batch.puts)
        finally:
            self._running = None

    async def _lookup(self, gets: dict[str, list[asyncio.Future[str | None]]]) -> None:
        # A key whose callers all gave up (decision timeout) is not looked
        # up: after a stall the backlog drains at once.
        keys = [key for key, futures in gets.items() if not all(f.done() for f in futures)]
        found: dict[str, str | None] = {}
        error: Exception | None = None
        if keys:
            started = clock.monotonic()
            try:
                found = await self.table.lookup_many(keys)
            except Exception as exc:  # handed to each caller
                self._metrics.store_error(self.name)
                error = exc
            else:
                self._metrics.store_latency(self.name, "get", clock.monotonic() - started)
        for key, futures in gets.items():
            for future in futures:
                self._answer(future, found.get(key), error)

    async def _update(self, puts: list[_Put]) -> None:
        started = clock.monotonic()
        errors: Sequence[BaseException | None]
        try:
            errors = await self.table.update_many([put.item for put in puts])
        except Exception as exc:  # handed to each caller
            self._metrics.store_error(self.name)
            errors = [exc] * len(puts)
        else:
            self._metrics.store_latency(self.name, "put", clock.monotonic() - started)
            for _ in filter(None, errors):
                self._metrics.store_error(self.name)
        for put, error in zip(puts, errors, strict=True):
            key, value, _ttl = put.item
            if self._last_put.get(key) is put:
                del self._last_put[key]
            self._answer(put.future, None, error)
            for reader in put.readers:
                self._answer(reader, value, error)

    def _answer(self, future: asyncio.Future[T], result: T,
                error: BaseException | None) -> None:
        self._unanswered -= 1
        if future.done():  # the caller gave up (timeout, cancellation)
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(_translate(self.spec, error))

    async def _finish(self) -> None:
        while self._running is not None:
            await asyncio.wait([self._running])  # never cancels the batches
        try:
            await self.table.close()
        except Exception as exc:  # raised by close()
            self._close_error = exc


def open_checked(spec: str, *, read_write: bool, missing_empty: bool = False) -> Table:
    """Open one of policyd's tables and check its files (Table.verify)
    before anything writes them: a damaged lmdb file makes LMDB abort the
    process on its first write, and policyd would die at every start.  A
    damaged file is CorruptError saying what to do; other errors propagate.
    ``missing_empty``: read-only, an lmdb file policyd has not created yet
    is an empty table (memtable.registry.open_table)."""
    from memtable.registry import open_table

    try:
        table = open_table(spec, read_write=read_write, missing_empty=missing_empty)
    except CorruptError as exc:
        raise _recovery(spec, exc) from None
    try:
        table.verify()
    except CorruptError as exc:
        table.close()
        raise _recovery(spec, exc) from None
    except BaseException:
        table.close()
        raise
    return table


def _recovery(spec: str, exc: CorruptError) -> CorruptError:
    state = ("memcached still holds policyd's state" if spec.startswith("memcache:")
             else "the greylisting state in it is lost")
    table_spec = "lmdb:" + exc.path.removesuffix(".lmdb")
    return CorruptError(
        f"{exc}: {state}; stop policyd, `mv {exc.path} {exc.path}.corrupt`, refill it from "
        f"the last dump (`memtable -i {table_spec} < DUMP`) or let policyd create it empty, "
        'and start policyd again (see "A corrupt backup" in docs/operations.md)', exc.path)


def _translate(spec: str, exc: BaseException) -> BaseException:
    """The exception a caller sees: a new StoreError for table failures,
    anything else (a bug) as it is."""
    if isinstance(exc, MemtableError | OSError):
        error = StoreError(f"{spec}: {exc}")
        error.__cause__ = exc
        return error
    return exc
