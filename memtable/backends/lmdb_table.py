"""The lmdb: table type, byte-compatible and lock-compatible with Postfix.

``lmdb:/path/NAME`` is the single file ``/path/NAME.lmdb`` that Postfix's
dict_lmdb/slmdb and ``postmap lmdb:`` read and write:

- LMDB opened with MDB_NOSUBDIR | MDB_NOLOCK (no ``-lock`` file), mode 0644,
  the main (unnamed) database, 16 MiB initial map like lmdb_map_size.
- Keys and values stored with one trailing NUL byte (DICT_FLAG_TRY1NULL);
  lookups and deletes try ``key\\0`` and then ``key`` (TRY0NULL) and, like
  Postfix, stick to the form that matched first.  Keys are case-folded when
  ``fold`` is true (DICT_FLAG_FOLD_FIX).  update() replaces
  (DICT_FLAG_DUP_REPLACE).
- Because of MDB_NOLOCK, every operation is serialised with a whole-file
  fcntl() (POSIX record) lock on the .lmdb file, exactly as dict_lmdb does
  (it hard-codes MYFLOCK_STYLE_FCNTL): shared around each read, exclusive
  around each write, held only for that operation, with a new LMDB
  transaction inside the lock so other processes' writes are seen.
  Waiting for the lock is bounded (LMDB_LOCK_WAIT_SECONDS) -> BackupError.
- update_many() writes a batch in ONE write transaction under ONE
  exclusive lock (same locking as update(); one commit, so one sync, for
  the whole batch): the batch is stored whole or, when the transaction
  fails, not at all.
- delete_if() reads a key's value and deletes it only when the caller's
  predicate accepts it, in ONE write transaction under ONE exclusive lock:
  no other process can write between the check and the delete.
- Commits sync the data pages, not the meta page (MDB_NOMETASYNC, see
  LmdbTable): a power loss may undo the last commit, nothing else.
- MDB_MAP_FULL: the map size doubles and the transaction is retried;
  MDB_MAP_RESIZED (another process grew the file): the new size is adopted
  and the operation retried (slmdb's recovery).

fcntl locks belong to a process, not to a file descriptor, and closing any
descriptor of the file drops them; py-lmdb also refuses to open one file
twice in a process.  So tables on the same file in one process share one
environment, one lock descriptor and one thread mutex (``_Shared``).  An
environment must not be used across fork(): open tables after forking.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TypeVar

import lmdb

from memtable import clock, limits
from memtable.backends.lmdb_check import LmdbCorrupt, check_lmdb
from memtable.errors import BackupError, CorruptError, DamagedError, MemtableError, OpenError
from memtable.table import Item, Outcome, Table, fold_case

T = TypeVar("T")

# slmdb_open(): room for the initial "drop" transaction and metadata.
_SLMDB_FUDGE = 10240


class _Shared:
    """One .lmdb file as opened by this process (see the module docstring)."""

    def __init__(self, key: tuple[int, int], fd: int, env: lmdb.Environment, writable: bool):
        self.key = key
        self.fd = fd
        self.env = env
        self.writable = writable
        self.mutex = threading.Lock()
        self.refs = 1
        # Descriptors of this file waiting to be closed: closing any of them
        # drops this process's fcntl locks, so only under the mutex.
        self.fds_to_close: list[int] = []
        # Set once LMDB reported the file damaged: no transaction is started
        # on it again (a write could trip an LMDB assertion, which aborts).
        self.corrupt: str | None = None

    def close_waiting_fds(self) -> None:
        """Close waiting descriptors; the caller holds the mutex."""
        while self.fds_to_close:
            os.close(self.fds_to_close.pop())


log = logging.getLogger(__name__)

_registry_lock = threading.Lock()
_registry: dict[tuple[int, int], _Shared] = {}


def _encode(text: str) -> bytes | None:
    """Key or value bytes, or None when Postfix could not hold it (a NUL
    byte ends a C string; lone surrogates have no bytes)."""
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None
    return None if b"\0" in data else data


# What LMDB reports when it finds its file damaged (MDB_CORRUPTED,
# MDB_PAGE_NOTFOUND, MDB_PANIC, MDB_INVALID).
_CORRUPTION = (lmdb.CorruptedError, lmdb.PageNotFoundError, lmdb.PanicError,
               lmdb.InvalidError)
CORRUPT_ADVICE = "move it away (then rebuild it from a dump or its source)"


def _problem(fd: int, size: int) -> str | None:
    """What is wrong with the LMDB file open on ``fd``, or None."""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data:
        return _check(data)


def _check(data: mmap.mmap) -> str | None:
    # Apart from _problem: the exception (and the views into ``data`` its
    # frames hold) is gone before the map is closed.
    try:
        check_lmdb(data)
    except LmdbCorrupt as exc:
        return str(exc)
    return None


def not_created(path: str) -> bool:
    """True when ``lmdb:path`` has no database yet: NAME.lmdb is missing, or
    an empty (0-byte) regular file, which LMDB initialises on its first
    read-write open as it would a new one."""
    try:
        st = os.stat(path + ".lmdb")
    except FileNotFoundError:
        return True
    except OSError:
        return False  # opening it says why
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def _decode(data: bytes) -> str:
    # Postfix copies up to the first NUL (its SCOPY macro).
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


class LmdbTable(Table):
    """``lmdb:/path/NAME`` (the file NAME.lmdb), Postfix's format and locks.

    ``lock_wait``: how long an operation waits for Postfix's fcntl lock (and
    for another thread's operation) before it fails; ``chunk_items`` and
    ``chunk_bytes``: how much sequence() reads under one lock.

    ``metasync`` false (the default) opens the file with MDB_NOMETASYNC:
    a commit syncs its data pages, and its meta page (the pointer to the
    new tree) is written but synced only by the next commit's sync.  The
    file stays consistent; a crash of the process loses nothing (the page
    cache has every commit); a power loss may undo the last commit.  The
    write-ahead guarantee this gives, and the measurement behind the
    choice, are in docs/design.md ("The write-ahead guarantee";
    bench/lmdb_commit.py).  ``metasync=True`` syncs each commit whole, as
    Postfix's dict_lmdb does.  It is a property of the environment: the
    first table of a file opened in a process decides for all.  The file's
    format does not depend on it."""

    def __init__(self, path: str, *, read_write: bool, fold: bool,
                 metasync: bool = False,
                 lock_wait: float = limits.LMDB_LOCK_WAIT_SECONDS,
                 chunk_items: int = limits.LMDB_SEQUENCE_CHUNK_ITEMS,
                 chunk_bytes: int = limits.LMDB_SEQUENCE_CHUNK_BYTES) -> None:
        self.spec = f"lmdb:{path}"
        self.metasync = metasync
        self.lock_wait = lock_wait
        self.chunk_items = chunk_items
        self.chunk_bytes = chunk_bytes
        self.path = path
        self.db_path = path + ".lmdb"
        self.read_write = read_write
        self.fold = fold
        # DICT_FLAG_TRY1NULL | DICT_FLAG_TRY0NULL until one form is seen.
        self._try1null = True
        self._try0null = True
        self._shared: _Shared | None = None
        self._shared = self._attach()

    # -- opening and closing ----------------------------------------------

    def _attach(self) -> _Shared:
        # Like Postfix, a read-write open creates a missing file (mode 0644
        # minus umask); a read-only open of a missing file is an error.
        fd, created = self._open_file()
        if created:
            self._give_to_directory_owner(fd)
        try:
            st = os.fstat(fd)
            key = (st.st_dev, st.st_ino)
        except OSError as exc:
            os.close(fd)
            raise OpenError(f"{self.spec}: stat {self.db_path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OpenError(f"{self.spec}: open database {self.db_path}: not a regular file")
        deadline = self._deadline()
        with _registry_lock:
            shared = _registry.get(key)
            if shared is None:
                try:
                    env = self._open_env(fd, st.st_size, deadline, writable=self.read_write)
                except BaseException:
                    os.close(fd)
                    raise
                shared = _registry[key] = _Shared(key, fd, env, self.read_write)
                return shared
            try:
                self._acquire_mutex(shared, deadline)
            except BackupError:
                shared.fds_to_close.append(fd)  # another thread may hold a lock
                raise
            try:
                # Closing a descriptor drops this process's fcntl locks on
                # the file; safe only because we hold the mutex.
                if self.read_write and not shared.writable:
                    self._reopen_writable(shared, fd, deadline)
                else:
                    os.close(fd)
                shared.refs += 1
            finally:
                shared.mutex.release()
            return shared

    def _open_file(self) -> tuple[int, bool]:
        """A descriptor of the .lmdb file, and whether this open created it."""
        # O_NONBLOCK: a FIFO in the file's place must not block open();
        # this descriptor only carries the fcntl locks.
        base = os.O_CLOEXEC | os.O_NONBLOCK
        try:
            if not self.read_write:
                return os.open(self.db_path, os.O_RDONLY | base), False
            try:
                # O_EXCL tells who created the file (and never follows a link).
                return os.open(self.db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | base,
                               0o644), True
            except FileExistsError:
                return os.open(self.db_path, os.O_RDWR | os.O_CREAT | base, 0o644), False
        except OSError as exc:
            raise OpenError(f"{self.spec}: open database {self.db_path}: "
                            f"{exc.strerror}") from None

    def _give_to_directory_owner(self, fd: int) -> None:
        """Run as root, a new file gets the owner and group of its directory.

        The service's state directory belongs to policyd's user (systemd's
        StateDirectory=); a root-owned file there (policyd started as root,
        ``policyd cleanup`` or ``memtable -i`` run by root) could not be
        opened by the service afterwards.  postmap, run as root, takes the
        owner of its source file for the same reason; memtable's tables have
        no source file, so the directory decides.  The new, still empty
        file is removed again when that fails."""
        if os.geteuid() != 0:
            return
        try:
            directory = os.stat(os.path.dirname(self.db_path) or ".")
            if (directory.st_uid, directory.st_gid) != (0, 0):
                # fchown() on the descriptor just created: no link is followed.
                os.fchown(fd, directory.st_uid, directory.st_gid)
        except OSError as exc:
            os.close(fd)
            with suppress(OSError):
                os.unlink(self.db_path)
            raise OpenError(f"{self.spec}: give {self.db_path} the owner of its directory: "
                            f"{exc.strerror}") from None

    def _reopen_writable(self, shared: _Shared, fd: int, deadline: float) -> None:
        """Replace a shared read-only environment by a read-write one (py-lmdb
        cannot open the file twice); on failure, go back to read-only."""
        old_fd = shared.fd
        shared.env.close()
        shared.fd = fd
        os.close(old_fd)
        try:
            shared.env = self._open_env(fd, os.fstat(fd).st_size, deadline, writable=True)
            shared.writable = True
        except (OSError, BackupError) as exc:
            shared.env = self._open_env(fd, 1, self._deadline(), writable=False)
            if isinstance(exc, OSError):
                raise BackupError(f"{self.spec}: reopen {self.db_path}: "
                                  f"{exc.strerror}") from None
            raise

    def _open_env(self, fd: int, size: int, deadline: float, *,
                  writable: bool) -> lmdb.Environment:
        # slmdb_open(): start at lmdb_map_size, or the file size plus room.
        map_size = limits.LMDB_INITIAL_MAP_BYTES
        if size > map_size - _SLMDB_FUDGE:
            map_size = min(size + _SLMDB_FUDGE, max(size, limits.LMDB_MAX_MAP_BYTES))
        # Locked while LMDB reads the meta pages: shared, so that opening
        # does not wait for a postmap rebuild; exclusive only when LMDB is
        # about to write the first meta pages of a new (empty) file.
        self._lock_fd(fd, writable and size == 0, deadline)
        try:
            return lmdb.open(self.db_path, map_size=map_size, subdir=False,
                             readonly=not writable, lock=False, max_dbs=0,
                             mode=0o644, create=writable, metasync=self.metasync)
        except lmdb.Error as exc:
            # py-lmdb's text starts with the path, which the message has already.
            text = str(exc).removeprefix(f"{self.db_path}: ")
            message = f"{self.spec}: open database {self.db_path}: {text}"
            if isinstance(exc, _CORRUPTION):
                raise CorruptError(message, self.db_path) from None
            raise OpenError(message) from None
        finally:
            self._unlock_fd(fd)

    def close(self) -> None:
        shared, self._shared = self._shared, None
        if shared is None:
            return
        with _registry_lock:
            shared.refs -= 1
            if shared.refs > 0:
                return
            del _registry[shared.key]
            # Wait for an operation of another thread to finish.  If it does
            # not, leave the file open: closing the descriptor or the
            # environment would drop that thread's fcntl lock mid-write.
            if not shared.mutex.acquire(timeout=self.lock_wait):
                log.warning("%s: busy for more than %g s at close; left open",
                            self.spec, self.lock_wait)
                return
            try:
                shared.env.close()
                shared.close_waiting_fds()
                os.close(shared.fd)
            finally:
                shared.mutex.release()

    # -- locking -------------------------------------------------------------

    def _deadline(self) -> float:
        return clock.monotonic() + self.lock_wait

    def _acquire_mutex(self, shared: _Shared, deadline: float) -> None:
        if not shared.mutex.acquire(timeout=max(0.0, deadline - clock.monotonic())):
            raise BackupError(f"{self.spec}: {self.db_path} is busy in this process for "
                              f"more than {self.lock_wait:g} s")
        # Nothing to recover if closing fails: the descriptor is gone either way.
        with suppress(OSError):
            shared.close_waiting_fds()

    def _lock_fd(self, fd: int, exclusive: bool, deadline: float) -> None:
        # Postfix waits forever (F_SETLKW); memtable polls with F_SETLK, at
        # first often (another process's commit takes about a millisecond),
        # then every LMDB_LOCK_POLL_SECONDS.  The sum of the pauses bounds
        # the wait even when the clock is frozen in tests.
        wait = self.lock_wait
        pause, paused = min(limits.LMDB_LOCK_FIRST_POLL_SECONDS, limits.LMDB_LOCK_POLL_SECONDS), 0.0
        while not self._try_lock_fd(fd, exclusive):
            if paused >= wait or clock.monotonic() >= deadline:
                kind = "exclusive" if exclusive else "shared"
                raise BackupError(f"{self.spec}: no {kind} lock on {self.db_path} within "
                                  f"{wait:g} s (another process holds it)")
            clock.sleep(pause)
            paused += pause
            pause = min(pause * 2, limits.LMDB_LOCK_POLL_SECONDS)

    def _try_lock_fd(self, fd: int, exclusive: bool) -> bool:
        """Take the fcntl lock if no other process holds a conflicting one."""
        try:
            fcntl.lockf(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            kind = "exclusive" if exclusive else "shared"
            raise BackupError(f"{self.spec}: {kind} lock on {self.db_path}: "
                              f"{exc.strerror}") from None
        return True

    def _unlock_fd(self, fd: int) -> None:
        try:
            fcntl.lockf(fd, fcntl.LOCK_UN)
        except OSError as exc:
            raise BackupError(f"{self.spec}: unlock {self.db_path}: {exc.strerror}") from None

    @contextmanager
    def _locked(self, exclusive: bool) -> Iterator[_Shared]:
        shared = self._shared
        if shared is None:
            raise BackupError(f"{self.spec}: table is closed")
        deadline = self._deadline()
        self._acquire_mutex(shared, deadline)
        try:
            self._lock_fd(shared.fd, exclusive, deadline)
            try:
                yield shared
            finally:
                self._unlock_fd(shared.fd)
        finally:
            shared.mutex.release()

    @contextmanager
    def _locked_now(self, exclusive: bool) -> Iterator[_Shared | None]:
        """_locked() without waiting: None at once (nothing held) when
        another thread of this process or another process holds the file."""
        shared = self._shared
        if shared is None:
            raise BackupError(f"{self.spec}: table is closed")
        if not shared.mutex.acquire(blocking=False):
            yield None
            return
        try:
            with suppress(OSError):
                shared.close_waiting_fds()
            if not self._try_lock_fd(shared.fd, exclusive):
                yield None
                return
            try:
                yield shared
            finally:
                self._unlock_fd(shared.fd)
        finally:
            shared.mutex.release()

    # -- transactions with slmdb's recovery ------------------------------------

    def _in_transaction(self, shared: _Shared, write: bool, what: str,
                        body: Callable[[lmdb.Transaction], T]) -> T:
        """Run body in a new transaction (committed when writing), recovering
        from MDB_MAP_RESIZED and MDB_MAP_FULL like slmdb does."""
        if shared.corrupt is not None:
            raise DamagedError(shared.corrupt, self.db_path)
        for _ in range(limits.LMDB_RETRY_LIMIT + 1):
            env = shared.env
            try:
                txn = env.begin(write=write)
            except lmdb.MapResizedError:
                self._adopt_size(env, what)
                continue
            except _CORRUPTION as exc:
                raise self._corrupt(shared, what, exc) from None
            except lmdb.Error as exc:
                raise BackupError(f"{self.spec}: {what} {self.db_path}: {exc}") from None
            try:
                result = body(txn)
                if write:
                    txn.commit()
                else:
                    txn.abort()
                return result
            except lmdb.MapResizedError:
                self._abort(txn)
                self._adopt_size(env, what)
            except lmdb.MapFullError:
                self._abort(txn)
                self._grow(env, what)
            except _CORRUPTION as exc:
                self._abort(txn)
                raise self._corrupt(shared, what, exc) from None
            except lmdb.Error as exc:
                self._abort(txn)
                raise BackupError(f"{self.spec}: {what} {self.db_path}: {exc}") from None
            except BaseException:
                self._abort(txn)
                raise
        raise BackupError(f"{self.spec}: {what} {self.db_path}: gave up after "
                          f"{limits.LMDB_RETRY_LIMIT} map size recoveries")

    @staticmethod
    def _abort(txn: lmdb.Transaction) -> None:
        # A failed commit has already finished the transaction.
        with suppress(lmdb.Error):
            txn.abort()

    def _adopt_size(self, env: lmdb.Environment, what: str) -> None:
        # Another process grew the map: take the size from the file's meta page.
        try:
            env.set_mapsize(0)
        except lmdb.Error as exc:
            raise BackupError(f"{self.spec}: {what} {self.db_path}: {exc}") from None

    def _grow(self, env: lmdb.Environment, what: str) -> None:
        current = int(env.info()["map_size"])
        if current >= limits.LMDB_MAX_MAP_BYTES:
            raise BackupError(f"{self.spec}: {what} {self.db_path}: database is full "
                              f"({current} bytes, the most memtable maps)")
        try:
            env.set_mapsize(min(current * 2, limits.LMDB_MAX_MAP_BYTES))
        except lmdb.Error as exc:
            raise BackupError(f"{self.spec}: {what} {self.db_path}: {exc}") from None

    # -- checking the file ---------------------------------------------------

    def verify(self) -> None:
        """Walk every page of the file (memtable.backends.lmdb_check) under a
        shared lock: CorruptError, naming what is wrong, when LMDB could
        abort the process or overwrite live records on it.  LMDB itself
        never reads the file here."""
        with self._locked(exclusive=False) as shared:
            try:
                size = os.fstat(shared.fd).st_size
            except OSError as exc:
                raise BackupError(f"{self.spec}: stat {self.db_path}: {exc.strerror}") from None
            if size > limits.LMDB_VERIFY_MAX_BYTES:
                log.warning("%s: %s is larger than %d bytes: not checked", self.spec,
                            self.db_path, limits.LMDB_VERIFY_MAX_BYTES)
                return
            problem = _problem(shared.fd, size) if size else None
        if problem is not None:
            raise CorruptError(f"{self.spec}: {self.db_path} is corrupt ({problem})",
                               self.db_path)

    def _corrupt(self, shared: _Shared, what: str, exc: lmdb.Error) -> DamagedError:
        """LMDB found the file damaged while working: said once as an error;
        from now on every operation on the file fails at once with the same
        message, without LMDB (until the process opens it afresh)."""
        message = (f"{self.spec}: {what} {self.db_path}: {exc}; the file is corrupt: "
                   f"{CORRUPT_ADVICE}")
        shared.corrupt = message
        log.error("%s", message)
        return DamagedError(message, self.db_path)

    # -- the Table operations ------------------------------------------------

    def _name(self, key: str) -> bytes | None:
        """The key's bytes (folded when asked), or None if no record can
        have it (NUL byte, over LMDB's key size limit with the NUL)."""
        name = _encode(fold_case(key) if self.fold else key)
        shared = self._shared
        if name is None or shared is None:
            return name
        if len(name) + 1 > shared.env.max_key_size():
            return None
        return name

    def lookup(self, key: str) -> str | None:
        name = self._name(key)
        if name is None:
            if self._shared is None:
                raise BackupError(f"{self.spec}: table is closed")
            return None

        def get(txn: lmdb.Transaction) -> bytes | None:
            if self._try1null:
                value = txn.get(name + b"\0")
                if value is not None:
                    self._try0null = False
                    return bytes(value)
            if self._try0null and name:
                value = txn.get(name)
                if value is not None:
                    self._try1null = False
                    return bytes(value)
            return None

        with self._locked(exclusive=False) as shared:
            value = self._in_transaction(shared, False, "read", get)
        return None if value is None else _decode(value)

    def lookup_many(self, keys: Sequence[str]) -> dict[str, str | None]:
        """lookup() for each key, in ONE read transaction under ONE shared
        lock: {key: value or None}."""
        found = self._lookup_many(keys, wait=True)
        assert found is not None  # waiting, it answers or raises
        return found

    def lookup_many_now(self, keys: Sequence[str]) -> dict[str, str | None] | None:
        """lookup_many(), or None at once when another thread of this
        process (a commit) or another process (an exclusive lock) holds
        the file: a read that never waits, for an event loop."""
        return self._lookup_many(keys, wait=False)

    def _lookup_many(self, keys: Sequence[str], *,
                     wait: bool) -> dict[str, str | None] | None:
        names = {key: self._name(key) for key in keys}
        if self._shared is None:
            raise BackupError(f"{self.spec}: table is closed")
        wanted = [name for name in names.values() if name is not None]
        if not wanted:
            return dict.fromkeys(names)

        def get_all(txn: lmdb.Transaction) -> dict[bytes, bytes]:
            found: dict[bytes, bytes] = {}
            for name in wanted:
                # lookup()'s TRY1NULL / TRY0NULL order, sticking to the
                # form that matched first.
                if self._try1null:
                    value = txn.get(name + b"\0")
                    if value is not None:
                        self._try0null = False
                        found[name] = bytes(value)
                        continue
                if self._try0null and name:
                    value = txn.get(name)
                    if value is not None:
                        self._try1null = False
                        found[name] = bytes(value)
            return found

        with (self._locked(exclusive=False) if wait
              else self._locked_now(exclusive=False)) as shared:
            if shared is None:
                return None
            found = self._in_transaction(shared, False, "read", get_all)
        results: dict[str, str | None] = {}
        for key, name in names.items():
            data = None if name is None else found.get(name)
            results[key] = None if data is None else _decode(data)
        return results

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        """Store key = value (replacing); ttl means nothing to lmdb."""
        self._check_writable()
        name = self._name(key)
        data = _encode(value)
        if name is None or data is None:
            raise BackupError(f'{self.spec}: cannot store "{key}": a key or value with a '
                              "NUL byte, or a key longer than LMDB allows")
        # Undecided: Linux Postfix appends the NUL (no LMDB_NO_TRAILING_NULL).
        if self._try1null and self._try0null:
            self._try0null = False
        if self._try1null:
            name += b"\0"
            data += b"\0"

        def put(txn: lmdb.Transaction) -> None:
            txn.put(name, data, overwrite=True)

        with self._locked(exclusive=True) as shared:
            self._in_transaction(shared, True, "update", put)

    def update_many(self, items: Sequence[Item]) -> list[MemtableError | None]:
        """Store several (key, value, ttl) items, in order (a later item of
        the same key wins), in ONE transaction under ONE exclusive lock.

        Returns one entry per item: None when stored, or the BackupError
        update() would raise for that item alone (a key or value lmdb cannot
        hold); such items are left out and the rest is stored.  A failure of
        the transaction itself (lock, lmdb error, closed table) raises
        BackupError and stores nothing.  ttl means nothing to lmdb.
        """
        self._check_writable()
        results: list[MemtableError | None] = []
        pairs: list[tuple[bytes, bytes]] = []
        for key, value, _ttl in items:
            name = self._name(key)
            data = _encode(value)
            if name is None or data is None:
                results.append(BackupError(
                    f'{self.spec}: cannot store "{key}": a key or value with a '
                    "NUL byte, or a key longer than LMDB allows"))
                continue
            results.append(None)
            pairs.append((name, data))
        if not pairs:
            return results
        # The same trailing-NUL decision as update().
        if self._try1null and self._try0null:
            self._try0null = False
        if self._try1null:
            pairs = [(name + b"\0", data + b"\0") for name, data in pairs]

        def put_all(txn: lmdb.Transaction) -> None:
            for name, data in pairs:
                txn.put(name, data, overwrite=True)

        with self._locked(exclusive=True) as shared:
            self._in_transaction(shared, True, "update", put_all)
        return results

    def delete(self, key: str) -> bool:
        self._check_writable()
        name = self._name(key)
        if name is None:
            if self._shared is None:
                raise BackupError(f"{self.spec}: table is closed")
            return False

        def remove(txn: lmdb.Transaction) -> bool:
            if self._try1null and txn.delete(name + b"\0"):
                self._try0null = False
                return True
            if self._try0null and name and txn.delete(name):
                self._try1null = False
                return True
            return False

        with self._locked(exclusive=True) as shared:
            return self._in_transaction(shared, True, "delete", remove)

    def delete_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
        """Remove key when ``deletable(value)`` is true of its value, read and
        removed in ONE write transaction under ONE exclusive lock, so that
        no writer (policyd, Postfix, postmap) can store a new value between
        the check and the delete.  ``deletable`` runs under the lock: keep it
        quick and free of I/O."""
        self._check_writable()
        name = self._name(key)
        if name is None:
            if self._shared is None:
                raise BackupError(f"{self.spec}: table is closed")
            return Outcome.ABSENT

        def remove(txn: lmdb.Transaction) -> Outcome:
            # lookup()'s TRY1NULL / TRY0NULL order, sticking to the form found.
            stored, raw = name, None
            if self._try1null:
                stored = name + b"\0"
                raw = txn.get(stored)
                if raw is not None:
                    self._try0null = False
            if raw is None and self._try0null and name:
                stored = name
                raw = txn.get(stored)
                if raw is not None:
                    self._try1null = False
            if raw is None:
                return Outcome.ABSENT
            if not deletable(_decode(bytes(raw))):
                return Outcome.KEPT
            txn.delete(stored)
            return Outcome.DELETED

        with self._locked(exclusive=True) as shared:
            return self._in_transaction(shared, True, "delete", remove)

    def sequence(self) -> Iterator[tuple[str, str]]:
        """Every (key, value), in key order, NULs stripped.

        Read in chunks (chunk_items / chunk_bytes), each under its
        own shared lock and transaction, and never holding the lock while the
        caller works: memory stays bounded and writers are not starved.  Like
        Postfix's first/next, the walk is not one snapshot; it resumes after
        the last key seen, so entries added or removed meanwhile may or may
        not appear, but no key appears twice.
        """
        after: bytes | None = None
        while True:
            with self._locked(exclusive=False) as shared:
                chunk, more = self._in_transaction(
                    shared, False, "read", functools.partial(self._chunk, after=after))
            for raw_key, raw_value in chunk:
                yield _decode(raw_key), _decode(raw_value)
            if not more or not chunk:
                return
            after = chunk[-1][0]

    def _chunk(self, txn: lmdb.Transaction, *, after: bytes | None
               ) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Up to a chunk of entries after key ``after``; True when cut short."""
        out: list[tuple[bytes, bytes]] = []
        size = 0
        with txn.cursor() as cursor:
            found = cursor.first() if after is None else cursor.set_range(after)
            if found and after is not None and cursor.key() == after:
                found = cursor.next()
            while found:
                key, value = bytes(cursor.key()), bytes(cursor.value())
                out.append((key, value))
                size += len(key) + len(value)
                if len(out) >= self.chunk_items or size >= self.chunk_bytes:
                    return out, True
                found = cursor.next()
        return out, False
