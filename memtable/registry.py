"""Open any table memtable supports from a Postfix ``type:name`` string.

``memcache:/path/file.cf`` is memtable's own; lmdb:, inline:, static: and
texthash: come from memtable.backends.  Postfix's rules on how a table may
be opened live here: read-only versus read-write, and the refusal to serve
security-sensitive data from memcache (anyone who can reach memcached can
write it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from memtable.config import MemcacheConfig
from memtable.errors import AccessError, ConfigError, UnsupportedTableError
from memtable.limits import MAX_TABLE_NESTING
from memtable.table import AsyncTable, EmptyTable, Table
from memtable.wire import MemcacheWire


def split_spec(spec: str) -> tuple[str, str]:
    """``type:name`` -> (type, name); a bare name is an error (no default type)."""
    type_, sep, name = spec.strip().partition(":")
    if not sep or not type_ or not name:
        raise UnsupportedTableError(
            f'"{spec}": expected type:name, e.g. memcache:/etc/postfix/cache.cf or lmdb:/path')
    return type_.lower(), name


def open_table(spec: str, *, read_write: bool = False, fold: bool = True,
               security_sensitive: bool = False, missing_empty: bool = False,
               wire: Callable[..., MemcacheWire] = MemcacheWire, _depth: int = 0) -> Table:
    """Open ``spec`` (``memcache:/path.cf``, ``lmdb:/path``, ...).

    ``read_write`` is Postfix's O_RDWR (needed for update and delete);
    ``fold`` is DICT_FLAG_FOLD_FIX (keys to lower case, postmap's default);
    ``security_sensitive`` is DICT_FLAG_NO_UNAUTH (alias_maps,
    virtual_*_maps ...), which memcache tables refuse.  ``missing_empty``:
    a read-only open of an lmdb file that does not exist yet (a read-write
    open creates it), here or as a memcache table's backup, gives an empty
    table instead of Postfix's "open database ...: No such file or directory".
    ``wire``: what a memcache table's connection is built with (tests run
    the same tables on the asyncio driver this way).
    """
    if _depth > MAX_TABLE_NESTING:
        raise ConfigError(f'"{spec}": tables nested more than {MAX_TABLE_NESTING} deep')
    type_, name = split_spec(spec)
    if type_ == "memcache":
        if security_sensitive:
            raise AccessError(f"memcache:{name} map is not allowed for security-sensitive data")
        return _open_memcache(name, read_write=read_write, fold=fold, depth=_depth,
                              missing_empty=missing_empty, wire=wire)
    from memtable.backends import open_backend
    from memtable.backends.lmdb_table import not_created

    if (missing_empty and not read_write and type_ == "lmdb" and not_created(name)
            and os.path.isdir(os.path.dirname(name) or ".")):
        return EmptyTable(f"{type_}:{name}", fold=fold)

    return open_backend(type_, name, read_write=read_write, fold=fold)


def _open_memcache(path: str, *, read_write: bool, fold: bool, depth: int,
                   missing_empty: bool, wire: Callable[..., MemcacheWire]) -> Table:
    from memtable.domainlist import DomainFilter
    from memtable.keys import KeyFormat, KeyPipeline
    from memtable.memcache_table import MemcacheTable, new_wire

    config = MemcacheConfig.from_file(path)

    def open_lookup(inner: str) -> Table:
        return open_table(inner, read_write=False, fold=True, wire=wire, _depth=depth + 1)

    domain = DomainFilter.build(config.domain, open_lookup)
    pipeline = KeyPipeline(KeyFormat.compile(config.key_format), config.key_digest, domain)
    backup = None
    if config.backup:
        try:
            backup = open_table(config.backup, read_write=read_write, fold=fold,
                                missing_empty=missing_empty, wire=wire, _depth=depth + 1)
        except ConfigError as exc:
            # Keep the class (UnsupportedTableError stays one) and name this file.
            raise type(exc)(f"backup = {config.backup}: {exc}", path) from None
    return MemcacheTable(config, read_write=read_write, fold=fold, pipeline=pipeline,
                         backup=backup,
                         wire=new_wire(config, backup.spec if backup is not None else None,
                                       wire))


def as_async(table: Table) -> AsyncTable:
    """``table``, opened (and verified) by open_table, for an event loop.

    A memcache table becomes an AsyncMemcacheTable with the same
    configuration, key pipeline and backup (the backup on a ThreadedTable
    of its own) and a new AsyncMemcacheWire: memcached is spoken to on the
    loop.  Any other table runs on a ThreadedTable.  The blocking table
    must not be used afterwards (its backup and domain list are the async
    table's now); close the async one.
    """
    from memtable.amemcache_table import AsyncMemcacheTable
    from memtable.committer import ThreadedTable
    from memtable.memcache_table import MemcacheTable

    if isinstance(table, MemcacheTable):
        table.wire.close()  # never used again: the new table has its own
        return AsyncMemcacheTable(
            table.config, read_write=table.read_write, fold=table.fold,
            pipeline=table.pipeline,
            backup=ThreadedTable(table.backup) if table.backup is not None else None)
    return ThreadedTable(table)
