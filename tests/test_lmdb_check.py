"""A damaged lmdb backup: found before LMDB touches it (memtable's page
check, LmdbTable.verify), refused by policyd at start, in --check-config
and by cleanup with one line that says how to recover, and a store failure
(not a dead process) when LMDB reports the damage while policyd runs.

The damaged files are real LMDB files, written by memtable or by Postfix's
postmap, then damaged by tests.lmdb_damage the ways the field does."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memtable.backends import LmdbTable
from memtable.backends.lmdb_check import LmdbCorrupt, check_lmdb
from memtable.errors import BackupError, CorruptError
from policyd.cli import main
from tests import lmdb_damage
from tests.conftest import Memcached
from tests.policyd_proc import PolicydProcess
from tests.postfixlab import run_postmap

# A write transaction by LMDB itself, in its own process: on a file whose
# free list holds a live page it aborts (SIGABRT), as policyd did.
WRITE = textwrap.dedent("""
    import sys, lmdb
    env = lmdb.open(sys.argv[1], subdir=False, lock=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"k000001\\0", b"new\\0")
    print("written")
""")


def fill(path: Path, n: int = 3000, rewrites: int = 3) -> Path:
    """A sound file of ``n`` records written by memtable, rewritten a few
    times so that it has a free list: the lmdb file's path."""
    table = LmdbTable(str(path), read_write=True, fold=True)
    try:
        table.update_many([(f"k{i:06d}", "v" * 80, None) for i in range(n)])
        for r in range(rewrites):
            table.update_many([(f"k{i:06d}", "w" * (80 + r), None) for i in range(r, n, 7)])
    finally:
        table.close()
    return Path(f"{path}.lmdb")


def verify(path: Path) -> None:
    table = LmdbTable(str(path), read_write=False, fold=True)
    try:
        table.verify()
    finally:
        table.close()


# --- the check --------------------------------------------------------------------

def test_sound_files_pass(tmp_path: Path, postmap_config: Path) -> None:
    # memtable's own, with values on overflow pages, emptied, refilled
    table = LmdbTable(str(tmp_path / "m"), read_write=True, fold=True)
    try:
        table.verify()  # just created: the two meta pages only
        table.update_many([(f"k{i}", "v" * (i * 700), None) for i in range(60)])
        table.verify()
        for i in range(60):
            table.delete(f"k{i}")
        table.verify()
        table.update("a", "b")
        table.verify()
    finally:
        table.close()
    verify(fill(tmp_path / "f").with_suffix(""))
    # Postfix's own: postmap builds it, postmap -i adds (run alone), -d deletes
    source = tmp_path / "p"
    source.write_text("".join(f"key{i} value{i}{'x' * (i % 300)}\n" for i in range(2000)))
    assert run_postmap(postmap_config, f"lmdb:{source}").returncode == 0
    assert run_postmap(postmap_config, "-i", f"lmdb:{source}",
                       input=b"new1 n1\nnew2 n2\n").returncode == 0
    assert run_postmap(postmap_config, "-d", "key7", f"lmdb:{source}").returncode == 0
    verify(source)
    check_lmdb(b"")  # a file created but never written


def test_a_free_list_holding_a_live_page_is_found_before_lmdb_aborts(
        tmp_path: Path) -> None:
    """The issue's crash: LMDB's first write aborts the process with
    ``Assertion 'mp->mp_pgno != pgno' failed``; verify() finds it first."""
    db = fill(tmp_path / "triplets")
    root = lmdb_damage.free_main_root(db)
    with pytest.raises(CorruptError) as caught:
        verify(tmp_path / "triplets")
    assert "both free and in use" in str(caught.value)
    assert caught.value.path == str(db)
    # What LMDB makes of the same file: it dies.
    done = subprocess.run([sys.executable, "-c", WRITE, str(db)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGABRT, (root, done)
    assert "Assertion 'mp->mp_pgno != pgno' failed" in done.stderr


@pytest.mark.parametrize("damage", ["overwritten", "zeroed", "garbage", "meta", "truncated"])
def test_damaged_pages_are_named(tmp_path: Path, damage: str) -> None:
    db = fill(tmp_path / "t")
    leaves = lmdb_damage.leaf_pages(db)
    if damage == "overwritten":  # a write landed on the wrong page
        lmdb_damage.overwrite_page(db, leaves[3], leaves[4])
        expected = f"page {leaves[3]} holds page {leaves[4]}'s header"
    elif damage == "zeroed":
        lmdb_damage.zero_page(db, leaves[0])
        expected = f"page {leaves[0]} holds page 0's header"
    elif damage == "garbage":  # before: "holds page 18446744073709551615's header"
        lmdb_damage.zero_page(db, leaves[2], fill=0xFF)
        expected = f"page {leaves[2]} is overwritten: what it holds is not a page of this file$"
    elif damage == "meta":
        lmdb_damage.zero_page(db, 1)
        expected = "meta page 1 is not an LMDB meta page"
    else:
        data = db.read_bytes()
        db.write_bytes(data[:len(data) // 2])
        expected = "beyond the end of the file"
    with pytest.raises(LmdbCorrupt, match=expected):
        check_lmdb(db.read_bytes())


def test_lmdb_reporting_damage_at_run_time_is_a_backup_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """LMDB's own MDB_CORRUPTED while working: a BackupError that says the
    file is corrupt and what to do (policyd answers failure_action),
    said once as an error; LMDB is not asked to touch the file again, even
    where its pages are intact."""
    db = fill(tmp_path / "t", rewrites=0)
    table = LmdbTable(str(tmp_path / "t"), read_write=True, fold=True)
    try:
        assert table.lookup("k000001") == "v" * 80
        assert table.lookup("k002999") == "v" * 80
        leaves = lmdb_damage.leaf_pages(db)
        assert len(leaves) > 2
        lmdb_damage.zero_page(db, leaves[0])
        with caplog.at_level("ERROR"):
            with pytest.raises(BackupError,
                               match=r"MDB_CORRUPTED.*the file is corrupt: move it away"):
                table.update("k000001", "x")
            with pytest.raises(BackupError, match="MDB_CORRUPTED"):
                table.lookup("k002999")  # on an intact page: refused all the same
        assert [r.levelname for r in caplog.records] == ["ERROR"]
    finally:
        table.close()


def memtable_cli(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "memtable.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False, input=stdin)


def test_memtable_on_a_corrupt_file_is_a_fatal_error_not_a_temporary_failure(
        tmp_path: Path) -> None:
    """The damage stays until the file is rebuilt: exit 1 with one line,
    never 75 (temporary failure).  Before: `memtable: error: ...` then
    `memtable: temporary failure: ...`, exit 75."""
    db = fill(tmp_path / "t", rewrites=0)
    leaves = lmdb_damage.leaf_pages(db)
    lmdb_damage.zero_page(db, leaves[0])
    # -s reads the whole file: checked first, named in the check's words.
    done = memtable_cli("-s", f"lmdb:{tmp_path}/t")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"memtable: fatal: lmdb:{tmp_path}/t: {db} is corrupt (main "
                           f"database: page {leaves[0]} holds page 0's header (overwritten)): "
                           "move it away (then rebuild it from a dump or its source)\n")
    # -q reads a few pages: LMDB finds the damage, said once.
    done = memtable_cli("-q", "k000000", f"lmdb:{tmp_path}/t")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.count("\n") == 1 and "temporary failure" not in done.stderr
    assert done.stderr.startswith(f"memtable: error: lmdb:{tmp_path}/t: read {db}: ")
    assert "MDB_CORRUPTED" in done.stderr and "the file is corrupt: move it away" in done.stderr



def test_memtable_writes_refuse_a_damaged_file_instead_of_aborting(tmp_path: Path) -> None:
    """A live page on the free list: LMDB's first write aborts the process
    (SIGABRT).  memtable -i and -d check the file first and say so in one
    line, exit 1; the file is left as it was."""
    db = fill(tmp_path / "t")
    lmdb_damage.free_main_root(db)
    before = db.read_bytes()
    for args, stdin in ((("-i",), "knew value\n"), (("-d", "k000000"), "")):
        done = memtable_cli(*args, f"lmdb:{tmp_path}/t", stdin=stdin)
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"memtable: fatal: lmdb:{tmp_path}/t: {db} is corrupt (")
    assert db.read_bytes() == before

# --- policyd ----------------------------------------------------------------------

def corrupt_config(tmp_path: Path, memcached: Memcached,
                   damage: str = "free list") -> tuple[Path, Path]:
    """policyd.cf with a memcache triplet table whose backup is damaged: a
    live page in the free list, or a meta page overwritten (LMDB refuses to
    open the file: MDB_INVALID)."""
    db = fill(tmp_path / "triplets")
    if damage == "free list":
        lmdb_damage.free_main_root(db)
    else:
        lmdb_damage.zero_page(db, 1)
    cf = tmp_path / "triplets.cf"
    cf.write_text(f"memcache = {memcached.spec}\nbackup = lmdb:{tmp_path}/triplets\n")
    policyd_cf = tmp_path / "policyd.cf"
    policyd_cf.write_text(f"triplet_table = memcache:{cf}\n"
                          f"client_table = lmdb:{tmp_path}/clients\n"
                          f"listen = inet:127.0.0.1:0\n")
    return policyd_cf, db


@pytest.mark.parametrize(("damage", "says"), [
    ("free list", "{db} is corrupt (page "),
    ("meta", "open database {db}: MDB_INVALID"),
])
def test_check_config_refuses_a_corrupt_backup(tmp_path: Path, memcached: Memcached,
                                               capsys: pytest.CaptureFixture[str],
                                               damage: str, says: str) -> None:
    policyd_cf, db = corrupt_config(tmp_path, memcached, damage)
    assert main(["--check-config", "-c", str(policyd_cf)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"policyd: lmdb:{tmp_path}/triplets: " + says.format(db=db))
    assert "memcached still holds policyd's state" in err
    assert f"`mv {db} {db}.corrupt`" in err


def test_policyd_and_cleanup_refuse_to_start_on_a_corrupt_backup(
        tmp_path: Path, memcached: Memcached) -> None:
    """Before: policyd died with SIGABRT on its first write, at every restart."""
    policyd_cf, db = corrupt_config(tmp_path, memcached)
    for command in ([], ["cleanup"]):
        done = subprocess.run([sys.executable, "-m", "policyd", "-c", str(policyd_cf),
                               *command], capture_output=True, text=True, timeout=60,
                              check=False)
        assert done.returncode == 1, done
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"{db} is corrupt (" in done.stderr and "docs/operations.md" in done.stderr
    # The recovery the message gives: move it away, start again.
    db.rename(f"{db}.corrupt")
    assert main(["--check-config", "-c", str(policyd_cf)]) == 0


def test_damage_found_while_running_fails_as_failure_action_says(
        tmp_path: Path, memcached: Memcached,
        policyd_factory: type[PolicydProcess]) -> None:
    """The process stays up for every other connection, and says loudly what
    is wrong: each affected decision is failure_action (DUNNO here)."""
    proc = policyd_factory(tmp_path / "p", memcached.spec,
                           extra="auto_whitelist_clients = 0\n").start()
    assert proc.ask(sender="a@example.org").startswith("DEFER_IF_PERMIT")
    db = tmp_path / "p" / "triplets.lmdb"
    for leaf in lmdb_damage.leaf_pages(db):
        lmdb_damage.zero_page(db, leaf)
    assert proc.ask(sender="b@example.org") == "DUNNO"
    assert proc.ask(sender="c@example.org") == "DUNNO"
    assert proc.proc is not None and proc.proc.poll() is None
    log = proc.log_text()
    assert "reason=store-failure" in log
    assert "MDB_CORRUPTED" in log and "the file is corrupt: move it away" in log
    assert "error:" in log  # said once at error level, not only per request
