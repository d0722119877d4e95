"""A real authoritative DNS server for tests: NSD (Debian's nsd) on a
loopback port, serving zones the test writes, never the network.

    with start_nsd(tmp_path, {"example.org": ZONE_TEXT}) as dns:
        resolver = Resolver(servers=(dns.server,), timeout=2.0)

A zone text is the body of a zone file without $ORIGIN (added here); NSD
answers authoritatively, so names outside the given zones are REFUSED
(a DNS failure to the client), and TTLs are exactly the zone's.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import stop_process

NSD = shutil.which("nsd") or "/usr/sbin/nsd"
START_WAIT = 10.0  # seconds for nsd to answer its first query

SOA = "@ 3600 IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n@ 3600 IN NS ns.{zone}.\n"


@dataclass(frozen=True)
class Nsd:
    """A running nsd: ``server`` is its (address, port)."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    directory: Path

    @property
    def server(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def spec(self) -> str:
        """The server as policyd's dns_servers names it."""
        return f"{self.host}:{self.port}"


def _config(directory: Path, port: int, zones: Mapping[str, str]) -> str:
    lines = [
        "server:",
        "  ip-address: 127.0.0.1",
        f"  port: {port}",
        f'  zonesdir: "{directory}"',
        f'  pidfile: "{directory}/nsd.pid"',
        '  database: ""',
        f'  xfrdfile: "{directory}/xfrd.state"',
        f'  zonelistfile: "{directory}/zone.list"',
        f'  logfile: "{directory}/nsd.log"',
        '  username: ""',
        '  chroot: ""',
        "  server-count: 1",
        "  verbosity: 1",
        # No response rate limiting: a load test's NXDOMAIN flood from
        # loopback is what it is there to stop, and nsd would drop answers.
        "  rrl-ratelimit: 0",
        "remote-control:",
        "  control-enable: no",
    ]
    for zone in zones:
        lines += ["zone:", f"  name: {zone}", f'  zonefile: "{zone}.zone"']
    return "\n".join(lines) + "\n"


def _answers(host: str, port: int) -> bool:
    """Does something answer a DNS query on (host, port) over UDP?"""
    # A minimal query for "." SOA; any reply (even REFUSED) means nsd is up.
    query = bytes.fromhex("abcd01000001000000000000") + b"\x00\x00\x06\x00\x01"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.2)
        try:
            s.sendto(query, (host, port))
            return s.recv(512)[:2] == b"\xab\xcd"
        except OSError:
            return False


@contextmanager
def start_nsd(directory: Path, zones: Mapping[str, str]) -> Iterator[Nsd]:
    """Start nsd serving ``zones`` (name -> records) on a loopback port."""
    # Imported here: conftest imports this module, and bench/ imports it alone.
    from tests.conftest import free_port

    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    for zone, body in zones.items():
        text = f"$ORIGIN {zone}.\n$TTL 300\n" + SOA.format(zone=zone) + body
        (directory / f"{zone}.zone").write_text(text)
    port = free_port()
    conf = directory / "nsd.conf"
    conf.write_text(_config(directory, port, zones))
    check = subprocess.run(["nsd-checkconf", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nsd.conf: {check.stderr.strip()}")
    proc = subprocess.Popen([NSD, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    nsd = Nsd(proc, "127.0.0.1", port, directory)
    try:
        deadline = time.monotonic() + START_WAIT
        while not _answers(nsd.host, port):
            if proc.poll() is not None or time.monotonic() > deadline:
                log = directory / "nsd.log"
                raise RuntimeError("nsd did not start: "
                                   + (log.read_text()[-2000:] if log.exists() else ""))
            time.sleep(0.02)
        yield nsd
    finally:
        stop_process(proc)


class SilentServer:
    """A loopback UDP socket that takes DNS queries and never answers: what
    a resolver sees from a DNS server that hangs.  ``queries()`` counts the
    datagrams it was sent so far."""

    def __init__(self, udp: socket.socket) -> None:
        self._udp = udp
        self._received = 0
        udp.setblocking(False)

    @property
    def server(self) -> tuple[str, int]:
        return ("127.0.0.1", self._udp.getsockname()[1])

    def queries(self) -> int:
        while True:
            try:
                self._udp.recv(65536)
            except BlockingIOError:
                return self._received
            self._received += 1


@contextmanager
def silent_dns() -> Iterator[SilentServer]:
    """A SilentServer on a loopback port for the block."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        yield SilentServer(udp)


@contextmanager
def silent_dns_server() -> Iterator[tuple[str, int]]:
    """The (address, port) of a SilentServer."""
    with silent_dns() as silent:
        yield silent.server


@pytest.fixture
def nsd_factory(tmp_path: Path) -> Iterator[Callable[[Mapping[str, str]], Nsd]]:
    """Start nsd servers for this test: ``nsd_factory({"zone": body})``."""
    with ExitStack() as exits:
        started: list[Nsd] = []

        def factory(zones: Mapping[str, str]) -> Nsd:
            nsd = exits.enter_context(start_nsd(tmp_path / f"nsd{len(started)}", zones))
            started.append(nsd)
            return nsd

        yield factory
