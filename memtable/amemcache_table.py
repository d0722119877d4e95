"""memcache: tables on an asyncio event loop (policyd's).

AsyncMemcacheTable runs the same plans as MemcacheTable
(memtable.memcache_rules: Postfix's lookup/update/delete semantics with the
backup, skips, write-back, stale keys and their repair), awaiting each
effect instead of blocking on it:

- memcached through an AsyncMemcacheWire, on the loop: no thread between
  the loop and memcached;
- the backup through a ThreadedTable (memtable.committer): its lookups,
  commits and deletes run on that one thread, under Postfix's fcntl lock
  and the file's mutex, and the updates asked while it is busy share one
  synced commit.

update_many completes when memcached answered STORED and the backup's
commit returned (docs/design.md, "The write-ahead guarantee"): the set
round trip and the commit are both started, then both awaited, so that
they overlap.  Several operations of one table may run at once (one per
request); the rules' stale-key memory allows for that.  A ``domain`` list
naming a table (``domain = lmdb:/path``) is looked up on the loop, as the
key pipeline does it: keep such tables to local files.

Open one with memtable.registry.as_async(open_table(...)).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from memtable.awire import AsyncMemcacheWire
from memtable.committer import ThreadedTable
from memtable.config import MemcacheConfig
from memtable.errors import MemtableError, TemporaryError
from memtable.keys import KeyPipeline
from memtable.memcache_rules import (
    BackupDelete,
    BackupLookup,
    BackupUpdate,
    Committed,
    Effect,
    McDelete,
    McDeleteMany,
    McDeleteUnchanged,
    McGet,
    McGets,
    McSet,
    MemcacheParts,
    Plan,
    SetAndCommit,
)
from memtable.memcache_table import new_wire
from memtable.table import AsyncTable, Item, Outcome

T = TypeVar("T")


class AsyncMemcacheTable(MemcacheParts[ThreadedTable, AsyncMemcacheWire], AsyncTable):
    """One ``memcache:/path/file.cf`` table on an event loop
    (registry.as_async builds it)."""

    def __init__(self, config: MemcacheConfig, *, read_write: bool, fold: bool,
                 pipeline: KeyPipeline, backup: ThreadedTable | None,
                 wire: AsyncMemcacheWire | None = None) -> None:
        super().__init__(config, read_write=read_write, fold=fold, pipeline=pipeline,
                         backup=backup, wire=wire or new_wire(
                             config, backup.spec if backup is not None else None,
                             AsyncMemcacheWire))

    # -- the runner ------------------------------------------------------

    async def _run(self, plan: Plan[T]) -> T:
        """drive() (memtable.memcache_rules), awaiting each effect; a plan
        whose caller gave up (cancelled) is closed, so that its cleanup
        runs."""
        result: Any = None
        error: Exception | None = None
        try:
            while True:
                try:
                    effect = plan.throw(error) if error is not None else plan.send(result)
                except StopIteration as stop:
                    done: T = stop.value
                    return done
                error = None
                try:
                    result = await self._perform(effect)
                except Exception as exc:
                    error, result = exc, None
        finally:
            plan.close()

    async def _perform(self, effect: Effect) -> Any:
        wire = self.wire
        if isinstance(effect, McGet):
            return await wire.get_many(effect.keys)
        if isinstance(effect, SetAndCommit):
            return await self._set_and_commit(effect)
        if isinstance(effect, McSet):
            await wire.set_many(effect.items)
            return None
        backup = self.backup
        if isinstance(effect, BackupLookup):
            assert backup is not None
            return await backup.lookup_many(effect.keys)
        if isinstance(effect, BackupUpdate):
            assert backup is not None
            return await backup.update_many(effect.items)
        if isinstance(effect, McDelete):
            return await wire.delete(effect.key)
        if isinstance(effect, BackupDelete):
            assert backup is not None
            return await backup.delete(effect.key)
        if isinstance(effect, McDeleteMany):
            await wire.delete_many(effect.keys)
            return None
        if isinstance(effect, McGets):
            return await wire.gets(effect.key)
        if isinstance(effect, McDeleteUnchanged):
            return await wire.delete_unchanged(effect.key, effect.cas)
        raise TypeError(f"unknown effect {effect!r}")

    async def _set_and_commit(self, effect: SetAndCommit) -> Committed:
        """The commit is asked first (it starts on the backup's thread at
        once), the sets go out and their replies are awaited on the loop,
        then the commit is awaited: the two overlap."""
        assert self.backup is not None
        commit = self.backup.start_update_many(effect.commit.items)
        set_error: TemporaryError | None = None
        try:
            await self.wire.set_many(effect.sets.items)
        except TemporaryError as exc:
            set_error = exc
        except BaseException:
            commit.cancel()  # nobody will read it (the commit itself goes on)
            raise
        committed: list[MemtableError | None] | Exception
        try:
            committed = await commit
        except Exception as exc:
            committed = exc
        return set_error, committed

    # -- AsyncTable --------------------------------------------------------

    async def lookup(self, key: str) -> str | None:
        found = await self._run(self.rules.lookup([key]))
        return found[key]

    async def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        return await self._run(self.rules.lookup(keys))

    async def update(self, key: str, value: str, ttl: int | None = None) -> None:
        error = (await self._run(self.rules.update([(key, value, ttl)])))[0]
        if error is not None:
            raise error

    async def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        return await self._run(self.rules.update(items))

    async def delete(self, key: str) -> bool:
        return await self._run(self.rules.delete(key))

    async def delete_cached_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
        return await self._run(self.rules.delete_cached_if(key, deletable))

    async def close(self) -> None:
        """A last try to rewrite the stale keys, then close memcached's
        connection, the domain list's tables and the backup (its thread
        finishes what was asked first)."""
        try:
            await self._run(self.rules.close())
        finally:
            await self.wire.close()
            if self.pipeline.domain is not None:
                self.pipeline.domain.close()
            if self.backup is not None:
                await self.backup.close()
