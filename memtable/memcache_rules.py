"""Postfix's memcache table rules, written once, with no I/O.

Every operation of a memcache: table (lookup, update, delete, the stale-key
repair, close's last repair) is a *plan*: a generator that yields effects
(``McGet(keys)``, ``BackupUpdate(items)`` ...) and receives their results,
or has their exception thrown in.  The plan decides everything Postfix's
dict_memcache decides (keys, skips and their logging, the write-back, the
backup's precedence, ValueTooLong, what counts as answered by the backup)
and memtable's stale-key memory; a runner only performs the effects:

- memtable.memcache_table.MemcacheTable runs a plan blocking, with a
  MemcacheWire and the backup Table (the ``memtable`` command, the API);
- memtable.amemcache_table.AsyncMemcacheTable awaits the effects on an
  event loop, with an AsyncMemcacheWire and the backup as a ThreadedTable
  (policyd).

Single operations are one-item batches of the same plans.  How the rules
work is the module docstring of memtable.memcache_table; docs/design.md
("Memcache rules as plans") says why they are written this way.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from memtable import clock
from memtable.config import MemcacheConfig
from memtable.errors import (
    AccessError,
    ConfigError,
    KeySkippedError,
    MemtableError,
    TemporaryError,
    ValueTooLongError,
    clip,
)
from memtable.keys import SILENT_SKIPS, KeyPipeline
from memtable.limits import (
    MEMCACHE_STALE_KEYS_MAX,
    MEMCACHE_STALE_REPAIR_BATCH,
    MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS,
)
from memtable.table import Item, Outcome
from memtable.ttl import wire_exptime

log = logging.getLogger("memtable")

T = TypeVar("T")

# Values cross the wire as bytes; surrogateescape keeps any byte sequence a
# server holds (Postfix treats values as C strings) round-trippable.
ENCODING = "utf-8"
ERRORS = "surrogateescape"

#: One ``set`` command: (memcache key, value, flags, exptime).
SetItem = tuple[bytes, bytes, int, int]


# -- effects: what a plan asks its runner to do ------------------------------

class Effect:
    """Something a plan needs done; the runner sends back its result or
    throws its exception into the plan.  (Not frozen: a frozen dataclass
    costs each of the several effects of a request ~0.5 us to build.)"""

    __slots__ = ()


@dataclass(slots=True)
class McGet(Effect):
    """memcached ``get``: -> {key: (flags, value)} of the hits."""

    keys: list[bytes]


@dataclass(slots=True)
class McSet(Effect):
    """memcached ``set`` of each item, every reply STORED: -> None."""

    items: list[SetItem]


@dataclass(slots=True)
class McDelete(Effect):
    """memcached ``delete``: -> True when the key was there."""

    key: bytes


@dataclass(slots=True)
class McDeleteMany(Effect):
    """memcached ``delete`` of each key: -> None."""

    keys: list[bytes]


@dataclass(slots=True)
class McGets(Effect):
    """memcached ``gets``: -> (flags, value, cas unique) or None."""

    key: bytes


@dataclass(slots=True)
class McDeleteUnchanged(Effect):
    """MemcacheWire.delete_unchanged: -> True, False (changed), None (gone)."""

    key: bytes
    cas: int


@dataclass(slots=True)
class BackupLookup(Effect):
    """The backup's lookup_many: -> {key: value or None}."""

    keys: list[str]


@dataclass(slots=True)
class BackupUpdate(Effect):
    """The backup's update_many (one transaction): -> one error or None per item."""

    items: list[Item]


@dataclass(slots=True)
class BackupDelete(Effect):
    """The backup's delete: -> True when the key was there."""

    key: str


@dataclass(slots=True)
class SetAndCommit(Effect):
    """``sets`` and ``commit`` at the same time (the round trip overlaps the
    synced commit), both always run to their end: -> (the TemporaryError
    of the sets or None, the commit's result or the Exception it raised)."""

    sets: McSet
    commit: BackupUpdate


#: A plan: yields effects, receives their results, returns T.
Plan = Generator[Effect, Any, T]

#: SetAndCommit's result.
Committed = tuple[TemporaryError | None, "list[MemtableError | None] | Exception"]


def drive(plan: Plan[T], perform: Callable[[Effect], Any]) -> T:
    """The loop of every blocking runner: an effect's exception is thrown
    into the plan, which decides; a plan abandoned (KeyboardInterrupt ...)
    is closed, so that its cleanup runs."""
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
                result = perform(effect)
            except Exception as exc:
                error, result = exc, None
    finally:
        plan.close()


class WireState(Protocol):
    """The two non-I/O parts of a memcache connection the rules consult."""

    @property
    def writable(self) -> bool: ...

    def answered_by_backup(self, count: int = 1) -> None: ...


B = TypeVar("B")  # the backup: a Table, or a ThreadedTable on an event loop
W = TypeVar("W", bound="WireState")  # the connection: either driver


class MemcacheParts(Generic[B, W]):
    """What a memcache table holds, blocking (MemcacheTable) or on an event
    loop (AsyncMemcacheTable): its settings, backup, connection and rules."""

    def __init__(self, config: MemcacheConfig, *, read_write: bool, fold: bool,
                 pipeline: KeyPipeline, backup: B | None, wire: W) -> None:
        self.spec = f"memcache:{config.path}"
        self.config = config
        self.read_write = read_write
        self.fold = fold
        self.pipeline = pipeline
        self.backup = backup
        self.wire = wire
        self.rules = MemcacheRules(config, read_write=read_write, fold=fold,
                                   pipeline=pipeline, has_backup=backup is not None, wire=wire)


class MemcacheRules:
    """One memcache: table's rules and its memory of stale keys."""

    def __init__(self, config: MemcacheConfig, *, read_write: bool, fold: bool,
                 pipeline: KeyPipeline, has_backup: bool, wire: WireState,
                 stale_keys_max: int = MEMCACHE_STALE_KEYS_MAX) -> None:
        self.spec = f"memcache:{config.path}"
        self.stale_keys_max = stale_keys_max
        self.config = config
        self.read_write = read_write
        self.fold = fold
        self.pipeline = pipeline
        self.has_backup = has_backup
        self.wire = wire
        # memcache key -> (the original key, its absolute expiry or 0 for
        # none) of keys changed in the backup only (see memcache_table).
        self.stale: dict[bytes, tuple[str, float]] = {}
        self._forgotten = 0                 # stale keys dropped over the bound ...
        self._forgotten_logged = -math.inf  # ... and when that was last said
        self._repairing = False  # one repair at a time (an event loop runs several plans)

    # -- keys and items ----------------------------------------------------

    def check_writable(self) -> None:
        if not self.read_write:
            raise AccessError(f"{self.spec}: table is opened read-only")

    def key(self, name: str, operation: str) -> bytes | None:
        """The memcache key for name, or None when Postfix would skip it.

        Skipped updates warn and raise KeySkippedError (information is lost);
        skipped lookups and deletes are silent, as in Postfix, except for
        reasons Postfix does not have (a key too long for memcached).
        """
        prepared = self.pipeline.prepare(name, self.fold)
        if prepared.key is not None:
            return prepared.key
        reason = prepared.skip_reason or ""
        loud = operation == "update" or reason not in SILENT_SKIPS
        log.log(logging.WARNING if loud else logging.DEBUG,
                '%s: skipping %s for name "%s": %s', self.config.path, operation, clip(name),
                reason)
        if operation == "update":
            raise KeySkippedError(name, reason)
        return None

    def item(self, key: bytes, value: str, ttl: int | None, *,
             warn: bool = True) -> tuple[bytes, int]:
        """The value's bytes and exptime; ValueTooLongError (logged unless
        ``warn`` is false) over data_size_limit, ConfigError for a ttl
        memcached cannot hold."""
        data = value.encode(ENCODING, ERRORS)
        if len(data) > self.config.data_size_limit:
            log.log(logging.WARNING if warn else logging.DEBUG,
                    "database %s: data for key %s is too long (data_size_limit=%d) "
                    "-- not stored", self.spec, key.decode(ENCODING, ERRORS),
                    self.config.data_size_limit)
            raise ValueTooLongError(
                f"{self.spec}: value of {len(data)} bytes for key "
                f"{key.decode(ENCODING, ERRORS)} exceeds data_size_limit="
                f"{self.config.data_size_limit}")
        return data, wire_exptime(self.config.ttl if ttl is None else ttl)

    # -- stale keys --------------------------------------------------------

    def mark_stale(self, mc_key: bytes, key: str, ttl: int | None) -> None:
        """memcached may hold an older value of key than the backup now does."""
        ttl = self.config.ttl if ttl is None else ttl
        self._remember(mc_key, (key, clock.now() + ttl if ttl > 0 else 0.0))

    def _remember(self, mc_key: bytes, entry: tuple[str, float]) -> None:
        self.stale.pop(mc_key, None)  # re-inserted last: the oldest go first
        self.stale[mc_key] = entry
        if len(self.stale) > self.stale_keys_max:
            del self.stale[next(iter(self.stale))]
            self._forgotten += 1
            now = clock.monotonic()
            if now - self._forgotten_logged >= MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS:
                log.warning("%s: more than %d keys changed in the backup only: %d of the "
                            "oldest forgotten; memcached may serve their older values until "
                            "they expire or are written again", self.spec,
                            self.stale_keys_max, self._forgotten)
                self._forgotten_logged = now
                self._forgotten = 0

    def _settle(self, mc_key: bytes, before: tuple[str, float] | None) -> None:
        """memcached now holds the backup's value of mc_key, as read while
        the key's stale entry was ``before``.  If another operation of this
        table changed the entry meanwhile (only possible when an event loop
        runs several plans at once), which write memcached got last is
        unknown: the key stays (or becomes again) stale."""
        current = self.stale.get(mc_key)
        if current is before:
            if current is not None:
                del self.stale[mc_key]
        elif current is None and before is not None:
            self._remember(mc_key, before)

    def stale_ttl(self, mc_key: bytes) -> int | None:
        """The ttl left to a stale key (None: not stale, use the table's)."""
        entry = self.stale.get(mc_key)
        if entry is None:
            return None
        expires = entry[1]
        return max(1, math.ceil(expires - clock.now())) if expires else 0

    def repair(self) -> Plan[None]:
        """Rewrite a batch of stale keys in memcached from the backup (delete
        those the backup no longer has or that have expired), once memcached
        takes writes again."""
        if (not self.stale or not self.wire.writable or not self.has_backup
                or self._repairing):
            return
        self._repairing = True
        try:
            batch = list(itertools.islice(self.stale.items(), MEMCACHE_STALE_REPAIR_BATCH))
            try:
                values: dict[str, str | None] = yield BackupLookup(
                    [key for _, (key, _) in batch])
            except MemtableError as exc:
                # The operation that follows reads the backup too, and reports.
                log.debug("%s: cannot read the backup to rewrite stale keys: %s",
                          self.spec, exc)
                return
            now = clock.now()
            sets: list[SetItem] = []
            deletes: list[bytes] = []
            for mc_key, (key, expires) in batch:
                value = values.get(key)
                if value is None or 0 < expires <= now:
                    deletes.append(mc_key)
                    continue
                ttl = math.ceil(expires - now) if expires else 0
                try:
                    data, exptime = self.item(mc_key, value, ttl, warn=False)
                except (ValueTooLongError, ConfigError):  # warned about when written
                    deletes.append(mc_key)
                    continue
                sets.append((mc_key, data, self.config.flags, exptime))
            try:
                if sets:
                    yield McSet(sets)
                if deletes:
                    yield McDeleteMany(deletes)
            except TemporaryError:
                return  # logged by the wire; they stay stale
            for mc_key, entry in batch:
                self._settle(mc_key, entry)
        finally:
            self._repairing = False

    # -- the operations ----------------------------------------------------

    def lookup(self, keys: Sequence[str]) -> Plan[dict[str, str | None]]:
        """{key: value or None}: memcache first; a miss (or a memcache error)
        with a backup is looked up in the backup, by its ORIGINAL key, and a
        hit written back to memcache.  Keys memcached may hold stale go to
        the backup directly.  Without a backup a memcache error raises."""
        results: dict[str, str | None] = {}
        prepared: list[tuple[str, bytes]] = []
        for key in keys:
            results[key] = None
            mc_key = self.key(key, "lookup")
            if mc_key is not None:
                prepared.append((key, mc_key))
        if not prepared:
            return results  # nothing to ask anybody
        if self.stale:
            yield from self.repair()
        stale = self.stale
        wanted = list(dict.fromkeys(mc_key for _, mc_key in prepared if mc_key not in stale))
        hits: dict[bytes, tuple[int, bytes]] = {}
        if wanted:
            try:
                hits = yield McGet(wanted)
            except TemporaryError:
                if not self.has_backup:
                    raise
                self.wire.answered_by_backup(len(wanted))
        misses: dict[str, bytes] = {}
        for key, mc_key in prepared:
            hit = hits.get(mc_key)
            if hit is not None:
                results[key] = hit[1].decode(ENCODING, ERRORS)
            elif self.has_backup:
                misses[key] = mc_key
        if misses:
            yield from self._from_backup(misses, results)
        return results

    def _from_backup(self, misses: dict[str, bytes],
                     results: dict[str, str | None]) -> Plan[None]:
        """Look the ORIGINAL keys up in the backup; write the hits back to
        memcache (best effort: the lookups have their answers already, and
        a memcache failure is logged by the wire, once per outage)."""
        before = {mc_key: self.stale.get(mc_key) for mc_key in misses.values()}
        found: dict[str, str | None] = yield BackupLookup(list(misses))
        write_back: list[SetItem] = []
        for key, mc_key in misses.items():
            value = results[key] = found.get(key)
            if value is None:
                continue
            try:
                data, exptime = self.item(mc_key, value, self.stale_ttl(mc_key))
            except (ValueTooLongError, ConfigError) as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)
                continue
            write_back.append((mc_key, data, self.config.flags, exptime))
        if not write_back:
            return
        try:
            yield McSet(write_back)
        except TemporaryError:
            return
        for mc_key, _, _, _ in write_back:
            self._settle(mc_key, before[mc_key])

    def update(self, items: Sequence[Item]) -> Plan[list[MemtableError | None]]:
        """Store each (key, value, ttl) item in memcache (with ``ttl`` or the
        table's ttl) and in the backup: one pipelined round trip of ``set``s
        and one backup transaction, overlapped.

        One entry per item: None when stored, else the error that item met
        (KeySkippedError, ValueTooLongError, ConfigError, a TemporaryError
        ...).  With a backup, memcache failures (and a value too long for
        memcache) are only logged: the backup's outcome is the item's; the
        item is then remembered as stale.  The pipelined sets succeed or
        fail together, so without a backup a memcache failure is every
        item's error.  AccessError (read-only table) is raised, nothing is
        stored."""
        self.check_writable()
        results: list[MemtableError | None] = [None] * len(items)
        mc_keys: dict[int, bytes] = {}  # item index -> memcache key
        sets: list[SetItem] = []
        set_at: list[int] = []      # item index of each set
        to_backup: list[int] = []   # item indexes that go on to the backup
        flags = self.config.flags
        for i, (key, value, ttl) in enumerate(items):
            try:
                mc_key = self.key(key, "update")
                assert mc_key is not None  # skipped updates raise
                mc_keys[i] = mc_key
                data, exptime = self.item(mc_key, value, ttl)
            except ValueTooLongError as exc:
                if self.has_backup:
                    to_backup.append(i)
                else:
                    results[i] = exc
                continue
            except MemtableError as exc:
                results[i] = exc
                continue
            sets.append((mc_key, data, flags, exptime))
            set_at.append(i)
            if self.has_backup:
                to_backup.append(i)
        if not sets and not to_backup:
            return results
        if self.stale:
            yield from self.repair()
        backup: list[Item] = [(items[i][0], items[i][1], None) for i in to_backup]
        # (the backup keeps no ttl: Postfix's tables have none)
        set_error: TemporaryError | None = None
        committed: list[MemtableError | None] | Exception = []
        try:
            if sets and backup:
                set_error, committed = yield SetAndCommit(McSet(sets), BackupUpdate(backup))
            elif sets:
                try:
                    yield McSet(sets)
                except TemporaryError as exc:
                    set_error = exc
            else:
                try:
                    committed = yield BackupUpdate(backup)
                except MemtableError as exc:
                    committed = exc
        except GeneratorExit:
            # Abandoned mid-write (a cancelled caller): memcached may hold
            # the old values or the new, the backup has whichever committed.
            for i in to_backup:
                self.mark_stale(mc_keys[i], items[i][0], items[i][2])
            raise
        if set_error is not None:
            if not self.has_backup:
                for i in set_at:
                    results[i] = set_error
            else:
                self.wire.answered_by_backup(len(set_at))
        elif self.stale:
            for i in set_at:
                self.stale.pop(mc_keys[i], None)
        if not backup:
            return results
        if isinstance(committed, MemtableError):
            for i in to_backup:
                results[i] = committed
        elif isinstance(committed, Exception):
            raise committed  # not a table's failure: a bug, the caller sees it
        else:
            for i, error in zip(to_backup, committed, strict=True):
                results[i] = error
        in_memcache = set(set_at) if set_error is None else set()
        for i in to_backup:
            if results[i] is None and i not in in_memcache:
                self.mark_stale(mc_keys[i], items[i][0], items[i][2])
        return results

    def delete(self, key: str) -> Plan[bool]:
        """Remove key from memcache and the backup; the backup's answer is
        the result when there is one.  With a backup, a memcache failure is
        only logged (and the key remembered as stale)."""
        self.check_writable()
        mc_key = self.key(key, "delete")
        if mc_key is None:
            return False
        if self.stale:
            yield from self.repair()
        try:
            deleted: bool = yield McDelete(mc_key)
        except TemporaryError:
            if not self.has_backup:
                raise
            self.wire.answered_by_backup()
            found: bool = yield BackupDelete(key)
            self.mark_stale(mc_key, key, None)  # memcached may still hold it
            return found
        self.stale.pop(mc_key, None)
        if self.has_backup:
            found = yield BackupDelete(key)
            return found
        return deleted

    def delete_cached_if(self, key: str, deletable: Callable[[str], bool]) -> Plan[Outcome]:
        """Remove key from memcached only (never the backup) while its value
        is one ``deletable(value)`` accepts: ``gets`` the value and its cas
        unique, then a cas-guarded delete, so a value written meanwhile, by
        this host or another, stays.  TemporaryError when memcached cannot
        answer."""
        self.check_writable()
        mc_key = self.key(key, "delete")
        if mc_key is None:
            return Outcome.ABSENT
        hit: tuple[int, bytes, int] | None = yield McGets(mc_key)
        if hit is None:
            return Outcome.ABSENT
        if not deletable(hit[1].decode(ENCODING, ERRORS)):
            return Outcome.KEPT
        done: bool | None = yield McDeleteUnchanged(mc_key, hit[2])
        if done is None:
            return Outcome.ABSENT
        return Outcome.DELETED if done else Outcome.KEPT

    def close(self) -> Plan[None]:
        """A last try to rewrite the stale keys (when memcached takes
        writes), and a warning naming what is left."""
        while self.stale and self.wire.writable:
            left = len(self.stale)
            yield from self.repair()
            if len(self.stale) >= left:
                break
        if self.stale:
            some = ", ".join(clip(key, 60) for key, _ in itertools.islice(
                self.stale.values(), 3))
            count = len(self.stale)
            log.warning("%s: %d %s changed in the backup only and memcached may serve "
                        "older values for them until they expire or are written again (%s%s)",
                        self.spec, count, "key was" if count == 1 else "keys were", some,
                        ", ..." if count > 3 else "")
            self.stale.clear()
