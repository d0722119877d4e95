"""memtable against raw pymemcache and Postfix's own client, same memcached.

Single operations, one after another, as a policy server or postscreen
does them: updates and lookups of the same N keys through

- raw pymemcache (``Client(noreply=False)`` with a 5 s timeout, as a
  production client has; memtable bounds every call too): the floor for a
  Python client;
- memtable ``memcache:`` without a backup;
- memtable ``memcache:`` with ``backup = lmdb:`` (every update also writes
  the lmdb file; lookups hit memcache);
- ``postmap -q - memcache:FILE.cf`` (Postfix's C client) and
  ``memtable -q -`` reading the N keys on standard input: the whole process
  is timed, start-up included (reported separately).

The clients take turns slice by slice (SLICE_OPS keys each, the order of
the clients rotating from slice to slice), ``rounds`` times over the keys,
and each figure is the median of its slices' rates: a disturbance of the
machine (another process, a noisy neighbour of this VM) then hits every
client alike and moves no median much.  While the clients run, this process
is pinned to one CPU and memcached's threads to another (when there are two
or more): otherwise the scheduler puts a client's connection sometimes on
memcached's core and sometimes not, and a round trip's cost follows that
placement rather than the client (seen here: the same lookup path through
two connections measured 81% and 107% of raw pymemcache).  The commands are
timed whole, best of ``rounds``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.servers import Server
from tests.postfixcf import postfix_config_dir, write_aged

TTL = 3600
COMMAND_TIMEOUT = 300.0
# Keys per timed slice (one client's turn).
SLICE_OPS = 500

_Run = Callable[[int, int], None]  # runs one client's operation on keys[start:end]


@dataclass
class OpResult:
    """Throughput of one client doing one kind of operation."""

    client: str
    operation: str
    ops: int
    seconds: float
    note: str = ""

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


@contextlib.contextmanager
def _pinned(memcached: Server) -> Iterator[None]:
    """This process on the first CPU it may use, memcached's threads on
    another, while the block runs (nothing done on a single CPU)."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        mine = []
    if len(mine) < 2:
        yield
        return
    threads = [int(t) for t in os.listdir(f"/proc/{memcached.pid}/task")]
    before = {t: os.sched_getaffinity(t) for t in threads}
    try:
        os.sched_setaffinity(0, {mine[0]})
        for t in threads:
            os.sched_setaffinity(t, {mine[1]})
        yield
    finally:
        os.sched_setaffinity(0, set(mine))
        for t, cpus in before.items():
            with contextlib.suppress(OSError):  # the thread is gone
                os.sched_setaffinity(t, cpus)


def _keys(n: int) -> list[str]:
    return [f"user{i}@example{i % 100}.com" for i in range(n)]


def _value(i: int) -> str:
    # Shaped like a verify(8) cache entry: a few timestamps and a status.
    return f"0:{1700000000 + i}:{1700000000 + i}:{1700000000 + i}:250 2.1.5 Ok"


def _write_cf(path: Path, memcached: Server, key_format: str, backup: Path | None) -> Path:
    lines = [f"memcache = inet:127.0.0.1:{memcached.port}",
             f"key_format = {key_format}",
             f"ttl = {TTL}"]
    if backup is not None:
        lines.append(f"backup = lmdb:{backup}")
    # Aged: postmap waits ~2 s for a file written this second.
    return write_aged(path, "\n".join(lines) + "\n")


def _timed_command(argv: list[str], stdin: bytes) -> tuple[float, bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MAIL_CONFIG"}
    t0 = time.perf_counter()
    done = subprocess.run(argv, input=stdin, capture_output=True, timeout=COMMAND_TIMEOUT,
                          env=env, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode not in (0, 1):
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: "
                           f"{done.stderr.decode(errors='replace')[-500:]}")
    return elapsed, done.stdout


def run_memtable_bench(workdir: Path, memcached: Server, ops: int,
                       rounds: int = 3) -> list[OpResult]:
    from pymemcache.client.base import Client

    from memtable import open_table

    mt = workdir / "memtable-bench"
    mt.mkdir(parents=True, exist_ok=True)
    keys = _keys(ops)
    values = [_value(i) for i in range(ops)]
    plain_cf = _write_cf(mt / "plain.cf", memcached, "bench:%s", None)
    backup_cf = _write_cf(mt / "backup.cf", memcached, "benchb:%s", mt / "backup")

    raw = Client(("127.0.0.1", memcached.port), default_noreply=False, connect_timeout=5,
                 timeout=5)
    raw_keys = [f"raw:{k}" for k in keys]
    tables = {"memtable": open_table(f"memcache:{plain_cf}", read_write=True),
              "memtable + lmdb backup": open_table(f"memcache:{backup_cf}", read_write=True)}

    def raw_update(start: int, end: int) -> None:
        for i in range(start, end):
            raw.set(raw_keys[i], values[i], expire=TTL, noreply=False)

    def raw_lookup(start: int, end: int) -> None:
        for i in range(start, end):
            if raw.get(raw_keys[i]) is None:
                raise RuntimeError(f"raw pymemcache: {raw_keys[i]} not found")

    def table_update(label: str) -> _Run:
        table = tables[label]

        def run(start: int, end: int) -> None:
            for i in range(start, end):
                table.update(keys[i], values[i])
        return run

    def table_lookup(label: str) -> _Run:
        table = tables[label]

        def run(start: int, end: int) -> None:
            for i in range(start, end):
                if table.lookup(keys[i]) is None:
                    raise RuntimeError(f"{label}: {keys[i]} not found")
        return run

    cases: list[tuple[str, str, _Run]] = [
        ("pymemcache (raw)", "update", raw_update), ("pymemcache (raw)", "lookup", raw_lookup)]
    for label in tables:
        cases += [(label, "update", table_update(label)), (label, "lookup", table_lookup(label))]
    rates: dict[tuple[str, str], list[float]] = {(c, o): [] for c, o, _ in cases}
    try:
        for _, op, fn in cases:  # untimed: every key stored before any is looked up
            if op == "update":
                fn(0, ops)
        turn = 0
        with _pinned(memcached):
            for _ in range(rounds):
                for start in range(0, ops, SLICE_OPS):
                    end = min(start + SLICE_OPS, ops)
                    turn += 1
                    for k in range(len(cases)):
                        client, op, fn = cases[(turn + k) % len(cases)]
                        t0 = time.perf_counter()
                        fn(start, end)
                        elapsed = time.perf_counter() - t0
                        rates[client, op].append((end - start) / max(elapsed, 1e-9))
    finally:
        raw.close()
        for table in tables.values():
            table.close()
    # Reported as the time the median rate would take for all the keys.
    results = [OpResult(c, o, ops, ops / statistics.median(r)) for (c, o), r in rates.items()]

    stdin = ("\n".join(keys) + "\n").encode()
    commands: list[tuple[str, str, list[str]]] = []
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin:/usr/bin")
    if postmap:
        commands.append(("postmap -q - (Postfix C)", "postmap",
                         [postmap, "-c", str(postfix_config_dir(workdir)), "-q", "-",
                          f"memcache:{plain_cf}"]))
    memtable_cli = Path(sys.executable).parent / "memtable"
    if memtable_cli.exists():
        commands.append(("memtable -q - (CLI)", "memtable",
                         [str(memtable_cli), "-q", "-", f"memcache:{plain_cf}"]))
    for label, name, argv in commands:
        startup = min(_timed_command(argv, b"")[0] for _ in range(rounds))
        elapsed, out = float("inf"), b""
        for _ in range(rounds):
            t, out = _timed_command(argv, stdin)
            elapsed = min(elapsed, t)
        _check_found(name, out, ops)
        results.append(OpResult(label, "lookup", ops, elapsed,
                                note=f"whole process; start-up alone {startup * 1000:.0f} ms"))
    return results


def _check_found(name: str, out: bytes, ops: int) -> None:
    found = out.count(b"\n")
    if found != ops:
        raise RuntimeError(f"{name}: {found} of {ops} keys found")
