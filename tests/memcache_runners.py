"""The memcache table tests on every way memtable runs a memcache table.

A test takes the ``open_table`` fixture instead of importing
memtable.open_table: it opens tables the same way, and its memcache tables
are MemcacheTables ("blocking", as memtable.open_table gives them) or
AsyncMemcacheTables ("async", from registry.as_async, their coroutines run
on a private event loop by AsyncAdapter, a blocking Table over them).
OPENERS adds the blocking table on the asyncio driver ("asyncio-wire",
tests/wire_drivers.py); memtable.cli.main takes any of them as its
``open_table`` (the differential tests).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from memtable.amemcache_table import AsyncMemcacheTable
from memtable.errors import MemtableError
from memtable.memcache_table import MemcacheTable
from memtable.registry import as_async, open_table
from memtable.table import Item, Outcome, Table
from memtable.wire import MemcacheWire
from tests.wire_drivers import AsyncOnLoop


class AsyncAdapter(Table):
    """A blocking Table running an AsyncMemcacheTable's coroutines on a
    private event loop (one call at a time)."""

    def __init__(self, table: MemcacheTable) -> None:
        self.spec = table.spec
        self.read_write = table.read_write
        self.fold = table.fold
        self.blocking = table  # its backup, for verify() and sequence()
        self.loop = asyncio.new_event_loop()
        inner = as_async(table)
        assert isinstance(inner, AsyncMemcacheTable)
        self.inner = inner
        self.config = table.config
        self.closed = False

    @property
    def wire(self) -> Any:
        return self.inner.wire

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def lookup(self, key: str) -> str | None:
        value: str | None = self.run(self.inner.lookup(key))
        return value

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        found: dict[str, str | None] = self.run(self.inner.lookup_many(keys))
        return found

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        self.run(self.inner.update(key, value, ttl))

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        errors: list[MemtableError | None] = self.run(self.inner.update_many(items))
        return errors

    def delete(self, key: str) -> bool:
        found: bool = self.run(self.inner.delete(key))
        return found

    def delete_cached_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
        outcome: Outcome = self.run(self.inner.delete_cached_if(key, deletable))
        return outcome

    def sequence(self) -> Iterator[tuple[str, str]]:
        # The backup's thread is idle between calls: reading it here is safe.
        return self.blocking.sequence()

    def verify(self) -> None:
        self.blocking.verify()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.run(self.inner.close())
        finally:
            self.loop.close()


MemcacheTables = (MemcacheTable, AsyncAdapter)


Opener = Callable[..., Table]
"""memtable.open_table's signature (spec, read_write=..., fold=..., ...)."""


def opener(runner: str = "blocking", wire: Callable[..., Any] = MemcacheWire) -> Opener:
    """open_table, giving memcache tables of the ``runner`` kind, whose
    connection (blocking runner) is built with ``wire``."""

    def open_(spec: str, **kwargs: Any) -> Table:
        table = open_table(spec, wire=wire, **kwargs)
        if runner == "async" and isinstance(table, MemcacheTable):
            return AsyncAdapter(table)
        return table

    return open_


OPENERS: dict[str, Opener] = {
    "blocking": opener(),
    "asyncio-wire": opener(wire=AsyncOnLoop),
    "async-table": opener("async"),
}


@pytest.fixture(name="open_table", params=["blocking", "async-table"])
def open_table_fixture(request: pytest.FixtureRequest) -> Opener:
    """open_table on each runner of the memcache rules (module docstring);
    a test module may override it, or a test parametrize it indirectly
    with names of OPENERS."""
    return OPENERS[request.param]
