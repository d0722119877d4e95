"""memtable.memcache_rules on its own: the plans driven by hand, with no
I/O, for what only an event loop running several plans at once can make
happen (which no blocking test can reach)."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from memtable.config import MemcacheConfig
from memtable.errors import ServerUnavailableError
from memtable.keys import KeyFormat, KeyPipeline
from memtable.memcache_rules import (
    BackupLookup,
    BackupUpdate,
    Effect,
    McGet,
    McSet,
    MemcacheRules,
    SetAndCommit,
)


class _Wire:
    """The wire's two non-I/O parts."""

    writable = True

    def __init__(self) -> None:
        self.by_backup = 0

    def answered_by_backup(self, count: int = 1) -> None:
        self.by_backup += count


def _rules(tmp_path: Path) -> MemcacheRules:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = inet:127.0.0.1:11211\nbackup = lmdb:{tmp_path / 'b'}\n"
                  "ttl = 600\n")
    config = MemcacheConfig.from_file(str(cf))
    return MemcacheRules(config, read_write=True, fold=True,
                         pipeline=KeyPipeline(KeyFormat.compile("%s")), has_backup=True,
                         wire=_Wire())


def _finish(plan: Generator[Effect, Any, Any], result: object) -> Any:
    """Send the last effect's result: the plan must end, with this value."""
    with pytest.raises(StopIteration) as done:
        plan.send(result)
    return done.value.value


def _stale(rules: MemcacheRules, key: str) -> None:
    """key written while memcached failed: in the backup only."""
    plan = rules.update([(key, "new", None)])
    effect = plan.send(None)
    assert isinstance(effect, SetAndCommit)
    assert _finish(plan, (ServerUnavailableError("down"), [None])) == [None]
    assert key.encode() in rules.stale


def test_a_key_written_while_it_is_repaired_stays_stale(tmp_path: Path) -> None:
    """The repair read the backup's value; before its set came back, an
    update of the key succeeded (another request on the loop).  memcached
    may now hold the repair's older value: the key must stay stale."""
    rules = _rules(tmp_path)
    _stale(rules, "k")
    repair = rules.repair()
    assert repair.send(None) == BackupLookup(["k"])
    assert isinstance(repair.send({"k": "new"}), McSet)
    # meanwhile: an update of k, memcached and backup both fine
    update = rules.update([("k", "newer", None)])
    update.send(None)  # its repair is skipped: one repair at a time
    assert _finish(update, (None, [None])) == [None]
    assert b"k" not in rules.stale
    _finish(repair, None)  # the repair's set: STORED
    assert b"k" in rules.stale  # rewritten from the backup by the next repair


def test_a_repair_with_nothing_changed_meanwhile_forgets_the_key(tmp_path: Path) -> None:
    rules = _rules(tmp_path)
    _stale(rules, "k")
    repair = rules.repair()
    repair.send(None)
    repair.send({"k": "new"})
    _finish(repair, None)
    assert rules.stale == {}


def test_a_write_back_does_not_undo_a_failure_marked_meanwhile(tmp_path: Path) -> None:
    """A lookup missed memcached and read the backup; meanwhile an update
    of the key failed in memcached (stale now).  The lookup's write-back of
    the older value must not clear that."""
    rules = _rules(tmp_path)
    lookup = rules.lookup(["k"])
    assert lookup.send(None) == McGet([b"k"])
    assert lookup.send({}) == BackupLookup(["k"])
    assert isinstance(lookup.send({"k": "old"}), McSet)
    _stale(rules, "k")
    assert _finish(lookup, None) == {"k": "old"}
    assert b"k" in rules.stale


def test_an_update_abandoned_mid_write_marks_its_keys_stale(tmp_path: Path) -> None:
    """The caller was cancelled while the sets and the commit were in
    flight: memcached may hold either value, so the backup decides."""
    rules = _rules(tmp_path)
    plan = rules.update([("a", "1", None), ("b", "2", 60)])
    effect = plan.send(None)
    assert isinstance(effect, SetAndCommit)
    assert effect.commit == BackupUpdate([("a", "1", None), ("b", "2", None)])
    plan.close()
    assert set(rules.stale) == {b"a", b"b"}
