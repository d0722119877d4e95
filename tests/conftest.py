"""Fixtures shared by the whole suite: real memcached servers started on
loopback ports or UNIX sockets in a temporary directory.

And the test run's isolation from the host's mail configuration, set up
before any test runs: reading /etc/postfix or /etc/policyd fails in the
pytest process and in every Python process a test starts
(tests/hostguard), and MAIL_CONFIG points Postfix programs run without
``-c`` (postconf, postmap) at an empty directory, so they fail with
"open .../main.cf" instead of reading the host's.  A test that depends on
the host therefore fails on every machine, not only on a fresh one.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import stop_process

MEMCACHED = shutil.which("memcached") or "/usr/bin/memcached"
HOSTGUARD_DIR = Path(__file__).resolve().parent / "hostguard"
_empty_mail_config: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    from tests.hostguard import sitecustomize  # noqa: F401  # installs the guard here

    empty = tempfile.mkdtemp(prefix="tests-empty-mail-config.")
    _empty_mail_config.append(empty)
    os.environ["MAIL_CONFIG"] = empty
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HOSTGUARD_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_unconfigure(config: pytest.Config) -> None:
    for empty in _empty_mail_config:
        shutil.rmtree(empty, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Memcached:
    """A private memcached process; ``spec`` is its memcache = value."""

    proc: subprocess.Popen[bytes]
    spec: str
    host: str = ""
    port: int = 0
    path: str = ""

    def connect(self) -> socket.socket:
        if self.path:
            s = socket.socket(socket.AF_UNIX)
            s.connect(self.path)
        else:
            s = socket.create_connection((self.host, self.port))
        s.settimeout(5)
        return s

    def pause(self) -> None:
        """Stop memcached (SIGSTOP: it accepts connections, never answers),
        and wait until the kernel says it is stopped: on a busy machine a
        thread may otherwise still answer the next request."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with open(f"/proc/{self.proc.pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t"):
                    return
            time.sleep(0.005)
        raise AssertionError(f"memcached {self.proc.pid} did not stop")

    def raw(self, command: bytes) -> bytes:
        """Send one command and return the reply up to its terminator."""
        with self.connect() as s:
            s.sendall(command)
            buf = b""
            while not buf.endswith((b"END\r\n", b"EN\r\n", b"STORED\r\n", b"DELETED\r\n",
                                    b"NOT_FOUND\r\n", b"OK\r\n", b"ERROR\r\n", b"HD\r\n")) \
                    and b"\r\n" not in buf[-2:]:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
            return buf

    def meta(self, key: str) -> dict[str, object] | None:
        """Raw state of key with `mg KEY t f v`: ttl left, flags, value."""
        with self.connect() as s:
            s.sendall(b"mg " + key.encode() + b" t f v\r\n")
            buf = b""
            while b"\r\n" not in buf:
                buf += s.recv(65536)
            head, _, rest = buf.partition(b"\r\n")
            if head.startswith(b"EN"):
                return None
            parts = head.split()
            assert parts[0] == b"VA", head
            size = int(parts[1])
            while len(rest) < size + 2:
                rest += s.recv(65536)
            info: dict[str, object] = {"value": rest[:size].decode()}
            for p in parts[2:]:
                if p.startswith(b"t"):
                    info["ttl"] = int(p[1:])
                elif p.startswith(b"f"):
                    info["flags"] = int(p[1:])
            return info

    def flush(self) -> None:
        self.raw(b"flush_all\r\n")

    def stop(self) -> None:
        stop_process(self.proc)


def _wait_ready(mc: Memcached) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with mc.connect() as s:
                s.sendall(b"version\r\n")
                if s.recv(100).startswith(b"VERSION"):
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"memcached on {mc.spec} did not start")


def start_memcached(tmp: Path, unix: bool = False, port: int | None = None,
                    extra: tuple[str, ...] = ()) -> Memcached:
    user = ["-u", "root"] if os.geteuid() == 0 else []  # memcached refuses root without -u
    if unix:
        path = str(tmp / f"memcached-{os.getpid()}-{time.monotonic_ns()}.sock")
        proc = subprocess.Popen([MEMCACHED, *user, "-s", path, "-a", "0666", "-m", "64", *extra])
        mc = Memcached(proc, f"unix:{path}", path=path)
    else:
        port = port or free_port()
        proc = subprocess.Popen([MEMCACHED, *user, "-l", "127.0.0.1", "-p", str(port),
                                 "-U", "0", "-m", "64", *extra])
        mc = Memcached(proc, f"inet:127.0.0.1:{port}", host="127.0.0.1", port=port)
    try:
        _wait_ready(mc)
    except Exception:
        mc.stop()
        raise
    return mc


@pytest.fixture(scope="session")
def memcached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Memcached]:
    """One memcached on a loopback port for the whole session."""
    mc = start_memcached(tmp_path_factory.mktemp("memcached"))
    yield mc
    mc.stop()


@pytest.fixture
def memcached(memcached_server: Memcached) -> Memcached:
    """The session memcached, emptied for this test."""
    memcached_server.flush()
    return memcached_server


@pytest.fixture
def memcached_unix(tmp_path: Path) -> Iterator[Memcached]:
    """A memcached of this test's own on a UNIX socket."""
    mc = start_memcached(tmp_path, unix=True)
    yield mc
    mc.stop()


# Fixtures defined beside their helpers, made available to every test file.
from tests.dnslab import nsd_factory  # noqa: E402, F401
from tests.memcache_runners import open_table_fixture  # noqa: E402, F401
from tests.policyd_proc import policyd_factory  # noqa: E402, F401
from tests.postfixlab import postfix_instance, postmap_config  # noqa: E402, F401


@pytest.fixture(params=["blocking", "asyncio"])
def wire_driver(request: pytest.FixtureRequest) -> Any:
    """The class of memcache wire to build: MemcacheWire, or the asyncio
    driver behind a blocking face (tests/wire_drivers.py)."""
    from tests.wire_drivers import DRIVERS

    return DRIVERS[request.param]
