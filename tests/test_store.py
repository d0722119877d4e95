"""policyd.store: get/put over one AsyncTable, batched, in order, write-ahead,
bounded, failures per caller.  Real lmdb tables run through
memtable.registry.as_async (a ThreadedTable), gated to let work pile up;
DictTable (a fake of our own Table interface) where a table must fail."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from memtable.backends import LmdbTable
from memtable.errors import BackupError, MemtableError, ServerUnavailableError
from memtable.registry import as_async, open_table
from memtable.table import Item
from policyd.metrics import NullMetrics
from policyd.store import Store, StoreError
from tests.conftest import Memcached, free_port, start_memcached
from tests.dict_table import DictTable
from tests.greylist_helpers import run, write
from tests.wait import WAIT


class GatedLmdb(LmdbTable):
    """A real lmdb table that records its batch calls.  While ``gate`` is
    clear, update_many waits for it before its transaction (``entered``
    says one is waiting); ``committed`` holds the keys of every
    update_many that returned, ``closed_after`` those committed at close."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), read_write=True, fold=False)
        self.calls: list[tuple[str, list[str]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.committed: list[str] = []
        self.closed_after: list[str] | None = None

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        self.calls.append(("lookup_many", list(keys)))
        return super().lookup_many(keys)

    def lookup_many_now(self, keys: Sequence[str]) -> dict[str, str | None] | None:
        found = super().lookup_many_now(keys)
        if found is not None:  # answered on the loop: a lookup all the same
            self.calls.append(("lookup_many", list(keys)))
        return found

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        self.calls.append(("update_many", [key for key, _, _ in items]))
        self.entered.set()
        assert self.gate.wait(WAIT)
        errors = super().update_many(items)
        self.committed += [key for key, _, _ in items]
        return errors

    def close(self) -> None:
        self.closed_after = list(self.committed)
        super().close()

    async def in_update(self) -> None:
        """Until an update_many waits at the closed gate."""
        assert await asyncio.to_thread(self.entered.wait, WAIT)
        self.entered.clear()


class RecordingMetrics(NullMetrics):
    def __init__(self) -> None:
        self.latencies: list[tuple[str, str]] = []
        self.errors: list[str] = []

    def store_latency(self, store: str, op: str, seconds: float) -> None:
        self.latencies.append((store, op))

    def store_error(self, store: str) -> None:
        self.errors.append(store)


def stored(path: Path, key: str) -> str | None:
    """What another reader of the lmdb file finds under key."""
    with LmdbTable(str(path), read_write=False, fold=False) as table:
        return table.lookup(key)


def test_roundtrip_with_real_memcached(tmp_path: Path, memcached: Memcached) -> None:
    cf = write(tmp_path / "t.cf", f"memcache = {memcached.spec}\ntimeout = 1\nmax_try = 1\n"
               f"backup = lmdb:{tmp_path / 'backup'}\n")

    async def main() -> None:
        store = Store(as_async(open_table(f"memcache:{cf}", read_write=True)))
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
    assert stored(tmp_path / "backup", "k49") == "K49"


def test_unreachable_memcached_is_a_store_error(tmp_path: Path) -> None:
    cf = write(tmp_path / "t.cf", f"memcache = inet:127.0.0.1:{free_port()}\n"
               "timeout = 1\nmax_try = 1\n")

    async def main() -> None:
        store = Store(as_async(open_table(f"memcache:{cf}", read_write=True)))
        with pytest.raises(StoreError, match="memcache"):
            await store.get("key")
        with pytest.raises(StoreError):
            await store.put("key", "v", 60)
        await store.close()
    run(main())


def test_operations_asked_during_a_batch_go_out_as_one_lookup_and_one_update(
        tmp_path: Path) -> None:
    table = GatedLmdb(tmp_path / "t")
    table.update("d", "4")

    async def main() -> None:
        store = Store(as_async(table))
        table.gate.clear()
        first = store.put("a", "1", 60)
        await table.in_update()
        gets = [store.get(key) for key in ("b", "c", "b", "d")]
        puts = [store.put("e", "5", 60), store.put("f", "6", 60)]
        table.gate.set()
        assert await first is None
        assert await asyncio.gather(*gets) == [None, None, None, "4"]
        assert await asyncio.gather(*puts) == [None, None]
        await store.close()

    run(main())
    assert table.calls[0] == ("update_many", ["a"])
    # Everything asked meanwhile: one call of each kind, a key looked up once.
    assert sorted(table.calls[1:]) == [("lookup_many", ["b", "c", "d"]),
                                       ("update_many", ["e", "f"])]
    assert stored(tmp_path / "t", "f") == "6"


def test_a_get_sees_every_put_of_its_key_asked_before_it(tmp_path: Path) -> None:
    """A get of a key with a put waiting or in flight is answered with that
    put's value (no lookup); puts of one key land in the order asked."""
    table = GatedLmdb(tmp_path / "t")

    async def main() -> list[str | None]:
        store = Store(as_async(table))
        table.gate.clear()
        first = store.put("k", "1", 60)
        await table.in_update()
        during = store.get("k")             # the put of "1" is in flight
        second = store.put("k", "2", 60)
        between = store.get("k")            # the put of "2" waits
        third = store.put("k", "3", 60)
        after = store.get("k")              # the put of "3" waits
        assert not during.done()            # not before "1" is committed
        table.gate.set()
        await asyncio.gather(first, second, third)
        values = list(await asyncio.gather(during, between, after))
        values.append(await store.get("k"))  # looked up now
        await store.close()
        return values

    assert run(main()) == ["1", "2", "3", "3"]
    assert table.calls == [("update_many", ["k"]), ("update_many", ["k", "k"]),
                           ("lookup_many", ["k"])]
    assert stored(tmp_path / "t", "k") == "3"


def test_a_put_completes_only_after_its_update_returned(tmp_path: Path) -> None:
    """The write-ahead guarantee: when a put's future (or a get answered by
    it) completes, the table's update_many has returned, and another
    reader of the file finds the value."""
    table = GatedLmdb(tmp_path / "t")
    seen: list[tuple[list[str], str | None]] = []

    def check(_: asyncio.Future[object]) -> None:
        seen.append((list(table.committed), stored(tmp_path / "t", "k")))

    async def main() -> None:
        store = Store(as_async(table))
        table.gate.clear()
        put = store.put("k", "v", 60)
        reader = store.get("k")
        put.add_done_callback(check)
        reader.add_done_callback(check)
        await table.in_update()
        for _ in range(10):  # loop iterations, no time: nothing may complete them
            await asyncio.sleep(0)
        assert not put.done() and not reader.done()
        table.gate.set()
        await put
        assert await reader == "v"
        await store.close()

    run(main())
    assert seen == [(["k"], "v"), (["k"], "v")]


def test_what_waits_is_bounded(tmp_path: Path) -> None:
    table = GatedLmdb(tmp_path / "t")

    async def main() -> None:
        store = Store(as_async(table), max_pending=3)
        table.gate.clear()
        first = store.put("x", "1", 60)
        await table.in_update()
        waiting = [store.get("x"), store.get("y")]
        refused = store.get("z")
        assert refused.done()  # at once, not after the batch
        with pytest.raises(StoreError, match="more than 3 operations waiting"):
            await refused
        table.gate.set()
        await first
        assert await asyncio.gather(*waiting) == ["1", None]
        assert await store.get("z") is None  # answered ones no longer count
        await store.close()

    run(main())


def test_table_failures_reach_each_caller_as_its_own_store_error(tmp_path: Path) -> None:
    """A failed call fails each of its operations, a per-item error only its
    put and the gets it answers; each caller raises its own StoreError;
    metrics count one error per failed call or item."""
    table = GatedLmdb(tmp_path / "t")
    metrics = RecordingMetrics()

    async def main() -> None:
        store = Store(as_async(table), name="triplets", metrics=metrics)
        futures = [store.put("good", "v", 60), store.put("bad\0key", "v", 60),
                   store.get("bad\0key")]
        good, bad, reader = await asyncio.gather(*futures, return_exceptions=True)
        assert good is None
        assert isinstance(bad, StoreError) and isinstance(bad.__cause__, BackupError)
        assert isinstance(reader, StoreError) and reader is not bad
        assert "cannot store" in str(bad)
        await store.close()

    run(main())
    assert metrics.errors == ["triplets"]
    assert metrics.latencies == [("triplets", "put")]

    class Down(DictTable):
        def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
            raise ServerUnavailableError("memcache:x: unavailable")

        def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
            raise BackupError("lmdb:/x: no exclusive lock within 10 s")

    metrics = RecordingMetrics()

    async def down() -> None:
        store = Store(as_async(Down("dict:down")), name="clients", metrics=metrics)
        results = await asyncio.gather(store.put("a", "1", 1), store.put("b", "2", 1),
                                       store.get("c"), store.get("d"),
                                       return_exceptions=True)
        assert all(isinstance(r, StoreError) for r in results)
        assert len({id(r) for r in results}) == 4
        assert all("no exclusive lock" in str(r) for r in results[:2])
        assert all("unavailable" in str(r) for r in results[2:])
        await store.close()

    run(down())
    assert metrics.errors == ["clients", "clients"] and metrics.latencies == []


def test_a_bug_in_a_table_is_raised_as_it_is_and_the_store_goes_on() -> None:
    class Buggy(DictTable):
        def update(self, key: str, value: str, ttl: int | None = None) -> None:
            if key == "bug":
                raise ZeroDivisionError("a bug is not a store failure")
            super().update(key, value, ttl)

    async def main() -> None:
        store = Store(as_async(Buggy()))
        with pytest.raises(ZeroDivisionError):
            await store.put("bug", "v", 1)
        await store.put("k", "v", 1)
        assert await store.get("k") == "v"
        await store.close()

    run(main())


def test_a_caller_giving_up_keeps_its_put_and_drops_its_lookup(tmp_path: Path) -> None:
    table = GatedLmdb(tmp_path / "t")

    async def main() -> None:
        store = Store(as_async(table))
        table.gate.clear()
        blocker = store.put("z", "0", 60)
        await table.in_update()
        put, get = store.put("k", "v", 60), store.get("gone")
        put.cancel()
        get.cancel()
        table.gate.set()
        await blocker
        assert await store.get("k") == "v"  # the put still ran, in order
        await store.close()

    run(main())
    assert ("lookup_many", ["gone"]) not in table.calls


def test_each_store_runs_its_batches_on_its_own(tmp_path: Path) -> None:
    """policyd's stores do not wait for each other: a store's put completes
    while another store's update is held."""
    held, free = GatedLmdb(tmp_path / "held"), GatedLmdb(tmp_path / "free")

    async def main() -> None:
        stores = [Store(as_async(held)), Store(as_async(free))]
        held.gate.clear()
        waiting = stores[0].put("a", "1", 60)
        await held.in_update()
        await asyncio.wait_for(stores[1].put("a", "2", 60), WAIT)
        assert not waiting.done()
        held.gate.set()
        await waiting
        await asyncio.gather(*(store.close() for store in stores))

    run(main())
    assert stored(tmp_path / "held", "a") == "1" and stored(tmp_path / "free", "a") == "2"


def test_close_finishes_what_was_asked_then_closes_the_table(tmp_path: Path) -> None:
    table = GatedLmdb(tmp_path / "t")

    async def main() -> None:
        store = Store(as_async(table))
        table.gate.clear()
        first = store.put("a", "1", 60)
        await table.in_update()
        second = store.put("b", "2", 60)  # waits for the next batch
        closing = asyncio.gather(store.close(), store.close())
        await asyncio.sleep(0)
        assert store.closed
        refused = store.get("a")
        table.gate.set()
        await closing
        await store.close()  # idempotent
        assert first.result() is None and second.result() is None
        with pytest.raises(StoreError, match="closed"):
            await refused

    run(main())
    assert table.closed_after == ["a", "b"]
    assert stored(tmp_path / "t", "b") == "2"


def test_close_abandons_a_table_stuck_on_a_hung_memcached(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stop must not wait for memcached's timeouts (up to max_try x
    timeout): close() waits close_wait, then leaves the table's thread (a
    daemon) behind."""
    server = start_memcached(tmp_path)
    try:
        cf = write(tmp_path / "t.cf", f"memcache = {server.spec}\ntimeout = 20\n")
        table = open_table(f"memcache:{cf}", read_write=True)
        server.pause()

        async def main() -> None:
            store = Store(as_async(table), close_wait=0.2)
            pending = store.get("key")  # waits for memcached
            with caplog.at_level(logging.WARNING):
                await store.close()
            assert not pending.done()
            pending.cancel()
        run(main())
        assert "not finished within 0.2s; abandoning it" in caplog.text
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()
