"""Smoke test of the benchmark's load generator (no speed assertions).

A tiny asyncio server in this process (its own thread and event loop)
answers ``action=DUNNO``; the generator, in its own processes as in the
real benchmark, drives it for about a second.  The figures must be sane:
requests counted, no errors, every reply seen as DUNNO, p50 <= p99 <= max.
Also: the request is a complete Postfix 3.7 RCPT request, and a server
that answers garbage or hangs up is counted as errors, not a crash; the
memtable benchmark reports every client and gives back the CPU affinity
it pins while measuring; the bench command itself runs end to end; the
server's CPU is metered over exactly the requests counted, threads and
children included; the goals table reports each of the issue's goals, met
or not, from a report of known figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench import report as rep
from bench import run as bench_run
from bench import servers
from bench.loadgen import LoadResult, LoadSpec, parse_reply, percentile, run_load
from bench.memory import GrowthResult, IdleResult
from bench.memtable_bench import SLICE_OPS, OpResult, run_memtable_bench
from bench.requests import MIXES, POOL_CLIENTS, make_source, pool_address

THREAD_JOIN_SECONDS = 5.0
BENCH_COMMAND_SECONDS = 120.0  # start-up of memcached and policyd included


class _Replier(asyncio.Protocol):
    """Answers each complete request (ends with an empty line) with reply()."""

    def __init__(self, reply: Callable[[int], bytes | None]) -> None:
        self.reply = reply
        self.buf = b""
        self.count = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\n\n" in self.buf and self.transport is not None:
            _, _, self.buf = self.buf.partition(b"\n\n")
            self.count += 1
            answer = self.reply(self.count)
            if answer is None:
                self.transport.close()
                return
            self.transport.write(answer)


@contextmanager
def policy_server(reply: Callable[[int], bytes | None]) -> Iterator[int]:
    """A loopback server in a thread of its own; yields its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []

    async def start() -> asyncio.Server:
        server = await loop.create_server(lambda: _Replier(reply), "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        return server

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(start())
        ready.set()
        loop.run_forever()
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert ready.wait(THREAD_JOIN_SECONDS), "test server did not start"
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(THREAD_JOIN_SECONDS)


def test_the_cpu_meter_spans_exactly_the_requests_counted() -> None:
    # A meter that reads the server's answered-request count instead of its
    # CPU: read just before the first request and after the last reply, the
    # difference is every request counted, and none of the connection set-up.
    answered = itertools.count(1)
    last = [0]

    def reply(_: int) -> bytes:
        last[0] = next(answered)
        return b"action=DUNNO\n\n"

    with policy_server(reply) as port:
        result = run_load(LoadSpec("127.0.0.1", port, connections=3, mix="new", duration=0.5,
                                   timeout=5.0, connect_timeout=5.0),
                          meter=lambda: float(last[0]))
    assert result.requests > 0 and result.error_count == 0
    assert result.server_cpu_seconds == result.requests
    assert result.cpu_us_per_request == pytest.approx(1e6)


_BURN = """
import os, subprocess, sys, threading, time
def burn():
    t = time.thread_time()
    while time.thread_time() - t < 0.2:
        pass
child = "import time\\nwhile time.process_time() < 0.2: pass\\n"
subprocess.run([sys.executable, "-c", child], check=True)  # ended and waited for
live = subprocess.Popen([sys.executable, "-c", child + "print('done', flush=True)\\n"
                         "time.sleep(60)"], stdout=subprocess.PIPE)
thread = threading.Thread(target=burn)
thread.start()
thread.join()
assert live.stdout.readline() == b"done\\n"
print(live.pid, flush=True)
time.sleep(60)
"""


def test_cpu_seconds_counts_threads_and_children() -> None:
    # 0.2 s of CPU each in a thread, a child that ended, and a child still
    # running: over 0.5 s only if all three are counted.
    proc = subprocess.Popen([sys.executable, "-c", _BURN], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        live = int(proc.stdout.readline())
        assert servers.cpu_seconds(live) >= 0.15
        assert servers.cpu_seconds(proc.pid) >= 0.5
    finally:
        for pid in (live, proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(THREAD_JOIN_SECONDS)
        assert proc.stdout is not None
        proc.stdout.close()
    assert servers.cpu_seconds(proc.pid) == 0  # gone: nothing to read


def _point(server: str, mix: str, connections: int, rps: float, p99_ms: float,
           cpu_us: float | None = None, errors: int = 0) -> rep.Point:
    requests = int(rps * 10)
    cpu = None if cpu_us is None else cpu_us * requests / 1e6
    return rep.Point(server, LoadResult(connections, mix, requests, 10.0,
                                        {"timeout": errors} if errors else {},
                                        {"DEFER_IF_PERMIT": requests}, p99_ms / 2, p99_ms,
                                        p99_ms * 2, server_cpu_seconds=cpu), 0)


def _known_report() -> rep.Report:
    """Two mixes; `new` meets every goal, `hot` misses each one."""
    report = rep.Report(command="test", quick=False, duration=10.0, machine={}, started="now")
    for mix, good in (("new", True), ("hot", False)):
        for c, least, most in rep.PEER_GOALS:
            report.points.append(_point("postgrey", mix, c, 2000, 10.0, cpu_us=400))
            report.points.append(_point("policyd", mix, c, 2000 * (least + (0.5 if good else -0.2)),
                                        10.0 * (most - 0.05 if good else most + 0.05),
                                        cpu_us={1: 900, 20: 300, 100: 150}[c]))
        report.points.append(_point("policyd", mix, 1000, 9000, 100.0, cpu_us=140,
                                    errors=0 if good else 3))
    report.memtable = [OpResult("pymemcache (raw)", "lookup", 1000, 1.0),
                       OpResult("pymemcache (raw)", "update", 1000, 1.0),
                       OpResult("memtable", "lookup", 1000, 1 / 0.90),  # 90%: met
                       OpResult("memtable", "update", 1000, 1 / 0.80)]  # 80%: missed
    report.idle = [IdleResult("policyd", 1000, 1000, 0, 26_000, 33_000, 33_000, 16_000, 22_000)]
    report.growth = GrowthResult("policyd", 1_000_000, 0, 33_000, 22_000,
                                 points=[(250_000, 50_000, 23_000), (500_000, 60_000, 23_000),
                                         (750_000, 60_000, 23_500), (1_000_000, 60_000, 24_000)])
    return report


def test_goals_table_reports_each_goal_of_the_issue_met_or_not() -> None:
    report = _known_report()
    goals = {g.goal: g for g in rep.goals(report)}
    assert list(goals) == [
        "1 connection: policyd req/s >= 1.0x postgrey's",
        "1 connection: policyd p99 <= 1.0x postgrey's (no worse)",
        "20 connections: policyd req/s >= 3.0x postgrey's",
        "20 connections: policyd p99 <= 0.3x postgrey's",
        "100 connections: policyd req/s >= 5.0x postgrey's",
        "100 connections: policyd p99 <= 0.25x postgrey's",
        "1,000 connections: no errors, bounded memory (anonymous RSS growth over the second "
        "half of the request run <= 10 MiB)",
        "memtable single lookups within 15% of raw pymemcache",
        "memtable single updates within 15% of raw pymemcache",
        "policyd's own CPU per request at 1, 20, 100 connections (user + system time of its "
        "processes / requests)",
        "DNS on (warm cache) costs <= 10% of policyd's req/s at 20 and 100 connections "
        "(pool mix)"]
    # hot misses every peer goal: not met, its figure in bold, new's not.
    g = goals["20 connections: policyd req/s >= 3.0x postgrey's"]
    assert (g.mark, g.figures) == (
        "**no**", "new 3.50x (7,000 vs 2,000/s), **hot 2.80x (5,600 vs 2,000/s)**")
    g = goals["100 connections: policyd p99 <= 0.25x postgrey's"]
    assert (g.mark, g.figures) == (
        "**no**", "new 0.20x (2.00 vs 10.00 ms), **hot 0.30x (3.00 vs 10.00 ms)**")
    g = goals["1,000 connections: no errors, bounded memory (anonymous RSS growth over the "
              "second half of the request run <= 10 MiB)"]
    assert g.mark == "**no**" and "**hot 3 (timeout 3)**" in g.figures
    assert "anonymous RSS growth over the second half +1.0 MiB" in g.figures
    assert goals["memtable single lookups within 15% of raw pymemcache"].mark == "yes"
    assert goals["memtable single updates within 15% of raw pymemcache"].mark == "**no**"
    g = goals["policyd's own CPU per request at 1, 20, 100 connections (user + system time "
              "of its processes / requests)"]
    assert (g.mark, g.figures) == ("reported", "new 900 / 300 / 150 us, hot 900 / 300 / 150 us")
    assert goals["DNS on (warm cache) costs <= 10% of policyd's req/s at 20 and 100 "
                 "connections (pool mix)"].mark == "not measured"

    # Without hot, every goal of the new mix is met.
    report.points = [p for p in report.points if p.result.mix == "new"]
    marks = [g.mark for g in rep.goals(report) if "connection:" in g.goal
             or "connections:" in g.goal]
    assert marks == ["yes"] * 7

    # The markdown: the goals table and a CPU column in each mix's table.
    text = rep.generated_section(report, None)
    assert ("| 20 connections: policyd req/s >= 3.0x postgrey's | yes | new 3.50x (7,000 vs "
            "2,000/s) |") in text
    assert "| 1 | policyd | 3,000 | 4.75 | 9.50 | 19.0 | 0 | 900 us | 1.50x | 0.95x |" in text
    assert "| 1 | postgrey | 2,000 | 5.00 | 10.00 | 20.0 | 0 | 400 us |  |  |" in text


def test_a_goal_missed_says_what_the_variants_reached() -> None:
    # The variants beside policyd (mixed mix): the goal line says how far
    # the server and the policy alone got, and without backups.
    report = rep.Report(command="test", quick=False, duration=10.0, machine={}, started="now")
    mix = rep.WHERE_TIME_GOES_MIX
    for server, rps in (("postgrey", 2000), ("policyd", 900), ("policyd-nobackup", 1800),
                        ("policyd-nostore", 5000)):
        report.points.append(_point(server, mix, 1, rps, 1.0, cpu_us=100))
    goal = rep.goals(report)[0]
    # The variants' figures are for reference: outside the miss's bold.
    assert (goal.mark, goal.figures) == (
        "**no**", "**mixed 0.45x (900 vs 2,000/s)**, (for reference, mixed: "
                  "policyd-nostore 2.50x, policyd-nobackup 0.90x)")
    text = rep.generated_section(report, None)
    assert ("| connections | postgrey | policyd-nostore (stores that cost nothing) | "
            "policyd-nobackup (memcached, no backups) | policyd (memcached and backups) |"
            ) in text
    assert ("| 1 | 2,000/s | 5,000/s (2.50x), 100 us/req | 1,800/s (0.90x), 100 us/req | "
            "900/s (0.45x), 100 us/req |") in text


def test_goals_not_measured_say_so() -> None:
    report = rep.Report(command="test", quick=True, duration=1.0, machine={}, started="now")
    report.points.append(_point("policyd", "new", 1, 1000, 1.0))  # no postgrey, no CPU
    goals = rep.goals(report)
    assert all(g.mark == "not measured" for g in goals), goals
    assert "cpu - us/req" in rep.console_line("policyd", report.points[0].result, 0)


def test_closed_loop_figures_are_sane() -> None:
    with policy_server(lambda _: b"action=DUNNO\n\n") as port:
        result = run_load(LoadSpec("127.0.0.1", port, connections=4, mix="mixed",
                                   duration=1.0, timeout=5.0, connect_timeout=5.0))
    assert result.requests > 0
    assert result.errors == {}
    assert result.actions == {"DUNNO": result.requests}
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms
    assert 0.5 < result.elapsed < 10
    assert result.rps == pytest.approx(result.requests / result.elapsed)


def test_request_count_mode_stops_at_the_quota() -> None:
    with policy_server(lambda _: b"action=DUNNO\n\n") as port:
        result = run_load(LoadSpec("127.0.0.1", port, connections=3, mix="new", duration=30.0,
                                   requests=50, timeout=5.0, connect_timeout=5.0))
    assert result.requests == 50
    assert result.error_count == 0


def test_bad_servers_are_counted_as_errors() -> None:
    # Counted over all connections (each error makes the generator
    # reconnect): every 5th reply is garbage, every 7th a hang-up.
    total = itertools.count(1)

    def reply(_: int) -> bytes | None:
        n = next(total)
        if n % 7 == 0:
            return None
        return b"nonsense\n\n" if n % 5 == 0 else b"action=DEFER_IF_PERMIT Greylisted\n\n"

    with policy_server(reply) as port:
        result = run_load(LoadSpec("127.0.0.1", port, connections=2, mix="hot", duration=0.5,
                                   timeout=5.0, connect_timeout=5.0))
    assert result.errors.get("malformed", 0) > 0
    assert result.errors.get("closed", 0) > 0
    assert result.requests > 0
    assert set(result.actions) == {"DEFER_IF_PERMIT"}


def test_nothing_listening_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        result = run_load(LoadSpec("127.0.0.1", port, connections=1, duration=0.2,
                                   timeout=1.0, connect_timeout=1.0))
    assert result.requests == 0
    assert result.errors.get("connect", 0) >= 1


@pytest.mark.parametrize("mix", MIXES)
def test_requests_are_complete_postfix_37_rcpt_requests(mix: str) -> None:
    source = make_source(mix, worker=0)
    seen = set()
    for _ in range(200):
        raw = source()
        assert raw.endswith(b"\n\n") and raw.count(b"\n\n") == 1
        attrs = dict(line.split("=", 1) for line in raw.decode().splitlines() if line)
        assert attrs["request"] == "smtpd_access_policy"
        assert attrs["protocol_state"] == "RCPT"
        for name in ("client_address", "client_name", "reverse_client_name", "helo_name",
                     "sender", "recipient", "instance", "size", "server_address", "server_port",
                     "client_port", "policy_context", "ccert_pubkey_fingerprint", "stress",
                     "encryption_keysize", "sasl_method", "etrn_domain"):
            assert name in attrs, name
        seen.add((attrs["client_address"], attrs["sender"], attrs["recipient"]))
    if mix in ("new", "pool"):
        assert len(seen) == 200  # never a repeat
    if mix == "pool":  # new triplets from a pool of client addresses
        clients = {client for client, _, _ in seen}
        assert clients <= {pool_address(i) for i in range(POOL_CLIENTS)} and len(clients) < 200
    elif mix != "new":
        assert len(seen) < 200  # repeats of a hot/warm set


def test_new_triplets_differ_between_workers() -> None:
    a, b = make_source("new", worker=0), make_source("new", worker=1)
    assert not {a() for _ in range(100)} & {b() for _ in range(100)}


def test_reply_parsing_and_percentiles() -> None:
    assert parse_reply(b"action=DUNNO\n\n") == "DUNNO"
    assert parse_reply(b"action=defer_if_permit Greylisted, retry\n\n") == "DEFER_IF_PERMIT"
    assert parse_reply(b"action=\n\n") is None
    assert parse_reply(b"action=DUNNO\nextra=1\n\n") is None
    assert parse_reply(b"DUNNO\n\n") is None
    assert percentile([], 0.5) == 0
    values = list(range(1, 101))
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == \
        (50, 99, 100)


def test_memtable_bench_reports_every_client_and_restores_cpu_affinity(tmp_path: Path) -> None:
    # A real memcached from the benchmark's own helper; few keys, one pass.
    memcached = servers.start_memcached(tmp_path)
    try:
        threads = [int(t) for t in os.listdir(f"/proc/{memcached.pid}/task")]
        mine_before = os.sched_getaffinity(0)
        theirs_before = {t: os.sched_getaffinity(t) for t in threads}
        results = run_memtable_bench(tmp_path, memcached, ops=SLICE_OPS * 2, rounds=1)
        assert os.sched_getaffinity(0) == mine_before
        for t, cpus in theirs_before.items():
            assert os.sched_getaffinity(t) == cpus
    finally:
        memcached.stop()
    pairs = {(r.client, r.operation) for r in results}
    for client in ("pymemcache (raw)", "memtable", "memtable + lmdb backup"):
        assert {(client, "update"), (client, "lookup")} <= pairs
    assert ("postmap -q - (Postfix C)", "lookup") in pairs
    assert all(r.ops == SLICE_OPS * 2 and r.per_second > 0 for r in results)


def test_bench_command_measures_the_servers_back_to_back(tmp_path: Path) -> None:
    # The whole command, short: real memcached, the do-nothing server and a
    # one-process policyd; every point has both, measured one after the other.
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--servers", "null,policyd", "--mixes", "new",
         "--connections", "1,2", "--duration", "0.3", "--policyd-instances", "1",
         "--skip-memtable", "--skip-memory", "--output", str(out)],
        cwd=servers.ROOT, capture_output=True, text=True, timeout=BENCH_COMMAND_SECONDS)
    assert proc.returncode == 0, proc.stderr
    points = [line.split()[:3] for line in proc.stdout.splitlines()
              if line.startswith("  ") and " req/s " in line]
    assert points == [["null", "new", "1"], ["policyd", "new", "1"],
                      ["null", "new", "2"], ["policyd", "new", "2"]]
    # Each server's CPU per request, metered from its process.
    cpu = [float(line.split(" cpu ")[1].split()[0]) for line in proc.stdout.splitlines()
           if line.startswith("  policyd ") and " req/s " in line]
    assert len(cpu) == 2 and all(us > 0 for us in cpu)
    text = out.read_text()
    assert "| errors | CPU per request |" in text
    assert "[INFO] policyd's own CPU per request at 1, 20, 100 connections" in proc.stdout
    assert text.startswith("# Benchmarks\n")
    assert "## Method" not in text  # the method lives in docs/benchmarks.md only
    assert "<!-- bench:generated:begin" in text and "### Mix: new" in text
    assert (tmp_path / "benchmarks.png").stat().st_size > 0


def test_bench_measures_dns_on_beside_dns_off(tmp_path: Path) -> None:
    # policyd-dns: its own memcached and nsd, its DNS cache warmed first;
    # reported beside plain policyd with the ratio and the goal line.
    # Warmed right before each of its pool points: unlisted clients' answers
    # stay cached for a minute only, and a full run's pool points come later.
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--servers", "policyd,policyd-dns", "--mixes",
         "new,pool", "--connections", "2,3", "--duration", "0.3", "--policyd-instances", "1",
         "--skip-memtable", "--skip-memory", "--no-write"],
        cwd=servers.ROOT, capture_output=True, text=True, timeout=BENCH_COMMAND_SECONDS)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split()[:3] for line in proc.stdout.splitlines()
             if line.startswith("  ") and (" req/s " in line or "DNS caches warmed" in line)]
    assert steps == [["policyd", "new", "2"], ["policyd-dns", "new", "2"],
                     ["policyd", "new", "3"], ["policyd-dns", "new", "3"],
                     ["policyd", "pool", "2"], ["policyd-dns", "pool", "2:"],
                     ["policyd-dns", "pool", "2"],
                     ["policyd", "pool", "3"], ["policyd-dns", "pool", "3:"],
                     ["policyd-dns", "pool", "3"]]
    lines = [line for line in proc.stdout.splitlines()
             if line.startswith("  ") and " req/s " in line]
    assert all(" errors 0 " in line for line in lines)
    assert "policyd-dns/policyd pool       2 conn: req/s x" in proc.stdout
    assert "policyd-dns/policyd pool       3 conn: req/s x" in proc.stdout
    assert "DNS on (warm cache) costs <= 10% of policyd's req/s" in proc.stdout


def test_bench_shows_where_policyds_time_goes(tmp_path: Path) -> None:
    # policyd beside itself without backups and with stores that cost
    # nothing, in the mixed mix only; the report's table and goal lines
    # carry their ratios to postgrey.
    out = tmp_path / "benchmarks.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--servers",
         "postgrey,policyd,policyd-nobackup,policyd-nostore", "--mixes", "new,mixed",
         "--connections", "2", "--duration", "0.3", "--policyd-instances", "1",
         "--skip-memtable", "--skip-memory", "--output", str(out), "--keep"],
        cwd=servers.ROOT, capture_output=True, text=True, timeout=BENCH_COMMAND_SECONDS)
    assert proc.returncode == 0, proc.stderr
    steps = [line.split()[:3] for line in proc.stdout.splitlines()
             if line.startswith("  ") and " req/s " in line]
    assert steps == [["postgrey", "new", "2"], ["policyd", "new", "2"],
                     ["postgrey", "mixed", "2"], ["policyd", "mixed", "2"],
                     ["policyd-nobackup", "mixed", "2"], ["policyd-nostore", "mixed", "2"]]
    assert all(" errors 0 " in line for line in proc.stdout.splitlines()
               if line.startswith("  ") and " req/s " in line)
    kept = Path(proc.stdout.rsplit("work directory kept: ", 1)[1].split()[0])
    try:
        # Only policyd itself wrote backups; the variants answered all the same.
        assert list((kept / "policyd").glob("*.lmdb"))
        assert not list((kept / "policyd-nobackup").rglob("*.lmdb"))
        assert not list((kept / "policyd-nostore").rglob("*.lmdb"))
    finally:
        shutil.rmtree(kept, ignore_errors=True)
    text = out.read_text()
    table = text.split("### Where policyd's time goes", 1)[1].split("###", 1)[0]
    row = next(line for line in table.splitlines() if line.startswith("| 2 |"))
    assert row.count("x), ") == 3 and row.count(" us/req") == 3
    assert "### Mix: new" in text and "### Mix: mixed" in text


def test_a_server_that_died_between_points_is_reported_not_retried(tmp_path: Path) -> None:
    # A server idle while the others are measured may die unseen: the next
    # point reports it (with its log) instead of counting connect errors.
    server = servers.start_null(tmp_path)
    server.stop()
    report = rep.Report(command="test", quick=True, duration=0.2, machine={}, started="now")
    args = bench_run.parse_args(["--duration", "0.2"])
    assert bench_run._load_point(report, args, "null", server, "new", 1) is False
    assert report.points == []
    assert report.unavailable["null"] == "exited during the run (new, 1 connections)"


def test_stop_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    # stop() must leave nothing running and never raise, so that every
    # server of a run gets stopped.
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
               "print('ready', flush=True); time.sleep(60)"
    procs = [subprocess.Popen([sys.executable, "-c", stubborn], stdout=subprocess.PIPE)
             for _ in range(2)]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    server = servers.Server("stubborn", procs, "127.0.0.1", 0, tmp_path / "log")
    server.stop(wait=0.5)
    server.stop(wait=0.5)  # twice is fine
    assert all(proc.poll() is not None for proc in procs)
    for proc in procs:
        assert proc.stdout is not None
        proc.stdout.close()


def test_lmdb_commit_bench_prints_both_modes_per_group_size(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run(
        [sys.executable, "-m", "bench.lmdb_commit", "--dir", str(tmp_path),
         "--seconds", "0.05", "--rounds", "1"],
        cwd=root, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "synced" in lines[0] and "MDB_NOMETASYNC" in lines[0]
    assert [line.split("|")[0].strip() for line in lines[1:]] == ["1", "10", "100"]
    assert all(line.count("commits/s") == 2 for line in lines[1:])
    assert list(tmp_path.iterdir()) == []  # its files are removed
