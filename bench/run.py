"""``python -m bench.run`` (``./dev bench``): every benchmark, one command.

Starts a private memcached and the servers (the do-nothing server,
postgrey, policyd, policyd with DNS, and in the mixed mix two variants
that show where policyd's time goes), then drives every mix at every
connection count with the load generator, the servers one after the
other at each point, and prints one line per server and point; then the
memtable benchmark and policyd's memory; then the policyd/postgrey ratios and the goals.
Writes docs/benchmarks.md (generated section only) and its PNG plot.
A server that cannot start is reported as not measured; the rest runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import report as rep
from bench import servers
from bench.loadgen import LoadError, LoadResult, LoadSpec, run_load
from bench.memory import idle_connections, request_growth
from bench.memtable_bench import run_memtable_bench
from bench.requests import MIXES, POOL_CLIENTS

SERVERS = ("null", "postgrey", "policyd", "policyd-dns", "policyd-nobackup", "policyd-nostore")
# Where policyd's time goes: its variants are measured in one mix only
# (report.WHERE_TIME_GOES_MIX).
VARIANTS = tuple(name for name, _ in rep.VARIANTS)
# Requests that warm policyd-dns's DNS caches before the first point: each
# process sees nearly every pool client (random picks: about e**-4 missed).
WARM_REQUESTS_PER_PROCESS = 4 * POOL_CLIENTS
WARM_SEED = 99  # triplets of their own: the measured ones stay new
DEFAULT_CONNECTIONS = (1, 20, 100, 1000)
DOCS = servers.ROOT / "docs"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("numbers must be at least 1")
    return values


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [x.strip() for x in text.split(",") if x.strip()]
        bad = [v for v in values if v not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="short run: 1 s points, 50,000 memory requests, 5,000 memtable ops")
    p.add_argument("--duration", type=float, help="seconds per load point (default 5; quick 1)")
    p.add_argument("--connections", type=_ints, default=list(DEFAULT_CONNECTIONS),
                   help="comma-separated connection counts (default 1,20,100,1000)")
    p.add_argument("--mixes", type=_choices(MIXES), default=list(MIXES),
                   help="comma-separated request mixes (default new,hot,mixed,pool)")
    p.add_argument("--servers", type=_choices(SERVERS), default=list(SERVERS),
                   help="comma-separated servers (default: all, " + ",".join(SERVERS)
                   + "; the last two in the mixed mix only)")
    p.add_argument("--memory-requests", type=int,
                   help="requests for policyd's memory run (default 1,000,000; quick 50,000)")
    p.add_argument("--idle-connections", type=int, default=1000,
                   help="idle connections for the memory check (default 1,000)")
    p.add_argument("--memtable-ops", type=int,
                   help="keys for the memtable benchmark (default 20,000; quick 5,000)")
    p.add_argument("--rounds", type=int,
                   help="memtable passes over the keys (default 3; figures: median of all slices)")
    p.add_argument("--timeout", type=float, default=10.0, help="reply timeout in seconds")
    p.add_argument("--policyd-instances", type=int, default=os.cpu_count() or 1,
                   help="policyd processes sharing the port (listen_reuse_port), "
                        "default one per CPU; the memory run always uses one")
    p.add_argument("--processes", type=int, default=0,
                   help="load generator processes per point (default: one per 500 connections)")
    p.add_argument("--skip-load", action="store_true", help="no load points")
    p.add_argument("--skip-memtable", action="store_true", help="no memtable benchmark")
    p.add_argument("--skip-memory", action="store_true", help="no memory benchmark")
    p.add_argument("--output", type=Path, default=DOCS / "benchmarks.md",
                   help="markdown report (default docs/benchmarks.md)")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, data)")
    args = p.parse_args(argv)
    args.duration = args.duration or (1.0 if args.quick else 5.0)
    if args.memory_requests is None:
        args.memory_requests = 50_000 if args.quick else 1_000_000
    args.memtable_ops = args.memtable_ops or (5_000 if args.quick else 20_000)
    args.rounds = args.rounds or 3
    for name in ("duration", "memory_requests", "memtable_ops", "rounds", "timeout",
                 "idle_connections"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.policyd_instances < 1:
        p.error("--policyd-instances must be at least 1")
    if args.processes < 0:
        p.error("--processes must be 0 (automatic) or more")
    return args


def _raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Servers started from here inherit the limit; 1,000 connections need it.
    want = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, need))
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _start(name: str, workdir: Path, memcached: servers.Server,
           instances: int = 1) -> servers.Server:
    if name == "null":
        return servers.start_null(workdir)
    if name == "postgrey":
        return servers.start_postgrey(workdir)
    if name == "policyd-dns":
        return servers.start_policyd_dns(workdir, instances)
    if name == "policyd-nobackup":
        return servers.start_policyd_nobackup(workdir, instances)
    if name == "policyd-nostore":
        return servers.start_policyd_nostore(workdir, instances)
    return servers.start_policyd(workdir, memcached, instances)


def _warm_dns(server: servers.Server, instances: int) -> None:
    """Fill each policyd-dns process's DNS cache with the pool clients'
    answers ("DNS on, warm cache").  Run right before each pool point: an
    unlisted client's answer (NXDOMAIN) stays cached only for the zone's
    negative TTL (a minute), and a pool point comes minutes after the start."""
    try:
        run_load(LoadSpec(server.host, server.port, 10 * instances, mix="pool",
                          duration=60.0, requests=WARM_REQUESTS_PER_PROCESS * instances,
                          seed=WARM_SEED))
    except LoadError as exc:
        raise servers.ServerError(f"warming the DNS cache failed: {exc}") from None


def run(args: argparse.Namespace) -> rep.Report:
    report = rep.Report(command="python -m bench.run " + shlex.join(sys.argv[1:]),
                        quick=args.quick, duration=args.duration, machine=rep.machine_info(),
                        started=time.strftime("%Y-%m-%d %H:%M %Z"))
    if not args.skip_load and {"policyd", "policyd-dns", *VARIANTS} & set(args.servers):
        report.machine["policyd processes (load points)"] = str(args.policyd_instances)
    print("machine: " + "; ".join(f"{k} {v}" for k, v in report.machine.items()), flush=True)
    _raise_fd_limit(4 * max([*args.connections, args.idle_connections]) + 1000)
    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    memcached = servers.start_memcached(workdir)
    try:
        if not args.skip_load:
            _load_points(report, args, workdir, memcached)
        if not args.skip_memtable:
            print(f"\nmemtable: {args.memtable_ops:,} keys, {args.rounds} passes", flush=True)
            report.memtable = run_memtable_bench(workdir, memcached, args.memtable_ops,
                                                 args.rounds)
            for r in report.memtable:
                print(f"  {r.client:26} {r.operation:7} {r.per_second:10,.0f}/s  {r.note}")
        if not args.skip_memory:
            _memory(report, args, workdir, memcached)
    finally:
        memcached.stop()
        report.machine["Load average at end"] = rep.load_average()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _load_points(report: rep.Report, args: argparse.Namespace, workdir: Path,
                 memcached: servers.Server) -> None:
    """Every point with the servers back to back: this shared machine's
    speed drifts over minutes, so the ratios compare neighbours in time."""
    with contextlib.ExitStack() as started:  # stops every server, even if one stop fails
        running: dict[str, servers.Server] = {}
        for name in args.servers:
            try:
                server = _start(name, workdir, memcached, args.policyd_instances)
            except (servers.ServerError, OSError) as exc:
                report.unavailable[name] = str(exc).splitlines()[0]
                print(f"{name}: NOT MEASURED: {exc}", flush=True)
                continue
            started.callback(server.stop)
            running[name] = server
            pids = ", ".join(map(str, server.pids))
            print(f"{name} (pid {pids}) on {server.host}:{server.port}", flush=True)
        for mix in args.mixes:
            print(f"\nmix {mix}", flush=True)
            for c in args.connections:
                for name, server in list(running.items()):
                    if name in VARIANTS and mix != rep.WHERE_TIME_GOES_MIX:
                        continue
                    if not _load_point(report, args, name, server, mix, c):
                        server.stop()  # the rest of a multi-process server too
                        del running[name]


def _load_point(report: rep.Report, args: argparse.Namespace, name: str,
                server: servers.Server, mix: str, connections: int) -> bool:
    """Measure one point; False when the server is dead (it may also have
    died while the others were measured)."""
    result: LoadResult | None = None
    ready = server.alive()
    if ready and name == "policyd-dns" and mix == "pool":
        try:
            _warm_dns(server, args.policyd_instances)
            print(f"  {name} {mix} {connections}: DNS caches warmed", flush=True)
        except servers.ServerError as exc:
            print(f"  {name} {mix} {connections}: not measured: {exc}", flush=True)
            ready = False
    if ready:
        spec = LoadSpec(server.host, server.port, connections, mix=mix,
                        duration=args.duration, timeout=args.timeout, processes=args.processes)
        try:
            result = run_load(spec, meter=server.cpu_seconds)
        except LoadError as exc:
            print(f"  {name} {mix} {connections}: load generator failed: {exc}", flush=True)
    if result is not None:
        point = rep.Point(name, result, server.rss_kib())
        report.points.append(point)
        print("  " + rep.console_line(name, result, point.rss_kib), flush=True)
    if server.alive():
        return True
    report.unavailable[name] = f"exited during the run ({mix}, {connections} connections)"
    print(f"  {name} EXITED:\n{server.log_tail()}", flush=True)
    return False


def _memory(report: rep.Report, args: argparse.Namespace, workdir: Path,
            memcached: servers.Server) -> None:
    for name in [s for s in ("postgrey", "policyd") if s in args.servers]:
        home = workdir / f"memory-{name}"
        home.mkdir(exist_ok=True)
        try:
            server = _start(name, home, memcached)
        except (servers.ServerError, OSError) as exc:
            print(f"\nmemory {name}: NOT MEASURED: {exc}", flush=True)
            continue
        try:
            idle = idle_connections(server, args.idle_connections)
            report.idle.append(idle)
            print(f"\nmemory {name}: {idle.opened:,}/{idle.connections:,} idle connections, "
                  f"{idle.errors} errors; RSS {idle.rss_before_kib / 1024:.1f} -> "
                  f"{idle.rss_idle_kib / 1024:.1f} MiB (after close "
                  f"{idle.rss_after_close_kib / 1024:.1f}); anonymous "
                  f"{idle.anon_before_kib / 1024:.1f} -> {idle.anon_idle_kib / 1024:.1f} MiB",
                  flush=True)
            if name == "policyd":
                print(f"memory policyd: {args.memory_requests:,} requests ...", flush=True)
                growth = request_growth(server, args.memory_requests, args.timeout)
                report.growth = growth
                for (n, rss, anon), r in zip(growth.points, growth.runs, strict=False):
                    print(f"  after {n:,} requests: RSS {rss / 1024:.1f} MiB, anonymous "
                          f"{anon / 1024:.1f} MiB "
                          f"({r.rps:,.0f} req/s, errors {r.error_count})", flush=True)
        except LoadError as exc:
            print(f"memory {name}: load generator failed: {exc}", flush=True)
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = run(args)
    print()
    for line in rep.summary_lines(report):
        print(line)
    if not args.no_write:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        png: str | None = None
        if report.points:
            png_path = args.output.with_suffix(".png")
            rep.plot(report, png_path)
            png = png_path.name
        rep.write_markdown(args.output, rep.generated_section(report, png))
        print(f"\nwrote {args.output}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
