"""The texthash: table type (Postfix's dict_thash.c).

``texthash:/path`` reads a postmap(1) source file -- ``key whitespace
value`` lines, comments, continuation lines -- into memory when the table is
opened, and never looks at the file again.  Bad lines are skipped with
Postfix's warnings; a repeated key keeps its first value (postmap's
DICT_FLAG_DUP_WARN).  The file size is bounded by LOOKUP_FILE_MAX_BYTES.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from memtable import clock, limits
from memtable.errors import AccessError, ConfigError
from memtable.files import read_regular_file
from memtable.syntax import parse_key_value, readllines
from memtable.table import Table, fold_case

log = logging.getLogger("memtable.backends")


class TexthashTable(Table):
    """``texthash:/path``: read-only, loaded at open (at most ``max_bytes``
    of file); supports sequence()."""

    def __init__(self, path: str, *, read_write: bool, fold: bool,
                 max_bytes: int = limits.LOOKUP_FILE_MAX_BYTES) -> None:
        self.spec = f"texthash:{path}"
        self.max_bytes = max_bytes
        self.path = path
        self.read_write = read_write
        self.fold = fold
        if read_write:
            # dict_thash_open() refuses anything but O_RDONLY.
            raise AccessError(f"{self.spec} map requires O_RDONLY access mode")
        self._entries = self._load()

    def _key(self, key: str) -> str:
        return fold_case(key) if self.fold else key

    def _load(self) -> dict[str, str]:
        # Postfix re-reads a file that changed while (or just before) it was
        # read, so that a file being written is not taken half-done.
        entries: dict[str, str] = {}
        for _ in range(limits.TEXTHASH_HOT_RETRIES + 1):
            before = int(clock.now())
            data, mtime = self._read()
            entries = self._parse(data)
            after = int(clock.now())
            if mtime < before - 1 or mtime > after:
                return entries
            clock.sleep(limits.TEXTHASH_HOT_PAUSE_SECONDS)
        log.warning("%s: file keeps changing; using what was read last", self.path)
        return entries

    def _read(self) -> tuple[bytes, int]:
        limit = self.max_bytes
        try:
            data, st = read_regular_file(self.path, limit)
        except OSError as exc:
            raise ConfigError(f"open database {self.path}: {exc.strerror}") from None
        if len(data) > limit:
            raise ConfigError(f"{self.spec}: file is larger than {limit} bytes")
        return data, int(st.st_mtime)

    def _parse(self, data: bytes) -> dict[str, str]:
        entries: dict[str, str] = {}
        path = self.path
        for line in readllines(data, path):
            record = parse_key_value(line, path, missing_note=" -- ignoring this line")
            if record is None:
                continue
            key, value = record
            folded = self._key(key)
            if folded in entries:
                log.warning('%s, line %d: duplicate entry: "%s"', path, line.first, key)
                continue
            entries[folded] = value
        return entries

    def lookup(self, key: str) -> str | None:
        return self._entries.get(self._key(key))

    def sequence(self) -> Iterator[tuple[str, str]]:
        # Postfix walks its hash table; memtable keeps the file's order.
        yield from list(self._entries.items())
