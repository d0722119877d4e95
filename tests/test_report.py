"""``policyd report`` over real stores (lmdb files, memcached with an lmdb
backup) filled with the known records of tests.report_data, run through
policyd.cli.main at a frozen time; and the triplet record's passed_at."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from freezegun import freeze_time

from policyd.cli import main
from policyd.config import PolicydConfig
from policyd.greylist import TripletRecord
from policyd.report import (
    DEFAULT_TOP,
    DELAY_BUCKETS,
    Analyser,
    Report,
    delay_bucket,
    duration,
    percentile,
)
from policyd.storewalk import TRIPLETS, Entry, parse_entry
from policyd.triplet import KeyMaker
from tests.conftest import Memcached
from tests.greylist_helpers import config, make_policy, request, run
from tests.report_data import (
    DELAYS,
    HISTOGRAM,
    NOW,
    T0,
    clients,
    fill,
    memcache_cf,
    policyd_cf,
    triplets,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def lmdb_setup(tmp_path: Path, delays: list[int] = DELAYS, extra: str = "") -> str:
    tspec, cspec = f"lmdb:{tmp_path}/triplets", f"lmdb:{tmp_path}/clients"
    fill(tspec, triplets(delays))
    fill(cspec, clients())
    return policyd_cf(tmp_path, tspec, cspec, extra)


def report(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with freeze_time(T0):
        status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


# --- the record --------------------------------------------------------------

def test_triplet_record_keeps_the_pass_time() -> None:
    record = TripletRecord(100, 500, True, 400)
    assert record.serialise() == "100,500,1,400"
    assert TripletRecord.parse("100,500,1,400") == record and record.delay == 300
    imported = TripletRecord.parse("100,500,1,0")  # from postgrey: no pass time
    assert imported == TripletRecord(100, 500, True, 0) and imported.delay is None
    assert TripletRecord(100, 100).serialise() == "100,100,0,0"
    assert TripletRecord(100, 100).delay is None  # pending
    for bad in ("100,500", "100,500,1", "100,500,1,400,9", "100,500,2,400", "1,2,1,-3", "a,b,1,2"):
        with pytest.raises(ValueError, match="malformed triplet record"):
            TripletRecord.parse(bad)


def test_policy_records_the_pass_time_and_keeps_it_on_refresh() -> None:
    from datetime import UTC, datetime

    async def scenario() -> str:
        policy, ttable, _ = make_policy(config())
        with freeze_time(T0) as frozen:
            for offset in (0, 420, 420 + 2 * 3600):  # new, pass, refresh
                frozen.move_to(datetime.fromtimestamp(NOW + offset, tz=UTC))
                await policy.decide(request())
        await policy.aclose()
        return ttable.data["192.0.2.0/alice@example.org/bob@example.com"][0]

    # last_seen moved on to the refresh; passed_at still says when it passed
    assert run(scenario()) == f"{NOW},{NOW + 420 + 7200},1,{NOW + 420}"


def analyse(cfg: PolicydConfig, entries: list[Entry], now: int) -> Report:
    """What `policyd report` makes of entries its walk read (report.collect)."""
    analyser = Analyser(cfg, now, DEFAULT_TOP)
    for entry in entries:
        analyser.add(entry)
    return analyser.finish()


# --- pure figures ------------------------------------------------------------

def test_percentiles_buckets_and_durations() -> None:
    ordered = sorted(DELAYS)
    assert [percentile(ordered, p) for p in (10, 50, 90, 99)] == [400, 900, 9000, 144000]
    assert percentile([7], 99) == 7 and percentile([1, 2], 10) == 1
    edges = {0: "0-5m", 299: "0-5m", 300: "5-10m", 3599: "30m-1h", 3600: "1-2h",
             172799: "1-2d", 172800: ">2d"}
    for delay, label in edges.items():
        assert DELAY_BUCKETS[delay_bucket(delay)][0] == label
    assert [duration(s) for s in (0, 59, 60, 400, 9000, 86400, 144000)] == [
        "0s", "59s", "1m", "6m 40s", "2h 30m", "1d", "1d 16h"]


def test_shared_store_records_are_told_apart_by_shape() -> None:
    entries = [parse_entry(TRIPLETS, "a/b/c", "1,2,0,0", by_shape=True),
               parse_entry(TRIPLETS, "a", "1,2,3,4,5", by_shape=True),
               parse_entry(TRIPLETS, "x", "1,2", by_shape=True)]
    assert [e.kind for e in entries] == ["triplets", "clients", "triplets"]
    assert entries[2].malformed and not entries[0].malformed
    # without by_shape a client record in the triplet table is malformed
    assert parse_entry(TRIPLETS, "a", "1,2,3,4,5").malformed


# --- the command over lmdb tables ---------------------------------------------

def test_report_figures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path)
    status, out, err = report(capsys, "report", "-c", cf, "--top", "3")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert "  pending           7  not passed yet, within retry_window" in lines
    assert "  passed           98  seen within max_age" in lines
    assert ("  expired          17  12 never retried within retry_window, 5 passed but "
            "unseen for max_age") in lines
    assert "  malformed         2" in lines
    assert "Retry delays (passed_at - first_seen) of 100 passes" in lines
    assert "  (3 passed triplets imported from postgrey: delay unknown)" in lines
    assert "  p10 6m 40s  p50 15m  p90 2h 30m  p99 1d 16h  max 1d 16h" in lines
    assert "    5-10m       10 #####" in lines
    assert "   10-30m       70 " + "#" * 40 in lines
    assert "     1-2d        2 #" in lines
    assert "      >2d        0 " in lines
    assert "  live 7, expired 1, malformed 1, auto-whitelisted (>= 5 passes) 3" in lines
    assert "  passes per client: 0: 1, 1: 1, 2-4: 2, 5-9: 0, 10-99: 3, 100+: 0" in lines
    top = lines[lines.index("  top 3 clients by passes:") + 1:][:3]
    # equal counts: the first in key order wins; the expired 100-pass client is out
    assert top == ["          57  192.0.2.0", "          12  198.51.100.0",
                   "          12  203.0.113.0"]
    assert "  greylist_delay = 6m  (now 5m)" in lines
    assert "  retry_window = 3d 8h  (now 2d)" in lines
    assert "  max_age = 35d  (keep)" in lines
    assert "too thin" not in out


def test_report_json_matches(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path)
    status, out, _ = report(capsys, "-c", cf, "report", "--json", "--top", "2")
    assert status == 0
    data = json.loads(out)
    assert data["generated_at"] == NOW
    assert {k: data["triplets"][k] for k in (
        "read", "pending", "passed", "expired", "expired_pending", "expired_passed",
        "malformed", "unknown_delay", "capped")} == {
        "read": 124, "pending": 7, "passed": 98, "expired": 17, "expired_pending": 12,
        "expired_passed": 5, "malformed": 2, "unknown_delay": 3, "capped": False}
    assert data["delays"]["count"] == 100
    assert data["delays"]["percentiles"] == {"p10": 400, "p50": 900, "p90": 9000,
                                             "p99": 144000, "max": 144000}
    assert {b["bucket"]: b["count"] for b in data["delays"]["histogram"]} == HISTOGRAM
    assert data["clients"]["top"] == [{"client": "192.0.2.0", "passed": 57},
                                      {"client": "198.51.100.0", "passed": 12}]
    assert [c["clients"] for c in data["clients"]["passes"]] == [1, 1, 2, 0, 3, 0]
    assert (data["clients"]["live"], data["clients"]["expired"],
            data["clients"]["malformed"], data["clients"]["auto_whitelisted"]) == (7, 1, 1, 3)
    assert data["thin"] is False
    suggested = {s["name"]: (s["current"], s["suggested"]) for s in data["suggestions"]}
    # p10 400 s -> 6 whole minutes; 2 x p99 = 80 h; max_age cannot be derived
    assert suggested == {"greylist_delay": (300, 360), "retry_window": (172800, 288000),
                         "max_age": (3024000, 3024000)}
    reasons = {s["name"]: s["reason"] for s in data["suggestions"]}
    assert "not derivable" in reasons["max_age"]


def test_fast_senders_and_wide_window_keep_the_settings() -> None:
    # 60 passes, all between 5 and 8 minutes: nothing to change
    delays = [300 + 3 * i for i in range(60)]
    entries = [parse_entry(TRIPLETS, k, v) for k, v in triplets(delays).items()]
    result = analyse(config(), entries, NOW)
    assert not result.thin
    assert [(s.current, s.suggested) for s in result.suggestions] == [
        (300, 300), (172800, 172800), (3024000, 3024000)]
    assert "keep it" in result.suggestions[0].reason
    # a greylist_delay below 5 minutes is raised to it, never suggested lower
    low = analyse(config(greylist_delay=60, retry_window=86400),
                  [parse_entry(TRIPLETS, k, v) for k, v in triplets(delays).items()], NOW)
    assert (low.suggestions[0].current, low.suggestions[0].suggested) == (60, 300)


def test_thin_data_keeps_the_settings(tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path, delays=[900] * 49)
    status, out, _ = report(capsys, "report", "-c", cf)
    assert status == 0
    assert ("  only 49 passes with a known delay (fewer than 50): the data is too thin to "
            "tune from; keep the current settings") in out
    assert "  greylist_delay = 5m  (keep)" in out
    assert "  retry_window = 2d  (keep)" in out
    status, out, _ = report(capsys, "report", "-c", cf, "--json")
    data = json.loads(out)
    assert data["thin"] is True
    assert all(s["current"] == s["suggested"] for s in data["suggestions"])


def test_privacy_names_no_client(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = KeyMaker(privacy=True, salt="pepper")
    tspec, cspec = f"lmdb:{tmp_path}/triplets", f"lmdb:{tmp_path}/clients"
    fill(tspec, {keys.triplet_key(k.split("/")[0], f"s{i}", "r"): v
                 for i, (k, v) in enumerate(triplets().items())})
    fill(cspec, {keys.client_record_key(k): v for k, v in clients().items()})
    cf = policyd_cf(tmp_path, tspec, cspec, "privacy = yes\nprivacy_salt = pepper\n")
    status, out, _ = report(capsys, "report", "-c", cf, "--top", "2")
    assert status == 0
    assert "  passed           98  seen within max_age" in out  # states and delays as ever
    assert "  p10 6m 40s  p50 15m" in out
    assert out.count("(hashed key)") == 2
    assert keys.client_record_key("192.0.2.0") not in out and "192.0.2" not in out
    assert "privacy = yes: keys are HMAC hashes" in out
    _, out, _ = report(capsys, "report", "-c", cf, "--json")
    assert [c["client"] for c in json.loads(out)["clients"]["top"]] == [None] * 6


def test_reading_is_capped_and_says_so(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path)
    status, out, _ = report(capsys, "report", "-c", cf, "--max-entries", "20", "--json")
    data = json.loads(out)
    assert status == 0 and data["triplets"]["read"] == 20 and data["triplets"]["capped"]
    assert data["clients"]["read"] == 9 and not data["clients"]["capped"]
    assert any("stopped after 20 entries" in n for n in data["notes"])
    status, _, err = report(capsys, "report", "-c", cf, "--max-entries", "0")
    assert status == 1 and "--max-entries must be 1.." in err


def test_shared_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = f"lmdb:{tmp_path}/state"
    fill(spec, {**triplets(), **clients()})
    cf = policyd_cf(tmp_path, spec, spec)
    status, out, _ = report(capsys, "report", "-c", cf, "--json")
    data = json.loads(out)
    assert status == 0
    # "x,y" (the bad client) is malformed too, counted once, with the triplets
    assert (data["triplets"]["passed"], data["triplets"]["malformed"]) == (98, 3)
    assert (data["clients"]["live"], data["clients"]["expired"]) == (7, 1)
    assert any("share one store" in n for n in data["notes"])


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path)
    png = tmp_path / "delays.png"
    status, out, _ = report(capsys, "report", "-c", cf, "--plot", str(png))
    assert status == 0 and "Retry delays" in out
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    status, _, err = report(capsys, "report", "-c", cf, "--plot",
                            str(tmp_path / "no" / "such" / "dir.png"))
    assert status == 1 and "policyd: report: cannot write" in err


def test_plot_without_matplotlib_is_a_clear_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cf = lmdb_setup(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    status, out, err = report(capsys, "report", "-c", cf, "--plot", str(tmp_path / "x.png"))
    assert status == 1 and out == ""
    assert err == ("policyd: report: --plot needs matplotlib, which is not installed "
                   "(pip install matplotlib)\n")


def test_a_store_policyd_has_not_created_yet_is_empty(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    """A fresh install: policyd creates its lmdb files at start.  Before:
    `policyd: report: lmdb:...: open database ...: No such file or directory`."""
    tspec = f"lmdb:{tmp_path}/triplets"
    cspec = memcache_cf(tmp_path, "c", memcached.spec, f"lmdb:{tmp_path}/cb")
    cf = policyd_cf(tmp_path, tspec, cspec)
    status, out, err = report(capsys, "report", "-c", cf, "--json")
    assert status == 0, err
    data = json.loads(out)
    assert (data["triplets"]["read"], data["triplets"]["passed"]) == (0, 0)
    assert (data["clients"]["read"], data["clients"]["live"]) == (0, 0)
    status, out, err = report(capsys, "report", "-c", cf)
    assert status == 0 and err == ""
    assert f"Triplets ({tspec}: 0 read)" in out
    assert not list(tmp_path.glob("*.lmdb"))  # the report created nothing


def test_missing_store_is_a_clear_error(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    # No directory: policyd would not create the file at start either.
    cf = policyd_cf(tmp_path, f"lmdb:{tmp_path}/no/t", f"lmdb:{tmp_path}/no/c")
    status, out, err = report(capsys, "report", "-c", cf)
    assert status == 1 and out == ""
    assert err.startswith("policyd: report: lmdb:") and "No such file" in err
    assert err.count("\n") == 1


# --- memcache tables -----------------------------------------------------------

def test_report_through_the_backup_of_a_memcache_table(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    tspec = memcache_cf(tmp_path, "t", memcached.spec, f"lmdb:{tmp_path}/tb")
    cspec = memcache_cf(tmp_path, "c", memcached.spec, f"lmdb:{tmp_path}/cb")
    fill(tspec, triplets())
    fill(cspec, clients())
    memcached.flush()  # the report reads the backups only
    status, out, _ = report(capsys, "report", "-c", policyd_cf(tmp_path, tspec, cspec),
                            "--json")
    data = json.loads(out)
    assert status == 0
    assert (data["triplets"]["passed"], data["triplets"]["pending"],
            data["triplets"]["expired"]) == (98, 7, 17)
    assert data["delays"]["percentiles"]["p50"] == 900
    assert data["clients"]["top"][0] == {"client": "192.0.2.0", "passed": 57}
    # nothing was written back to memcached by the walk
    assert memcached.meta("c:192.0.2.0") is None


def test_memcache_table_without_backup_cannot_be_reported(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    tspec = memcache_cf(tmp_path, "t", memcached.spec, None)
    cspec = memcache_cf(tmp_path, "c", memcached.spec, f"lmdb:{tmp_path}/cb")
    fill(cspec, clients())
    status, out, err = report(capsys, "report", "-c", policyd_cf(tmp_path, tspec, cspec))
    assert status == 1 and out == ""
    assert err == (f"policyd: report: {tspec}: memcached cannot list its entries and this "
                   f"table has no backup; add `backup = lmdb:/var/lib/policyd/NAME` to "
                   f"{tspec[len('memcache:'):]} so that policyd's records can be walked\n")


def test_config_of_the_report_is_the_policyd_cf(tmp_path: Path) -> None:
    # `report -c FILE` and `-c FILE report` name the same file
    cf = lmdb_setup(tmp_path)
    from policyd.cli import _parser

    assert _parser().parse_args(["report", "-c", cf]).config == cf
    assert _parser().parse_args(["-c", cf, "report"]).config == cf
    assert PolicydConfig.from_file(cf).retry_window == 172800


def test_o_before_and_after_the_command_both_apply(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # -o given before the command, after it, and again after it: all
    # apply, in command-line order (the later setting of a name wins).
    cf = lmdb_setup(tmp_path)
    status, out, err = report(capsys, "-c", cf, "-o", "greylist_delay=1m",
                              "-o", "max_age=40d", "report", "-o", "retry_window=3d",
                              "-o", "greylist_delay=10m", "--json")
    assert status == 0, err
    config = json.loads(out)["config"]
    assert (config["greylist_delay"], config["retry_window"], config["max_age"]) == \
        (600, 3 * 86400, 40 * 86400)


def test_plot_writes_no_cache_into_the_home_directory(tmp_path: Path) -> None:
    """The policyd user's home is /var/lib/policyd: matplotlib's and
    fontconfig's caches go to a temporary directory, removed afterwards."""
    cf = lmdb_setup(tmp_path)
    home, tmp = tmp_path / "home", tmp_path / "tmp"
    home.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items()
           if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), TMPDIR=str(tmp))
    png = tmp_path / "delays.png"
    done = subprocess.run([sys.executable, "-m", "policyd", "report", "-c", cf,
                           "--plot", str(png)], env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert [str(p.relative_to(home)) for p in home.rglob("*")] == []
    assert list(tmp.iterdir()) == []


def test_the_report_names_the_spf_delay(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    cf = lmdb_setup(tmp_path, extra="greylist_delay_spf_pass = 1m\n")
    status, out, err = report(capsys, "report", "-c", cf)
    assert status == 0, err
    assert ("settings: greylist_delay = 5m, greylist_delay_spf_pass = 1m, retry_window = 2d, "
            "max_age = 35d") in out.splitlines()
    assert ("note: senders whose SPF passed waited greylist_delay_spf_pass (1m) instead of "
            "greylist_delay: their delays are among the retry delays (a delay under "
            "greylist_delay is one of theirs)") in out.splitlines()
    status, out, err = report(capsys, "report", "-c", cf, "--json")
    assert json.loads(out)["config"]["greylist_delay_spf_pass"] == 60


def test_report_names_greylist_delay_listed() -> None:
    """With dnsbl_greylist_threshold only listed clients and clients whose
    score was unknown (DNS failed) are greylisted: the report says whose
    retry delays it shows (the records keep no score)."""
    cfg = config(greylist_delay_listed=1800, dnsbl_greylist_threshold=3)
    result = analyse(cfg, [], NOW)
    out = result.render()
    assert "settings: greylist_delay = 5m, greylist_delay_listed = 30m, retry_window" in out
    assert ("note: dnsbl_greylist_threshold = 3: only clients whose DNSBL score reached it, "
            "and clients whose score was unknown because DNS failed, were greylisted (the "
            "listed ones greylist_delay_listed (30m), the others greylist_delay; the records "
            "do not say which applied); unlisted clients were let through and left no "
            "record") in out.splitlines()
    assert "mix both kinds of client" not in out
    assert result.to_json()["config"]["greylist_delay_listed"] == 1800
    plain = analyse(config(), [], NOW)
    assert "greylist_delay_listed" not in plain.render()
    assert "dnsbl_greylist_threshold" not in plain.render()
    assert plain.to_json()["config"]["greylist_delay_listed"] is None
    # A threshold without a longer delay: the same clients, one delay.
    out = analyse(config(dnsbl_greylist_threshold=2), [], NOW).render()
    assert ("note: dnsbl_greylist_threshold = 2: only clients whose DNSBL score reached it, "
            "and clients whose score was unknown because DNS failed, were greylisted (both "
            "waited greylist_delay); unlisted clients were let through and left no "
            "record") in out.splitlines()
    # With SPF's shorter delay too: a listed client never gets it.
    out = analyse(config(greylist_delay_spf_pass=60, greylist_delay_listed=1800,
                         dnsbl_greylist_threshold=3), [], NOW).render()
    assert "one of theirs); a listed client waited greylist_delay_listed even then" in out
