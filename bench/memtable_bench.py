"""memtable against raw pymemcache and Postfix's own client, same memcached.

Single operations, one after another, as a policy server or postscreen
does them: N updates then N lookups of the same keys through

- raw pymemcache (``Client(noreply=False)``): the floor for a Python client;
- memtable ``memcache:`` without a backup;
- memtable ``memcache:`` with ``backup = lmdb:`` (every update also writes
  the lmdb file; lookups hit memcache);
- ``postmap -q - memcache:FILE.cf`` (Postfix's C client) and
  ``memtable -q -`` reading the N keys on standard input: the whole process
  is timed, start-up included (reported separately).

Each figure is the best of ``rounds`` rounds (the least disturbed by the
other processes on the machine).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.servers import Server

TTL = 3600
COMMAND_TIMEOUT = 300.0


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


def _keys(n: int) -> list[str]:
    return [f"user{i}@example{i % 100}.com" for i in range(n)]


def _value(i: int) -> str:
    # Shaped like a verify(8) cache entry: a few timestamps and a status.
    return f"0:{1700000000 + i}:{1700000000 + i}:{1700000000 + i}:250 2.1.5 Ok"


def _best(rounds: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _write_cf(path: Path, memcached: Server, key_format: str, backup: Path | None) -> Path:
    lines = [f"memcache = inet:127.0.0.1:{memcached.port}",
             f"key_format = {key_format}",
             f"ttl = {TTL}"]
    if backup is not None:
        lines.append(f"backup = lmdb:{backup}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _postfix_dir(workdir: Path) -> Path:
    """A private main.cf for ``postmap -c``: nothing read or logged from
    the system's Postfix configuration."""
    d = workdir / "postfix-cf"
    d.mkdir(parents=True, exist_ok=True)
    (d / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {d}/queue\n"
        f"data_directory = {d}/data\n"
        f"maillog_file = {d}/maillog\n"
        f"maillog_file_prefixes = {d}\n"
        "myhostname = bench.example\n")
    return d


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

    def raw_update() -> None:
        for k, v in zip(raw_keys, values, strict=True):
            raw.set(k, v, expire=TTL, noreply=False)

    def raw_lookup() -> None:
        for k in raw_keys:
            if raw.get(k) is None:
                raise RuntimeError(f"raw pymemcache: {k} not found")

    def table_update(label: str) -> Callable[[], None]:
        table = tables[label]

        def run() -> None:
            for k, v in zip(keys, values, strict=True):
                table.update(k, v)
        return run

    def table_lookup(label: str) -> Callable[[], None]:
        table = tables[label]

        def run() -> None:
            for k in keys:
                if table.lookup(k) is None:
                    raise RuntimeError(f"{label}: {k} not found")
        return run

    cases: list[tuple[str, str, Callable[[], None]]] = [
        ("pymemcache (raw)", "update", raw_update), ("pymemcache (raw)", "lookup", raw_lookup)]
    for label in tables:
        cases += [(label, "update", table_update(label)), (label, "lookup", table_lookup(label))]
    best = dict.fromkeys(((c, o) for c, o, _ in cases), float("inf"))
    try:
        # Rounds outside, clients inside: a disturbance of the machine (other
        # processes) hits every client alike instead of one of them.
        for _ in range(rounds):
            for client, op, fn in cases:
                best[client, op] = min(best[client, op], _best(1, fn))
    finally:
        raw.close()
        for table in tables.values():
            table.close()
    results = [OpResult(c, o, ops, t) for (c, o), t in best.items()]

    stdin = ("\n".join(keys) + "\n").encode()
    commands: list[tuple[str, str, list[str]]] = []
    postmap = shutil.which("postmap") or shutil.which("postmap", path="/usr/sbin:/usr/bin")
    if postmap:
        commands.append(("postmap -q - (Postfix C)", "postmap",
                         [postmap, "-c", str(_postfix_dir(workdir)), "-q", "-",
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
