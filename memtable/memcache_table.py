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

A MemcacheTable is not thread-safe: use one per thread.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

from memtable import clock
from memtable.config import MemcacheConfig
from memtable.errors import (
    ConfigError,
    KeySkippedError,
    MemtableError,
    SequenceUnsupportedError,
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
from memtable.table import Outcome, Table
from memtable.ttl import wire_exptime
from memtable.wire import MemcacheWire

log = logging.getLogger("memtable")

# Values cross the wire as bytes; surrogateescape keeps any byte sequence a
# server holds (Postfix treats values as C strings) round-trippable.
_ENCODING = "utf-8"
_ERRORS = "surrogateescape"


class MemcacheTable(Table):
    """One ``memcache:/path/file.cf`` table."""

    def __init__(self, config: MemcacheConfig, *, read_write: bool, fold: bool,
                 pipeline: KeyPipeline, backup: Table | None,
                 wire: MemcacheWire | None = None) -> None:
        self.spec = f"memcache:{config.path}"
        self.config = config
        self.read_write = read_write
        self.fold = fold
        self.pipeline = pipeline
        self.backup = backup
        self.wire = wire or MemcacheWire(
            config.memcache,
            timeout=config.timeout,
            max_try=config.max_try,
            retry_pause=config.retry_pause,
            line_size_limit=config.line_size_limit,
            data_size_limit=config.data_size_limit,
            name=self.spec,
            fallback=backup.spec if backup is not None else "",
        )
        # memcache key -> (the original key, its absolute expiry or 0 for
        # none) of keys changed in the backup only (see the module docstring).
        self._stale: dict[bytes, tuple[str, float]] = {}
        self._forgotten = 0              # stale keys dropped over the bound ...
        self._forgotten_logged = -math.inf  # ... and when that was last said

    # -- helpers ---------------------------------------------------------

    def _key(self, name: str, operation: str) -> bytes | None:
        """The memcache key for name, or None when Postfix would skip it.

        Skipped updates warn and raise KeySkippedError (information is lost);
        skipped lookups and deletes are silent, as in Postfix, except for
        reasons Postfix does not have (a key too long for memcached).
        """
        prepared = self.pipeline.prepare(name, self.fold)
        if prepared.key is not None:
            return prepared.key
        self._skip(name, operation, prepared.skip_reason or "")
        return None

    def _skip(self, name: str, operation: str, reason: str) -> None:
        """Log a skipped name; raise KeySkippedError for an update."""
        loud = operation == "update" or reason not in SILENT_SKIPS
        log.log(logging.WARNING if loud else logging.DEBUG,
                '%s: skipping %s for name "%s": %s', self.config.path, operation, clip(name),
                reason)
        if operation == "update":
            raise KeySkippedError(name, reason)

    def _store(self, key: bytes, value: str, ttl: int | None) -> None:
        """Write to memcache; raises TemporaryError or ValueTooLongError."""
        data, exptime = self._item(key, value, ttl)
        self.wire.set(key, data, flags=self.config.flags, exptime=exptime)

    def _item(self, key: bytes, value: str, ttl: int | None, *,
              warn: bool = True) -> tuple[bytes, int]:
        """The value's bytes and exptime; ValueTooLongError (logged unless
        ``warn`` is false) over data_size_limit, ConfigError for a ttl
        memcached cannot hold."""
        data = value.encode(_ENCODING, _ERRORS)
        if len(data) > self.config.data_size_limit:
            log.log(logging.WARNING if warn else logging.DEBUG,
                    "database %s: data for key %s is too long (data_size_limit=%d) "
                    "-- not stored", self.spec, key.decode(_ENCODING, _ERRORS),
                    self.config.data_size_limit)
            raise ValueTooLongError(
                f"{self.spec}: value of {len(data)} bytes for key "
                f"{key.decode(_ENCODING, _ERRORS)} exceeds data_size_limit="
                f"{self.config.data_size_limit}")
        return data, wire_exptime(self.config.ttl if ttl is None else ttl)

    # -- stale keys ------------------------------------------------------

    def _mark_stale(self, mc_key: bytes, key: str, ttl: int | None) -> None:
        """memcached may hold an older value of key than the backup now does."""
        ttl = self.config.ttl if ttl is None else ttl
        self._stale.pop(mc_key, None)  # re-inserted last: the oldest go first
        self._stale[mc_key] = (key, clock.now() + ttl if ttl > 0 else 0.0)
        if len(self._stale) > MEMCACHE_STALE_KEYS_MAX:
            del self._stale[next(iter(self._stale))]
            self._forgotten += 1
            now = clock.monotonic()
            if now - self._forgotten_logged >= MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS:
                log.warning("%s: more than %d keys changed in the backup only: %d of the "
                            "oldest forgotten; memcached may serve their older values until "
                            "they expire or are written again", self.spec,
                            MEMCACHE_STALE_KEYS_MAX, self._forgotten)
                self._forgotten_logged = now
                self._forgotten = 0

    def _stale_ttl(self, mc_key: bytes) -> int | None:
        """The ttl left to a stale key (None: not stale, use the table's)."""
        entry = self._stale.get(mc_key)
        if entry is None:
            return None
        expires = entry[1]
        return max(1, math.ceil(expires - clock.now())) if expires else 0

    def _repair(self) -> None:
        """Rewrite a batch of stale keys in memcached from the backup (delete
        those the backup no longer has or that have expired), once memcached
        takes writes again."""
        if not self._stale or not self.wire.writable or self.backup is None:
            return
        batch = list(itertools.islice(self._stale.items(), MEMCACHE_STALE_REPAIR_BATCH))
        keys = [key for _, (key, _) in batch]
        try:
            lookup_many = getattr(self.backup, "lookup_many", None)
            values: dict[str, str | None] = (
                lookup_many(keys) if lookup_many is not None
                else {key: self.backup.lookup(key) for key in keys})
        except MemtableError as exc:
            # The operation that follows reads the backup too, and reports.
            log.debug("%s: cannot read the backup to rewrite stale keys: %s", self.spec, exc)
            return
        now = clock.now()
        sets: list[tuple[bytes, bytes, int, int]] = []
        deletes: list[bytes] = []
        for mc_key, (key, expires) in batch:
            value = values.get(key)
            if value is None or 0 < expires <= now:
                deletes.append(mc_key)
                continue
            ttl = math.ceil(expires - now) if expires else 0
            try:
                data, exptime = self._item(mc_key, value, ttl, warn=False)
            except (ValueTooLongError, ConfigError):  # warned about when written
                deletes.append(mc_key)
                continue
            sets.append((mc_key, data, self.config.flags, exptime))
        try:
            if sets:
                self.wire.set_many(sets)
            if deletes:
                self.wire.delete_many(deletes)
        except TemporaryError:
            return  # logged by the wire; they stay stale
        for mc_key, entry in batch:
            if self._stale.get(mc_key) is entry:
                del self._stale[mc_key]

    # -- Table -----------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        mc_key = self._key(key, "lookup")
        if mc_key is None:
            return None
        self._repair()
        if mc_key in self._stale:
            return self._backup_only(key, mc_key)  # memcached's copy is older
        error: TemporaryError | None = None
        try:
            hit = self.wire.get(mc_key)
        except TemporaryError as exc:
            error, hit = exc, None
        if hit is not None:
            return hit[1].decode(_ENCODING, _ERRORS)
        if self.backup is None:
            if error is not None:
                raise error
            return None
        if error is not None:
            self.wire.answered_by_backup()
        return self._backup_only(key, mc_key)

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """Look several keys up with one memcache round trip.

        Same per-key semantics as lookup() (skips, backup fallback and
        write-back); policyd's store worker uses it to coalesce requests.
        """
        prepared = {key: self._key(key, "lookup") for key in keys}
        self._repair()
        wanted = [k for k in dict.fromkeys(prepared.values())
                  if k is not None and k not in self._stale]
        error: TemporaryError | None = None
        hits: dict[bytes, tuple[int, bytes]] = {}
        if wanted:
            try:
                hits = self.wire.get_many(wanted)
            except TemporaryError as exc:
                error = exc
        if error is not None and self.backup is None:
            raise error
        if error is not None:
            self.wire.answered_by_backup(len(wanted))
        results: dict[str, str | None] = {}
        misses: dict[str, bytes] = {}
        for key, mc_key in prepared.items():
            if mc_key is None:
                results[key] = None
            elif mc_key in hits:
                results[key] = hits[mc_key][1].decode(_ENCODING, _ERRORS)
            else:
                results[key] = None
                if self.backup is not None:
                    misses[key] = mc_key
        if misses:
            self._backup_many(misses, results)
        return results

    def _backup_many(self, misses: dict[str, bytes], results: dict[str, str | None]) -> None:
        """_backup_only() for several keys: one backup lookup_many (one lmdb
        transaction) when the backup has it, one pipelined write-back."""
        assert self.backup is not None
        lookup_many = getattr(self.backup, "lookup_many", None)
        if lookup_many is None or len(misses) == 1:
            for key, mc_key in misses.items():
                results[key] = self._backup_only(key, mc_key)
            return
        found: dict[str, str | None] = lookup_many(list(misses))
        write_back: list[tuple[bytes, bytes, int, int]] = []
        for key, mc_key in misses.items():
            value = found.get(key)
            results[key] = value
            if value is None:
                continue
            try:
                data, exptime = self._item(mc_key, value, self._stale_ttl(mc_key))
            except (ValueTooLongError, ConfigError) as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)
                continue
            write_back.append((mc_key, data, self.config.flags, exptime))
        if write_back:
            # Best effort, as in _backup_only: the lookups have their answers
            # (a failure is logged by the wire, once per outage).
            try:
                self.wire.set_many(write_back)
            except TemporaryError:
                return
            for mc_key, _, _, _ in write_back:
                self._stale.pop(mc_key, None)

    def _backup_only(self, key: str, mc_key: bytes) -> str | None:
        """Look the ORIGINAL key up in the backup; write a hit back to memcache."""
        assert self.backup is not None
        value = self.backup.lookup(key)
        if value is not None:
            # Write-back is best effort: the lookup has its answer already
            # (a memcache failure is logged by the wire, once per outage).
            try:
                self._store(mc_key, value, self._stale_ttl(mc_key))
            except TemporaryError:
                pass
            except ValueTooLongError as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)
            else:
                self._stale.pop(mc_key, None)
        return value

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        """Store key = value in memcache (with ``ttl`` or the table's ttl),
        then in the backup.  With a backup, only backup failures raise."""
        self._check_writable()
        mc_key = self._key(key, "update")
        assert mc_key is not None  # skipped updates raise
        self._repair()
        stored = False
        try:
            self._store(mc_key, value, ttl)
            stored = True
        except (TemporaryError, ValueTooLongError) as exc:
            if self.backup is None:
                raise
            if isinstance(exc, TemporaryError):
                self.wire.answered_by_backup()
        if self.backup is not None:
            self.backup.update(key, value)
            if not stored:
                self._mark_stale(mc_key, key, ttl)
        if stored:
            self._stale.pop(mc_key, None)

    def update_many(self, items: Sequence[tuple[str, str, int | None]]
                    ) -> list[MemtableError | None]:
        """update() for each (key, value, ttl) item, in order, batched: one
        pipelined round trip of ``set`` commands (wire.set_many) and one
        backup batch (its update_many when it has one: one lmdb transaction),
        the backup written while memcached answers the sets, so that its
        commit and the round trip overlap.

        Returns one entry per item: None when update() would have returned,
        else the error it would have raised for that item (KeySkippedError,
        ValueTooLongError, ConfigError, a TemporaryError ...).  Per item the
        rules are update()'s; the one difference: the pipelined sets succeed
        or fail together (one NOT_STORED or a broken connection fails the
        round trip), so without a backup a memcache failure is every item's
        error.  AccessError (read-only table) is raised, nothing is stored.
        """
        self._check_writable()
        self._repair()
        results: list[MemtableError | None] = [None] * len(items)
        mc_keys: dict[int, bytes] = {}  # item index -> memcache key
        sets: list[tuple[bytes, bytes, int, int]] = []
        set_at: list[int] = []      # item index of each set
        to_backup: list[int] = []   # item indexes that go on to the backup
        flags = self.config.flags
        for i, (key, value, ttl) in enumerate(items):
            try:
                mc_key = self._key(key, "update")
                assert mc_key is not None  # skipped updates raise
                mc_keys[i] = mc_key
                data, exptime = self._item(mc_key, value, ttl)
            except ValueTooLongError as exc:
                if self.backup is None:
                    results[i] = exc
                else:
                    to_backup.append(i)
                continue
            except MemtableError as exc:
                results[i] = exc
                continue
            sets.append((mc_key, data, flags, exptime))
            set_at.append(i)
            to_backup.append(i)
        backup = self.backup is not None and bool(to_backup)
        failed: list[Exception] = []

        def write_backup() -> None:
            # Runs inside the wire's reply wait, which must not see it fail:
            # anything unexpected is raised once the wire is done.
            try:
                self._backup_updates(items, to_backup, results)
            except Exception as exc:
                failed.append(exc)

        stored = False
        if sets:
            try:
                # The backup batch is written while memcached answers.
                self.wire.set_many(sets, meanwhile=write_backup if backup else None)
                stored = True
            except TemporaryError as exc:
                if self.backup is None:
                    for i in set_at:
                        results[i] = exc
                else:
                    self.wire.answered_by_backup(len(set_at))
        elif backup:
            write_backup()
        if failed:
            raise failed[0]
        if stored:
            for i in set_at:
                self._stale.pop(mc_keys[i], None)
        if backup:
            in_memcache = set(set_at) if stored else set()
            for i in to_backup:
                if results[i] is None and i not in in_memcache:
                    self._mark_stale(mc_keys[i], items[i][0], items[i][2])
        return results

    def _backup_updates(self, items: Sequence[tuple[str, str, int | None]],
                     indexes: list[int], results: list[MemtableError | None]) -> None:
        assert self.backup is not None
        batch = [(items[i][0], items[i][1], None) for i in indexes]
        update_many = getattr(self.backup, "update_many", None)
        if update_many is None:
            for i, (key, value, _) in zip(indexes, batch, strict=True):
                try:
                    self.backup.update(key, value)
                except MemtableError as exc:
                    results[i] = exc
            return
        try:
            got: Sequence[MemtableError | None] = update_many(batch)
        except MemtableError as exc:
            for i in indexes:
                results[i] = exc
            return
        for i, error in zip(indexes, got, strict=True):
            results[i] = error

    def delete(self, key: str) -> bool:
        self._check_writable()
        mc_key = self._key(key, "delete")
        if mc_key is None:
            return False
        self._repair()
        try:
            deleted = self.wire.delete(mc_key)
        except TemporaryError:
            if self.backup is None:
                raise
            self.wire.answered_by_backup()
            found = self.backup.delete(key)
            self._mark_stale(mc_key, key, None)  # memcached may still hold it
            return found
        self._stale.pop(mc_key, None)
        if self.backup is not None:
            return self.backup.delete(key)
        return deleted

    def delete_cached_if(self, key: str, doomed: Callable[[str], bool]) -> Outcome:
        """Remove key from memcached only (never the backup) while its value
        is one ``doomed(value)`` accepts: ``gets`` the value and its cas
        unique, then a cas-guarded delete (MemcacheWire.delete_unchanged),
        so a value written meanwhile, by this host or another, stays.
        TemporaryError when memcached cannot answer."""
        self._check_writable()
        mc_key = self._key(key, "delete")
        if mc_key is None:
            return Outcome.ABSENT
        hit = self.wire.gets(mc_key)
        if hit is None:
            return Outcome.ABSENT
        if not doomed(hit[1].decode(_ENCODING, _ERRORS)):
            return Outcome.KEPT
        done = self.wire.delete_unchanged(mc_key, hit[2])
        if done is None:
            return Outcome.ABSENT
        return Outcome.DELETED if done else Outcome.KEPT

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
        while self._stale and self.wire.writable:
            left = len(self._stale)
            self._repair()
            if len(self._stale) >= left:
                break
        if self._stale:
            some = ", ".join(clip(key, 60) for key, _ in itertools.islice(
                self._stale.values(), 3))
            count = len(self._stale)
            log.warning("%s: %d %s changed in the backup only and memcached may serve "
                        "older values for them until they expire or are written again (%s%s)",
                        self.spec, count, "key was" if count == 1 else "keys were", some,
                        ", ..." if count > 3 else "")
            self._stale.clear()
        self.wire.close()
        if self.pipeline.domain is not None:
            self.pipeline.domain.close()
        if self.backup is not None:
            self.backup.close()

