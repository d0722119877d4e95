"""A child process for tests/test_crash.py: writes keys through an
AsyncMemcacheTable and prints each key once its update_many returned (the
moment policyd would answer a request), until it is killed.

    python -m tests.crash_writer memcache:/path/table.cf WRITERS

WRITERS tasks write at once, so that ThreadedTable's group commit puts
several of them into one transaction; each writes one key per update_many.
"""

from __future__ import annotations

import asyncio
import itertools
import sys

from memtable.registry import as_async, open_table


async def _writer(table: object, serial: itertools.count[int]) -> None:
    from memtable.table import AsyncTable

    assert isinstance(table, AsyncTable)
    while True:
        key = f"key{next(serial)}"
        errors = await table.update_many([(key, f"value of {key}", None)])
        if errors[0] is not None:
            raise errors[0]
        sys.stdout.write(key + "\n")
        sys.stdout.flush()  # acknowledged: the parent may kill us any time now


async def _main(spec: str, writers: int) -> None:
    table = as_async(open_table(spec, read_write=True))
    serial = itertools.count()
    await asyncio.gather(*(_writer(table, serial) for _ in range(writers)))


if __name__ == "__main__":
    asyncio.run(_main(sys.argv[1], int(sys.argv[2])))
