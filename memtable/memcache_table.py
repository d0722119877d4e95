"""memcache: tables with Postfix's dict_memcache semantics.

lookup: memcache first; on a miss (or a memcache error) with a backup, the
ORIGINAL key is looked up in the backup and a hit is written back to
memcache with the table's ttl and flags.  update: memcache first, then the
backup; update_many() does the same for a batch with one pipelined round
trip of ``set`` commands and one backup batch (one lmdb transaction).
delete: both, the backup's result wins.  delete_cached_if: memcached
only, guarded by cas (a value written meanwhile stays).  sequence: through
the backup only.  With a backup, the backup's outcome is the result and memcache
errors are only logged, as in Postfix (once per outage, memtable.outage).

Where memtable goes further than Postfix: a key whose memcache write (or
delete) failed while its backup write succeeded is remembered as *stale*
(memcached may still hold the older value).  It is never read from
memcached: its lookups go to the backup and write the value back; and once
memcached takes writes again, every table operation first rewrites a batch
of stale keys from the backup (limits.MEMCACHE_STALE_REPAIR_BATCH), so that
other readers of memcached (other MX hosts) see the newer values too.  At
most limits.MEMCACHE_STALE_KEYS_MAX keys are remembered, the oldest
forgotten first, with a warning; the memory is the process's own, so keys
still stale when it exits are named in a warning by close().

The rules are written once, with no I/O, in memtable.memcache_rules;
MemcacheTable runs them blocking (this module), AsyncMemcacheTable on an
event loop (memtable.amemcache_table).  Within one event loop several
operations of a table run at once; the stale-key memory then keeps a key
stale when another operation changed it while it was being rewritten.

A MemcacheTable is not thread-safe: use one per thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

from memtable.config import MemcacheConfig
from memtable.errors import MemtableError, SequenceUnsupportedError, TemporaryError
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
    drive,
)
from memtable.table import Item, Outcome, Table
from memtable.wire import MemcacheWire

log = logging.getLogger("memtable")

T = TypeVar("T")


def new_wire(config: MemcacheConfig, backup_spec: str | None,
             factory: Callable[..., T]) -> T:
    """A memcache connection (MemcacheWire or AsyncMemcacheWire) as the
    table's configuration asks."""
    return factory(
        config.memcache,
        timeout=config.timeout,
        max_try=config.max_try,
        retry_pause=config.retry_pause,
        line_size_limit=config.line_size_limit,
        data_size_limit=config.data_size_limit,
        name=f"memcache:{config.path}",
        fallback=backup_spec or "",
    )


class MemcacheTable(MemcacheParts[Table, MemcacheWire], Table):
    """One ``memcache:/path/file.cf`` table, blocking; registry.open_table
    builds its wire (new_wire)."""

    # -- the runner ------------------------------------------------------

    def _run(self, plan: Plan[T]) -> T:
        return drive(plan, self._perform)

    def _perform(self, effect: Effect) -> Any:
        """Do one effect of a plan: memcached through the wire, the backup
        through its Table.  (One key or item is the single command ``get
        k`` or ``set k``: McCore.get_many, McCore.set_many.)"""
        wire = self.wire
        if isinstance(effect, McGet):
            return wire.get_many(effect.keys)
        if isinstance(effect, McSet):
            wire.set_many(effect.items)
            return None
        if isinstance(effect, SetAndCommit):
            return self._set_and_commit(effect)
        backup = self.backup
        if isinstance(effect, BackupLookup):
            assert backup is not None
            if len(effect.keys) == 1:
                return {effect.keys[0]: backup.lookup(effect.keys[0])}
            return backup.lookup_many(effect.keys)
        if isinstance(effect, BackupUpdate):
            assert backup is not None
            return backup.update_many(effect.items)
        if isinstance(effect, McDelete):
            return wire.delete(effect.key)
        if isinstance(effect, BackupDelete):
            assert backup is not None
            return backup.delete(effect.key)
        if isinstance(effect, McDeleteMany):
            wire.delete_many(effect.keys)
            return None
        if isinstance(effect, McGets):
            return wire.gets(effect.key)
        if isinstance(effect, McDeleteUnchanged):
            return wire.delete_unchanged(effect.key, effect.cas)
        raise TypeError(f"unknown effect {effect!r}")

    def _set_and_commit(self, effect: SetAndCommit) -> Committed:
        """The backup's commit runs while memcached answers the sets
        (MemcacheWire.set_many's ``while_waiting``); one item: one after the
        other, as Postfix does."""
        assert self.backup is not None
        backup = self.backup
        committed: list[list[MemtableError | None] | Exception] = []

        def commit() -> None:
            # Runs inside the wire's reply wait, which must not see it fail.
            try:
                committed.append(backup.update_many(effect.commit.items))
            except Exception as exc:
                committed.append(exc)

        set_error: TemporaryError | None = None
        items = effect.sets.items
        try:
            self.wire.set_many(items, while_waiting=commit if len(items) > 1 else None)
        except TemporaryError as exc:
            set_error = exc
        if not committed:
            commit()
        return set_error, committed[0]

    # -- Table -----------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        return self._run(self.rules.lookup([key]))[key]

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """lookup() of several keys: one memcache round trip, one backup
        transaction for the misses, one pipelined write-back."""
        return self._run(self.rules.lookup(keys))

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        """Store key = value in memcache (with ``ttl`` or the table's ttl),
        then in the backup.  With a backup, only backup failures raise."""
        error = self._run(self.rules.update([(key, value, ttl)]))[0]
        if error is not None:
            raise error

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        """update() for each (key, value, ttl) item, in order, batched: one
        pipelined round trip of ``set`` commands and one backup batch (one
        lmdb transaction), the commit running while memcached answers.  One
        entry per item (memtable.memcache_rules.MemcacheRules.update)."""
        return self._run(self.rules.update(items))

    def delete(self, key: str) -> bool:
        return self._run(self.rules.delete(key))

    def delete_cached_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
        """Remove key from memcached only (never the backup) while its value
        is one ``deletable(value)`` accepts (cas-guarded: a value written
        meanwhile, by this host or another, stays).  TemporaryError when
        memcached cannot answer."""
        return self._run(self.rules.delete_cached_if(key, deletable))

    def sequence(self) -> Iterator[tuple[str, str]]:
        if self.backup is None:
            log.warning("database %s: first/next support requires backup database", self.spec)
            raise SequenceUnsupportedError(
                f"{self.spec}: first/next support requires backup database")
        return self.backup.sequence()

    def verify(self) -> None:
        """memcached has no file: check the backup's."""
        if self.backup is not None:
            self.backup.verify()

    def close(self) -> None:
        """Close; a last try to rewrite the stale keys first (when memcached
        takes writes), and a warning naming what is left."""
        self._run(self.rules.close())
        self.wire.close()
        if self.pipeline.domain is not None:
            self.pipeline.domain.close()
        if self.backup is not None:
            self.backup.close()
