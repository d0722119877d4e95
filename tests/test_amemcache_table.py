"""AsyncMemcacheTable and registry.as_async against a real memcached and a
real lmdb backup (the rules' own tests run on it too: tests.memcache_runners)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from memtable.amemcache_table import AsyncMemcacheTable
from memtable.committer import ThreadedTable
from memtable.registry import as_async, open_table
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
