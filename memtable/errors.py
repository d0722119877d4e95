"""The single exception hierarchy of memtable (and the stores policyd builds on it).

Every exception that memtable raises derives from MemtableError.  The split
that matters to callers is Postfix's: a *temporary* failure (DICT_ERR_RETRY:
try again later) is never confused with "not found" (a plain None result).
"""

from __future__ import annotations

from memtable.limits import MESSAGE_QUOTE_MAX_CHARS


def clip(text: str, limit: int = MESSAGE_QUOTE_MAX_CHARS) -> str:
    """``text`` as a message quotes it: at most ``limit`` characters, with
    how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


class MemtableError(Exception):
    """Root of every error raised by memtable."""


class ConfigError(MemtableError):
    """Raised when a table configuration is invalid (fatal in Postfix).

    ``path`` and ``line`` name the offending place when it is known, and
    ``str(err)`` reads ``FILE, line N: message`` like Postfix's diagnostics.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"{path}, line {line}: " if line is not None else f"{path}: "
        super().__init__(where + message)


class UnsupportedTableError(ConfigError):
    """Raised when a ``type:name`` table names a type memtable cannot open."""


class OpenError(MemtableError):
    """Raised when a table's file cannot be opened: missing (read-only
    open), no permission, not a database.  Fatal in Postfix too
    ("open database ..."), so the memtable command exits 1, not 75."""


class CorruptError(OpenError):
    """Raised by verify() when a table's file is damaged (LMDB would abort
    the process or overwrite live data on it): the file, ``path``, must be
    moved away and rebuilt."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


class AccessError(MemtableError):
    """Raised when an operation is not allowed on a table.

    Examples: update/delete on a table opened read-only, or opening a
    memcache table for security-sensitive data (Postfix's DICT_FLAG_NO_UNAUTH).
    """


class SequenceUnsupportedError(MemtableError):
    """Raised by sequence() on a memcache table without a backup table."""


class KeySkippedError(MemtableError):
    """Raised by update() when the key is skipped (Postfix warns and fails).

    Lookups of such keys silently return None and deletes return False; only
    updates lose information, so only updates raise.  ``reason`` is Postfix's
    wording ("empty lookup key", "domain mismatch", ...).
    """

    def __init__(self, key: str, reason: str):
        self.key = key
        self.reason = reason
        super().__init__(f'skipping update for name "{clip(key)}": {reason}')


class ValueTooLongError(MemtableError):
    """Raised by update() when the value exceeds data_size_limit and there is
    no backup table to keep it (Postfix warns and does not store it)."""


class TemporaryError(MemtableError):
    """Raised when a table cannot answer now (Postfix's DICT_ERR_RETRY).

    The caller should try again later; nothing is known about the key.
    """


class ServerUnavailableError(TemporaryError):
    """Raised when memcached refused the connection, timed out or went away
    on every one of max_try attempts."""


class ProtocolError(TemporaryError):
    """Raised when memcached's reply broke the protocol or a limit
    (line_size_limit, data_size_limit, garbage, trailing data) on every
    attempt.  The connection is always dropped first."""


class BackupError(TemporaryError):
    """Raised when the backup table (lmdb file, ...) fails an operation."""


class DamagedError(BackupError, CorruptError):
    """Raised when LMDB finds a table's file damaged while working (its
    MDB_CORRUPTED, ...), after it was opened.  A BackupError to the table's
    users (policyd answers its failure_action; a memcache table still
    has memcached) and a CorruptError: the damage stays until the file is
    rebuilt, so the memtable command exits 1, not 75 (temporary failure)."""
