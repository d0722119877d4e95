"""memtable.files: only regular files are read, so that a FIFO (or a
device) where a configuration or table file belongs is a clear error, not a
hang.  Through the real commands, each under a timeout: a hang fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtable.files import read_regular_file

COMMAND_TIMEOUT = 30


def test_reads_at_most_limit_plus_one(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    data, st = read_regular_file(str(path), 10)
    assert data == b"x" * 11 and st.st_size == 100
    assert read_regular_file(str(path), 1000)[0] == b"x" * 100


def test_refuses_fifo_directory_and_missing(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        read_regular_file(str(fifo), 10)
    with pytest.raises(IsADirectoryError):
        read_regular_file(str(tmp_path), 10)
    with pytest.raises(FileNotFoundError):
        read_regular_file(str(tmp_path / "missing"), 10)


def _python(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, check=False)


@pytest.mark.parametrize("place", ["cf", "texthash", "lmdb", "domain", "backup-cf"])
def test_memtable_fifo_is_a_fatal_error(tmp_path: Path, place: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cf = tmp_path / "t.cf"
    if place == "cf":
        spec = f"memcache:{fifo}"
    elif place == "texthash":
        spec = f"texthash:{fifo}"
    elif place == "lmdb":
        os.mkfifo(tmp_path / "db.lmdb")
        spec = f"lmdb:{tmp_path / 'db'}"
    elif place == "domain":
        cf.write_text(f"memcache = inet:127.0.0.1:9\ndomain = {fifo}\n")
        spec = f"memcache:{cf}"
    else:
        cf.write_text(f"memcache = inet:127.0.0.1:9\nbackup = memcache:{fifo}\n")
        spec = f"memcache:{cf}"
    done = _python("-m", "memtable.cli", "-q", "user@example.com", spec)
    assert done.returncode == 1, done
    assert "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("place", ["policyd.cf", "whitelist"])
def test_policyd_check_config_fifo_is_an_error(tmp_path: Path, place: str) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    if place == "policyd.cf":
        cf = fifo
    else:
        cf = tmp_path / "policyd.cf"
        cf.write_text(f"triplet_table = lmdb:{tmp_path}/t\nclient_table = lmdb:{tmp_path}/c\n"
                      f"whitelist_clients = {fifo}\n")
    done = _python("-m", "policyd", "-c", str(cf), "--check-config")
    assert done.returncode == 1, done
    assert "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr
