"""A fake memcached that misbehaves on purpose, for what real ones never send
(and a DNS server that never answers, for name lookups that stall).

HostileServer listens on 127.0.0.1:0 and runs ``script(conn, index)`` in a
thread for every connection it accepts (index counts from 0), so a test can
send oversized or broken replies, stall, drip bytes or hang up mid-reply,
and then check how many connections (attempts) the client made.

Every socket operation here has a timeout and every thread is joined with
one, so a test can never hang on the fake server.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest

Script = Callable[[socket.socket, int], None]

# Longest any fake-server socket operation may block.
IO_TIMEOUT = 5.0
# Longest a script keeps a connection open (stall/drip/flood loops).
SCRIPT_MAX_SECONDS = 5.0


class HostileServer:
    """Threaded fake server; use as a context manager."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.05)
        self.port: int = self.listener.getsockname()[1]
        self.spec = f"inet:127.0.0.1:{self.port}"
        self.connections = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                index = self.connections
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn, index), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, index: int) -> None:
        conn.settimeout(IO_TIMEOUT)
        try:
            self.script(conn, index)
        except OSError:
            pass  # the client hung up: expected in most scripts
        except BaseException as exc:  # surfaced by close()
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        self._acceptor.join(IO_TIMEOUT)
        for thread in self._threads:
            thread.join(IO_TIMEOUT)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- building blocks for scripts ------------------------------------------------


def read_command(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read what the client sent up to the first CRLF (bounded)."""
    buf = b""
    while b"\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionResetError("client closed")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("command too long")
    return buf


def wait_client_gone(conn: socket.socket, server: HostileServer | None = None) -> None:
    """Hold the connection open until the client closes it (bounded)."""
    deadline = time.monotonic() + SCRIPT_MAX_SECONDS
    conn.settimeout(0.05)
    while time.monotonic() < deadline and not (server and server.stopping):
        try:
            if not conn.recv(65536):
                return
        except TimeoutError:
            continue


def reply(data: bytes) -> Script:
    """Read one command, send ``data``, then wait for the client to hang up."""

    def script(conn: socket.socket, index: int) -> None:
        read_command(conn)
        conn.sendall(data)
        wait_client_gone(conn)

    return script


def stall() -> Script:
    """Read the command and never answer."""

    def script(conn: socket.socket, index: int) -> None:
        read_command(conn)
        wait_client_gone(conn)

    return script


def drip(data: bytes, interval: float) -> Script:
    """Answer one byte every ``interval`` seconds."""

    def script(conn: socket.socket, index: int) -> None:
        read_command(conn)
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(interval)
        wait_client_gone(conn)

    return script


def flood(head: bytes, filler: bytes = b"x" * 65536) -> Script:
    """Send ``head`` then filler without end, until the client hangs up."""

    def script(conn: socket.socket, index: int) -> None:
        read_command(conn)
        conn.sendall(head)
        deadline = time.monotonic() + SCRIPT_MAX_SECONDS
        while time.monotonic() < deadline:
            conn.sendall(filler)  # raises once the client has closed

    return script


def hang_up_after(data: bytes) -> Script:
    """Send part of a reply, then close the connection."""

    def script(conn: socket.socket, index: int) -> None:
        read_command(conn)
        conn.sendall(data)

    return script


# -- a DNS server that never answers (or refuses), for name lookups -------------


class PrivateResolver:
    """A DNS server on 127.53.x.y:53 that reads queries and never answers
    (``refuse=True``: answers each with REFUSED at once), and a private
    resolv.conf naming it.

    ``wrap(argv)`` runs a program in a private mount namespace (``unshare
    --mount``, which needs root) in which that file is /etc/resolv.conf, so
    the program's own resolver (glibc's getaddrinfo) waits for this server
    for real: resolv.conf takes no port, hence port 53, and a loopback
    address of its own so that parallel test runs do not meet.  glibc gives
    up on a server that never answers after ``timeout:30`` (its maximum).
    """

    def __init__(self, directory: Path, *, refuse: bool = False) -> None:
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            pytest.skip("a private /etc/resolv.conf needs root and unshare(1)")
        self.refuse = refuse
        self.queries: list[bytes] = []  # the questions received, raw
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for _ in range(100):
            self.address = f"127.53.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
            try:
                self.sock.bind((self.address, 53))
                break
            except OSError:
                continue
        else:
            raise RuntimeError("no free 127.53.x.y:53 address")
        self.sock.settimeout(0.05)
        self.conf = directory / "resolv.conf"
        self.conf.write_text(f"nameserver {self.address}\noptions timeout:30 attempts:1\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.queries.append(query)
            if self.refuse and len(query) >= 12:
                # Same id and question; QR set, RCODE 5 (REFUSED).
                flags = bytes([query[2] | 0x80, (query[3] & 0xF0) | 5])
                self.sock.sendto(query[:2] + flags + query[4:], peer)

    def wrap(self, argv: list[str]) -> list[str]:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(self.conf), *argv]

    def as_host(self, hostname: str, hosts: str) -> Callable[[list[str]], list[str]]:
        """A wrap that also runs the program as on a host called
        ``hostname`` (a private UTS namespace: gethostname()) whose
        /etc/hosts holds ``hosts``: the resolver's files, then this server."""
        hosts_file = self.conf.with_name(f"hosts-{hostname}")
        hosts_file.write_text(hosts)

        def wrap(argv: list[str]) -> list[str]:
            return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
                    'hostname "$0" && mount --bind "$1" /etc/hosts'
                    ' && mount --bind "$2" /etc/resolv.conf && shift 2 && exec "$@"',
                    hostname, str(hosts_file), str(self.conf), *argv]
        return wrap

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(IO_TIMEOUT)

    def __enter__(self) -> PrivateResolver:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
