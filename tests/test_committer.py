"""memtable.committer.ThreadedTable: group commit on a thread of its own,
over a real lmdb table."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from memtable.backends.lmdb_table import LmdbTable
from memtable.committer import ThreadedTable
from memtable.errors import BackupError
from memtable.table import Item
from tests.dict_table import DictTable
from tests.test_lmdb_interop import lock_held


class _CountingLmdb(LmdbTable):
    """A real lmdb table that counts its transactions."""

    commits = 0

    def update_many(self, items):  # type: ignore[no-untyped-def]
        self.commits += 1
        return super().update_many(items)


def test_updates_asked_together_share_one_commit(tmp_path: Path) -> None:
    table = _CountingLmdb(str(tmp_path / "t"), read_write=True, fold=False)
    threaded = ThreadedTable(table)

    async def main() -> list[list[object]]:
        results = await asyncio.gather(*(
            threaded.update_many([(f"k{i}", f"v{i}", None)]) for i in range(50)))
        found = await threaded.lookup_many([f"k{i}" for i in range(50)] + ["absent"])
        assert found == {**{f"k{i}": f"v{i}" for i in range(50)}, "absent": None}
        await threaded.close()
        return [list(r) for r in results]

    results = asyncio.run(main())
    assert results == [[None]] * 50
    # The first job may be taken alone; everything asked meanwhile joins one group.
    assert table.commits <= 2
    reread = LmdbTable(str(tmp_path / "t"), read_write=False, fold=False)
    assert reread.lookup("k49") == "v49"
    reread.close()


def test_order_is_kept_per_key() -> None:
    table = DictTable()
    threaded = ThreadedTable(table)

    async def main() -> tuple[dict[str, str | None], dict[str, str | None]]:
        # Tasks ask in the order created, within one loop iteration.
        first = asyncio.ensure_future(threaded.update_many([("k", "1", None)]))
        seen = asyncio.ensure_future(threaded.lookup_many(["k"]))
        second = asyncio.ensure_future(threaded.update_many([("k", "2", None)]))
        await asyncio.gather(first, second)
        before = await seen
        after = await threaded.lookup_many(["k"])
        await threaded.close()
        return before, after

    before, after = asyncio.run(main())
    assert before == {"k": "1"} and after == {"k": "2"}
    assert table.closed


def test_item_errors_are_per_item_and_failures_per_caller(tmp_path: Path) -> None:
    table = LmdbTable(str(tmp_path / "t"), read_write=True, fold=False)
    threaded = ThreadedTable(table)
    items: list[Item] = [("good", "v", None), ("bad\0key", "v", None)]

    async def main() -> None:
        errors = await threaded.update_many(items)
        assert errors[0] is None and isinstance(errors[1], BackupError)
        await threaded.close()
        with pytest.raises(BackupError, match="closed"):
            await threaded.update_many([("k", "v", None)])

    asyncio.run(main())


class _HeldTable(DictTable):
    """Its updates wait until the test lets them go."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        assert self.release.wait(10)
        super().update(key, value, ttl)


def test_a_full_queue_is_refused_at_once() -> None:
    table = _HeldTable()
    threaded = ThreadedTable(table, max_waiting=2)

    async def main() -> None:
        # The first job is taken up and held; two more wait; a fourth is refused.
        held = asyncio.ensure_future(threaded.update_many([("k0", "v", None)]))
        await asyncio.sleep(0)
        while threaded.waiting:
            await asyncio.sleep(0.001)
        waiting = [asyncio.ensure_future(threaded.update_many([(f"k{i}", "v", None)]))
                   for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(BackupError, match="more than 2 operations waiting"):
            await threaded.update_many([("x", "v", None)])
        table.release.set()
        assert await asyncio.gather(held, *waiting) == [[None]] * 3
        await threaded.close()

    asyncio.run(main())


def test_deletes_keep_their_place_among_updates(tmp_path: Path) -> None:
    """A delete runs on the thread in its own transaction, between the
    updates asked before and after it."""
    table = _CountingLmdb(str(tmp_path / "t"), read_write=True, fold=False)
    threaded = ThreadedTable(table)

    async def main() -> tuple[list[object], dict[str, str | None]]:
        done = await asyncio.gather(
            threaded.update_many([("k", "1", None)]), threaded.delete("k"),
            threaded.delete("k"), threaded.update_many([("j", "2", None)]))
        found = await threaded.lookup_many(["k", "j"])
        await threaded.close()
        return list(done), found

    done, found = asyncio.run(main())
    assert done == [[None], True, False, [None]]
    assert found == {"k": None, "j": "2"}


def test_start_update_many_commits_while_the_caller_goes_on(tmp_path: Path) -> None:
    """The commit starts when asked, before the caller awaits it."""
    table = _HeldTable()
    threaded = ThreadedTable(table)

    async def main() -> None:
        commit = threaded.start_update_many([("k", "v", None)])
        while threaded.waiting:  # the thread took the job up without an await on it
            await asyncio.sleep(0.001)
        assert not commit.done()
        table.release.set()
        assert await commit == [None]
        await threaded.close()

    asyncio.run(main())


def _commit_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("commit ")]


def test_a_lookup_with_the_file_free_is_answered_on_the_loop(tmp_path: Path) -> None:
    table = LmdbTable(str(tmp_path / "t"), read_write=True, fold=False)
    table.update("k", "v")
    threaded = ThreadedTable(table)

    async def main() -> dict[str, str | None]:
        found = await threaded.lookup_many(["k", "absent"])
        assert not _commit_threads()  # no thread was woken for it
        await threaded.close()
        return found

    assert asyncio.run(main()) == {"k": "v", "absent": None}


def test_a_lookup_goes_to_the_thread_while_another_process_holds_the_file(
        tmp_path: Path) -> None:
    """Postfix's exclusive lock held by another process: the lookup does not
    wait on the loop; the thread waits for the lock and answers."""
    db = tmp_path / "t"
    table = LmdbTable(str(db), read_write=True, fold=False)
    table.update("k", "v")
    threaded = ThreadedTable(table)

    async def main() -> dict[str, str | None]:
        with lock_held(Path(str(db) + ".lmdb"), "fcntl-ex"):
            lookup = asyncio.ensure_future(threaded.lookup_many(["k"]))
            await asyncio.sleep(0)  # the lookup found the file held and asked the thread
            assert _commit_threads() and not lookup.done()
        found = await lookup
        await threaded.close()
        return found

    assert asyncio.run(main()) == {"k": "v"}


def test_a_lookup_asked_after_an_update_sees_it(tmp_path: Path) -> None:
    """While an update asked before it is unfinished, a lookup is not read
    on the loop (it would miss the update) but queued behind it."""
    table = LmdbTable(str(tmp_path / "t"), read_write=True, fold=False)
    table.update("k", "old")
    threaded = ThreadedTable(table)

    async def main() -> list[dict[str, str | None]]:
        seen = []
        for i in range(20):
            update = threaded.start_update_many([("k", f"new{i}", None)])
            seen.append(await threaded.lookup_many(["k"]))
            assert await update == [None]
        await threaded.close()
        return seen

    assert asyncio.run(main()) == [{"k": f"new{i}"} for i in range(20)]
