"""A crash (SIGKILL) of a process writing through an AsyncMemcacheTable
loses no acknowledged write: every key whose update_many had returned is in
the lmdb backup, read by a fresh LmdbTable and by Postfix's postmap."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memtable.backends.lmdb_table import LmdbTable
from tests.conftest import Memcached
from tests.postfixcf import postfix_config_dir
from tests.postfixlab import HAVE_POSTMAP, run_postmap

ACKNOWLEDGED_BEFORE_KILL = 300
WRITERS = 8


@pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed")
def test_sigkill_loses_no_acknowledged_write(tmp_path: Path, memcached: Memcached) -> None:
    backup = tmp_path / "backup"
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nbackup = lmdb:{backup}\n")
    root = Path(__file__).resolve().parent.parent
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_writer", f"memcache:{cf}", str(WRITERS)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < ACKNOWLEDGED_BEFORE_KILL:
            line = child.stdout.readline()
            if not line:
                _, err = child.communicate(timeout=30)
                raise AssertionError(f"the writer ended ({child.returncode}): {err}")
            acknowledged.append(line.strip())
        # Mid-stream: commits and round trips are in flight.
        os.kill(child.pid, signal.SIGKILL)
        rest, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    # Lines written before the kill are still in the pipe: acknowledged too.
    acknowledged += rest.splitlines()  # each line one write(): never cut
    assert len(set(acknowledged)) == len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL

    table = LmdbTable(str(backup), read_write=False, fold=True)
    try:
        stored = dict(table.sequence())
    finally:
        table.close()
    missing = [key for key in acknowledged if stored.get(key) != f"value of {key}"]
    assert not missing, f"{len(missing)} acknowledged keys lost, e.g. {missing[:5]}"

    listed = run_postmap(postfix_config_dir(tmp_path), "-s", f"lmdb:{backup}")
    assert listed.returncode == 0, listed.stderr
    by_postmap = dict(line.split("\t", 1) for line in listed.stdout.decode().splitlines())
    assert [key for key in acknowledged if by_postmap.get(key) != f"value of {key}"] == []
    # And memcached answered each of them: it has the last ones too.
    assert memcached.meta(acknowledged[-1]) is not None
