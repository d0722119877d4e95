"""Synced lmdb commits through ThreadedTable: the meta-page sync, measured.

Each commit is one ``update_many`` of G items (G = 1, 10, 100: the group
sizes ThreadedTable's group commit makes at low, middle and high load)
awaited on an event loop, into an lmdb file opened as memtable opens it
(Postfix's format and fcntl locks), either synced whole (memtable's
choice) or with MDB_NOMETASYNC (LmdbTable(metasync=False): the data pages
synced, the meta page left to the next commit's sync).  The two take turns
(slice by slice, ``rounds`` times) in one run, on files in one directory
of the filesystem given (a tmpfs would make every sync free), and each
figure is the median of its slices: a disturbance of the machine hits both
alike.

    .venv/bin/python -m bench.lmdb_commit [--dir DIR] [--seconds S] [--rounds N]

prints, per group size, commits/s and the wall time of one commit for
each, and their ratio.  docs/design.md ("The write-ahead guarantee") has
this machine's figures and the choice they led to.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from memtable.backends.lmdb_table import LmdbTable
from memtable.committer import ThreadedTable

GROUPS = (1, 10, 100)
MODES = {"synced": True, "nometasync": False}
VALUE = "1796587212,1796587212,1,0"  # a triplet record's size


async def _slice(table: ThreadedTable, group: int, seconds: float, serial: list[int]) -> float:
    """Commits per second for ``seconds``, each one update_many of ``group`` items."""
    commits = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        base = serial[0]
        serial[0] += group
        errors = await table.update_many(
            [(f"bench-{base + i}", VALUE, None) for i in range(group)])
        assert not any(errors), errors
        commits += 1
        now = time.perf_counter()
        if now >= end:
            return commits / (now - start)


async def _run(directory: Path, seconds: float, rounds: int) -> dict[tuple[str, int], float]:
    tables = {mode: ThreadedTable(LmdbTable(str(directory / mode), read_write=True,
                                            fold=False, metasync=metasync))
              for mode, metasync in MODES.items()}
    rates: dict[tuple[str, int], list[float]] = {}
    serial = [0]
    try:
        for turn in range(rounds):
            for group in GROUPS:
                modes = list(MODES) if turn % 2 == 0 else list(reversed(MODES))
                for mode in modes:
                    rate = await _slice(tables[mode], group, seconds, serial)
                    rates.setdefault((mode, group), []).append(rate)
    finally:
        for table in tables.values():
            await table.close()
    return {key: statistics.median(values) for key, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=".", help="where the lmdb files go (default: .)")
    parser.add_argument("--seconds", type=float, default=1.0, help="one slice (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="slices per figure (default 5)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lmdb-commit.", dir=args.dir) as tmp:
        medians = asyncio.run(_run(Path(tmp), args.seconds, args.rounds))
    print(f"{'items per commit':>16} | {'synced':>22} | {'MDB_NOMETASYNC':>22} | ratio")
    for group in GROUPS:
        cells = []
        for mode in MODES:
            rate = medians[(mode, group)]
            cells.append(f"{rate:>8,.0f} commits/s {1e6 / rate:>5,.0f} us")
        ratio = medians[("nometasync", group)] / medians[("synced", group)]
        print(f"{group:>16} | {cells[0]:>22} | {cells[1]:>22} | {ratio:.2f}x")


if __name__ == "__main__":
    main()
