"""Closed-loop load generator for SMTPD policy servers.

N persistent connections, each behaving like one smtpd process: send one
request, wait for the whole reply (``action=...\\n\\n``), record the
latency, send the next.  The generator runs in worker PROCESSES of its own
(never in the process of a server under test), several of them for many
connections, each an asyncio loop driving its connections with plain
Protocol callbacks (no coroutine per request: the generator must not be
the bottleneck; bench.run measures a do-nothing server to show its
ceiling).

Errors are counted, never raised: ``connect`` (could not connect),
``closed`` (server closed a connection), ``timeout`` (no reply within
``timeout`` seconds), ``malformed`` (anything but one ``action=`` line and
an empty line).  After an error the connection is reopened after a short
pause, as smtpd would on its next request.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing as mp
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
RECONNECT_PAUSE_SECONDS = 0.05
# How often in-flight requests are checked against the reply timeout.
TIMEOUT_SCAN_SECONDS = 0.1
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

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0


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


class _Worker:
    """One process's connections and tallies."""

    def __init__(self, spec: LoadSpec, index: int, connections: int, quota: int | None) -> None:
        self.spec = spec
        self.count = connections
        self.quota = quota
        self.next_request: Callable[[], bytes] = make_source(spec.mix, index, spec.seed)
        self.latencies: array[int] = array("q")
        self.errors: Counter[str] = Counter()
        self.actions: Counter[str] = Counter()
        self.sent = 0
        self.deadline_ns = 0
        self.last_reply_ns = 0
        self.running = False
        self.live: set[_Conn] = set()
        self.loop = asyncio.get_running_loop()
        self.idle = asyncio.Event()

    def may_send(self) -> bool:
        if not self.running or time.monotonic_ns() >= self.deadline_ns:
            return False
        return self.quota is None or self.sent < self.quota

    def error(self, kind: str, conn: _Conn) -> None:
        self.errors[kind] += 1
        self.live.discard(conn)
        if self.running and self.may_send():
            self.loop.call_later(RECONNECT_PAUSE_SECONDS,
                                 lambda: self.loop.create_task(self.reconnect()))
        self.check_idle()

    def check_idle(self) -> None:
        if self.running and not any(c.sent_ns for c in self.live) and not self.may_send():
            self.idle.set()

    async def open(self) -> _Conn | None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self), self.spec.host, self.spec.port),
                self.spec.connect_timeout)
        except (TimeoutError, OSError):
            self.errors["connect"] += 1
            return None
        self.live.add(conn)
        return conn

    async def reconnect(self) -> None:
        conn = await self.open()
        if conn is None:
            if self.may_send():
                self.loop.call_later(RECONNECT_PAUSE_SECONDS,
                                     lambda: self.loop.create_task(self.reconnect()))
            else:
                self.check_idle()
            return
        conn.send_next()

    async def scan_timeouts(self) -> None:
        limit = int(self.spec.timeout * 1e9)
        while True:
            await asyncio.sleep(TIMEOUT_SCAN_SECONDS)
            now = time.perf_counter_ns()
            for conn in list(self.live):
                if conn.sent_ns and now - conn.sent_ns > limit:
                    conn.fail("timeout")
            self.check_idle()


class _Conn(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent_ns = 0  # perf_counter_ns of the request in flight, 0 when none
        self.dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send_next(self) -> None:
        w = self.worker
        if self.dead or self.transport is None or not w.may_send():
            w.check_idle()
            return
        w.sent += 1
        self.sent_ns = time.perf_counter_ns()
        self.transport.write(w.next_request())

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        self.buf += data
        if not self.sent_ns:
            self.fail("malformed")  # a reply nobody asked for
            return
        if not self.buf.endswith(b"\n\n"):
            if len(self.buf) > MAX_REPLY_BYTES:
                self.fail("malformed")
            return
        action = parse_reply(self.buf)
        if action is None:
            self.fail("malformed")
            return
        w = self.worker
        w.latencies.append(now - self.sent_ns)
        w.actions[action] += 1
        w.last_reply_ns = time.monotonic_ns()
        self.buf = b""
        self.sent_ns = 0
        self.send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.dead:
            self.fail("closed")

    def fail(self, kind: str) -> None:
        if self.dead:
            return
        self.dead = True
        if self.sent_ns:
            # The request in flight is lost; smtpd would count it as failed.
            self.worker.sent -= 1
        self.sent_ns = 0
        if self.transport is not None:
            self.transport.abort()
        self.worker.error(kind, self)


async def _worker_main(spec: LoadSpec, index: int, connections: int, quota: int | None,
                       pipe: Connection, start: Any) -> dict[str, Any]:
    w = _Worker(spec, index, connections, quota)
    conns: list[_Conn] = []
    for first in range(0, connections, CONNECT_BATCH):
        batch = range(first, min(first + CONNECT_BATCH, connections))
        opened = await asyncio.gather(*(w.open() for _ in batch))
        conns.extend(c for c in opened if c is not None)
    missing = connections - len(conns)
    pipe.send(("ready", len(conns)))
    go = await w.loop.run_in_executor(None, start.wait, spec.connect_timeout + 60)
    if not go:
        return {"aborted": True}
    t0 = time.monotonic_ns()
    w.deadline_ns = t0 + int(spec.duration * 1e9)
    w.running = True
    scanner = w.loop.create_task(w.scan_timeouts())
    for _ in range(missing):
        w.loop.create_task(w.reconnect())
    for conn in conns:
        conn.send_next()
    w.check_idle()
    try:
        await asyncio.wait_for(w.idle.wait(), spec.duration + spec.timeout + 5)
    except TimeoutError:
        w.errors["timeout"] += sum(1 for c in w.live if c.sent_ns)
    scanner.cancel()
    for conn in list(w.live):
        conn.dead = True
        if conn.transport is not None:
            conn.transport.close()
    await asyncio.sleep(0)
    return {
        "start_ns": t0,
        "end_ns": w.last_reply_ns or t0,
        "latencies": w.latencies.tobytes(),
        "errors": dict(w.errors),
        "actions": dict(w.actions),
    }


def _worker(spec: LoadSpec, index: int, connections: int, quota: int | None,
            pipe: Connection, start: Any) -> None:
    try:
        result = asyncio.run(_worker_main(spec, index, connections, quota, pipe, start))
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


def run_load(spec: LoadSpec) -> LoadResult:
    """Run ``spec`` in worker processes; block until every one reports."""
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
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    return _merge(spec, results, nproc)


def _merge(spec: LoadSpec, results: list[dict[str, Any]], nproc: int) -> LoadResult:
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
    )
