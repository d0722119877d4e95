"""memtable: Postfix's memcache_table(5), exactly, in Python.

    from memtable import open_table
    with open_table("memcache:/etc/postfix/verify.cf", read_write=True) as t:
        t.update("user@example.com", "value")        # table ttl
        t.update("user@example.com", "value", ttl=90 * 86400)
        t.lookup("user@example.com")                  # str or None
        t.delete("user@example.com")                  # bool

Temporary failures raise TemporaryError; "not found" is None.
"""

from memtable.errors import (
    AccessError,
    BackupError,
    ConfigError,
    CorruptError,
    DamagedError,
    KeySkippedError,
    MemtableError,
    OpenError,
    ProtocolError,
    SequenceUnsupportedError,
    ServerUnavailableError,
    TemporaryError,
    UnsupportedTableError,
    ValueTooLongError,
)
from memtable.registry import open_table
from memtable.table import Table

__all__ = [
    "AccessError",
    "BackupError",
    "ConfigError",
    "CorruptError",
    "DamagedError",
    "KeySkippedError",
    "MemtableError",
    "OpenError",
    "ProtocolError",
    "SequenceUnsupportedError",
    "ServerUnavailableError",
    "Table",
    "TemporaryError",
    "UnsupportedTableError",
    "ValueTooLongError",
    "open_table",
]
