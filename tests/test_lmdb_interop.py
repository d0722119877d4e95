"""lmdb: tables against real Postfix: same bytes, same locks, same growth.

``postmap`` (Debian's Postfix with postfix-lmdb) is the oracle: files written
by LmdbTable are read by ``postmap -q/-s``, files written by ``postmap`` are
read by LmdbTable, and both sides write the same file at the same time.

Facts these tests pin down (read from dict_lmdb.c/slmdb.c, seen with strace):
Postfix locks lmdb files with whole-file fcntl() locks (dict_lmdb hard-codes
MYFLOCK_STYLE_FCNTL, whatever INTERNAL_LOCK says): shared around each lookup
and each sequence step, exclusive around each update/delete (postmap -q/-s/-d
and the daemons).  ``postmap lmdb:FILE`` (bulk create) takes the exclusive
lock, downgrades it to shared and holds it until it commits.  ``postmap -i``
takes NO lock at all (mkmap_open clears the per-table lock), so it is not a
safe concurrent writer; postmap -d is used for that below.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import select
import struct
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from memtable import limits
from memtable.backends import LmdbTable
from memtable.errors import AccessError, BackupError, OpenError
from memtable.table import Outcome
from tests.policyd_proc import PolicydProcess
from tests.postfixlab import POSTMAP, run_postmap
from tests.wait import WAIT

pytestmark = pytest.mark.postfix

REPO = Path(__file__).resolve().parent.parent


def pm_seq(cfg: Path, path: Path) -> list[tuple[str, str]]:
    res = run_postmap(cfg, "-s", f"lmdb:{path}")
    assert res.returncode == 0, res.stderr
    return [tuple(line.split("\t", 1)) for line in res.stdout.decode().splitlines()]  # type: ignore[misc]


def pm_get(cfg: Path, key: str, path: Path, *flags: str) -> str | None:
    res = run_postmap(cfg, *flags, "-q", key, f"lmdb:{path}")
    assert res.returncode in (0, 1) and b"fatal" not in res.stderr, res.stderr
    return res.stdout.decode().removesuffix("\n") if res.returncode == 0 else None


def pm_create(cfg: Path, path: Path, text: str) -> None:
    path.write_text(text)
    res = run_postmap(cfg, f"lmdb:{path}")
    assert res.returncode == 0, res.stderr


def raw_items(path: Path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path) + ".lmdb", subdir=False, lock=False, readonly=True)
    try:
        with env.begin() as txn:
            return [(bytes(k), bytes(v)) for k, v in txn.cursor()]
    finally:
        env.close()


@contextlib.contextmanager
def opened(path: Path, *, read_write: bool = True, fold: bool = True,
           **bounds: Any) -> Iterator[LmdbTable]:
    """The table; ``bounds``: LmdbTable's lock_wait, chunk_items, chunk_bytes."""
    table = LmdbTable(str(path), read_write=read_write, fold=fold, **bounds)
    try:
        yield table
    finally:
        table.close()


def readline(proc: subprocess.Popen[bytes], timeout: float = WAIT) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "helper process did not answer"
    return proc.stdout.readline()


LOCKER = textwrap.dedent("""
    import fcntl, os, sys
    path, how = sys.argv[1], sys.argv[2]
    fd = os.open(path, os.O_RDWR)
    if how == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX if how == "fcntl-ex" else fcntl.LOCK_SH)
    print("locked", flush=True)
    sys.stdin.read()
""")


@contextlib.contextmanager
def lock_held(db_file: Path, how: str) -> Iterator[None]:
    """Another process holds a lock on db_file (fcntl-ex, fcntl-sh, flock)."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db_file), how],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert readline(proc) == b"locked\n"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=WAIT)


def fcntl_holder(db_file: Path) -> int:
    """The lock type another process holds on db_file (F_UNLCK if none)."""
    fd = os.open(db_file, os.O_RDONLY)
    try:
        probe = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
        return int(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0])
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# Same bytes
# ---------------------------------------------------------------------------

def test_file_written_by_memtable_is_read_by_postmap(postmap_config: Path,
                                                     tmp_path: Path) -> None:
    db = tmp_path / "db"
    pairs = {"Alice@Example.COM": "OK", "b": "value with  spaces\tand tab",
             "Straße": "ünïcode", "key:with:colons": "1;2;3;4;5", "z": ""}
    with opened(db) as table:
        for key, value in pairs.items():
            table.update(key, value)
        table.update("b", "replaced")  # DICT_FLAG_DUP_REPLACE
        pairs["b"] = "replaced"
    assert (tmp_path / "db.lmdb").stat().st_mode & 0o777 == 0o644 & ~_umask()
    assert not list(tmp_path.glob("db.lmdb-lock"))  # MDB_NOLOCK: no lock file
    # Stored folded (postmap's default), each with one trailing NUL.
    assert sorted(raw_items(db)) == sorted(
        (k.casefold().encode() + b"\0", v.encode() + b"\0") for k, v in pairs.items())
    for key, value in pairs.items():
        assert pm_get(postmap_config, key.upper(), db) == value
    with opened(db, read_write=False) as table:
        assert pm_seq(postmap_config, db) == list(table.sequence())


def test_commits_do_not_sync_the_meta_page_and_postmap_reads_them(
        postmap_config: Path, tmp_path: Path) -> None:
    """The choice of docs/design.md ("The write-ahead guarantee"): commits
    sync their data pages, not the meta page (MDB_NOMETASYNC), and the file
    is Postfix's as before; metasync=True syncs each commit whole."""
    db, whole = tmp_path / "db", tmp_path / "whole"
    with opened(db) as table:
        assert table._shared is not None
        assert table._shared.env.flags()["metasync"] is False
        table.update_many([("k1", "v1", None), ("k2", "v2", None)])
    with LmdbTable(str(whole), read_write=True, fold=True, metasync=True) as synced:
        assert isinstance(synced, LmdbTable) and synced._shared is not None
        assert synced._shared.env.flags()["metasync"] is True
        synced.update("k1", "v1")
    assert pm_seq(postmap_config, db) == [("k1", "v1"), ("k2", "v2")]
    assert pm_seq(postmap_config, whole) == [("k1", "v1")]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
@pytest.mark.parametrize("dump_mode", [0o644, 0o640, 0o600, None],
                         ids=["dump0644", "dump0640", "dump0600", "pipe"])
def test_a_new_file_gets_the_permissions_postmap_i_gives_it(
        postmap_config: Path, tmp_path: Path, dump_mode: int | None, umask: int) -> None:
    """postmap -i gives a new file no group or other permission that its
    standard input, when a regular file, lacks (and forces umask 022);
    memtable -i the same (keeping a stricter umask): a 0600 dump of
    policyd's addresses does not become a table every user can read."""
    dump = tmp_path / "dump"
    dump.write_text("a@example.com 1\n")
    if dump_mode is not None:
        dump.chmod(dump_mode)
    modes = {}
    for name in ("postmap", "memtable"):
        spec = f"lmdb:{tmp_path / name}"
        with open(dump, "rb") as src:
            stdin, data = (src, None) if dump_mode is not None else (None, dump.read_bytes())
            if name == "postmap":
                done = run_postmap(postmap_config, "-i", spec, input=data, stdin=stdin,
                                   umask=umask)
            else:
                done = subprocess.run([sys.executable, "-m", "memtable.cli", "-i", spec],
                                      input=data, stdin=stdin, capture_output=True,
                                      umask=umask, timeout=WAIT, check=False)
        assert done.returncode == 0, done.stderr
        modes[name] = (tmp_path / f"{name}.lmdb").stat().st_mode & 0o777
    expected = 0o644 if dump_mode is None else 0o644 & dump_mode
    assert modes == {"postmap": expected, "memtable": expected & ~umask}


def test_an_existing_file_keeps_its_mode(tmp_path: Path) -> None:
    table = tmp_path / "t"
    with opened(table) as t:
        t.update("k", "v")
    (tmp_path / "t.lmdb").chmod(0o600)
    dump = tmp_path / "dump"
    dump.write_text("a@example.com 1\n")
    dump.chmod(0o644)
    with open(dump, "rb") as src:
        done = subprocess.run([sys.executable, "-m", "memtable.cli", "-i", f"lmdb:{table}"],
                              stdin=src, capture_output=True, umask=0, timeout=WAIT,
                              check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t.lmdb").stat().st_mode & 0o777 == 0o600


def _state_directory(tmp_path: Path) -> tuple[Path, pwd.struct_passwd]:
    """The state directory systemd's StateDirectory= makes for policyd's
    user (here nobody), before anything created a file in it."""
    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    state.chmod(0o750)
    return state, nobody


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat(follow_symlinks=False)
    return st.st_uid, st.st_gid


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the files created as root")
@pytest.mark.parametrize("creator", ["memtable -i", "policyd cleanup", "policyd"])
def test_run_as_root_a_new_file_gets_its_directorys_owner(
        tmp_path: Path, creator: str, policyd_factory: type[PolicydProcess]) -> None:
    """Before: root-owned files (-rw-r----- root root) the service, running
    as its own user, could not open: `open database ...: Permission denied`."""
    state, nobody = _state_directory(tmp_path)
    names = ["triplets.lmdb"]
    if creator == "memtable -i":
        done = subprocess.run([sys.executable, "-m", "memtable.cli", "-i",
                               f"lmdb:{state / 'triplets'}"], input=b"k v\n",
                              capture_output=True, timeout=WAIT, check=False)
        assert done.returncode == 0, done.stderr
    else:
        names.append("clients.lmdb")
        proc = policyd_factory(state, None)
        if creator == "policyd":
            proc.start()
            assert proc.stop() == 0, proc.log_text()
        else:
            done = subprocess.run([sys.executable, "-m", "policyd", "-c", str(proc.config),
                                   "cleanup"], capture_output=True, text=True,
                                  timeout=WAIT, check=False)
            assert done.returncode == 0, done.stderr
    for name in names:
        assert _owner(state / name) == (nobody.pw_uid, nobody.pw_gid), name


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the files created as root")
def test_run_as_root_an_existing_file_keeps_its_owner(tmp_path: Path) -> None:
    state, nobody = _state_directory(tmp_path)
    with opened(state / "t") as t:
        t.update("k", "v")
    assert _owner(state / "t.lmdb") == (nobody.pw_uid, nobody.pw_gid)
    os.chown(state / "t.lmdb", 0, 0)
    with opened(state / "t") as t:
        t.update("k", "w")
    assert _owner(state / "t.lmdb") == (0, 0)
    # A link in the file's place is not followed, nor its target chowned.
    target = tmp_path / "target"
    target.write_bytes(b"")
    (state / "l.lmdb").symlink_to(target)
    with opened(state / "l") as t:
        t.update("k", "v")
    assert _owner(target) == (0, 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_file_written_by_postmap_is_read_by_memtable(postmap_config: Path,
                                                     tmp_path: Path) -> None:
    db = tmp_path / "db"
    pm_create(postmap_config, db, "Key1 v1\nkey2   two words\nstraße x\n# c\nlast value\n")
    with opened(db, read_write=False) as reader, opened(db) as writer:
        assert reader.lookup("KEY1") == "v1"
        assert reader.lookup("key2") == "two words"
        assert reader.lookup("STRASSE") == "x"
        assert reader.lookup("nope") is None
        assert list(reader.sequence()) == pm_seq(postmap_config, db)
        # postmap -d: an exclusive-locked delete, seen by the open table.
        assert run_postmap(postmap_config, "-d", "key2", f"lmdb:{db}").returncode == 0
        assert reader.lookup("key2") is None
        # postmap -i (no lock, run alone here): additions are seen too.
        res = run_postmap(postmap_config, "-i", f"lmdb:{db}", input=b"new1 n1\nNEW2 n2\n")
        assert res.returncode == 0, res.stderr
        assert reader.lookup("new2") == "n2"
        # Our delete is seen by postmap.
        assert writer.delete("KEY1") is True
        assert writer.delete("KEY1") is False
        assert pm_get(postmap_config, "key1", db) is None
        assert [k for k, _ in pm_seq(postmap_config, db)] == ["last", "new1", "new2", "strasse"]


HOLDER = textwrap.dedent("""
    import fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDONLY)
    probe = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
    print(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, probe))[0])
""")


def test_delete_if_checks_and_deletes_in_one_locked_transaction(
        postmap_config: Path, tmp_path: Path) -> None:
    """delete_if removes a record only while deletable() accepts its value, and
    reads it under the exclusive fcntl lock: no other process (postmap,
    Postfix, policyd) can write between the check and the delete."""
    db = tmp_path / "db"
    pm_create(postmap_config, db, "old 1\nnew 2\n")
    held: list[int] = []

    def deletable(value: str) -> bool:
        # What another process sees on the file while the check runs.
        done = subprocess.run([sys.executable, "-c", HOLDER, f"{db}.lmdb"],
                              capture_output=True, text=True, timeout=WAIT, check=True)
        held.append(int(done.stdout))
        return value == "1"

    with opened(db) as table:
        assert table.delete_if("OLD", deletable) is Outcome.DELETED
        assert table.delete_if("new", deletable) is Outcome.KEPT
        assert table.delete_if("gone", deletable) is Outcome.ABSENT
    assert held == [fcntl.F_WRLCK, fcntl.F_WRLCK]  # never called for "gone"
    assert pm_seq(postmap_config, db) == [("new", "2")]


def test_without_fold(postmap_config: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    with opened(db, fold=False) as table:
        table.update("MiXed", "1")
        assert table.lookup("mixed") is None
        assert table.lookup("MiXed") == "1"
    assert pm_get(postmap_config, "MiXed", db, "-f") == "1"
    assert pm_get(postmap_config, "MiXed", db) is None  # postmap folds to "mixed"


def test_records_without_trailing_nul(postmap_config: Path, tmp_path: Path) -> None:
    """A file written without NULs (LMDB_NO_TRAILING_NULL platforms): lookups
    fall back to the bare key, and then updates stick to that form."""
    db = tmp_path / "db"
    env = lmdb.open(str(db) + ".lmdb", subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.put(b"bare", b"value")
    env.close()
    assert pm_get(postmap_config, "bare", db) == "value"
    with opened(db) as table:
        assert table.lookup("BARE") == "value"
        table.update("other", "x")
        assert table.delete("bare") is True
    assert raw_items(db) == [(b"other", b"x")]
    assert pm_get(postmap_config, "other", db) == "x"


def test_open_errors(postmap_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    res = run_postmap(postmap_config, "-q", "k", f"lmdb:{missing}")
    postfix_says = f"open database {missing}.lmdb: No such file or directory"
    assert postfix_says in res.stderr.decode()
    assert res.returncode == 1  # fatal for postmap, and for memtable
    with pytest.raises(OpenError, match=postfix_says):
        LmdbTable(str(missing), read_write=False, fold=True)
    # Read-write creates the file, like postmap -d / -i do (O_CREAT).
    with opened(missing) as table:
        assert table.lookup("k") is None
    assert pm_seq(postmap_config, missing) == []
    # Not an lmdb file.
    junk = tmp_path / "junk"
    Path(str(junk) + ".lmdb").write_bytes(b"this is not lmdb\n" * 600)
    with pytest.raises(OpenError, match=r"lmdb:.*junk: open database .*junk\.lmdb"):
        LmdbTable(str(junk), read_write=False, fold=True)


def test_read_only_and_closed(tmp_path: Path) -> None:
    db = tmp_path / "db"
    with opened(db) as table:
        table.update("k", "v")
    with opened(db, read_write=False) as table:
        with pytest.raises(AccessError):
            table.update("k", "w")
        with pytest.raises(AccessError):
            table.delete("k")
    table.close()  # twice is fine
    with pytest.raises(BackupError, match="closed"):
        table.lookup("k")


def test_bad_keys_and_values(tmp_path: Path) -> None:
    with opened(tmp_path / "db") as table:
        long_key = "k" * 600  # LMDB's key limit is 511 bytes
        assert table.lookup(long_key) is None
        assert table.delete("nul\0key") is False
        with pytest.raises(BackupError, match="cannot store"):
            table.update(long_key, "v")
        with pytest.raises(BackupError, match="cannot store"):
            table.update("k", "nul\0value")
        table.update("k" * 500, "fits")
        assert table.lookup("k" * 500) == "fits"


def test_two_tables_on_one_file_in_one_process(tmp_path: Path) -> None:
    """fcntl locks are per process: tables share one environment."""
    db = tmp_path / "db"
    with opened(db) as first:
        first.update("a", "1")
    reader = LmdbTable(str(db), read_write=False, fold=True)
    writer = LmdbTable(str(db), read_write=True, fold=True)  # upgrades the shared env
    try:
        writer.update("b", "2")
        assert reader.lookup("b") == "2"
        writer.close()
        assert reader.lookup("a") == "1"
    finally:
        reader.close()

    def work(n: int) -> None:
        with opened(db) as table:
            for i in range(50):
                table.update(f"t{n}-{i}", str(i))

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    with opened(db, read_write=False) as table:
        assert len(list(table.sequence())) == 2 + 4 * 50


def test_sequence_in_chunks(postmap_config: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    pm_create(postmap_config, db, "".join(f"k{i:03d} {'v' * (i % 7)}{i}\n" for i in range(100)))
    with opened(db, chunk_items=7, chunk_bytes=40) as table:
        assert list(table.sequence()) == pm_seq(postmap_config, db)
        # Changes between chunks: no key twice, later additions seen.
        seen = []
        for key, _ in table.sequence():
            seen.append(key)
            if key == "k010":
                table.delete("k050")
                table.update("k0505", "late")
        assert len(seen) == len(set(seen))
        assert "k050" not in seen and "k0505" in seen


# ---------------------------------------------------------------------------
# Same locks
# ---------------------------------------------------------------------------

def test_lock_style_is_fcntl_like_postfix(postmap_config: Path, tmp_path: Path) -> None:
    """An flock(2) lock stops neither Postfix nor memtable; an exclusive
    fcntl() lock stops both (postmap waits forever, memtable gives up)."""
    db = tmp_path / "db"
    db_file = Path(str(db) + ".lmdb")
    pm_create(postmap_config, db, "k v\n")
    with opened(db, lock_wait=0.2) as table:
        with lock_held(db_file, "flock"):
            assert pm_get(postmap_config, "k", db) == "v"
            assert table.lookup("k") == "v"
            table.update("k2", "v2")
        with lock_held(db_file, "fcntl-ex"):
            with pytest.raises(subprocess.TimeoutExpired):
                subprocess.run([POSTMAP, "-c", str(postmap_config), "-q", "k", f"lmdb:{db}"],
                               capture_output=True, timeout=1.0)
            with pytest.raises(BackupError, match=r"no shared lock on .* within 0\.2 s"):
                table.lookup("k")
            with pytest.raises(BackupError, match=r"no exclusive lock on .* within 0\.2 s"):
                table.update("k3", "v3")
            with pytest.raises(BackupError, match="no exclusive lock"):
                table.delete("k")
        with lock_held(db_file, "fcntl-sh"):
            assert table.lookup("k2") == "v2"  # shared + shared
            with pytest.raises(BackupError, match="no exclusive lock"):
                table.update("k3", "v3")
        table.update("k3", "v3")  # free again
    assert [k for k, _ in pm_seq(postmap_config, db)] == ["k", "k2", "k3"]


def test_a_read_that_never_waits_is_refused_while_the_file_is_held(
        postmap_config: Path, tmp_path: Path) -> None:
    """lookup_many_now (an event loop's read) answers when the file is free
    or only shared-locked, and says None at once, holding nothing, while
    another process holds Postfix's exclusive lock or another thread of
    this process is inside an operation."""
    db = tmp_path / "db"
    db_file = Path(str(db) + ".lmdb")
    pm_create(postmap_config, db, "k v\n")
    with opened(db) as table:
        assert table.lookup_many_now(["k", "absent"]) == {"k": "v", "absent": None}
        with lock_held(db_file, "fcntl-sh"):
            assert table.lookup_many_now(["k"]) == {"k": "v"}
        with lock_held(db_file, "fcntl-ex"):
            assert table.lookup_many_now(["k"]) is None
        shared = table._shared
        assert shared is not None
        with shared.mutex:  # as a commit on the backup's thread holds it
            assert table.lookup_many_now(["k"]) is None
        table.update("k", "w")  # nothing was left locked
        assert table.lookup_many_now(["k"]) == {"k": "w"}
    with pytest.raises(BackupError, match="closed"):
        table.lookup_many_now(["k"])


def test_postmap_bulk_create_holds_the_lock(postmap_config: Path, tmp_path: Path) -> None:
    """``postmap lmdb:FILE`` keeps a shared fcntl lock until it commits: our
    writes wait (and give up after the bound), reads go on, and once
    postmap is done its table and our later write are both there."""
    db = tmp_path / "db"
    db_file = Path(str(db) + ".lmdb")
    with opened(db) as table:
        table.update("old", "dropped by postmap's rebuild")
    os.mkfifo(db)  # postmap's source: it reads until we close our end
    proc = subprocess.Popen([POSTMAP, "-c", str(postmap_config), f"lmdb:{db}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with open(db, "wb") as source:
            source.write(b"from postmap 1\n")
            source.flush()
            for _ in range(int(WAIT / 0.01)):
                if fcntl_holder(db_file) != fcntl.F_UNLCK:
                    break
                threading.Event().wait(0.01)
            assert fcntl_holder(db_file) == fcntl.F_RDLCK
            with opened(db, lock_wait=0.2) as table:
                assert table.lookup("old") is not None  # postmap has not committed
                with pytest.raises(BackupError, match="no exclusive lock"):
                    table.update("mine", "1")
                source.write(b"also 2\n")
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=WAIT)
    with opened(db) as table:
        table.update("mine", "1")
    assert pm_seq(postmap_config, db) == [("also", "2"), ("from", "postmap 1"), ("mine", "1")]


WRITER = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from memtable.backends import LmdbTable
    path, prefix, count, size = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    table = LmdbTable(path, read_write=True, fold=True)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(count):
        table.update(f"{prefix}{i}", f"{prefix}-value-{i}-" + "x" * size)
    table.close()
    print("done", flush=True)
""")


def start_writer(db: Path, prefix: str, count: int, size: int = 0) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(REPO), str(db), prefix,
                             str(count), str(size)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert readline(proc) == b"ready\n"
    return proc


def go(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def finish(proc: subprocess.Popen[bytes]) -> None:
    assert readline(proc) == b"done\n"
    assert proc.wait(timeout=WAIT) == 0


def test_concurrent_writers_with_postfix(postmap_config: Path, tmp_path: Path) -> None:
    """Three memtable writer processes, postmap -d deleting and postmap -q
    reading, all at once on one file: nothing lost, nothing corrupted."""
    db = tmp_path / "db"
    count = 300
    pm_create(postmap_config, db, "".join(f"del{i} d\nkeep{i} k{i}\n" for i in range(count)))
    writers = [start_writer(db, f"w{n}-", count) for n in range(3)]
    deleter = subprocess.Popen([POSTMAP, "-c", str(postmap_config), "-d", "-", f"lmdb:{db}"],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    reader = subprocess.Popen([POSTMAP, "-c", str(postmap_config), "-q", "-", f"lmdb:{db}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    try:
        for w in writers:
            go(w)
        deleted = "".join(f"del{i}\n" for i in range(count)).encode()
        kept = "".join(f"KEEP{i}\n" for i in range(count)).encode() * 3
        out = {}

        def feed(proc: subprocess.Popen[bytes], data: bytes, name: str) -> None:
            out[name] = proc.communicate(data, timeout=WAIT * 3)

        feeders = [threading.Thread(target=feed, args=(deleter, deleted, "d")),
                   threading.Thread(target=feed, args=(reader, kept, "q"))]
        for f in feeders:
            f.start()
        for w in writers:
            finish(w)
        for f in feeders:
            f.join(timeout=WAIT * 3)
        assert deleter.returncode == 0, out["d"]
        assert reader.returncode == 0, out["q"]
        # Every lookup of a kept key succeeded while the others wrote.
        assert len(out["q"][0].decode().splitlines()) == 3 * count
    finally:
        for p in [*writers, deleter, reader]:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=WAIT)
    expected = sorted(
        [(f"keep{i}", f"k{i}") for i in range(count)]
        + [(f"w{n}-{i}", f"w{n}--value-{i}-") for n in range(3) for i in range(count)])
    postfix_view = pm_seq(postmap_config, db)
    assert sorted(postfix_view) == expected
    with opened(db, read_write=False) as table:
        assert list(table.sequence()) == postfix_view
        table.verify()  # every page sound, as memtable's page check sees it


def test_map_grows_past_16_mib_while_others_read(postmap_config: Path, tmp_path: Path) -> None:
    """A memtable writer doubles the map (MDB_MAP_FULL) past lmdb_map_size;
    a reader opened before (MDB_MAP_RESIZED) and postmap both follow."""
    db = tmp_path / "db"
    value_size = 100_000
    count = 2 * limits.LMDB_INITIAL_MAP_BYTES // value_size // 1  # ~32 MiB of values
    with opened(db, read_write=True) as table:
        table.update("sentinel", "s")
    with opened(db, read_write=False) as reader:
        writer = start_writer(db, "big", count, value_size)
        try:
            go(writer)
            lookups = 0
            while writer.poll() is None and lookups < 10_000:
                assert reader.lookup("sentinel") == "s"
                lookups += 1
            finish(writer)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(timeout=WAIT)
        last = f"big{count - 1}"
        assert reader.lookup(last) == f"big-value-{count - 1}-" + "x" * value_size
        assert len(list(reader.sequence())) == count + 1
        reader.verify()  # past 16 MiB, with values on overflow pages
    assert Path(str(db) + ".lmdb").stat().st_size > limits.LMDB_INITIAL_MAP_BYTES
    assert pm_get(postmap_config, last, db) == f"big-value-{count - 1}-" + "x" * value_size


def test_postmap_grows_the_map_under_an_open_reader(postmap_config: Path,
                                                    tmp_path: Path) -> None:
    db = tmp_path / "db"
    pm_create(postmap_config, db, "small 1\n")
    with opened(db, read_write=False) as reader, opened(db, read_write=True) as writer:
        assert reader.lookup("small") == "1"
        big = "y" * 200_000
        pm_create(postmap_config, db, "".join(f"k{i} {big}\n" for i in range(120)))
        assert Path(str(db) + ".lmdb").stat().st_size > limits.LMDB_INITIAL_MAP_BYTES
        assert reader.lookup("k119") == big
        assert reader.lookup("small") is None
        writer.update("after", "growth")  # the writer adopts the new size too
        assert pm_get(postmap_config, "after", db) == "growth"
