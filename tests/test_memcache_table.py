"""dict_memcache semantics against a real memcached and a real lmdb backup,
on both runners of the rules: ``open_table`` is the fixture of
tests.memcache_runners."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from memtable import (
    AccessError,
    ConfigError,
    KeySkippedError,
    SequenceUnsupportedError,
    TemporaryError,
    UnsupportedTableError,
    ValueTooLongError,
)
from memtable.table import Table
from tests.conftest import Memcached, free_port
from tests.memcache_runners import MemcacheTables, Opener


def make_cf(tmp_path: Path, memcache: str, *lines: str, name: str = "t.cf") -> str:
    path = tmp_path / name
    path.write_text("\n".join([f"memcache = {memcache}", *lines]) + "\n")
    return f"memcache:{path}"


def dead_server() -> str:
    return f"inet:127.0.0.1:{free_port()}"  # nothing listens: connection refused


def test_update_lookup_delete_round_trip(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    spec = make_cf(tmp_path, memcached.spec, "key_format = pfx:%s", "flags = 7", "ttl = 600")
    with open_table(spec, read_write=True) as table:
        assert table.lookup("User@Example.com") is None
        table.update("User@Example.com", "value 1")
        assert table.lookup("user@example.com") == "value 1"
        # Postfix's raw state: folded key behind key_format, flags, ttl.
        meta = memcached.meta("pfx:user@example.com")
        assert meta is not None
        assert meta["value"] == "value 1" and meta["flags"] == 7
        assert 590 <= int(str(meta["ttl"])) <= 600
        assert table.delete("USER@example.com") is True
        assert table.delete("user@example.com") is False
        assert memcached.meta("pfx:user@example.com") is None


def test_fold_off_keeps_case(open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    spec = make_cf(tmp_path, memcached.spec)
    with open_table(spec, read_write=True, fold=False) as table:
        table.update("MixedCase", "v")
    assert memcached.meta("MixedCase") is not None
    assert memcached.meta("mixedcase") is None


def test_unix_socket_server(open_table: Opener, tmp_path: Path, memcached_unix: Memcached) -> None:
    with open_table(make_cf(tmp_path, memcached_unix.spec), read_write=True) as table:
        table.update("k", "v")
        assert table.lookup("k") == "v"


def test_lookup_falls_back_to_backup_and_writes_back(open_table: Opener, tmp_path: Path,
                                                     memcached: Memcached) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    with open_table(backup, read_write=True) as lmdb:
        lmdb.update("only@backup.example", "from backup")
    spec = make_cf(tmp_path, memcached.spec, f"backup = {backup}", "key_format = b:%s",
                   "flags = 3", "ttl = 1200")
    with open_table(spec) as table:
        assert table.lookup("only@backup.example") == "from backup"
    meta = memcached.meta("b:only@backup.example")
    assert meta is not None
    assert meta["value"] == "from backup" and meta["flags"] == 3
    assert 1190 <= int(str(meta["ttl"])) <= 1200


def test_update_goes_to_memcache_then_backup(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    spec = make_cf(tmp_path, memcached.spec, f"backup = {backup}")
    with open_table(spec, read_write=True) as table:
        table.update("k@example.com", "v")
        assert sorted(table.sequence()) == [("k@example.com", "v")]
    assert memcached.meta("k@example.com") is not None
    with open_table(backup) as lmdb:
        assert lmdb.lookup("k@example.com") == "v"


def test_memcache_down_with_backup_answers_from_backup(open_table: Opener, tmp_path: Path) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    spec = make_cf(tmp_path, dead_server(), f"backup = {backup}")
    with open_table(spec, read_write=True) as table:
        table.update("k@example.com", "kept")        # memcache error only logged
        assert table.lookup("k@example.com") == "kept"
        assert table.delete("k@example.com") is True
        assert table.lookup("k@example.com") is None


def test_memcache_down_without_backup_is_temporary(open_table: Opener, tmp_path: Path) -> None:
    spec = make_cf(tmp_path, dead_server())
    with open_table(spec, read_write=True) as table:
        with pytest.raises(TemporaryError):
            table.lookup("k")
        with pytest.raises(TemporaryError):
            table.update("k", "v")
        with pytest.raises(TemporaryError):
            table.delete("k")


def test_too_long_value_not_stored_in_memcache_but_in_backup(
        open_table: Opener, tmp_path: Path, memcached: Memcached,
        caplog: pytest.LogCaptureFixture) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    spec = make_cf(tmp_path, memcached.spec, "data_size_limit = 10", f"backup = {backup}")
    with caplog.at_level(logging.WARNING), open_table(spec, read_write=True) as table:
        table.update("k", "x" * 11)
    assert "too long" in caplog.text
    assert memcached.meta("k") is None
    with open_table(backup) as lmdb:
        assert lmdb.lookup("k") == "x" * 11
    plain = make_cf(tmp_path, memcached.spec, "data_size_limit = 10", name="plain.cf")
    with open_table(plain, read_write=True) as table, pytest.raises(ValueTooLongError):
        table.update("k", "x" * 11)


def test_skipped_keys(open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    spec = make_cf(tmp_path, memcached.spec, "domain = example.com", "key_format = %d/%u")
    with open_table(spec, read_write=True) as table:
        assert table.lookup("user@other.example") is None
        assert table.lookup("") is None
        with pytest.raises(KeySkippedError, match="domain mismatch"):
            table.update("user@other.example", "v")
        assert table.delete("user@other.example") is False
        table.update("user@example.com", "v")
    assert memcached.meta("example.com/user") is not None


def test_keys_with_spaces_and_long_keys_are_skipped(open_table: Opener, tmp_path: Path,
                                                    memcached: Memcached) -> None:
    spec = make_cf(tmp_path, memcached.spec)
    with open_table(spec, read_write=True) as table:
        with pytest.raises(KeySkippedError, match="space or controls"):
            table.update("a b", "v")
        with pytest.raises(KeySkippedError, match="250-byte limit"):
            table.update("x" * 251, "v")
        table.update("x" * 250, "v")
        assert table.lookup("x" * 250) == "v"
    digest = make_cf(tmp_path, memcached.spec, "key_digest = sha256", name="d.cf")
    with open_table(digest, read_write=True) as table:
        table.update("x" * 1000, "long key, digested")
        assert table.lookup("x" * 1000) == "long key, digested"


def test_sequence_needs_backup(open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    with open_table(make_cf(tmp_path, memcached.spec)) as table, \
            pytest.raises(SequenceUnsupportedError):
        list(table.sequence())


def test_read_only_and_security_sensitive(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    spec = make_cf(tmp_path, memcached.spec)
    with open_table(spec) as table:
        with pytest.raises(AccessError, match="read-only"):
            table.update("k", "v")
        with pytest.raises(AccessError):
            table.delete("k")
    with pytest.raises(AccessError, match="security-sensitive"):
        open_table(spec, security_sensitive=True)


def test_bad_backup_types(open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    with pytest.raises(UnsupportedTableError, match="postmap"):
        open_table(make_cf(tmp_path, memcached.spec, "backup = btree:/var/lib/x"))
    with pytest.raises(ConfigError):
        open_table(make_cf(tmp_path, memcached.spec, "backup = nonsense"))


def test_lookup_many_matches_lookup(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    spec = make_cf(tmp_path, memcached.spec, f"backup = {backup}", "domain = example.com")
    with open_table(backup, read_write=True) as lmdb:
        lmdb.update("b@example.com", "backup only")
    with open_table(spec, read_write=True) as table:
        assert isinstance(table, MemcacheTables)
        table.update("a@example.com", "both")
        keys = ["a@example.com", "b@example.com", "c@example.com", "x@other.example", ""]
        assert table.lookup_many(keys) == {k: table.lookup(k) for k in keys}
        assert table.lookup_many(keys)["b@example.com"] == "backup only"


def _batch_table(open_table: Opener, tmp_path: Path, memcache: str, *lines: str) -> Table:
    table = open_table(make_cf(tmp_path, memcache, *lines), read_write=True)
    assert isinstance(table, MemcacheTables)
    return table


def test_update_many_matches_update(open_table: Opener, tmp_path: Path, memcached: Memcached,
                                    caplog: pytest.LogCaptureFixture) -> None:
    """Per item, update_many() has update()'s outcome: stored (memcache with
    its ttl and flags, then the backup), skipped key, too long a value."""
    backup = f"lmdb:{tmp_path / 'backup'}"
    table = _batch_table(open_table, tmp_path, memcached.spec, f"backup = {backup}",
                         "domain = example.com", "key_format = b:%s", "flags = 7",
                         "ttl = 1200", "data_size_limit = 20")
    with table:
        with caplog.at_level(logging.WARNING):
            results = table.update_many([
                ("a@example.com", "1", None),             # the table's ttl
                ("b@example.com", "2", 60),               # its own ttl
                ("x@other.example", "3", None),           # domain mismatch: skipped
                ("c@example.com", "y" * 21, None),        # too long: backup only
                ("a@example.com", "1 again", 100_000_000),  # > 30 days: absolute
            ])
        assert results[0] is None and results[1] is None and results[4] is None
        assert isinstance(results[2], KeySkippedError)
        assert results[2].reason == "domain mismatch"
        assert results[3] is None  # as update(): with a backup, only logged
        assert "too long" in caplog.text
        assert sorted(table.sequence()) == [("a@example.com", "1 again"),
                                            ("b@example.com", "2"), ("c@example.com", "y" * 21)]
    a, b = memcached.meta("b:a@example.com"), memcached.meta("b:b@example.com")
    assert a is not None and b is not None
    assert a["value"] == "1 again" and a["flags"] == 7
    assert int(str(a["ttl"])) > 30 * 86400  # sent as absolute time, read back as seconds left
    assert b["value"] == "2" and 50 <= int(str(b["ttl"])) <= 60
    assert memcached.meta("b:c@example.com") is None
    assert memcached.meta("b:x@other.example") is None


def test_update_many_without_backup(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    table = _batch_table(open_table, tmp_path, memcached.spec, "data_size_limit = 5")
    with table:
        results = table.update_many([("k1", "v1", 60), ("", "empty key", 60),
                                     ("k2", "toolong", 60), ("k3", "v3", 60)])
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], KeySkippedError)
        assert isinstance(results[2], ValueTooLongError)
        assert table.lookup_many(["k1", "k2", "k3"]) == {"k1": "v1", "k2": None, "k3": "v3"}
    with open_table(make_cf(tmp_path, memcached.spec), read_write=False) as ro:
        assert isinstance(ro, MemcacheTables)
        with pytest.raises(AccessError):
            ro.update_many([("k", "v", None)])


def test_update_many_with_memcache_down(open_table: Opener, tmp_path: Path) -> None:
    """Without a backup every item of the failed round trip gets the error;
    with one, the error is only logged and the backup batch decides."""
    table = _batch_table(open_table, tmp_path, dead_server())
    with table:
        results = table.update_many([("k1", "v", None), ("k2", "v", None)])
        assert all(isinstance(r, TemporaryError) for r in results)
    backup = f"lmdb:{tmp_path / 'backup'}"
    table = _batch_table(open_table, tmp_path, dead_server(), f"backup = {backup}")
    with table:
        assert table.update_many([("k1", "v1", None), ("k2", "v2", None)]) == [None, None]
        assert table.lookup_many(["k1", "k2", "k3"]) == {"k1": "v1", "k2": "v2", "k3": None}


def test_lookup_many_reads_misses_from_the_backup_in_one_batch(
        open_table: Opener, tmp_path: Path, memcached: Memcached) -> None:
    backup = f"lmdb:{tmp_path / 'backup'}"
    with open_table(backup, read_write=True) as lmdb:
        for i in range(5):
            lmdb.update(f"k{i}", f"from backup {i}")
    table = _batch_table(open_table, tmp_path, memcached.spec, f"backup = {backup}",
                         "key_format = b:%s", "flags = 3", "ttl = 1200")
    with table:
        table.update("k0", "in memcache")
        keys = [f"k{i}" for i in range(6)]
        assert table.lookup_many(keys) == {
            "k0": "in memcache", "k1": "from backup 1", "k2": "from backup 2",
            "k3": "from backup 3", "k4": "from backup 4", "k5": None}
    # the backup's hits were written back to memcache, with the table's ttl and flags
    for i in range(1, 5):
        meta = memcached.meta(f"b:k{i}")
        assert meta is not None and meta["value"] == f"from backup {i}" and meta["flags"] == 3
        assert 1190 <= int(str(meta["ttl"])) <= 1200
    assert memcached.meta("b:k5") is None


def test_skip_logging(open_table: Opener, tmp_path: Path, memcached: Memcached,
                      caplog: pytest.LogCaptureFixture) -> None:
    """Skipped updates warn once; lookups Postfix skips silently stay
    quiet; a key over memcached's limit (no Postfix reason) warns."""
    spec = make_cf(tmp_path, memcached.spec, "domain = example.com")
    with open_table(spec, read_write=True) as table, caplog.at_level(logging.WARNING):
        with pytest.raises(KeySkippedError):
            table.update("u@other.example", "v")
        assert caplog.text.count("skipping update") == 1
        caplog.clear()
        assert table.lookup("u@other.example") is None
        assert caplog.text == ""
        assert table.lookup("x" * 300 + "@example.com") is None
        assert "250-byte limit" in caplog.text and "key_digest" in caplog.text
