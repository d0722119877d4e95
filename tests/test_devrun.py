"""`./dev run` (policyd.devrun): a development instance that never mixes with
a production install on the same machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from memtable.config import MemcacheConfig
from policyd.devrun import memcached_answers
from tests.conftest import free_port
from tests.policyd_helpers import ask, connect, request, wait_until
from tests.wait import WAIT

REPO = Path(__file__).resolve().parent.parent
MEMTABLE = [sys.executable, "-m", "memtable.cli"]


def test_dev_run_uses_its_own_memcached_and_says_so(tmp_path: Path) -> None:
    """Its tables are on a memcached it started itself, on a port of its own
    (not production's 127.0.0.1:11211), the first line says which, and the
    README's `memtable -s memcache:.run/triplets.cf` shows what it stored."""
    state = tmp_path / "run"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policyd.devrun", "--state", str(state),
                             "-o", f"listen=inet:127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        said = re.fullmatch(r"started a private memcached on 127\.0\.0\.1:(\d+) \(pid \d+\) "
                            r"for this dev instance; 127\.0\.0\.1:11211 is not used\n", first)
        assert said, first
        mc_port = int(said[1])
        assert mc_port != 11211
        for table in ("triplets.cf", "clients.cf"):
            memcache = MemcacheConfig.from_file(str(state / table)).memcache
            assert (memcache.host, memcache.port) == ("127.0.0.1", mc_port)

        def answers() -> bool:
            try:
                with connect(("127.0.0.1", port)) as sock:
                    return ask(sock, request()).startswith(b"action=")
            except OSError:
                return False

        assert wait_until(answers, WAIT)
        listed = subprocess.run([*MEMTABLE, "-s", f"memcache:{state / 'triplets.cf'}"],
                                capture_output=True, text=True, timeout=30, check=False)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("192.0.2.0/a@example.org/b@example.com\t")
        got = subprocess.run([*MEMTABLE, "-q", "192.0.2.0/a@example.org/b@example.com",
                              f"memcache:{state / 'triplets.cf'}"],
                             capture_output=True, text=True, timeout=30, check=False)
        assert got.returncode == 0, got.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=WAIT)
    assert proc.returncode == 0
    assert not memcached_answers("127.0.0.1", mc_port)  # stopped with the dev instance


def test_dev_run_says_so_when_policyd_is_killed(tmp_path: Path) -> None:
    """kill -9 of its policyd: one line saying so, exit 128 + 9, and its
    memcached stopped (a policyd killed this way cannot log anything)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "policyd.devrun", "--state",
                             str(tmp_path / "run"), "-o", f"listen=inet:127.0.0.1:{port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    try:
        assert proc.stdout is not None
        started = re.findall(r"127\.0\.0\.1:(\d+) \(pid (\d+)\)", proc.stdout.readline())
        mc_port, mc_pid = int(started[0][0]), int(started[0][1])

        def policyd_pid() -> int | None:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            for pid in children:
                if b"policyd" in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[2]:
                    return int(pid)
            return None

        assert wait_until(lambda: policyd_pid() is not None, WAIT)
        pid = policyd_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 137
    assert err.endswith(f"dev run: policyd (pid {pid}) was killed by SIGKILL; stopping its "
                        f"private memcached (pid {mc_pid})\n")
    assert not memcached_answers("127.0.0.1", mc_port)
