"""policyd.store: async get/put over a Table in one worker thread, with
coalesced lookups, error translation and bounded queues."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest

from memtable.errors import KeySkippedError
from policyd.store import Store, StoreError
from tests.conftest import Memcached
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
