"""Table types other than memcache: what ``backup =`` and ``domain =`` may name.

open_backend() maps a Postfix ``type:name`` (already split) to one of:

- ``lmdb:/path/NAME``  -- the file NAME.lmdb, shared with postmap and Postfix
  daemons (same bytes, same fcntl locks); read-write capable.
- ``inline:{k=v, ...}``, ``static:value``, ``texthash:/path`` -- read-only,
  parsed at open with Postfix's syntax.

memcache: itself is opened by memtable.registry, not here.  Every other
Postfix type is refused with advice (hash/btree/dbm/cdb... files: convert
with ``postmap lmdb:FILE``; proxy: memtable reads the file directly).
"""

from __future__ import annotations

from memtable.backends.inline import InlineTable, StaticTable
from memtable.backends.lmdb_table import LmdbTable
from memtable.backends.texthash import TexthashTable
from memtable.errors import UnsupportedTableError
from memtable.table import Table

__all__ = ["InlineTable", "LmdbTable", "StaticTable", "TexthashTable", "open_backend"]

SUPPORTED_TYPES = ("memcache", "lmdb", "inline", "static", "texthash")

# Postfix's indexed-file types: the same source file works with postmap lmdb:.
_FILE_TYPES = frozenset({"hash", "btree", "dbm", "sdbm", "cdb"})


def open_backend(type_: str, name: str, *, read_write: bool, fold: bool) -> Table:
    """Open ``type_:name`` (not memcache).

    Raises UnsupportedTableError for a type memtable does not implement,
    AccessError when read_write is asked of inline: or texthash: (Postfix's
    "map requires O_RDONLY access mode"), ConfigError for bad syntax or an
    unreadable texthash file, BackupError when an lmdb file cannot be opened.
    """
    kind = type_.lower()
    if kind == "lmdb":
        return LmdbTable(name, read_write=read_write, fold=fold)
    if kind == "inline":
        return InlineTable(name, read_write=read_write, fold=fold)
    if kind == "static":
        return StaticTable(name, read_write=read_write, fold=fold)
    if kind == "texthash":
        return TexthashTable(name, read_write=read_write, fold=fold)
    supported = ", ".join(f"{t}:" for t in SUPPORTED_TYPES)
    spec = f"{type_}:{name}"
    if kind == "memcache":
        raise UnsupportedTableError(
            f'"{spec}": memcache tables are opened by memtable.open_table(), not here')
    if kind == "proxy":
        raise UnsupportedTableError(
            f'"{spec}": memtable does not use proxymap(8); it opens table files itself '
            f"with Postfix's locking -- write {name} instead (supported types: {supported})")
    if kind in _FILE_TYPES:
        raise UnsupportedTableError(
            f'"{spec}": table type {type_} is not supported by memtable; convert the '
            f'source file with "postmap lmdb:{name}" and use lmdb:{name} '
            f"(supported types: {supported})")
    raise UnsupportedTableError(
        f'"{spec}": table type {type_} is not supported by memtable '
        f"(supported types: {supported})")
