"""policyd whose stores cost nothing: the ceiling of the server and the policy.

``python -m bench.nostore -c CF`` runs policyd exactly as ``policyd -c CF``
does, except that every table is answered from a dict in the process once
opened (no memcached round trip, no backup commit).  bench.run measures it
beside policyd (``policyd-nostore``) to show what the server and the
greylisting policy can do on this machine with a store path that costs
nothing, i.e. how much of a goal the store path may spend.  A benchmark
tool only: nothing is stored beyond the process.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import policyd.greylist
from memtable.errors import MemtableError
from memtable.table import AsyncTable, Item, Table
from policyd.cli import main


class DictTable(AsyncTable):
    """An AsyncTable answered at once from a dict (replaces the opened table)."""

    def __init__(self, table: Table) -> None:
        self.spec = table.spec
        table.close()  # opened and checked as policyd does; not used
        self._values: dict[str, str] = {}

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        return {key: self._values.get(key) for key in keys}

    async def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        for key, value, _ttl in items:
            self._values[key] = value
        return [None] * len(items)

    async def close(self) -> None:
        self._values.clear()


if __name__ == "__main__":
    # policyd.greylist turns each opened table into its AsyncTable through
    # this name (build_policy); a benchmark launcher, so a patch is fine.
    setattr(policyd.greylist, "as_async", DictTable)  # noqa: B010
    sys.exit(main())
