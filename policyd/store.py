"""An asyncio face on blocking memtable Tables.

memtable's tables block (sockets to memcached, lmdb file locks); the policy
server's event loop must never wait on them.  A StoreWorker owns one
thread that performs the operations of the Stores attached to it (one
Store per Table) and hands the results back to the event loop.  policyd runs
its triplet and client stores on one shared worker, so the lookups of a
request for both tables go out in the same batch step.  When one round
holds operations of several tables, a helper thread runs all tables but the
first while the worker runs the first: the tables share nothing (each has
its own memcached connection and backup file), so their round trips and
synced commits overlap, and the round ends when all are done.  A Table is
still used by one thread at a time, as memtable requires.

Batching, on both sides of the thread boundary:

- The event loop collects the operations asked for during one loop
  iteration and hands them over as one list (one queue put, one wakeup).
- The worker takes everything waiting (up to STORE_MAX_BATCH operations)
  and runs it as a batch in rounds: all puts that may go first, then all
  gets that may go next, then puts that must follow those gets, and so on.
  Puts go first because their requests are answered as soon as they are
  committed, while a get's request still has its writes ahead.
  Per key the order of operations is kept (a get asked for after a put of
  the same key sees it, a get asked for before it does not; puts of one key
  land in the order asked); operations on different keys commute.  Per
  table and round, the gets become one ``table.lookup_many(keys)`` call (a
  memcache table: one ``get k1 k2 ...`` round trip) and the puts one
  ``table.update_many(items)`` call (a memcache table: one pipelined
  round trip of ``set`` commands, then one lmdb transaction for its
  backup), when the table has those methods; else one call per operation.
- The results of a round reach the event loop with ONE
  ``loop.call_soon_threadsafe``, so the loop goes on deciding requests
  whose lookups are done while the worker writes the next round.

Write-ahead guarantee: a put's future completes only after the table's
update returned, i.e. after memcached answered STORED and the backup
transaction holding the item was committed (lmdb: synced to disk).  policyd
answers a request only after all its puts completed, so a reply never
claims state that a crash of policyd or of memcached could lose; a batch
only makes several requests share one commit.

Every failure of the table (memtable's MemtableError: TemporaryError,
AccessError, KeySkippedError, ...) reaches the caller as StoreError; a
batch call that fails fails each of its operations, a per-item error of
update_many only its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from memtable import clock
from memtable.errors import CorruptError, MemtableError
from memtable.table import Table
from policyd import limits
from policyd.errors import PolicydError
from policyd.metrics import Metrics, NullMetrics

log = logging.getLogger(__name__)


class StoreError(PolicydError):
    """A store could not answer now (memcached down, timeout, backup failure,
    full queue, closed store); nothing is known about the key."""


_GET, _PUT, _CLOSE = 0, 1, 2


class _Op:
    __slots__ = ("error", "future", "key", "kind", "loop", "result", "store", "ttl", "value")

    def __init__(self, kind: int, store: Store, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any], key: str = "", value: str = "",
                 ttl: int = 0) -> None:
        self.kind = kind
        self.store = store
        self.loop = loop
        self.future = future
        self.key = key
        self.value = value
        self.ttl = ttl
        self.result: Any = None
        self.error: BaseException | None = None


def _deliver(ops: list[_Op]) -> None:
    """Runs on the event loop: complete the callers' futures."""
    for op in ops:
        future = op.future
        if future.done():  # the caller gave up (timeout, cancellation)
            continue
        if op.error is not None:
            future.set_exception(op.error)
        else:
            future.set_result(op.result)


def _run_group(group: list[_Op]) -> None:
    """Run one round's operations on one table (all gets or all puts)."""
    store = group[0].store
    if group[0].kind == _GET:
        store._run_gets(group)
    else:
        store._run_puts(group)


class _Helper:
    """A second thread of a StoreWorker: runs the groups of other tables
    while the worker runs its own, one round at a time."""

    def __init__(self, name: str) -> None:
        self._todo: queue.SimpleQueue[list[list[_Op]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, groups: list[list[_Op]]) -> None:
        self._todo.put(groups)

    def wait(self) -> None:
        """Until the groups submitted are done; a bug in them is raised here."""
        error = self._done.get()
        if error is not None:
            raise error

    def stop(self) -> None:
        self._todo.put(None)

    def _run(self) -> None:
        while (groups := self._todo.get()) is not None:
            error: BaseException | None = None
            try:
                for group in groups:
                    _run_group(group)
            except BaseException as exc:  # handed to the worker thread
                error = exc
            self._done.put(error)


class StoreWorker:
    """One thread running the operations of the Stores attached to it.

    ``max_pending`` bounds the operations asked for and not yet taken up by
    the thread (beyond it, callers get StoreError at once), ``max_batch``
    the operations run as one batch.  The thread ends when every attached
    store is closed.
    """

    def __init__(self, *, max_pending: int = limits.STORE_MAX_PENDING,
                 max_batch: int = limits.STORE_MAX_BATCH, name: str = "store") -> None:
        self.max_pending = max_pending
        self.max_batch = max(1, max_batch)
        self._queue: queue.SimpleQueue[list[_Op]] = queue.SimpleQueue()
        self._pending: list[_Op] = []   # asked for in this loop iteration
        self._flush_scheduled = False
        # Operations asked for (event-loop side) and taken (worker side):
        # each counter has one writer, so no lock is needed.
        self._asked = 0
        self._taken = 0
        self._open_stores = 0
        self._helper: _Helper | None = None  # started when two tables first meet in a round
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Operations asked for and not yet taken up by the thread."""
        return self._asked - self._taken

    def _attach(self) -> None:
        self._open_stores += 1

    # --- the event-loop side ----------------------------------------------

    def _submit(self, op: _Op) -> None:
        self._asked += 1
        self._pending.append(op)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            op.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        ops, self._pending = self._pending, []
        if ops:
            self._queue.put(ops)

    # --- the worker thread ------------------------------------------------

    def _run(self) -> None:
        while True:
            ops = self._queue.get()
            while len(ops) < self.max_batch:
                try:
                    ops += self._queue.get_nowait()
                except queue.Empty:
                    break
            self._taken += len(ops)
            for start in range(0, len(ops), self.max_batch):
                self._run_batch(ops[start:start + self.max_batch])
            if self._open_stores <= 0:
                if self._helper is not None:
                    self._helper.stop()
                return

    def _run_batch(self, batch: list[_Op]) -> None:
        """Run a batch in rounds (see the module docstring).

        Rounds alternate: even ones hold puts, odd ones gets.  Each
        operation goes to the earliest round of its kind that is not before
        the round of the previous operation on the same key.
        """
        rounds: list[list[_Op]] = []
        last: dict[tuple[int, str], int] = {}
        for op in batch:
            if op.kind == _CLOSE:
                # Everything asked for before the close runs first.
                self._run_rounds(rounds)
                rounds, last = [], {}
                op.store._call_close(op)
                self._open_stores -= 1
                self._send([op])
                continue
            key = (id(op.store), op.key)
            prev = last.get(key)
            if prev is None:
                target = 1 - op.kind  # 0: first put round, 1: first get round
            elif prev % 2 == 1 - op.kind:
                target = prev
            else:
                target = prev + 1
            last[key] = target
            while len(rounds) <= target:
                rounds.append([])
            rounds[target].append(op)
        self._run_rounds(rounds)

    def _run_rounds(self, rounds: list[list[_Op]]) -> None:
        for ops in rounds:
            if not ops:
                continue
            by_store: dict[int, list[_Op]] = {}
            for op in ops:
                by_store.setdefault(id(op.store), []).append(op)
            groups = list(by_store.values())
            if len(groups) > 1 and len({id(g[0].store.table) for g in groups}) == len(groups):
                # Different tables share nothing (own memcached connection,
                # own backup file): the helper runs all but the first, so
                # their round trips and backup commits (fsync) overlap.
                helper = self._helper_thread()
                helper.submit(groups[1:])
                _run_group(groups[0])
                helper.wait()
            else:
                for group in groups:
                    _run_group(group)
            self._send(ops)

    def _helper_thread(self) -> _Helper:
        if self._helper is None:
            self._helper = _Helper(f"{self._thread.name} helper")
        return self._helper

    @staticmethod
    def _send(ops: list[_Op]) -> None:
        """ONE wakeup of each event loop waiting for ``ops``."""
        loop = ops[0].loop
        if any(op.loop is not loop for op in ops):
            by_loop: dict[int, list[_Op]] = {}
            for op in ops:
                by_loop.setdefault(id(op.loop), []).append(op)
            groups = list(by_loop.values())
        else:
            groups = [ops]
        for group in groups:
            # A closed loop (RuntimeError) means nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                group[0].loop.call_soon_threadsafe(_deliver, group)


class Store:
    """Async get/put over one Table, run by a StoreWorker thread (its own
    unless ``worker`` is given)."""

    def __init__(self, table: Table, *, max_pending: int = limits.STORE_MAX_PENDING,
                 max_batch: int = limits.STORE_MAX_BATCH, name: str = "",
                 metrics: Metrics | NullMetrics | None = None,
                 worker: StoreWorker | None = None) -> None:
        self.table = table
        self.spec = table.spec
        self.name = name or table.spec
        self._metrics = metrics or NullMetrics()
        self._closed = False
        self._close_future: asyncio.Future[Any] | None = None
        self._lookup_many = getattr(table, "lookup_many", None)
        self._update_many = getattr(table, "update_many", None)
        if worker is None:
            worker = StoreWorker(max_pending=max_pending, max_batch=max_batch,
                                 name=f"store {self.spec}")
        self._worker = worker
        worker._attach()

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

    def _submit(self, kind: int, key: str = "", value: str = "", ttl: int = 0) -> \
            asyncio.Future[Any]:
        loop = _running_loop()
        future = loop.create_future()
        worker = self._worker
        if self._closed:
            future.set_exception(StoreError(f"{self.spec}: store is closed"))
        elif worker.waiting >= worker.max_pending:
            future.set_exception(StoreError(
                f"{self.spec}: more than {worker.max_pending} operations waiting"))
        else:
            worker._submit(_Op(kind, self, loop, future, key, value, ttl))
        return future

    def get(self, key: str) -> asyncio.Future[str | None]:
        """The value stored under key (None when there is none), as a future
        to await.  The operation is queued at once, so several gets and puts
        asked for before awaiting any go out together."""
        return self._submit(_GET, key)

    def put(self, key: str, value: str, ttl: int) -> asyncio.Future[None]:
        """Store key = value for ttl seconds (tables without expiry keep it);
        the future completes once the write is committed (see the module
        docstring)."""
        return self._submit(_PUT, key, value, ttl)

    async def close(self) -> None:
        """Finish what is queued, close the table, end the worker when no
        other store uses it.  Idempotent."""
        if self._close_future is None:
            self._closed = True
            loop = asyncio.get_running_loop()
            op = _Op(_CLOSE, self, loop, loop.create_future())
            self._close_future = op.future
            self._worker._submit(op)  # never refused: the bound is for gets and puts
        try:
            await asyncio.wait_for(asyncio.shield(self._close_future),
                                   limits.STORE_CLOSE_WAIT_SECONDS)
        except TimeoutError:
            log.warning("%s: worker did not finish within %ss; abandoning it",
                        self.spec, limits.STORE_CLOSE_WAIT_SECONDS)

    # --- run by the worker thread ------------------------------------------

    def _run_gets(self, ops: list[_Op]) -> None:
        # A get whose caller gave up (decision timeout) need not run: after
        # a stall the backlog then drains at once.  Puts still run.
        ops = [op for op in ops if not op.future.done()]
        if not ops:
            return
        if len(ops) > 1 and self._lookup_many is not None:
            keys = list(dict.fromkeys(op.key for op in ops))
            started = clock.monotonic()
            try:
                values = _as_mapping(keys, self._lookup_many(keys))
                self._metrics.store_latency(self.name, "get", clock.monotonic() - started)
            except Exception as exc:
                self._metrics.store_error(self.name)
                for op in ops:  # each caller its own exception object
                    op.error = _translate(self.spec, exc)
            else:
                for op in ops:
                    op.result = values.get(op.key)
            return
        for op in ops:
            self._call(op, "get", self.table.lookup, op.key)

    def _run_puts(self, ops: list[_Op]) -> None:
        if len(ops) > 1 and self._update_many is not None:
            items = [(op.key, op.value, op.ttl) for op in ops]
            started = clock.monotonic()
            try:
                errors: Sequence[BaseException | None] = self._update_many(items)
            except Exception as exc:
                self._metrics.store_error(self.name)
                for op in ops:  # each caller its own exception object
                    op.error = _translate(self.spec, exc)
                return
            self._metrics.store_latency(self.name, "put", clock.monotonic() - started)
            for op, item_error in zip(ops, errors, strict=True):
                if item_error is not None:
                    self._metrics.store_error(self.name)
                    op.error = _translate(self.spec, item_error)
            return
        for op in ops:
            self._call(op, "put", self.table.update, op.key, op.value, op.ttl)

    def _call_close(self, op: _Op) -> None:
        self._call(op, "close", self.table.close)

    def _call(self, op: _Op, name: str, fn: Any, *args: Any) -> None:
        started = clock.monotonic()
        try:
            op.result = fn(*args)
        except Exception as exc:  # handed to the caller
            self._metrics.store_error(self.name)
            op.error = _translate(self.spec, exc)
        else:
            self._metrics.store_latency(self.name, name, clock.monotonic() - started)


_last_loop: asyncio.AbstractEventLoop | None = None


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


def _running_loop() -> asyncio.AbstractEventLoop:
    """asyncio.get_running_loop(), without its cost on the hot path.

    On Python 3.11 every get_running_loop() makes a getpid() system call
    (a fork check), ~12% of the event loop's CPU under load here.  The
    loop last seen is still this thread's running loop when its
    ``_thread_id`` (set by BaseEventLoop.run_forever, None once stopped) is
    this thread; loops without it (uvloop) take the slow path.
    """
    loop = _last_loop
    if loop is not None and getattr(loop, "_thread_id", None) == threading.get_ident():
        return loop
    return _remember_loop(asyncio.get_running_loop())


def _remember_loop(loop: asyncio.AbstractEventLoop) -> asyncio.AbstractEventLoop:
    global _last_loop
    _last_loop = loop
    return loop


def _as_mapping(keys: Sequence[str], found: Any) -> Mapping[str, str | None]:
    """lookup_many may answer a mapping or a list in key order."""
    if isinstance(found, Mapping):
        return found
    return dict(zip(keys, found, strict=True))


def _translate(spec: str, exc: BaseException) -> BaseException:
    """The exception a caller sees: a new StoreError for table failures."""
    if isinstance(exc, MemtableError | OSError):
        error = StoreError(f"{spec}: {exc}")
        error.__cause__ = exc
        return error
    return exc
