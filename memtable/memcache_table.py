"""memcache: tables with Postfix's dict_memcache semantics.

lookup: memcache first; on a miss (or a memcache error) with a backup, the
ORIGINAL key is looked up in the backup and a hit is written back to
memcache with the table's ttl and flags.  update: memcache first, then the
backup; update_many() does the same for a batch with one pipelined round
trip of ``set`` commands and one backup batch (one lmdb transaction).
delete: both, the backup's result wins.  delete_cached_if: memcached
only, guarded by cas (a value written meanwhile stays).  sequence: through
the backup only.  With a backup, the backup's outcome is the result and memcache
errors are only logged, as in Postfix.

A MemcacheTable is not thread-safe: use one per thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence

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
        )

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

    def _item(self, key: bytes, value: str, ttl: int | None) -> tuple[bytes, int]:
        """The value's bytes and exptime; ValueTooLongError (logged) over
        data_size_limit, ConfigError for a ttl memcached cannot hold."""
        data = value.encode(_ENCODING, _ERRORS)
        if len(data) > self.config.data_size_limit:
            log.warning("database %s: data for key %s is too long (data_size_limit=%d) "
                        "-- not stored", self.spec, key.decode(_ENCODING, _ERRORS),
                        self.config.data_size_limit)
            raise ValueTooLongError(
                f"{self.spec}: value of {len(data)} bytes for key "
                f"{key.decode(_ENCODING, _ERRORS)} exceeds data_size_limit="
                f"{self.config.data_size_limit}")
        return data, wire_exptime(self.config.ttl if ttl is None else ttl)

    # -- Table -----------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        mc_key = self._key(key, "lookup")
        if mc_key is None:
            return None
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
            log.warning("%s", error)
        return self._backup_only(key, mc_key)

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """Look several keys up with one memcache round trip.

        Same per-key semantics as lookup() (skips, backup fallback and
        write-back); policyd's store worker uses it to coalesce requests.
        """
        prepared = {key: self._key(key, "lookup") for key in keys}
        wanted = [k for k in dict.fromkeys(prepared.values()) if k is not None]
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
            log.warning("%s", error)
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
                data, exptime = self._item(mc_key, value, None)
            except (ValueTooLongError, ConfigError) as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)
                continue
            write_back.append((mc_key, data, self.config.flags, exptime))
        if write_back:
            # Best effort, as in _backup_only: the lookups have their answers.
            try:
                self.wire.set_many(write_back)
            except TemporaryError as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)

    def _backup_only(self, key: str, mc_key: bytes) -> str | None:
        """Look the ORIGINAL key up in the backup; write a hit back to memcache."""
        assert self.backup is not None
        value = self.backup.lookup(key)
        if value is not None:
            # Write-back is best effort: the lookup has its answer already.
            try:
                self._store(mc_key, value, None)
            except (TemporaryError, ValueTooLongError) as exc:
                log.warning("%s: write-back to memcache failed: %s", self.spec, exc)
        return value

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        """Store key = value in memcache (with ``ttl`` or the table's ttl),
        then in the backup.  With a backup, only backup failures raise."""
        self._check_writable()
        mc_key = self._key(key, "update")
        assert mc_key is not None  # skipped updates raise
        try:
            self._store(mc_key, value, ttl)
        except (TemporaryError, ValueTooLongError) as exc:
            if self.backup is None:
                raise
            if isinstance(exc, TemporaryError):
                log.warning("%s", exc)
        if self.backup is not None:
            self.backup.update(key, value)

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
        results: list[MemtableError | None] = [None] * len(items)
        sets: list[tuple[bytes, bytes, int, int]] = []
        set_at: list[int] = []      # item index of each set
        to_backup: list[int] = []   # item indexes that go on to the backup
        flags = self.config.flags
        for i, (key, value, ttl) in enumerate(items):
            try:
                mc_key = self._key(key, "update")
                assert mc_key is not None  # skipped updates raise
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

        if sets:
            try:
                # The backup batch is written while memcached answers.
                self.wire.set_many(sets, meanwhile=write_backup if backup else None)
            except TemporaryError as exc:
                if self.backup is None:
                    for i in set_at:
                        results[i] = exc
                else:
                    log.warning("%s", exc)
        elif backup:
            write_backup()
        if failed:
            raise failed[0]
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
        try:
            deleted = self.wire.delete(mc_key)
        except TemporaryError:
            if self.backup is None:
                raise
            deleted = False
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
        self.wire.close()
        if self.pipeline.domain is not None:
            self.pipeline.domain.close()
        if self.backup is not None:
            self.backup.close()

