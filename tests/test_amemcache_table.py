"""AsyncMemcacheTable and registry.as_async against a real memcached and a
real lmdb backup (the rules' own tests run on it too: tests.memcache_runners)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from memtable.amemcache_table import AsyncMemcacheTable
from memtable.backends.lmdb_table import LmdbTable
from memtable.committer import ThreadedTable
from memtable.errors import MemtableError
from memtable.memcache_table import MemcacheTable
from memtable.registry import as_async, open_table
from memtable.table import Item
from tests.conftest import Memcached, start_memcached


def _in_file(backup: Path, key: str) -> str | None:
    """key's value as another process reads the file (fresh, no shared env)."""
    code = ("import sys; from memtable.backends.lmdb_table import LmdbTable; "
            "t = LmdbTable(sys.argv[1], read_write=False, fold=True); "
            "print(t.lookup(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, str(backup), key], capture_output=True,
                         text=True, timeout=30, check=True, cwd=Path(__file__).parent.parent)
    value = out.stdout.strip()
    return None if value == "None" else value


def test_as_async_keeps_the_tables_configuration(tmp_path: Path, memcached: Memcached) -> None:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nbackup = lmdb:{tmp_path / 'b'}\n"
                  "key_format = k:%s\nflags = 5\nttl = 300\n")
    blocking = open_table(f"memcache:{cf}", read_write=True)
    table = as_async(blocking)
    assert isinstance(table, AsyncMemcacheTable) and table.spec == blocking.spec
    assert isinstance(table.backup, ThreadedTable)
    assert table.backup.spec == f"lmdb:{tmp_path / 'b'}"

    async def main() -> dict[str, str | None]:
        assert await table.update_many([("Key", "v", None)]) == [None]
        found = await table.lookup_many(["key", "other"])
        await table.close()
        return found

    assert asyncio.run(main()) == {"key": "v", "other": None}
    meta = memcached.meta("k:key")
    assert meta is not None and meta["flags"] == 5 and 290 <= int(str(meta["ttl"])) <= 300
    assert _in_file(tmp_path / "b", "key") == "v"


def test_as_async_runs_other_tables_on_a_thread(tmp_path: Path) -> None:
    table = as_async(open_table(f"lmdb:{tmp_path / 'plain'}", read_write=True))
    assert isinstance(table, ThreadedTable)

    async def main() -> dict[str, str | None]:
        assert await table.update_many([("k", "v", None)]) == [None]
        found = await table.lookup_many(["k"])
        await table.close()
        return found

    assert asyncio.run(main()) == {"k": "v"}


def test_the_commit_runs_while_memcached_answers(tmp_path: Path) -> None:
    """update_many starts the backup's commit and the sets together: with
    memcached stopped, the commit is in the file while the sets still wait
    for their replies; update_many returns once memcached answers."""
    server = start_memcached(tmp_path)
    try:
        backup = tmp_path / "b"
        cf = tmp_path / "t.cf"
        cf.write_text(f"memcache = {server.spec}\nbackup = lmdb:{backup}\ntimeout = 60\n")
        table = as_async(open_table(f"memcache:{cf}", read_write=True))

        async def main() -> None:
            assert await table.update_many([("warm", "up", None)]) == [None]  # connected
            server.pause()
            update = asyncio.ensure_future(table.update_many([("a", "1", None),
                                                              ("b", "2", None)]))
            while await asyncio.to_thread(_in_file, backup, "b") != "2":
                assert not update.done()
            assert not update.done()  # memcached has not answered
            server.proc.send_signal(signal.SIGCONT)
            assert await update == [None, None]
            await table.close()

        asyncio.run(main())
        assert server.meta("a") is not None and server.meta("b") is not None
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


class _CountingLmdb(LmdbTable):
    """A real lmdb backup that counts its transactions."""

    commits = 0

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        self.commits += 1
        return super().update_many(items)


def test_requests_at_once_share_the_backup_commit(tmp_path: Path, memcached: Memcached) -> None:
    """Each update_many asks for its commit before its first await, so the
    updates of concurrent requests reach the backup's thread together and
    share one synced transaction (group commit)."""
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nbackup = lmdb:{tmp_path / 'b'}\n")
    blocking = open_table(f"memcache:{cf}", read_write=True)
    assert isinstance(blocking, MemcacheTable)
    backup = _CountingLmdb(str(tmp_path / "b"), read_write=True, fold=True)
    table = AsyncMemcacheTable(blocking.config, read_write=True, fold=True,
                               pipeline=blocking.pipeline, backup=ThreadedTable(backup))
    blocking.close()

    async def main() -> list[list[MemtableError | None]]:
        done = await asyncio.gather(*(table.update_many([(f"k{i}", f"v{i}", None)])
                                      for i in range(50)))
        assert await table.lookup_many(["k0", "k49"]) == {"k0": "v0", "k49": "v49"}
        await table.close()
        return done

    assert asyncio.run(main()) == [[None]] * 50
    assert backup.commits <= 2  # the first may be taken up alone
    assert memcached.meta("k49") is not None
