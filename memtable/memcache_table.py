"""memcache: tables with Postfix's dict_memcache semantics.

lookup: memcache first; on a miss (or a memcache error) with a backup, the
ORIGINAL key is looked up in the backup and a hit is written back to
memcache with the table's ttl and flags.  update: memcache first, then the
backup.  delete: both, the backup's result wins.  sequence: through the
backup only.  With a backup, the backup's outcome is the result and memcache
errors are only logged, as in Postfix.

A MemcacheTable is not thread-safe: use one per thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from memtable.config import MemcacheConfig
from memtable.errors import (
    KeySkippedError,
    SequenceUnsupportedError,
    TemporaryError,
    ValueTooLongError,
)
from memtable.keys import KeyPipeline
from memtable.table import Table
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

    def _key(self, name: str, operation: str, loud: bool) -> bytes | None:
        prepared = self.pipeline.prepare(name, self.fold)
        if prepared.key is None:
            level = logging.WARNING if loud else logging.DEBUG
            log.log(level, '%s: skipping %s for name "%s": %s',
                    self.config.path, operation, name, prepared.skip_reason)
            return None
        return prepared.key

    def _store(self, key: bytes, value: str, ttl: int | None) -> None:
        """Write to memcache; raises TemporaryError or ValueTooLongError."""
        data = value.encode(_ENCODING, _ERRORS)
        if len(data) > self.config.data_size_limit:
            log.warning("database %s: data for key %s is too long (data_size_limit=%d) "
                        "-- not stored", self.spec, key.decode(_ENCODING, _ERRORS),
                        self.config.data_size_limit)
            raise ValueTooLongError(
                f"{self.spec}: value of {len(data)} bytes for key "
                f"{key.decode(_ENCODING, _ERRORS)} exceeds data_size_limit="
                f"{self.config.data_size_limit}")
        exptime = wire_exptime(self.config.ttl if ttl is None else ttl)
        self.wire.set(key, data, flags=self.config.flags, exptime=exptime)

    # -- Table -----------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        mc_key = self._key(key, "lookup", loud=False)
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
        prepared = {key: self._key(key, "lookup", loud=False) for key in keys}
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
        for key, mc_key in prepared.items():
            if mc_key is None:
                results[key] = None
            elif mc_key in hits:
                results[key] = hits[mc_key][1].decode(_ENCODING, _ERRORS)
            elif self.backup is not None:
                results[key] = self._backup_only(key, mc_key)
            else:
                results[key] = None
        return results

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
        mc_key = self._key(key, "update", loud=True)
        if mc_key is None:
            raise KeySkippedError(key, self.pipeline.prepare(key, self.fold).skip_reason or "")
        try:
            self._store(mc_key, value, ttl)
        except (TemporaryError, ValueTooLongError) as exc:
            if self.backup is None:
                raise
            if isinstance(exc, TemporaryError):
                log.warning("%s", exc)
        if self.backup is not None:
            self.backup.update(key, value)

    def delete(self, key: str) -> bool:
        self._check_writable()
        mc_key = self._key(key, "delete", loud=False)
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

    def sequence(self) -> Iterator[tuple[str, str]]:
        if self.backup is None:
            log.warning("database %s: first/next support requires backup database", self.spec)
            raise SequenceUnsupportedError(
                f"{self.spec}: first/next support requires backup database")
        return self.backup.sequence()

    def close(self) -> None:
        self.wire.close()
        if self.pipeline.domain is not None:
            self.pipeline.domain.close()
        if self.backup is not None:
            self.backup.close()

