"""The tests' one in-memory Table (a fake of OUR Table interface): a dict
whose entries expire after their ttl by memtable's clock, so freezegun
expires them; it records what was asked of it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from memtable import clock
from memtable.table import Table


class DictTable(Table):
    """``data`` maps a key to (value, expiry time or None)."""

    def __init__(self, spec: str = "dict:test", data: Mapping[str, str] | None = None) -> None:
        self.spec = spec
        self.read_write = True
        self.fold = False
        self.data: dict[str, tuple[str, float | None]] = {
            key: (value, None) for key, value in (data or {}).items()}
        self.queries: list[str] = []  # the keys looked up, in order
        self.lookups = 0
        self.updates = 0
        self.closed = False

    def lookup(self, key: str) -> str | None:
        self.lookups += 1
        self.queries.append(key)
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and clock.now() >= expires:
            del self.data[key]
            return None
        return value

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        self.updates += 1
        self.data[key] = (value, clock.now() + ttl if ttl else None)

    def sequence(self) -> Iterator[tuple[str, str]]:
        for key, (value, _) in list(self.data.items()):
            yield key, value

    def close(self) -> None:
        self.closed = True
