"""Memory of a policy server: RSS with many idle connections, and RSS as
requests accumulate (a leak shows as growth that does not level off).

Idle connections are opened from this process with plain sockets; each
asks one request (so the server holds whatever per-connection state a real
smtpd connection creates) and then stays open, silent, while the server's
VmRSS is read.  The request run uses the load generator (100 connections,
realistic mix) in chunks, reading RSS after each chunk.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from bench.loadgen import LoadResult, LoadSpec, run_load
from bench.requests import render
from bench.servers import Server, ask_policy

IDLE_SETTLE_SECONDS = 1.0
SOCKET_TIMEOUT = 10.0
# Chunks of the long request run (RSS is read after each).
CHUNKS = 4
LOAD_CONNECTIONS = 100


@dataclass
class IdleResult:
    server: str
    connections: int
    opened: int
    errors: int
    rss_before_kib: int
    rss_idle_kib: int
    rss_after_close_kib: int
    anon_before_kib: int
    anon_idle_kib: int


@dataclass
class GrowthResult:
    server: str
    requests: int
    errors: int
    rss_start_kib: int
    anon_start_kib: int
    # (requests so far, RSS KiB, anonymous RSS KiB) after each chunk
    points: list[tuple[int, int, int]] = field(default_factory=list)
    runs: list[LoadResult] = field(default_factory=list)

    @property
    def second_half_growth_kib(self) -> int:
        """Anonymous RSS growth over the second half of the run (0 if too
        few points): heap that keeps growing once warm is a leak."""
        if len(self.points) < 2:
            return 0
        middle = self.points[len(self.points) // 2 - 1][2]
        return self.points[-1][2] - middle


def idle_connections(server: Server, count: int) -> IdleResult:
    before, anon_before = server.rss_kib(), server.anon_kib()
    socks: list[socket.socket] = []
    errors = 0
    try:
        for i in range(count):
            try:
                s = socket.create_connection((server.host, server.port), timeout=SOCKET_TIMEOUT)
            except OSError:
                errors += 1
                continue
            socks.append(s)
            try:
                if not ask_policy(s, render(i, 3, i, 1000, 1024 + i)):
                    errors += 1
            except OSError:
                errors += 1
        time.sleep(IDLE_SETTLE_SECONDS)
        # Still open?  A server that dropped idle connections fails here.
        for s in socks:
            try:
                if not ask_policy(s, render(count + 1, 3, 0, 1000, 1024)):
                    errors += 1
            except OSError:
                errors += 1
        time.sleep(IDLE_SETTLE_SECONDS)
        idle, anon_idle = server.rss_kib(), server.anon_kib()
    finally:
        for s in socks:
            s.close()
    time.sleep(IDLE_SETTLE_SECONDS)
    return IdleResult(server.name, count, len(socks), errors, before, idle, server.rss_kib(),
                      anon_before, anon_idle)


def request_growth(server: Server, requests: int, timeout: float = 10.0) -> GrowthResult:
    result = GrowthResult(server.name, 0, 0, server.rss_kib(), server.anon_kib())
    chunk = max(1, requests // CHUNKS)
    done = 0
    for i in range(CHUNKS):
        n = chunk if i < CHUNKS - 1 else requests - done
        if n <= 0:
            break
        # Duration only caps the chunk; 1,000/s is far below any server here.
        spec = LoadSpec(server.host, server.port, LOAD_CONNECTIONS, mix="mixed",
                        duration=max(60.0, n / 1000), requests=n, timeout=timeout,
                        seed=100 + i)
        run = run_load(spec)
        result.runs.append(run)
        done += run.requests
        result.errors += run.error_count
        result.points.append((done, server.rss_kib(), server.anon_kib()))
    result.requests = done
    return result
