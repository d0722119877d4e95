"""Both memcache drivers behind one blocking face, so every wire test runs
against each: MemcacheWire as it is, AsyncMemcacheWire through AsyncOnLoop,
which runs its coroutines on a private event loop.

The ``wire_driver`` fixture (tests/conftest.py) gives a test the class to
build; ``driver_sleeps`` records the retry pauses of either driver.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from memtable.awire import AsyncMemcacheWire
from memtable.endpoint import Endpoint
from memtable.mcproto import Item, McCore
from memtable.wire import MemcacheWire

T = TypeVar("T")


class AsyncOnLoop:
    """AsyncMemcacheWire, each operation run to its end on a private loop."""

    def __init__(self, endpoint: Endpoint, **settings: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.wire = AsyncMemcacheWire(endpoint, **settings)
        self.core: McCore = self.wire.core
        self.endpoint = endpoint
        self.name = self.wire.name
        self.timeout = self.wire.timeout

    def _do(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @property
    def writable(self) -> bool:
        return self.wire.writable

    def answered_by_backup(self, count: int = 1) -> None:
        self.wire.answered_by_backup(count)

    def get(self, key: bytes) -> tuple[int, bytes] | None:
        return self._do(self.wire.get(key))

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[int, bytes]]:
        return self._do(self.wire.get_many(keys))

    def set(self, key: bytes, value: bytes, *, flags: int, exptime: int) -> None:
        self._do(self.wire.set(key, value, flags=flags, exptime=exptime))

    def set_many(self, items: Sequence[Item], *,
                 while_waiting: Callable[[], None] | None = None) -> None:
        # The asyncio driver has no ``while_waiting`` (its callers overlap work
        # with tasks); a memcache table handing one in gets it run after.
        try:
            self._do(self.wire.set_many(items))
        finally:
            if while_waiting is not None:
                while_waiting()

    def gets(self, key: bytes) -> tuple[int, bytes, int] | None:
        return self._do(self.wire.gets(key))

    def delete_unchanged(self, key: bytes, cas: int) -> bool | None:
        return self._do(self.wire.delete_unchanged(key, cas))

    def delete(self, key: bytes) -> bool:
        return self._do(self.wire.delete(key))

    def delete_many(self, keys: Sequence[bytes]) -> None:
        self._do(self.wire.delete_many(keys))

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self._do(self.wire.close())
        finally:
            self.loop.close()


DRIVERS: dict[str, Callable[..., Any]] = {"blocking": MemcacheWire, "asyncio": AsyncOnLoop}
