"""Walk policyd's two stores record by record, for ``report`` and ``cleanup``.

memcached cannot list its keys, so a ``memcache:`` table is walked through
its backup (memtable's sequence(), as Postfix's first/next), whose keys are
the ORIGINAL keys, without key_format; a memcache table without a backup
cannot be walked, and says so.  Each record comes out parsed as a triplet
(policyd.greylist.TripletRecord) or client record
(policyd.reputation.ClientRecord), or as malformed.

When both tables are walked through the same store (one table, or one lmdb
file backing both), a record's kind is told from its shape (3-4 fields: a
triplet, 5: a client record) and the store is walked once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType

from memtable.errors import MemtableError, TemporaryError
from memtable.memcache_table import MemcacheTable
from memtable.registry import split_spec
from memtable.table import Outcome, Table
from policyd.config import PolicydConfig
from policyd.errors import PolicydError
from policyd.greylist import TripletRecord
from policyd.reputation import ClientRecord
from policyd.store import open_checked

TRIPLETS = "triplets"
CLIENTS = "clients"


class WalkError(PolicydError):
    """A store cannot be opened or walked; the message is one clear line."""


@dataclass(frozen=True)
class Entry:
    """One stored record: ``kind`` is TRIPLETS or CLIENTS (the table it
    belongs to); both parsed records are None when it is malformed."""

    kind: str
    key: str
    value: str
    triplet: TripletRecord | None = None
    client: ClientRecord | None = None

    @property
    def malformed(self) -> bool:
        return self.triplet is None and self.client is None


def parse_entry(kind: str, key: str, value: str, *, by_shape: bool = False) -> Entry:
    """``value`` parsed as a record of table ``kind``; with ``by_shape``
    (shared store) as whichever record it is."""
    if kind == TRIPLETS or by_shape:
        try:
            return Entry(TRIPLETS, key, value, triplet=TripletRecord.parse(value))
        except ValueError:
            pass
    if kind == CLIENTS or by_shape:
        try:
            return Entry(CLIENTS, key, value, client=ClientRecord.parse(value))
        except ValueError:
            pass
    return Entry(kind, key, value)


@dataclass
class WalkStats:
    """What one walk of one table read."""

    read: int = 0
    capped: bool = False


def _walked_table(table: Table) -> Table:
    """The table whose sequence() lists ``table``'s entries."""
    if isinstance(table, MemcacheTable):
        if table.backup is None:
            raise WalkError(
                f"{table.spec}: memcached cannot list its entries and this table has no "
                f"backup; add `backup = lmdb:/var/lib/policyd/NAME` to {table.config.path} "
                "so that policyd's records can be walked")
        return table.backup
    return table


def _identity(table: Table) -> tuple[str, str]:
    """Names the same underlying store the same way (lmdb: by real path)."""
    type_, name = split_spec(table.spec)
    if name.startswith("/"):
        name = os.path.realpath(name)
    return type_, name


@dataclass
class WalkTables:
    """The triplet and client tables of a configuration, opened for walking."""

    config: PolicydConfig
    triplets: Table
    clients: Table
    stats: dict[str, WalkStats] = field(default_factory=dict)

    @classmethod
    def open(cls, config: PolicydConfig, *, read_write: bool) -> WalkTables:
        """Open both tables (read-write for cleanup).  WalkError when one
        cannot be opened or walked; nothing is read yet.  Read-only (report,
        cleanup --dry-run), an lmdb file policyd creates at start and has
        not yet (a fresh install) is an empty table."""
        tables: list[Table] = []
        try:
            for spec in (config.triplet_table, config.client_table):
                tables.append(open_checked(spec, read_write=read_write, missing_empty=True))
            stores = cls(config, tables[0], tables[1])
            _walked_table(stores.triplets)
            _walked_table(stores.clients)
        except (MemtableError, OSError, WalkError) as exc:
            for table in tables:
                table.close()
            if isinstance(exc, WalkError):
                raise
            raise WalkError(str(exc)) from None
        return stores

    @property
    def shared(self) -> bool:
        """Both tables list their entries from one store."""
        return _identity(_walked_table(self.triplets)) == _identity(_walked_table(self.clients))

    def kinds(self) -> tuple[str, ...]:
        """The tables to walk: both, or one when they share a store."""
        return (TRIPLETS,) if self.shared else (TRIPLETS, CLIENTS)

    def table(self, kind: str) -> Table:
        return self.triplets if kind == TRIPLETS else self.clients

    def walk(self, kind: str, max_entries: int) -> Iterator[Entry]:
        """Every record of table ``kind``, at most ``max_entries`` of them
        (``stats[kind].capped`` then tells).  WalkError on failure."""
        stats = self.stats[kind] = WalkStats()
        source = _walked_table(self.table(kind))
        by_shape = self.shared
        try:
            items = source.sequence()
        except (MemtableError, OSError) as exc:
            raise WalkError(f"{self.table(kind).spec}: {exc}") from None
        try:
            while True:
                try:
                    item = next(items, None)
                except (MemtableError, OSError) as exc:
                    raise WalkError(f"{self.table(kind).spec}: {exc}") from None
                if item is None:
                    return
                if stats.read >= max_entries:
                    stats.capped = True
                    return
                stats.read += 1
                yield parse_entry(kind, item[0], item[1], by_shape=by_shape)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def delete_if(self, entry: Entry, deletable: Callable[[Entry], bool]
                  ) -> tuple[Outcome, Outcome | None]:
        """Delete ``entry.key`` wherever its record is still one ``deletable``
        accepts: from the walked store (the lmdb backup) checked and deleted
        in one exclusive transaction, then, for a memcache table, from
        memcached with a cas-guarded delete; a record written meanwhile is
        kept in either.  Returns the walked store's outcome and memcached's
        (None: not a memcache table, or memcached could not answer; its
        ttl expires the record there).  A malformed record in a shared
        store goes from both tables' memcached keys.  WalkError when the
        walked store fails."""
        kind, key = entry.kind, entry.key

        def check(value: str) -> bool:
            return deletable(parse_entry(kind, key, value, by_shape=self.shared))

        table = self.table(kind)
        source = _walked_table(table)
        try:
            stored = source.delete_if(key, check)
        except (MemtableError, OSError) as exc:
            raise WalkError(f"{source.spec}: delete {key!r}: {exc}") from None
        if stored is Outcome.KEPT:
            return stored, None  # rewritten meanwhile: memcached's copy is as new
        tables = [table]
        if entry.malformed and self.shared and self.clients is not self.triplets:
            tables = [self.triplets, self.clients]
        cached: Outcome | None = None
        for cache in tables:
            if not isinstance(cache, MemcacheTable):
                continue
            try:
                outcome = cache.delete_cached_if(key, check)
            except TemporaryError:
                continue
            if cached is None or outcome is Outcome.KEPT:
                cached = outcome
        return stored, cached

    def close(self) -> None:
        self.triplets.close()
        if self.clients is not self.triplets:
            self.clients.close()

    def __enter__(self) -> WalkTables:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def memcache_front(table: Table) -> MemcacheTable | None:
    """A memcache table's memcached alone, read-only: the same table
    without its backup, so a miss is a miss and nothing is written back
    from the backup.  None when ``table`` is not a memcache table."""
    if not isinstance(table, MemcacheTable):
        return None
    return MemcacheTable(table.config, read_write=False, fold=table.fold,
                         pipeline=table.pipeline, backup=None, wire=table.wire)


def triplet_expired(record: TripletRecord, now: int, config: PolicydConfig) -> bool:
    """The policy's rule (TripletRecord.expired) with the configured times."""
    return record.expired(now, config.retry_window, config.max_age)


def client_expired(record: ClientRecord, now: int, config: PolicydConfig) -> bool:
    """The policy's rule (ClientRecord.expired) with the configured max_age."""
    return record.expired(now, config.max_age)
