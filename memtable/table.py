"""The Table interface every memtable table type implements.

It mirrors Postfix's DICT operations: lookup, update, delete and sequence
(first/next as an iterator).  ``None`` from lookup() means "not found";
failures that mean "try again later" raise TemporaryError subclasses, so the
two are never confused.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from memtable.errors import AccessError, MemtableError, SequenceUnsupportedError

#: One update of a batch: (key, value, ttl); ttl None is the table's own.
Item = tuple[str, str, int | None]

_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_case(text: str, utf8: bool = True) -> str:
    """Postfix's casefold(), applied to keys by every table opened with
    ``fold`` and to domains by the domain list: full Unicode case folding
    when SMTPUTF8 support is on (the default since compatibility_level 1),
    else ASCII-only."""
    if utf8:
        return text.casefold()
    return text.translate(_ASCII_LOWER)


class Outcome(enum.Enum):
    """What a conditional delete (delete_if) found and did."""

    DELETED = "deleted"  # the value was one the caller gave up: now gone
    KEPT = "kept"  # another value is stored (written meanwhile): left alone
    ABSENT = "absent"  # nothing is stored under the key


class Table(abc.ABC):
    """A Postfix lookup table opened by memtable."""

    #: The ``type:name`` this table was opened from.
    spec: str
    #: True when opened for update/delete (Postfix's O_RDWR).
    read_write: bool
    #: Fold keys to lower case before use (Postfix's DICT_FLAG_FOLD_FIX,
    #: which postmap sets unless run with -f).
    fold: bool

    @abc.abstractmethod
    def lookup(self, key: str) -> str | None:
        """The value for key, or None when not found."""

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        """Store key = value.  ``ttl`` (seconds) only means something to
        tables that expire entries; others ignore it."""
        raise AccessError(f"{self.spec}: table does not support update")

    def delete(self, key: str) -> bool:
        """Remove key; True when it was there."""
        raise AccessError(f"{self.spec}: table does not support delete")

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """lookup() of each key: {key: value or None}.  Types that can
        do better (one round trip, one transaction) override it; a failure
        that is not one key's raises, as lookup() does."""
        return {key: self.lookup(key) for key in dict.fromkeys(keys)}

    def lookup_many_now(self, keys: Sequence[str]) -> dict[str, str | None] | None:
        """lookup_many() if it can answer without waiting for anybody (a
        lock held by another thread or process), else None.  An event loop
        calls it before handing the lookup to a thread (ThreadedTable).
        Types whose lookups may block have no such answer."""
        return None

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        """update() of each (key, value, ttl) item, in order: one entry per
        item, None when stored, else the MemtableError update() raised for
        that item.  Types that can do better (one pipelined round trip, one
        transaction: one sync) override it."""
        self._check_writable()
        results: list[MemtableError | None] = []
        for key, value, ttl in items:
            try:
                self.update(key, value, ttl)
            except MemtableError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results

    def delete_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
        """Remove key only while its value is one ``deletable(value)`` accepts,
        checked and removed in one step, so that a value another process
        writes meanwhile is never removed.  Only types that can do it
        atomically have it (lmdb: one exclusive transaction)."""
        raise AccessError(f"{self.spec}: table does not support a conditional delete")

    def sequence(self) -> Iterator[tuple[str, str]]:
        """Every (key, value) pair, in the table's order."""
        raise SequenceUnsupportedError(f"{self.spec}: table does not support sequence")

    def verify(self) -> None:  # noqa: B027 - optional hook
        """Check the table's files, reading them whole: CorruptError when
        one is damaged.  Types without files have nothing to check."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and connections."""

    def __enter__(self) -> Table:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_writable(self) -> None:
        if not self.read_write:
            raise AccessError(f"{self.spec}: table is opened read-only")


class EmptyTable(Table):
    """A read-only table with nothing in it: an lmdb file that a read-write
    open would create, seen by a read-only open that asked for it (see
    memtable.registry.open_table's ``missing_empty``)."""

    def __init__(self, spec: str, *, fold: bool = True) -> None:
        self.spec = spec
        self.read_write = False
        self.fold = fold

    def lookup(self, key: str) -> str | None:
        return None

    def sequence(self) -> Iterator[tuple[str, str]]:
        return iter(())


class AsyncTable(abc.ABC):
    """A Table for an asyncio event loop: the batch operations, awaited.

    policyd's stores use it; nothing here blocks the loop (memcached is
    spoken to on the loop, files are written by a thread of the table's
    own, see memtable.committer).  The semantics are Table's.
    """

    #: The ``type:name`` this table was opened from.
    spec: str

    @abc.abstractmethod
    async def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """Table.lookup_many, awaited."""

    @abc.abstractmethod
    async def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        """Table.update_many, awaited: done when every item is stored
        (written to memcached and committed to the backup, synced)."""

    async def delete(self, key: str) -> bool:
        """Table.delete, awaited."""
        raise AccessError(f"{self.spec}: table does not support delete")

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish what was asked, release files and connections."""
