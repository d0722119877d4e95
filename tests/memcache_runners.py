"""The memcache table tests on both runners of the rules.

``memcache_runner`` is "blocking" (MemcacheTable, as open_table gives it) or
"async" (AsyncMemcacheTable, from registry.as_async, its coroutines run on
a private event loop by AsyncAdapter, a blocking Table over it).  A test
module opts in with ``runner_opens(module)``: its own ``open_table`` (and
memtable.cli's, so that the memtable command of the differential tests runs
the chosen runner too) then gives the chosen kind of memcache table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import pytest

import memtable.cli
from memtable.amemcache_table import AsyncMemcacheTable
from memtable.errors import MemtableError
from memtable.memcache_table import MemcacheTable
from memtable.registry import as_async, open_table
from memtable.table import Item, Outcome, Table


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


def opener(runner: str) -> Callable[..., Table]:
    """open_table, giving memcache tables of the ``runner`` kind."""

    def open_(spec: str, **kwargs: Any) -> Table:
        table = open_table(spec, **kwargs)
        if runner == "async" and isinstance(table, MemcacheTable):
            return AsyncAdapter(table)
        return table

    return open_


def use_runner(runner: str, monkeypatch: pytest.MonkeyPatch,
               module: ModuleType | None = None) -> None:
    """memtable.cli's open_table (and ``module``'s) give ``runner``'s tables."""
    if module is not None:
        monkeypatch.setattr(module, "open_table", opener(runner))
    monkeypatch.setattr(memtable.cli, "open_table", opener(runner))


@pytest.fixture(params=["blocking", "async"])
def memcache_runner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which runner the test's memcache tables have (see the module docstring)."""
    runner: str = request.param
    use_runner(runner, monkeypatch, request.module)
    return runner
