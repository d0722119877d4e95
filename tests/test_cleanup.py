"""``policyd cleanup`` over real stores: lmdb files and memcached with lmdb
backups, filled with tests.report_data's known records, at a frozen time;
and the systemd units that run it daily."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time

from memtable.backends.lmdb_table import LmdbTable
from memtable.errors import BackupError
from memtable.registry import open_table
from memtable.table import Outcome
from memtable.wire import MemcacheWire
from policyd.cleanup import CleanupError, Counts, cleanup, delete_batch, render
from policyd.cli import main
from policyd.config import PolicydConfig
from policyd.greylist import TripletRecord
from policyd.storewalk import TRIPLETS, Entry, WalkTables
from tests.conftest import Memcached
from tests.greylist_helpers import DictTable
from tests.report_data import (
    DAY,
    HOUR,
    LIVE_TRIPLETS,
    NOW,
    T0,
    clients,
    dump,
    fill,
    memcache_cf,
    policyd_cf,
    triplet_key,
    triplets,
)

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"


def live_triplets() -> dict[str, str]:
    """The records of triplets() the policy still uses at NOW."""
    config = PolicydConfig()
    out = {}
    for key, value in triplets().items():
        try:
            record = TripletRecord.parse(value)
        except ValueError:
            continue
        if not record.expired(NOW, config.retry_window, config.max_age):
            out[key] = value
    return out


LIVE_CLIENTS = {k: v for k, v in clients().items() if k not in ("10.9.9.0", "bad")}

TRIPLET_LINE = ("policyd cleanup: triplets ({spec}): 124 examined, 17 expired (12 pending "
                "past retry_window, 5 passed but unseen for max_age), 2 malformed: {done}")
CLIENT_LINE = ("policyd cleanup: clients ({spec}): 9 examined, 1 expired (unseen for "
               "max_age), 1 malformed: {done}")


def lmdb_setup(tmp_path: Path) -> tuple[str, str, str]:
    tspec, cspec = f"lmdb:{tmp_path}/triplets", f"lmdb:{tmp_path}/clients"
    fill(tspec, triplets())
    fill(cspec, clients())
    return policyd_cf(tmp_path, tspec, cspec), tspec, cspec


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with freeze_time(T0):
        status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_live_set_is_what_the_data_says() -> None:
    # guards the fixtures: 95 live passes, 3 imported from postgrey, 7 pending
    assert len(live_triplets()) == LIVE_TRIPLETS == 105


def test_cleanup_deletes_expired_and_malformed(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    cf, tspec, cspec = lmdb_setup(tmp_path)
    status, out, err = run_cli(capsys, "cleanup", "-c", cf)
    assert status == 0 and err == ""
    assert out.splitlines() == [TRIPLET_LINE.format(spec=tspec, done="19 deleted"),
                                CLIENT_LINE.format(spec=cspec, done="2 deleted")]
    assert dump(tspec) == live_triplets()
    assert dump(cspec) == LIVE_CLIENTS
    # a second run finds nothing more
    status, out, _ = run_cli(capsys, "-c", cf, "cleanup")
    assert status == 0 and "105 examined, 0 expired" in out and "0 deleted" in out


def test_dry_run_deletes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf, tspec, cspec = lmdb_setup(tmp_path)
    status, out, _ = run_cli(capsys, "cleanup", "-c", cf, "--dry-run")
    assert status == 0
    assert out.splitlines() == [
        TRIPLET_LINE.format(spec=tspec,
                            done="19 would be deleted (dry run: nothing deleted)"),
        CLIENT_LINE.format(spec=cspec, done="2 would be deleted (dry run: nothing deleted)")]
    assert dump(tspec) == triplets() and dump(cspec) == clients()


def test_time_decides_what_is_expired(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    # two days later the 7 pending triplets are past retry_window as well
    cf, tspec, _ = lmdb_setup(tmp_path)
    with freeze_time("2024-05-03 13:00:00"):
        assert main(["cleanup", "-c", cf]) == 0
    out = capsys.readouterr().out
    assert "19 pending past retry_window" in out
    assert not any(k.startswith("198.51.100.0/new") for k in dump(tspec))


def test_walk_and_deletes_interleave_across_chunks(tmp_path: Path) -> None:
    # lmdb hands the walk 7 entries per lock; deletes of 5 at a time in
    # between must neither skip nor repeat entries
    cf, tspec, cspec = lmdb_setup(tmp_path)
    config = PolicydConfig.from_file(cf)
    tables = [LmdbTable(spec.removeprefix("lmdb:"), read_write=True, fold=True, chunk_items=7)
              for spec in (tspec, cspec)]
    with WalkTables(config, *tables) as stores:
        counts = cleanup(stores, config, NOW, batch_keys=5)
    assert (counts["triplets"].examined, counts["triplets"].deleted) == (124, 19)
    assert (counts["clients"].examined, counts["clients"].deleted) == (9, 2)
    assert dump(tspec) == live_triplets() and dump(cspec) == LIVE_CLIENTS


def test_a_record_rewritten_meanwhile_is_kept(tmp_path: Path) -> None:
    cf, tspec, _ = lmdb_setup(tmp_path)
    config = PolicydConfig.from_file(cf)
    with WalkTables.open(config, read_write=True) as stores:
        walked = {e.key: e for e in stores.walk(TRIPLETS, 1000)}
        retried, stale, gone = (triplet_key(0, "gone"), triplet_key(1, "gone"),
                                triplet_key(2, "gone"))
        # policyd saw a retry of one (new record), another changed but is
        # still expired, a third was removed
        fresh = TripletRecord(NOW, NOW).serialise()
        stores.triplets.update(retried, fresh)
        stores.triplets.update(stale, TripletRecord(NOW - 4 * DAY, NOW - 4 * DAY).serialise())
        stores.triplets.delete(gone)
        counts = {"triplets": Counts(), "clients": Counts()}
        delete_batch(stores, config, NOW, [walked[retried], walked[stale], walked[gone]],
                     counts)
    assert (counts["triplets"].deleted, counts["triplets"].kept_changed) == (1, 2)
    assert dump(tspec)[retried] == fresh and stale not in dump(tspec)


# A policyd-like writer in its own process: it rewrites one key through the
# table (memcached first, then the lmdb backup, as policyd does).  It first
# tells whether cleanup holds the backup's exclusive lock right now
# ("blocked": its write must wait until cleanup's transaction ends) or not
# ("free": nothing stops it from landing between cleanup's steps).
REWRITER = f"""
import fcntl, os, sys
sys.path.insert(0, {str(ROOT)!r})
from memtable.registry import open_table
spec, db, key, value = sys.argv[1:]
fd = os.open(db, os.O_RDWR)
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    print("free", flush=True)
except OSError:
    print("blocked", flush=True)
os.close(fd)
with open_table(spec, read_write=True) as table:
    table.update(key, value)
print("done", flush=True)
"""


@pytest.mark.parametrize("kind", ["lmdb", "memcache"])
def test_a_rewrite_racing_the_delete_is_kept(tmp_path: Path, memcached: Memcached,
                                             kind: str) -> None:
    """Issue 15: cleanup read an expired record, policyd rewrote it (a retry
    answered DEFER, the record fresh again), then cleanup deleted it.  Here
    a writer process starts the moment cleanup has read the record back for
    its final check; whatever the interleaving, the fresh record must be in
    the backup (and in memcached) afterwards."""
    backup = f"lmdb:{tmp_path}/tb"
    if kind == "lmdb":
        tspec = backup
        fill(tspec, triplets())
        cspec = f"lmdb:{tmp_path}/cb"
    else:
        _, tspec, cspec = memcache_setup(tmp_path, memcached)
    config = PolicydConfig.from_file(policyd_cf(tmp_path, tspec, cspec))
    key = triplet_key(4, "gone")
    fresh = TripletRecord(NOW, NOW).serialise()
    script = tmp_path / "rewrite.py"
    script.write_text(REWRITER)
    started: list[subprocess.Popen[str]] = []
    said: list[str] = []  # the writer's lines

    class RacedTables(WalkTables):
        """The stores, with the writer started inside the final check."""

        def delete_if(self, entry: Entry, deletable: Callable[[Entry], bool]
                      ) -> tuple[Outcome, Outcome | None]:
            def check(stored: Entry) -> bool:
                if stored.key == key and not started:  # the walked store's check
                    proc = subprocess.Popen(
                        [sys.executable, str(script), tspec, f"{tmp_path}/tb.lmdb", key, fresh],
                        stdout=subprocess.PIPE, text=True)
                    started.append(proc)
                    assert proc.stdout is not None
                    said.append(proc.stdout.readline())
                    if said == ["free\n"]:
                        # Nothing holds the record: the rewrite lands right now.
                        said.append(proc.stdout.readline())
                return deletable(stored)

            return super().delete_if(entry, check)

    with RacedTables.open(config, read_write=True) as stores:
        counts = cleanup(stores, config, NOW)
    assert len(started) == 1
    out, _ = started[0].communicate(timeout=30)
    assert started[0].returncode == 0 and "".join(said) + out in ("free\ndone\n",
                                                                 "blocked\ndone\n")
    assert dump(backup).get(key) == fresh
    if kind == "memcache":
        stored = memcached.meta(f"t:{key}")
        assert stored is not None and stored["value"] == fresh
    assert counts["triplets"].deleted + counts["triplets"].kept_changed == 19


def test_a_value_another_host_writes_between_gets_and_delete_stays_in_memcached(
        tmp_path: Path, memcached: Memcached) -> None:
    """memcached is never told to delete a value it did not show: another
    host writes the key right after cleanup has read memcached's (expired)
    copy; the delete is refused (cas), the new value stays."""
    cf, tspec, cspec = memcache_setup(tmp_path, memcached)
    config = PolicydConfig.from_file(cf)
    key = triplet_key(5, "gone")
    fresh = TripletRecord(NOW - HOUR, NOW - HOUR).serialise()
    (tmp_path / "other").mkdir()
    other_host = memcache_cf(tmp_path / "other", "t", memcached.spec, None)
    written: list[str] = []

    class OtherHostWritesAfterRead(MemcacheWire):
        """The triplet table's connection: the other host writes the key
        right after this one has read it (get, or gets for a cas)."""

        def _after_read(self, mc_key: bytes) -> None:
            if mc_key == f"t:{key}".encode() and not written:
                with open_table(other_host, read_write=True) as table:
                    table.update(key, fresh)
                written.append(fresh)

        def get(self, mc_key: bytes) -> tuple[int, bytes] | None:
            hit = super().get(mc_key)
            self._after_read(mc_key)
            return hit

        def gets(self, mc_key: bytes) -> tuple[int, bytes, int] | None:
            hit = super().gets(mc_key)
            self._after_read(mc_key)
            return hit

    with WalkTables(config, open_table(tspec, read_write=True, wire=OtherHostWritesAfterRead),
                    open_table(cspec, read_write=True)) as stores:
        cleanup(stores, config, NOW)
    assert written == [fresh]
    stored = memcached.meta(f"t:{key}")
    assert stored is not None and stored["value"] == fresh


def test_shared_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"lmdb:{tmp_path}/state"
    fill(spec, {**triplets(), **clients()})
    status, out, _ = run_cli(capsys, "cleanup", "-c", policyd_cf(tmp_path, spec, spec))
    assert status == 0 and "share one store" in out
    assert dump(spec) == {**live_triplets(), **LIVE_CLIENTS}


# --- memcache tables with lmdb backups ------------------------------------------

def memcache_setup(tmp_path: Path, memcached: Memcached) -> tuple[str, str, str]:
    tspec = memcache_cf(tmp_path, "t", memcached.spec, f"lmdb:{tmp_path}/tb")
    cspec = memcache_cf(tmp_path, "c", memcached.spec, f"lmdb:{tmp_path}/cb")
    fill(tspec, triplets())
    fill(cspec, clients())
    return policyd_cf(tmp_path, tspec, cspec), tspec, cspec


def test_cleanup_deletes_from_memcached_and_the_backup(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    cf, _, _ = memcache_setup(tmp_path, memcached)
    assert memcached.meta(f"t:{triplet_key(0, 'gone')}") is not None
    status, out, _ = run_cli(capsys, "cleanup", "-c", cf)
    assert status == 0 and "19 deleted" in out and "2 deleted" in out
    for key, value in triplets().items():
        stored = memcached.meta(f"t:{key}")
        if key in live_triplets():
            assert stored is not None and stored["value"] == value, key
        else:
            assert stored is None, key
    for key in clients():
        assert (memcached.meta(f"c:{key}") is not None) == (key in LIVE_CLIENTS), key
    assert dump(f"lmdb:{tmp_path}/tb") == live_triplets()
    assert dump(f"lmdb:{tmp_path}/cb") == LIVE_CLIENTS


def test_newer_record_of_another_host_stays_in_memcached(
        tmp_path: Path, memcached: Memcached) -> None:
    # Two MX hosts share memcached, each with its own backup: this host's
    # copy expired, the other host's policyd has just rewritten the key.
    cf, _, _ = memcache_setup(tmp_path, memcached)
    key = triplet_key(3, "gone")
    fresh = TripletRecord(NOW - HOUR, NOW - HOUR).serialise()
    (tmp_path / "other").mkdir()
    other_host = memcache_cf(tmp_path / "other", "t", memcached.spec, None)
    with open_table(other_host, read_write=True) as table:
        table.update(key, fresh)
    with freeze_time(T0):
        assert main(["cleanup", "-c", cf]) == 0
    stored = memcached.meta(f"t:{key}")
    assert stored is not None and stored["value"] == fresh
    assert key not in dump(f"lmdb:{tmp_path}/tb")  # the stale copy is gone


def test_dry_run_leaves_memcached_alone(tmp_path: Path, memcached: Memcached,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cf, _, _ = memcache_setup(tmp_path, memcached)
    status, out, _ = run_cli(capsys, "cleanup", "-c", cf, "--dry-run")
    assert status == 0 and "19 would be deleted" in out
    for key in triplets():
        assert memcached.meta(f"t:{key}") is not None, key
    assert dump(f"lmdb:{tmp_path}/tb") == triplets()


def test_dry_run_before_policyd_created_its_backups(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh install: the backups policyd creates at start are empty
    tables to a dry run, which creates nothing.  Before: `open database
    ...: No such file or directory`."""
    tspec = memcache_cf(tmp_path, "t", memcached.spec, f"lmdb:{tmp_path}/tb")
    cspec = f"lmdb:{tmp_path}/clients"
    status, out, err = run_cli(capsys, "cleanup", "-c", policyd_cf(tmp_path, tspec, cspec),
                               "--dry-run")
    assert status == 0, err
    assert out.splitlines() == [
        f"policyd cleanup: triplets ({tspec}): 0 examined, 0 expired (0 pending past "
        "retry_window, 0 passed but unseen for max_age), 0 malformed: 0 would be deleted "
        "(dry run: nothing deleted)",
        f"policyd cleanup: clients ({cspec}): 0 examined, 0 expired (unseen for max_age), "
        "0 malformed: 0 would be deleted (dry run: nothing deleted)"]
    assert not list(tmp_path.glob("*.lmdb"))


def test_memcache_table_without_backup_cannot_be_cleaned(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    tspec = memcache_cf(tmp_path, "t", memcached.spec, None)
    cspec = memcache_cf(tmp_path, "c", memcached.spec, f"lmdb:{tmp_path}/cb")
    status, out, err = run_cli(capsys, "cleanup", "-c", policyd_cf(tmp_path, tspec, cspec))
    assert status == 1 and out == ""
    assert err.startswith(f"policyd: cleanup: {tspec}: memcached cannot list its entries")
    assert err.count("\n") == 1


def test_a_failing_store_stops_with_the_counts_so_far(tmp_path: Path) -> None:
    class FailingDeletes(DictTable):
        def delete_if(self, key: str, deletable: Callable[[str], bool]) -> Outcome:
            raise BackupError("lmdb:/var/lib/policyd/clients: disk trouble")

    tspec = f"lmdb:{tmp_path}/triplets"
    fill(tspec, triplets())
    client_table = FailingDeletes("dict:clients")
    for key, value in clients().items():
        client_table.update(key, value)
    config = PolicydConfig.from_file(policyd_cf(tmp_path, tspec, "dict:clients"))
    stores = WalkTables(config, open_table(tspec, read_write=True), client_table)
    with stores, pytest.raises(CleanupError, match="disk trouble") as caught:
        cleanup(stores, config, NOW)
    # the triplets were cleaned before the client table failed
    assert caught.value.counts["triplets"].deleted == 19
    assert caught.value.counts["clients"].deleted == 0
    assert dump(tspec) == live_triplets()


def test_a_table_not_reached_is_not_reported(tmp_path: Path) -> None:
    """A triplet table that fails while it is walked stops the run before the
    clients: the output has no "0 examined" line for a table never walked."""
    class FailingWalk(DictTable):
        def sequence(self) -> Iterator[tuple[str, str]]:
            yield from list(super().sequence())[:3]
            raise BackupError("lmdb:/var/lib/policyd/triplets: MDB_CORRUPTED")

    triplet_table = FailingWalk("dict:triplets")
    for key, value in triplets().items():
        triplet_table.update(key, value)
    cspec = f"lmdb:{tmp_path}/clients"
    fill(cspec, clients())
    config = PolicydConfig.from_file(policyd_cf(tmp_path, "dict:triplets", cspec))
    stores = WalkTables(config, triplet_table, open_table(cspec, read_write=True))
    with stores, pytest.raises(CleanupError, match="MDB_CORRUPTED") as caught:
        cleanup(stores, config, NOW)
    assert set(caught.value.counts) == {"triplets"}
    assert caught.value.counts["triplets"].examined == 3
    lines = render(config, caught.value.counts, dry_run=False, shared=False).splitlines()
    assert len(lines) == 1 and lines[0].startswith("policyd cleanup: triplets ")
    assert dump(cspec) == clients()  # untouched


# --- systemd units --------------------------------------------------------------

def unit_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith(("#", ";"))]


HARDENING_PREFIXES = ("Protect", "Private", "Restrict", "NoNewPrivileges", "Capability",
                      "AmbientCapabilities", "SystemCall", "MemoryDenyWriteExecute",
                      "LockPersonality", "ProcSubset", "RemoveIPC", "ReadWritePaths",
                      "StateDirectory", "User=", "Group=", "UMask")


def test_cleanup_service_is_as_hardened_as_policyd() -> None:
    def hardening(path: Path) -> set[str]:
        return {line for line in unit_lines(path) if line.startswith(HARDENING_PREFIXES)}

    assert hardening(SYSTEMD / "policyd.service") <= hardening(
        SYSTEMD / "policyd-cleanup.service")
    service = unit_lines(SYSTEMD / "policyd-cleanup.service")
    assert "Type=oneshot" in service
    assert ("ExecStart=/opt/policyd/bin/policyd -c /etc/policyd/policyd.cf cleanup"
            in service)
    timer = unit_lines(SYSTEMD / "policyd-cleanup.timer")
    assert "OnCalendar=daily" in timer and "Persistent=true" in timer
    assert "WantedBy=timers.target" in timer


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze missing")
def test_systemd_analyze_accepts_the_cleanup_units(tmp_path: Path) -> None:
    service = (SYSTEMD / "policyd-cleanup.service").read_text()
    stand_in = tmp_path / "policyd"
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (tmp_path / "policyd-cleanup.service").write_text(
        service.replace("/opt/policyd/bin/policyd", str(stand_in)))
    shutil.copy(SYSTEMD / "policyd-cleanup.timer", tmp_path / "policyd-cleanup.timer")
    result = subprocess.run(
        [str(shutil.which("systemd-analyze")), "verify", "--man=no",
         str(tmp_path / "policyd-cleanup.service"), str(tmp_path / "policyd-cleanup.timer")],
        capture_output=True, text=True, timeout=20, check=False, cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
