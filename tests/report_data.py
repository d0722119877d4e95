"""Known store contents for the report and cleanup tests: every figure the
report prints follows from these lists, worked out by hand below."""

from __future__ import annotations

from pathlib import Path

from memtable.registry import open_table
from policyd.greylist import TripletRecord
from policyd.reputation import ClientRecord

NOW = 1714564800  # 2024-05-01 12:00:00 UTC
T0 = "2024-05-01 12:00:00"
HOUR, DAY = 3600, 86400

# Retry delays of 100 passes (sorted, nearest rank): p10 = 10th = 400,
# p50 = 50th = 900, p90 = 90th = 9000, p99 = 99th = 144000 = max.
DELAYS = [400] * 10 + [900] * 40 + [1500] * 30 + [9000] * 10 + [72000] * 8 + [144000] * 2
HISTOGRAM = {"0-5m": 0, "5-10m": 10, "10-30m": 70, "30m-1h": 0, "1-2h": 0, "2-6h": 10,
             "6-24h": 8, "1-2d": 2, ">2d": 0}
EXPIRED_PASSED = 5  # the first five 900 s passes were last seen 36 days ago


def triplet_key(i: int, kind: str = "p") -> str:
    return f"198.51.100.0/{kind}{i:03d}@example.org/bob@example.com"


def triplets(delays: list[int] = DELAYS) -> dict[str, str]:
    """Triplet records by key: passes with the given delays, 3 passes
    imported from postgrey (passed_at 0), 7 pending, 12 pending past retry_window
    (2 days), 2 malformed."""
    out: dict[str, str] = {}
    for i, delay in enumerate(delays):
        first = NOW - 10 * DAY - delay
        last = NOW - DAY
        if 10 <= i < 10 + EXPIRED_PASSED and delays is DELAYS:
            first, last = NOW - 40 * DAY - delay, NOW - 36 * DAY
        out[triplet_key(i)] = TripletRecord(first, last, True, first + delay).serialise()
    for i in range(3):
        out[triplet_key(i, "old")] = f"{NOW - 5 * DAY},{NOW - HOUR},1,0"
    for i in range(7):
        out[triplet_key(i, "new")] = TripletRecord(NOW - HOUR, NOW - HOUR).serialise()
    for i in range(12):
        out[triplet_key(i, "gone")] = TripletRecord(NOW - 3 * DAY, NOW - 3 * DAY).serialise()
    out[triplet_key(0, "bad")] = "garbage"
    out[triplet_key(1, "bad")] = "1,2,3,4,5,6"
    return out


LIVE_TRIPLETS = len(DELAYS) - EXPIRED_PASSED + 3 + 7  # 105


def clients() -> dict[str, str]:
    """Client records: 7 live (passes 57, 12, 12, 3, 2, 1, 0), one unseen
    for 40 days (max_age 35 days), one malformed."""
    def rec(passed: int, last: int = NOW - HOUR) -> str:
        return ClientRecord(NOW - 20 * DAY, last, passed + 1, passed, last).serialise()

    return {"192.0.2.0": rec(57), "198.51.100.0": rec(12), "203.0.113.0": rec(12),
            "172.16.3.0": rec(3), "172.16.2.0": rec(2), "172.16.1.0": rec(1),
            "10.0.0.0": rec(0), "10.9.9.0": rec(100, NOW - 40 * DAY), "bad": "x,y"}


def fill(spec: str, records: dict[str, str]) -> None:
    with open_table(spec, read_write=True) as table:
        for key, value in records.items():
            table.update(key, value)


def dump(spec: str) -> dict[str, str]:
    with open_table(spec) as table:
        return dict(table.sequence())


def policyd_cf(tmp_path: Path, triplet_table: str, client_table: str,
               extra: str = "") -> str:
    path = tmp_path / "policyd.cf"
    path.write_text(f"triplet_table = {triplet_table}\nclient_table = {client_table}\n"
                    "greylist_delay = 300s\nretry_window = 2d\nmax_age = 35d\n"
                    f"hostname = mx.example.net\n{extra}")
    return str(path)


def memcache_cf(tmp_path: Path, name: str, server: str, backup: str | None) -> str:
    path = tmp_path / f"{name}.cf"
    text = f"memcache = {server}\nkey_format = {name}:%s\ntimeout = 2\nmax_try = 1\n"
    if backup:
        text += f"backup = {backup}\n"
    path.write_text(text)
    return f"memcache:{path}"
