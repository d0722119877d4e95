"""Closed-loop load generator for SMTPD policy servers.

N persistent connections, each behaving like one smtpd process: send one
request, wait for the whole reply (``action=...\\n\\n``), record the
latency, send the next.  The generator runs in worker PROCESSES of its own
(never in the process of a server under test), several of them for many
connections, each one select.epoll loop over non-blocking sockets (no
asyncio, no coroutine per request: the generator shares the machine with
the server under test and must cost it as little CPU as it can;
bench.run measures a do-nothing server to show its ceiling).

Errors are counted, never raised: ``connect`` (could not connect),
``closed`` (server closed a connection), ``timeout`` (no reply within
``timeout`` seconds), ``malformed`` (anything but one ``action=`` line and
an empty line).  After an error the connection is reopened after a short
pause, as smtpd would on its next request.
"""

from __future__ import annotations

import errno
import math
import multiprocessing as mp
import select
import socket
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from bench.requests import make_source

# Connections one worker process drives at most (more -> more processes).
CONNECTIONS_PER_PROCESS = 500
# Connections opened at once while setting up (the server's listen queue).
CONNECT_BATCH = 100
# Pause before reopening a connection after an error.
RECONNECT_PAUSE_NS = 50_000_000
# How often in-flight requests are checked against the reply timeout.
TIMEOUT_SCAN_NS = 100_000_000
# Distinct reply byte strings whose parsed action is remembered.
REPLY_CACHE_ENTRIES = 256
# Longest reply accepted (postgrey's and policyd's are < 200 bytes).
MAX_REPLY_BYTES = 4096
# Extra time the parent waits for workers beyond duration + reply timeout.
WORKER_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class LoadSpec:
    """What to run: where, how many connections, which mix, how long."""

    host: str
    port: int
    connections: int
    mix: str = "mixed"
    duration: float = 5.0
    # Stop after this many replies in total (duration then only caps it).
    requests: int | None = None
    processes: int = 0  # 0: one per CONNECTIONS_PER_PROCESS connections
    timeout: float = 10.0
    connect_timeout: float = 10.0
    seed: int = 0

    def process_count(self) -> int:
        if self.processes > 0:
            return min(self.processes, self.connections)
        return max(1, math.ceil(self.connections / CONNECTIONS_PER_PROCESS))


@dataclass
class LoadResult:
    """Figures of one run; latencies in milliseconds."""

    connections: int
    mix: str
    requests: int
    elapsed: float
    errors: dict[str, int] = field(default_factory=dict)
    actions: dict[str, int] = field(default_factory=dict)
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    processes: int = 1
    # CPU time the server under test used while the requests ran (from the
    # meter given to run_load), None when not measured.
    server_cpu_seconds: float | None = None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def cpu_us_per_request(self) -> float | None:
        """The server's CPU time per request answered, in microseconds."""
        if self.server_cpu_seconds is None or self.requests <= 0:
            return None
        return self.server_cpu_seconds / self.requests * 1e6


def percentile(sorted_values: list[int] | array[int], fraction: float) -> int:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return int(sorted_values[rank - 1])


def parse_reply(data: bytes) -> str | None:
    """The action word of one complete reply, or None when malformed."""
    if not data.startswith(b"action=") or not data.endswith(b"\n\n"):
        return None
    line = data[:-2]
    if b"\n" in line:
        return None
    value = line[7:].decode("utf-8", "replace").strip()
    return value.split(None, 1)[0].upper() if value else None


# --- worker process --------------------------------------------------------


class _Conn:
    """One connection: its socket, the reply so far, the request in flight."""

    __slots__ = ("buf", "connecting", "out", "sent_ns", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.out = b""        # unsent rest of the request (a short send)
        self.sent_ns = 0      # perf_counter_ns of the request in flight, 0 when none
        self.connecting = True


class _Worker:
    """One process's connections and tallies, driven by one epoll loop.

    Plain non-blocking sockets and select.epoll instead of asyncio: per
    request the generator then costs a recv, a send and a few list
    operations, a half to a third of what asyncio's transports and protocol
    callbacks cost, and the CPU it does not take is left to the server
    under test on the same machine.
    """

    def __init__(self, spec: LoadSpec, index: int, connections: int, quota: int | None) -> None:
        self.spec = spec
        self.count = connections
        self.quota = quota
        self.next_request: Callable[[], bytes] = make_source(spec.mix, index, spec.seed)
        self.latencies: array[int] = array("q")
        self.errors: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        # Replies are a handful of distinct byte strings: parse each once.
        self.reply_actions: dict[bytes, str | None] = {}
        self.sent = 0
        self.deadline_ns = 0
        self.last_reply_ns = 0
        self.running = False
        family, _, _, _, address = socket.getaddrinfo(spec.host, spec.port,
                                                      type=socket.SOCK_STREAM)[0]
        self.family, self.address = family, address
        self.conns: dict[int, _Conn] = {}
        self.reconnect_at: list[int] = []  # monotonic_ns times, one per connection to reopen
        self.epoll = select.epoll()

    # -- connections ---------------------------------------------------------

    def open(self) -> None:
        """Start a non-blocking connect; completion shows as writability."""
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.errors["connect"] += 1
            self._schedule_reconnect()
            return
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.epoll.register(sock.fileno(), select.EPOLLOUT)

    def _connected(self, fd: int, conn: _Conn) -> bool:
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop(fd, conn)
            self.errors["connect"] += 1
            self._schedule_reconnect()
            return False
        conn.connecting = False
        self.epoll.modify(fd, select.EPOLLIN)
        return True

    def _drop(self, fd: int, conn: _Conn) -> None:
        del self.conns[fd]
        self.epoll.unregister(fd)
        conn.sock.close()

    def _schedule_reconnect(self) -> None:
        if self.running and self.may_send():
            self.reconnect_at.append(time.monotonic_ns() + RECONNECT_PAUSE_NS)

    def fail(self, fd: int, conn: _Conn, kind: str) -> None:
        if conn.sent_ns:
            # The request in flight is lost; smtpd would count it as failed.
            self.sent -= 1
        self._drop(fd, conn)
        self.errors[kind] += 1
        self._schedule_reconnect()

    # -- requests --------------------------------------------------------------

    def may_send(self) -> bool:
        if not self.running or time.monotonic_ns() >= self.deadline_ns:
            return False
        return self.quota is None or self.sent < self.quota

    def send_next(self, fd: int, conn: _Conn) -> None:
        if not self.may_send():
            return
        request = self.next_request()
        self.sent += 1
        conn.sent_ns = time.perf_counter_ns()
        try:
            n = conn.sock.send(request)
        except BlockingIOError:
            n = 0
        except OSError:
            self.fail(fd, conn, "closed")
            return
        if n < len(request):  # rare on loopback: finish when writable
            conn.out = request[n:]
            self.epoll.modify(fd, select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, fd: int, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self.fail(fd, conn, "closed")
            return
        conn.out = conn.out[n:]
        if not conn.out:
            self.epoll.modify(fd, select.EPOLLIN)

    def readable(self, fd: int, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_REPLY_BYTES + 1)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        now = time.perf_counter_ns()
        if not data:
            self.fail(fd, conn, "closed")
            return
        if not conn.sent_ns:
            self.fail(fd, conn, "malformed")  # a reply nobody asked for
            return
        buf = conn.buf + data if conn.buf else data
        if not buf.endswith(b"\n\n"):
            if len(buf) > MAX_REPLY_BYTES:
                self.fail(fd, conn, "malformed")
            else:
                conn.buf = buf
            return
        try:
            action = self.reply_actions[buf]
        except KeyError:
            action = parse_reply(buf)
            if len(self.reply_actions) < REPLY_CACHE_ENTRIES:
                self.reply_actions[buf] = action
        if action is None:
            self.fail(fd, conn, "malformed")
            return
        self.latencies.append(now - conn.sent_ns)
        self.actions[action] += 1
        self.last_reply_ns = now
        conn.buf = b""
        conn.sent_ns = 0
        self.send_next(fd, conn)

    # -- the loop ----------------------------------------------------------------

    def connect_all(self) -> int:
        """Open every connection (CONNECT_BATCH at a time); the number open."""
        deadline = time.monotonic() + self.spec.connect_timeout
        for first in range(0, self.count, CONNECT_BATCH):
            for _ in range(min(CONNECT_BATCH, self.count - first)):
                self.open()
            while any(c.connecting for c in self.conns.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    for fd, conn in list(self.conns.items()):
                        if conn.connecting:
                            self._drop(fd, conn)
                            self.errors["connect"] += 1
                    break
                for fd, _ in self.epoll.poll(min(left, 0.1)):
                    conn = self.conns[fd]
                    if conn.connecting:
                        self._connected(fd, conn)
        self.reconnect_at.clear()
        return len(self.conns)

    def run(self, missing: int) -> None:
        t0 = time.monotonic_ns()
        self.deadline_ns = t0 + int(self.spec.duration * 1e9)
        self.running = True
        self.reconnect_at = [t0] * missing
        for fd, conn in list(self.conns.items()):
            self.send_next(fd, conn)
        timeout_ns = int(self.spec.timeout * 1e9)
        # After the deadline only replies in flight are awaited, at most timeout.
        give_up_ns = self.deadline_ns + timeout_ns + int(5e9)
        next_scan = t0 + TIMEOUT_SCAN_NS
        poll = self.epoll.poll
        conns = self.conns
        while True:
            now = time.monotonic_ns()
            if self.reconnect_at and min(self.reconnect_at) <= now:
                due = [t for t in self.reconnect_at if t <= now]
                self.reconnect_at = [t for t in self.reconnect_at if t > now]
                for _ in due:
                    if self.may_send():
                        self.open()
            if now >= next_scan:
                next_scan = now + TIMEOUT_SCAN_NS
                self._scan(timeout_ns)
                if self._idle() or now >= give_up_ns:
                    break
            wake = next_scan
            if self.reconnect_at:
                wake = min(wake, min(self.reconnect_at))
            for fd, ev in poll(max(wake - now, 0) / 1e9):
                c = conns.get(fd)
                if c is None:
                    continue
                if c.connecting:
                    if self._connected(fd, c):
                        self.send_next(fd, c)
                    continue
                if ev & select.EPOLLOUT and c.out:
                    self._flush(fd, c)
                    if fd not in conns:  # the send failed: dropped
                        continue
                if ev & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self.readable(fd, c)
        for conn in conns.values():
            if conn.sent_ns:
                self.errors["timeout"] += 1
            conn.sock.close()
        conns.clear()
        self.epoll.close()

    def _scan(self, limit_ns: int) -> None:
        now = time.perf_counter_ns()
        for fd, conn in list(self.conns.items()):
            if conn.sent_ns and now - conn.sent_ns > limit_ns:
                self.fail(fd, conn, "timeout")

    def _idle(self) -> bool:
        """Done: nothing in flight, nothing more to send."""
        if self.may_send():
            return False
        return not any(c.sent_ns or c.connecting for c in self.conns.values())


def _worker(spec: LoadSpec, index: int, connections: int, quota: int | None,
            pipe: Connection, start: Any) -> None:
    try:
        w = _Worker(spec, index, connections, quota)
        opened = w.connect_all()
        pipe.send(("ready", opened))
        if not start.wait(spec.connect_timeout + 60):
            result: dict[str, Any] = {"aborted": True}
        else:
            t0 = time.perf_counter_ns()  # the clock of the latencies and last_reply_ns
            w.run(connections - opened)
            result = {
                "start_ns": t0,
                "end_ns": w.last_reply_ns or t0,
                "latencies": w.latencies.tobytes(),
                "errors": dict(w.errors),
                "actions": dict(w.actions),
            }
    except Exception as exc:  # reported to the parent, which shows it
        result = {"crashed": f"{type(exc).__name__}: {exc}"}
    pipe.send(("done", result))
    pipe.close()


# --- parent ----------------------------------------------------------------


class LoadError(Exception):
    """The generator itself failed (a worker crashed or never reported)."""


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _recv(pipe: Connection) -> tuple[str, Any]:
    try:
        kind, payload = pipe.recv()
    except (EOFError, OSError):
        raise LoadError("a load generator process died") from None
    return kind, payload


def run_load(spec: LoadSpec, meter: Callable[[], float] | None = None) -> LoadResult:
    """Run ``spec`` in worker processes; block until every one reports.

    ``meter`` (the server's CPU seconds so far) is read when every
    connection is open, just before the first request, and again when the
    last worker reported: the difference is the server's CPU for the
    requests counted, without the connection set-up."""
    if spec.connections < 1:
        raise ValueError("connections must be at least 1")
    nproc = spec.process_count()
    ctx = mp.get_context("spawn")  # no fork of a parent holding threads or servers
    start = ctx.Event()
    shares = _split(spec.connections, nproc)
    quotas: list[int | None] = (list(_split(spec.requests, nproc)) if spec.requests is not None
                                else [None] * nproc)
    pipes: list[Connection] = []
    procs = []
    try:
        for i in range(nproc):
            parent_end, child_end = ctx.Pipe()
            p = ctx.Process(target=_worker, name=f"loadgen-{i}",
                            args=(spec, i, shares[i], quotas[i], child_end, start), daemon=True)
            p.start()
            child_end.close()
            pipes.append(parent_end)
            procs.append(p)
        setup_wait = spec.connect_timeout * (1 + spec.connections / CONNECT_BATCH) + 30
        for pipe in pipes:
            if not pipe.poll(setup_wait):
                raise LoadError("a load generator process did not get ready")
            kind, payload = _recv(pipe)
            if kind != "ready":
                raise LoadError(f"load generator failed while connecting: {payload}")
        cpu_before = meter() if meter else 0.0
        start.set()
        results = []
        run_wait = spec.duration + spec.timeout + WORKER_GRACE_SECONDS
        for pipe in pipes:
            if not pipe.poll(run_wait):
                raise LoadError("a load generator process did not report")
            _, payload = _recv(pipe)
            if "crashed" in payload:
                raise LoadError(f"load generator crashed: {payload['crashed']}")
            results.append(payload)
        cpu = meter() - cpu_before if meter else None
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return _merge(spec, results, nproc, cpu)


def _merge(spec: LoadSpec, results: list[dict[str, Any]], nproc: int,
           server_cpu_seconds: float | None = None) -> LoadResult:
    latencies: array[int] = array("q")
    errors: Counter[str] = Counter()
    actions: Counter[str] = Counter()
    for r in results:
        chunk: array[int] = array("q")
        chunk.frombytes(r["latencies"])
        latencies.extend(chunk)
        errors.update(r["errors"])
        actions.update(r["actions"])
    ordered = sorted(latencies)
    start = min(r["start_ns"] for r in results)
    end = max(r["end_ns"] for r in results)
    return LoadResult(
        connections=spec.connections,
        mix=spec.mix,
        requests=len(ordered),
        elapsed=max(end - start, 1) / 1e9,
        errors=dict(errors),
        actions=dict(actions),
        p50_ms=percentile(ordered, 0.50) / 1e6,
        p99_ms=percentile(ordered, 0.99) / 1e6,
        max_ms=(ordered[-1] if ordered else 0) / 1e6,
        processes=nproc,
        server_cpu_seconds=server_cpu_seconds,
    )
