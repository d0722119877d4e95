"""policyd.store: async get/put over a Table in one worker thread, with
coalesced lookups, error translation and bounded queues."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from memtable.backends import LmdbTable
from memtable.errors import BackupError, KeySkippedError, MemtableError
from memtable.registry import open_table
from policyd import limits
from policyd.store import Store, StoreError, StoreWorker
from tests.conftest import Memcached, start_memcached
from tests.greylist_helpers import DictTable, run, write

WAIT = 5.0  # bound on every wait in these tests


class BatchTable(DictTable):
    """DictTable with lookup_many; its update() can be held to let work pile up."""

    def __init__(self) -> None:
        super().__init__("dict:batch")
        self.batches: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self.threads: set[str] = set()

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        self.threads.add(threading.current_thread().name)
        self.holding.set()
        assert self.hold.wait(WAIT)
        super().update(key, value, ttl)

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(keys))
        return {k: self.lookup(k) for k in keys}


def memcache_store(tmp_path: Path, server: str, read_write: bool = True) -> Store:
    cf = write(tmp_path / "t.cf", f"memcache = {server}\ntimeout = 1\nmax_try = 1\n")
    return Store.open(f"memcache:{cf}", read_write=read_write)


def test_roundtrip_with_real_memcached(tmp_path: Path, memcached: Memcached) -> None:
    async def main() -> None:
        store = memcache_store(tmp_path, memcached.spec)
        assert await store.get("192.0.2.0/a@x/b@y") is None
        await store.put("192.0.2.0/a@x/b@y", "1,2,0", 600)
        assert await store.get("192.0.2.0/a@x/b@y") == "1,2,0"
        # many at once: answered correctly whatever the batching
        keys = [f"k{i}" for i in range(50)]
        await asyncio.gather(*(store.put(k, k.upper(), 60) for k in keys))
        values = await asyncio.gather(*(store.get(k) for k in [*keys, "absent"]))
        assert values == [k.upper() for k in keys] + [None]
        await store.close()
    run(main())
    meta = memcached.meta("192.0.2.0/a@x/b@y")
    assert meta is not None and meta["value"] == "1,2,0"
    assert 590 <= int(meta["ttl"]) <= 600  # type: ignore[call-overload]


def test_close_abandons_a_worker_stuck_on_a_hung_memcached(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop must not wait for memcached's timeouts (up to max_try x
    timeout): close() waits STORE_CLOSE_WAIT_SECONDS, then leaves the
    worker (a daemon thread) behind."""
    monkeypatch.setattr(limits, "STORE_CLOSE_WAIT_SECONDS", 0.3)
    server = start_memcached(tmp_path)
    try:
        cf = write(tmp_path / "t.cf", f"memcache = {server.spec}\ntimeout = 20\n")
        store = Store.open(f"memcache:{cf}", read_write=True)
        server.pause()

        async def main() -> float:
            pending = store.get("key")  # the worker now waits for memcached
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await store.close()
            pending.cancel()
            return time.monotonic() - started
        assert run(main()) < 5
        assert "worker did not finish within 0.3s; abandoning it" in caplog.text
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_unreachable_memcached_is_a_store_error(tmp_path: Path) -> None:
    from tests.conftest import free_port

    async def main() -> None:
        store = memcache_store(tmp_path, f"inet:127.0.0.1:{free_port()}")
        with pytest.raises(StoreError, match="memcache"):
            await store.get("key")
        with pytest.raises(StoreError):
            await store.put("key", "v", 60)
        with pytest.raises(StoreError):  # the coalesced path fails the same way
            await asyncio.gather(store.get("a"), store.get("b"))
        await store.close()
    run(main())


def test_concurrent_gets_are_coalesced_in_order() -> None:
    table = BatchTable()

    async def main() -> None:
        store = Store(table)
        table.hold.clear()
        blocker = asyncio.ensure_future(store.put("a", "1", 60))
        await asyncio.to_thread(table.holding.wait, WAIT)  # the worker is inside update()
        gets = [asyncio.ensure_future(store.get(k)) for k in ["a", "b", "a", "c"]]
        put_b = asyncio.ensure_future(store.put("b", "2", 60))
        get_b = asyncio.ensure_future(store.get("b"))
        await asyncio.sleep(0)  # let every op reach the queue
        table.hold.set()
        await blocker
        assert await asyncio.gather(*gets) == ["1", None, "1", None]
        await put_b
        assert await get_b == "2"  # queued after the put: sees it
        await store.close()

    run(main())
    # four gets in one call (duplicates looked up once), then the lone get
    assert table.batches[0] == ["a", "b", "c"]
    assert table.lookups == 4
    assert len(table.threads) == 1 and table.closed


def test_pending_operations_are_bounded() -> None:
    table = BatchTable()

    async def main() -> None:
        store = Store(table, max_pending=2)
        table.hold.clear()
        blocker = asyncio.ensure_future(store.put("x", "1", 60))
        await asyncio.to_thread(table.holding.wait, WAIT)
        queued = [asyncio.ensure_future(store.get("x")) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(StoreError, match="more than 2"):
            await store.get("x")
        table.hold.set()
        await blocker
        assert await asyncio.gather(*queued) == ["1", "1"]
        await store.close()

    run(main())


def test_table_errors_become_store_errors_and_others_pass() -> None:
    class Odd(DictTable):
        def update(self, key: str, value: str, ttl: int | None = None) -> None:
            if key == "bug":
                raise ZeroDivisionError("a bug is not a store failure")
            raise KeySkippedError(key, "domain mismatch")

    async def main() -> None:
        store = Store(Odd())
        with pytest.raises(StoreError, match="domain mismatch") as err:
            await store.put("k", "v", 1)
        assert isinstance(err.value.__cause__, KeySkippedError)
        with pytest.raises(ZeroDivisionError):
            await store.put("bug", "v", 1)
        assert await store.get("k") is None  # the worker survived both
        await store.close()

    run(main())


def test_close_is_idempotent_and_refuses_later_work() -> None:
    table = DictTable()

    async def main() -> None:
        store = Store(table)
        await store.put("k", "v", 0)
        await asyncio.gather(store.close(), store.close())
        await store.close()
        assert table.closed and store.closed
        with pytest.raises(StoreError, match="closed"):
            await store.get("k")

    run(main())


def test_caller_giving_up_does_not_break_the_worker() -> None:
    table = BatchTable()

    async def main() -> None:
        store = Store(table)
        table.hold.clear()
        slow = asyncio.ensure_future(store.put("k", "v", 60))
        await asyncio.to_thread(table.holding.wait, WAIT)
        slow.cancel()
        table.hold.set()
        assert await store.get("k") == "v"  # the put still ran, in order
        await store.close()

    run(main())


class UpdateManyTable(BatchTable):
    """BatchTable with update_many; records the calls (kind, keys) in order.
    Keys starting with "skip" get a per-item KeySkippedError."""

    def __init__(self, spec: str = "dict:many") -> None:
        super().__init__()
        self.spec = spec
        self.calls: list[tuple[str, list[str]]] = []

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        self.calls.append(("get", list(keys)))
        return {k: DictTable.lookup(self, k) for k in keys}

    def lookup(self, key: str) -> str | None:
        self.calls.append(("get", [key]))
        return super().lookup(key)

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        self.calls.append(("put", [key]))
        super().update(key, value, ttl)

    def update_many(self, items: Sequence[tuple[str, str, int | None]]
                    ) -> list[MemtableError | None]:
        self.calls.append(("put", [key for key, _, _ in items]))
        self.threads.add(threading.current_thread().name)
        self.holding.set()
        assert self.hold.wait(WAIT)
        results: list[MemtableError | None] = []
        for key, value, _ttl in items:
            if key.startswith("skip"):
                results.append(KeySkippedError(key, "domain mismatch"))
            else:
                self.data[key] = (value, None)
                results.append(None)
        return results


def test_batch_runs_in_rounds_keeping_per_key_order() -> None:
    """Puts that may go first go out as one update_many, then the gets as
    one lookup_many, then the puts that must follow those gets, and so on
    (a lone operation: update()/lookup()); per key the order asked for
    holds, and per-item errors reach only their own caller."""
    table = UpdateManyTable()

    async def main() -> None:
        store = Store(table)
        table.hold.clear()
        blocker = store.put("z", "0", 60)
        await asyncio.to_thread(table.holding.wait, WAIT)  # the worker is busy
        table.holding.clear()
        futures: list[asyncio.Future[Any]] = [
            store.get("a"), store.put("a", "1", 60), store.get("a"), store.get("b"),
            store.put("skip-me", "x", 60), store.put("c", "3", 60), store.get("c"),
            store.put("a", "2", 60), store.get("d")]
        await asyncio.sleep(0)  # let the batch reach the queue
        table.hold.set()
        await blocker
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:4] == [None, None, "1", None]
        assert isinstance(results[4], StoreError) and "domain mismatch" in str(results[4])
        assert isinstance(results[4].__cause__, KeySkippedError)
        assert results[5:] == [None, "3", None, None]
        assert await store.get("a") == "2"  # the later put of a key wins
        await store.close()

    run(main())
    assert table.calls[1:] == [
        ("put", ["skip-me", "c"]),        # round 0: puts of keys not read before
        ("get", ["a", "b", "c", "d"]),    # round 1: c after its put, a before its put
        ("put", ["a"]),                   # round 2: a's first put, after a's first get
        ("get", ["a"]),                   # round 3: the get of a between its puts
        ("put", ["a"]),                   # round 4: a's second put
        ("get", ["a"]),                   # the last check above
    ]


def test_shared_worker_serves_several_stores_in_one_thread(tmp_path: Path,
                                                           memcached: Memcached) -> None:
    """Two memcache stores with lmdb backups on one worker: everything
    lands in memcached and in the backups, read back through the stores."""
    stores: list[Store] = []
    worker = StoreWorker(name="shared")
    for name in ("t", "c"):
        cf = write(tmp_path / f"{name}.cf",
                   f"memcache = {memcached.spec}\nkey_format = {name}:%s\n"
                   f"backup = lmdb:{tmp_path / name}\n")
        stores.append(Store(open_table(f"memcache:{cf}", read_write=True), worker=worker))
    t, c = stores
    prefix = {t: "t", c: "c"}

    async def main() -> None:
        keys = [f"k{i}" for i in range(40)]
        await asyncio.gather(*(s.put(k, prefix[s] + k, 600) for k in keys for s in stores))
        got = await asyncio.gather(*(s.get(k) for k in keys for s in stores))
        assert got == [prefix[s] + k for k in keys for s in stores]
        await t.close()
        assert await c.get("k1") == "ck1"  # the worker still serves the other store
        await c.close()

    run(main())
    worker._thread.join(WAIT)
    assert not worker._thread.is_alive()  # ended with the last of its stores
    assert memcached.meta("t:k39") is not None and memcached.meta("c:k0") is not None
    with LmdbTable(str(tmp_path / "c"), read_write=False, fold=True) as backup:
        assert backup.lookup("k7") == "ck7"


def test_failed_batch_call_fails_each_of_its_operations() -> None:
    class Down(UpdateManyTable):
        def update_many(self, items: Sequence[tuple[str, str, int | None]]
                        ) -> list[MemtableError | None]:
            raise BackupError("lmdb:/x: no exclusive lock within 10 s")

    table = Down()

    async def main() -> None:
        store = Store(table)
        table.hold.clear()
        blocker = store.get("x")  # lone get: table.lookup, not held
        await blocker
        results = await asyncio.gather(store.put("a", "1", 1), store.put("b", "2", 1),
                                       return_exceptions=True)
        # both in one batch or one each: either way each gets the error
        assert all(isinstance(r, StoreError) and "no exclusive lock" in str(r)
                   for r in results)
        await store.close()

    run(main())


def test_a_round_over_two_tables_runs_them_at_once() -> None:
    """The puts of two tables in one round overlap (each table's backup
    commit waits on the disk on its own), yet the round ends only when both
    are done; a table that fails fails only its own operations."""
    slow, other = UpdateManyTable("dict:slow"), UpdateManyTable("dict:other")

    class Broken(UpdateManyTable):
        def update_many(self, items: Sequence[tuple[str, str, int | None]]
                        ) -> list[MemtableError | None]:
            raise BackupError("lmdb:/x: no exclusive lock within 10 s")

    broken = Broken("dict:broken")
    worker = StoreWorker(name="pair")
    stores = [Store(t, worker=worker) for t in (slow, other, broken)]
    s, o, b = stores

    async def main() -> None:
        slow.hold.clear()
        other.hold.clear()
        futures = [s.put("a", "1", 60), s.put("b", "2", 60), o.put("a", "x", 60),
                   o.put("b", "y", 60), b.put("a", "z", 60), b.put("b", "z", 60)]
        # Both tables are inside update_many at the same time.
        assert await asyncio.to_thread(slow.holding.wait, WAIT)
        assert await asyncio.to_thread(other.holding.wait, WAIT)
        assert not any(f.done() for f in futures)
        slow.hold.set()
        await asyncio.sleep(0.05)
        assert not any(f.done() for f in futures[:4])  # the round waits for other
        other.hold.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[:4] == [None] * 4
        assert all(isinstance(r, StoreError) and "no exclusive lock" in str(r)
                   for r in results[4:])
        assert await asyncio.gather(s.get("a"), o.get("b")) == ["1", "y"]
        for store in stores:
            await store.close()

    run(main())
    worker._thread.join(WAIT)
    assert worker._helper is not None
    worker._helper._thread.join(WAIT)
    assert not worker._thread.is_alive() and not worker._helper._thread.is_alive()
    assert {name for t in (slow, other) for name in t.threads} == {"pair", "pair helper"}
