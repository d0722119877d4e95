"""policyd import-postgrey: postgrey's BerkeleyDB files into policyd's stores.

The end-to-end test drives Debian's real postgrey through the policy
protocol (its policy_test_time attribute sets postgrey's clock per request,
so hours pass without sleeping), imports its database, and asks a real
policyd the same requests.  The other tests build postgrey databases with
db5.3_load (Debian's db5.3-util, the tool family the import reads with).
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.servers import POSTGREY, Server, start_postgrey
from memtable.registry import open_table
from policyd.config import PolicydConfig
from policyd.greylist import TripletRecord
from policyd.postgrey import (
    PostgreyImportError,
    PostgreyOptions,
    import_postgrey,
    map_client,
    map_triplet,
    merge_client,
    merge_triplet,
    parse_dump,
)
from policyd.reputation import ClientRecord
from policyd.triplet import KeyMaker
from tests.conftest import Memcached
from tests.dnslab import start_nsd
from tests.policyd_proc import PolicydProcess

ROOT = Path(__file__).resolve().parent.parent
LOAD = "db5.3_load"
DUMP = "db5.3_dump"
DEFAULTS = PostgreyOptions()


# --- helpers -----------------------------------------------------------------


def make_db(path: Path, pairs: list[tuple[str, str]]) -> None:
    """A BerkeleyDB btree as postgrey keeps one, written by db5.3_load."""
    text = "".join(f"{k}\n{v}\n" for k, v in pairs)
    subprocess.run([LOAD, "-T", "-t", "btree", str(path)], input=text.encode(), check=True)


def make_dbdir(tmp: Path, triplets: list[tuple[str, str]],
               clients: list[tuple[str, str]] | None = None) -> Path:
    dbdir = tmp / "postgrey"
    dbdir.mkdir()
    make_db(dbdir / "postgrey.db", triplets)
    if clients is not None:
        make_db(dbdir / "postgrey_clients.db", clients)
    return dbdir


def lmdb_config(tmp: Path, extra: str = "") -> PolicydConfig:
    cf = tmp / "policyd.cf"
    cf.write_text(f"triplet_table = lmdb:{tmp / 'triplets'}\n"
                  f"client_table = lmdb:{tmp / 'clients'}\n" + extra)
    return PolicydConfig.from_file(str(cf))


def contents(spec: str) -> dict[str, str]:
    try:
        with open_table(spec, read_write=False) as table:
            return dict(table.sequence())
    except Exception:
        return {}


def run_import(config: PolicydConfig, dbdir: Path, *, dry_run: bool = False,
               options: PostgreyOptions = DEFAULTS) -> list[str]:
    lines: list[str] = []
    import_postgrey(dbdir, options, config, dry_run=dry_run, out=lines.append)
    return lines


# --- db_dump -p output ----------------------------------------------------------


def test_parse_dump_reads_db_dump_output_of_a_real_database(tmp_path: Path) -> None:
    # Every byte survives db_dump's printable form: backslash, non-ASCII, space.
    pairs = [("192.0.2.0/a\\\\b@x.org/c\\e9@y.org", "1,2"), ("k spaced", "v")]
    make_db(tmp_path / "t.db", pairs)
    dump = subprocess.run([DUMP, "-p", str(tmp_path / "t.db")], capture_output=True,
                          check=True).stdout
    got = list(parse_dump(io.BytesIO(dump), "t.db"))
    assert got == [(b"192.0.2.0/a\\b@x.org/c\xe9@y.org", b"1,2"), (b"k spaced", b"v")]


HEADER = b"VERSION=3\nformat=print\ntype=btree\nHEADER=END\n"


@pytest.mark.parametrize(("dump", "message"), [
    (b"VERSION=3\nformat=bytevalue\nHEADER=END\nDATA=END\n", "t.db: format is not print"),
    (b"hello\n", "t.db, line 1: not a header line"),
    (b"VERSION=3\n", "t.db: no HEADER=END"),
    (HEADER + b" key\n", "t.db, line 6: key without a value"),
    (HEADER + b" key\nvalue\n", "t.db, line 6: key without a value"),
    (HEADER + b"key\n value\n", "t.db, line 5: expected a key line"),
    (HEADER + b" k\n v\n", "t.db, line 6: ends without DATA=END"),
    (HEADER + b" k\\zz\n v\nDATA=END\n", "t.db, line 5: bad escape"),
    (HEADER + b" " + b"x" * 9000 + b"\n v\nDATA=END\n", "t.db, line 5: longer than 8192"),
    (HEADER + b"DATA=END\n" + HEADER, "more than one database"),
    (HEADER + b" a\n 1\n b\n 2\nDATA=END\n", "t.db: more than 1 records"),
])
def test_parse_dump_rejects_what_db_dump_never_writes(dump: bytes, message: str) -> None:
    with pytest.raises(PostgreyImportError, match=re.escape(message)):
        list(parse_dump(io.BytesIO(dump), "t.db", max_entries=1))


# --- one record at a time ---------------------------------------------------------


def test_triplet_keys_are_policyds_for_the_same_request() -> None:
    config, keys, now = PolicydConfig(), KeyMaker(), int(time.time())
    value = f"{now - 5000},{now - 4000}".encode()

    def key(raw: str) -> str:
        mapped = map_triplet(raw.encode(), value, options=DEFAULTS, config=config,
                             keys=keys, now=now)
        assert mapped.outcome == "passed"
        return mapped.key

    # NetAddr::IP writes IPv6 networks uncompressed; policyd compresses.
    want = keys.triplet_key  # policyd's own key of a normalised triplet
    assert key("2001:db8:0:0:0:0:0:0/a@x.org/b@y.org") == want("2001:db8::", "a@x.org",
                                                               "b@y.org")
    # policyd cuts the recipient's +extension (postgrey does not), and the
    # null sender is postgrey's empty one.
    assert key("192.0.2.0//b+ext@y.org") == want("192.0.2.0", "<>", "b@y.org")
    # policyd also folds SRS, which postgrey leaves alone.
    assert (key("192.0.2.0/srs0=hhh=tt=example.org=user@fwd.example/b@y.org")
            == want("192.0.2.0", "srs0=example.org=user@fwd.example", "b@y.org"))


def test_triplet_outcomes() -> None:
    config, keys, now = PolicydConfig(), KeyMaker(), int(time.time())

    def outcome(key: str, value: str, conf: PolicydConfig = config,
                options: PostgreyOptions = DEFAULTS) -> str:
        return map_triplet(key.encode(), value.encode(), options=options, config=conf,
                           keys=keys, now=now).outcome

    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 400},{now - 100}") == "passed"
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 500},{now - 150},5") == "passed"
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 100},{now - 50}") == "pending"
    # Pending past retry_window, passed but unseen for max_age.
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 3 * 86400},{now - 3 * 86400}") \
        == "expired"
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 40 * 86400},{now - 36 * 86400}") \
        == "expired"
    assert outcome("0123456789abcdef0123456789abcdef01234567", f"{now},{now}") == "hashed"
    assert outcome("192.0.2.0/a@x.org", f"{now},{now}") == "malformed"
    assert outcome("not-an-ip/a@x.org/b@y.org", f"{now},{now}") == "malformed"
    assert outcome("192.0.2.0/a@x.org/b@y.org", "soon") == "malformed"
    # postgrey's /24 cannot become policyd's addresses; its addresses can
    # become policyd's /24.
    host = PolicydConfig(client_key="host")
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 400},{now}", host) == "not-carried"
    # The same when client_key = spf falls back to host.
    spf_host = PolicydConfig(client_key="spf", spf_fallback_client_key="host")
    assert outcome("192.0.2.0/a@x.org/b@y.org", f"{now - 400},{now}", spf_host) \
        == "not-carried"
    by_host = PostgreyOptions(lookup_by_host=True)
    mapped = map_triplet(b"192.0.2.7/a@x.org/b@y.org", f"{now - 400},{now}".encode(),
                         options=by_host, config=config, keys=keys, now=now)
    assert (mapped.outcome, mapped.key) == (
        "passed", keys.triplet_key("192.0.2.0", "a@x.org", "b@y.org"))


def test_client_records() -> None:
    config, keys, now = PolicydConfig(), KeyMaker(), int(time.time())
    mapped = map_client(b"192.0.2.5", f"7,{now - 60}".encode(), config=config, keys=keys,
                        now=now)
    assert mapped.outcome == "client"
    assert mapped.key == "192.0.2.0"
    assert mapped.record == ClientRecord(now - 60, now - 60, 0, 7, now - 60)
    assert map_client(b"0123456789abcdef0123456789abcdef01234567", b"7,1", config=config,
                      keys=keys, now=now).outcome == "hashed"
    assert map_client(b"192.0.2.5", f"7,{now - 36 * 86400}".encode(), config=config,
                      keys=keys, now=now).outcome == "expired"


def test_a_triplet_record_is_replaced_only_by_one_further_along() -> None:
    pending = TripletRecord(1000, 1100)
    passed = TripletRecord(1000, 2000, True)
    assert merge_triplet(None, pending) == pending
    assert merge_triplet(pending, passed) == passed
    assert merge_triplet(passed, pending) is None
    assert merge_triplet(passed, passed) is None  # a second run: nothing to write
    assert merge_triplet(TripletRecord(1000, 3000, True), passed) is None  # policyd's newer
    # policyd's own pass and its delay stay; postgrey's later sighting is added.
    mine = TripletRecord(1500, 1800, True, 1700)
    assert merge_triplet(mine, passed) == TripletRecord(1500, 2000, True, 1700)


def test_addresses_of_one_network_combine_to_the_highest_count() -> None:
    # 3 passes from .1 and 2 from .2: policyd, counting the network's passes
    # at most once an hour, counted at least 3 and perhaps no more (the
    # passes may have fallen into the same hours): 3, never the sum.
    a = ClientRecord(1000, 9000, 0, 3, 9000)
    b = ClientRecord(2000, 8000, 0, 2, 8000)
    assert merge_client(b, a) == ClientRecord(1000, 9000, 0, 3, 9000)
    assert merge_client(a, b) is None  # a holds it all: nothing to write
    # A policyd record keeps its deferrals; the import adds the passes.
    policyd = ClientRecord(500, 9500, 4, 1, 7000)
    assert merge_client(policyd, a) == ClientRecord(500, 9500, 4, 3, 9000)


# --- whole imports into lmdb stores -----------------------------------------------


def test_network_combination_idempotence_and_newer_records(tmp_path: Path) -> None:
    now = int(time.time())
    config = lmdb_config(tmp_path, "auto_whitelist_clients = 5\n")
    dbdir = make_dbdir(tmp_path, [
        ("192.0.2.0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}"),
        ("192.0.2.0/a@x.org/b+1@y.org", f"{now - 7000},{now - 6000}"),  # same for policyd
        ("198.51.100.0/c@x.org/d@y.org", f"{now - 5000},{now - 4000}"),
    ], [
        ("203.0.113.1", f"4,{now - 100}"),
        ("203.0.113.2", f"3,{now - 200}"),  # with .1: 4 (not 7: not whitelisted)
        ("203.0.113.3", f"2,{now - 300}"),
    ])
    # A newer policyd record, and one that policyd would not use any more.
    with open_table(config.triplet_table, read_write=True) as table:
        table.update(KeyMaker().triplet_key("198.51.100.0", "c@x.org", "d@y.org"),
                     TripletRecord(now - 5000, now - 10, True, now - 4900).serialise())
    lines = run_import(config, dbdir)
    assert lines[-1].startswith("wrote 1 triplets to lmdb:")
    assert "and 1 client records" in lines[-1]
    assert "kept 1 records" in lines[-1]
    assert any(line.startswith("clients: 3 read: 3 addresses in 1 client records "
                               "(0 auto-whitelisted with auto_whitelist_clients = 5)")
               for line in lines)
    triplets, clients = contents(config.triplet_table), contents(config.client_table)
    key = KeyMaker().triplet_key
    assert triplets == {
        # b+1@ and b@: first seen with the one, last seen with the other.
        key("192.0.2.0", "a@x.org", "b@y.org"): f"{now - 7000},{now - 4000},1,0",
        key("198.51.100.0", "c@x.org", "d@y.org"): f"{now - 5000},{now - 10},1,{now - 4900}"}
    assert clients == {"203.0.113.0": f"{now - 300},{now - 100},0,4,{now - 100}"}
    # A second run changes nothing.
    again = run_import(config, dbdir)
    assert again[-1].startswith("wrote 0 triplets")
    assert "and 0 client records" in again[-1]
    assert (contents(config.triplet_table), contents(config.client_table)) == (triplets, clients)


def test_dry_run_writes_nothing_and_counts_the_same(tmp_path: Path) -> None:
    now = int(time.time())
    config = lmdb_config(tmp_path)
    dbdir = make_dbdir(tmp_path, [("192.0.2.0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}")],
                       [("192.0.2.9", f"5,{now}")])
    dry = run_import(config, dbdir, dry_run=True)
    assert dry[-1].startswith("would write 1 triplets")
    assert dry[-1].endswith("dry run: nothing written")
    assert not (tmp_path / "triplets.lmdb").exists()
    assert not (tmp_path / "clients.lmdb").exists()
    real = run_import(config, dbdir)
    assert real[-1].startswith("wrote 1 triplets")
    assert len(contents(config.triplet_table)) == 1


def test_mismatch_is_reported_before_anything_is_written(tmp_path: Path) -> None:
    now = int(time.time())
    config = lmdb_config(tmp_path, "client_key = smart\nipv6_prefix = 80\n")
    dbdir = make_dbdir(tmp_path, [
        ("192.0.2.0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}"),
        ("2001:db8:0:0:0:0:0:0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}"),
        ("5ba93c9db0cff93f52b521d7420e43f6eda2784f", f"{now - 5000},{now - 4000}"),
        ("198.51.100.7/e@x.org/f@y.org", f"{now - 5000},{now - 4000}"),  # --lookup-by-host?
    ], [("192.0.2.9", f"5,{now}"), ("0beec7b5ea3f0fdbc95d0dd47f3c5bc275da8a33", f"5,{now}")])
    seen: list[tuple[str, int]] = []

    def out(line: str) -> None:
        seen.append((line, len(contents(config.triplet_table))))

    import_postgrey(dbdir, DEFAULTS, config, dry_run=False, out=out)
    report = "\n".join(line for line, _ in seen)
    assert ("does not carry over: triplets of IPv6 clients: postgrey keyed them by /64 "
            "networks, policyd by /80 networks") in report
    assert "carries over: triplets of IPv4 clients" in report
    assert "carries over in part: client_key = smart" in report
    assert ("does not carry over: 1 triplets and 1 auto-whitelist entries are SHA1 hashes "
            "(postgrey --privacy)") in report
    assert ("triplets: 4 read: 2 passed, 0 pending, 0 expired, 2 skipped (1 hashed, "
            "1 not carried over, 0 malformed)") in report
    # --privacy: the plain auto-whitelist entry carries over, the hashed one cannot.
    assert ("clients: 2 read: 1 addresses in 1 client records (1 auto-whitelisted with "
            "auto_whitelist_clients = 5), 0 expired, 1 skipped (1 hashed, 0 malformed)") in report
    assert ("warning: 1 triplets name a client that is not a network address of --delay=300 "
            "--lookup-by-subnet --ipv4cidr=24 --ipv6cidr=64") in report
    # Everything but what the writes did (the last line; run as root, the
    # backups created) was said while the store was still empty.
    survey = [n for line, n in seen[:-1] if not line.startswith("created ")]
    assert survey == [0] * len(survey) and len(survey) >= 8
    assert seen[-1][0].startswith("wrote 2 triplets") and seen[-1][1] == 2


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    config = lmdb_config(tmp_path)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "policyd", "-c", config.path,
                               "import-postgrey", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=60)

    missing = run(str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert missing.stderr == (f"policyd: import-postgrey: {tmp_path / 'nowhere'}: no "
                              "postgrey.db (postgrey's --dbdir, by default /var/lib/postgrey)\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "postgrey.db").write_bytes(b"not a database" * 100)
    result = run(str(broken))
    assert result.returncode == 1
    assert result.stderr.startswith("policyd: import-postgrey: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_debians_postgrey_opts_can_be_pasted_whole(tmp_path: Path) -> None:
    now = int(time.time())
    config = lmdb_config(tmp_path)
    dbdir = make_dbdir(tmp_path, [("192.0.2.0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}")])
    # Every option of postgrey 1.37 but --help, --man, --version, --no-action.
    opts = ["--inet=10023", "--delay=300", "--max-age=35", "--retry-window=2",
            "--auto-whitelist-clients", "--auto-whitelist-clients=5", "-v", "-q", "-d",
            "--unix=/run/pg.sock", "-i", "127.0.0.1:10023", "-u", "/run/x", "--socketmode=0660",
            "--user=postgrey", "--group=postgrey", "--pidfile=/run/postgrey.pid",
            "--lookup-by-subnet", "--ipv4cidr=24", "--ipv6cidr=64",
            "--whitelist-clients=/etc/postgrey/whitelist_clients",
            "--whitelist-recipients=/etc/postgrey/whitelist_recipients",
            "--syslogfacility=mail", "--syslog-facility=mail", "--facility=mail",
            "--greylist-action=DEFER_IF_PERMIT", "--greylist-text=Greylisted %s",
            "--privacy", "--hostname=mx.example", "--exim", "--listen-queue-size=10",
            "--x-greylist-header=X-Greylist: delayed", f"--dbdir={dbdir}"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "policyd", "-c", config.path,
                               "import-postgrey", "--dry-run", *args], capture_output=True,
                              text=True, cwd=ROOT, timeout=60)

    result = run(*opts)  # DBDIR from --dbdir
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1] == (
        "policyd import-postgrey: not used: --inet=10023 --max-age=35 --retry-window=2 "
        "--auto-whitelist-clients --auto-whitelist-clients=5 -v -q -d --unix=/run/pg.sock "
        "-i=127.0.0.1:10023 -u=/run/x --socketmode=0660 --user=postgrey --group=postgrey "
        "--pidfile=/run/postgrey.pid --whitelist-clients=/etc/postgrey/whitelist_clients "
        "--whitelist-recipients=/etc/postgrey/whitelist_recipients --syslogfacility=mail "
        "--syslog-facility=mail --facility=mail --greylist-action=DEFER_IF_PERMIT "
        "--greylist-text=Greylisted %s --privacy --hostname=mx.example --exim "
        "--listen-queue-size=10 --x-greylist-header=X-Greylist: delayed: they do not decide "
        "what postgrey's records mean; policyd.cf's parameters apply (docs/policyd.md, "
        '"Moving from postgrey")')
    assert lines[-1].startswith("policyd import-postgrey: would write 1 triplets")
    # The operator's command line from the trial, DBDIR given as well.
    result = run("--inet=10023", "--delay=300", "--max-age=35", str(dbdir))
    assert result.returncode == 0, result.stderr
    assert "not used: --inet=10023 --max-age=35: " in result.stdout
    # Bad values: one line each.
    for args, message in [
            (("--delay=5m", str(dbdir)), "--delay=5m: postgrey's --delay is a positive whole "
             "number of seconds (--delay=300), without a unit"),
            (("--delay=0", str(dbdir)), "--delay=0: postgrey's --delay is a positive whole "
             "number"),
            ((f"--dbdir={dbdir}", str(tmp_path)), f"--dbdir={dbdir} and DBDIR {tmp_path} "
             "differ: give one of them"),
            ((), "no DBDIR: give postgrey's --dbdir (Debian: /var/lib/postgrey)")]:
        result = run(*args)
        assert result.returncode == 1, args
        assert result.stderr.startswith(f"policyd: import-postgrey: {message}"), result.stderr
        assert result.stderr.count("\n") == 1


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the import run as root")
def test_run_as_root_new_backups_belong_to_the_state_directorys_owner(
        tmp_path: Path, memcached: Memcached) -> None:
    # The state directory the unit creates for policyd's user (here nobody),
    # before policyd ever started; the import is run as root.
    nobody = pwd.getpwnam("nobody")
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, nobody.pw_uid, nobody.pw_gid)
    os.chmod(state, 0o750)
    clients_cf = tmp_path / "clients.cf"
    clients_cf.write_text(f"memcache = {memcached.spec}\nkey_format = imp-clients:%s\n"
                          f"backup = lmdb:{state / 'clients'}\n")
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"triplet_table = lmdb:{state / 'triplets'}\n"
                  f"client_table = memcache:{clients_cf}\n")
    now = int(time.time())
    dbdir = make_dbdir(tmp_path, [("192.0.2.0/a@x.org/b@y.org", f"{now - 5000},{now - 4000}")],
                       [("192.0.2.9", f"5,{now}")])
    result = subprocess.run([sys.executable, "-m", "policyd", "-c", str(cf), "import-postgrey",
                             str(dbdir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    group = grp.getgrgid(nobody.pw_gid).gr_name
    for name in ("triplets.lmdb", "clients.lmdb"):
        st = (state / name).stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (
            nobody.pw_uid, nobody.pw_gid, 0o640), name
        assert (f"policyd import-postgrey: created {state / name} owned by nobody:{group}, as "
                "its directory") in result.stdout.splitlines()
    # A second run creates nothing, says nothing about owners, changes none.
    os.chown(state / "triplets.lmdb", 0, 0)
    again = subprocess.run([sys.executable, "-m", "policyd", "-c", str(cf), "import-postgrey",
                            str(dbdir)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "created" not in again.stdout
    assert (state / "triplets.lmdb").stat().st_uid == 0


# --- client_key = spf ------------------------------------------------------------

SPF_ZONES = {
    # A pool of two addresses in two networks, as large senders have.
    "example.org": '@ TXT "v=spf1 ip4:192.0.2.10 ip4:198.51.100.20 -all"\n',
    "broad.example": '@ TXT "v=spf1 +all"\n',
    "nospf.example": "",
}


def spf_dbdir(tmp: Path, now: int) -> Path:
    passed = f"{now - 5000},{now - 4000}"
    return make_dbdir(tmp, [
        ("192.0.2.0/alice@example.org/bob@y.org", passed),  # SPF passes for .10
        ("203.0.113.0/dan@broad.example/bob@y.org", passed),  # passes too broadly
        ("203.0.113.0/erin@nospf.example/bob@y.org", passed),  # no SPF record
        ("203.0.113.0/fay@unserved.test/bob@y.org", passed),  # DNS fails (REFUSED)
        ("192.0.2.0//bob@y.org", passed),  # null sender: the HELO name was not kept
        ("100.64.0.0/gil@example.org/bob@y.org", passed),  # no address of it known
        ("192.0.2.0/hal@example.org/bob@y.org", f"{now - 100},{now - 50}"),  # pending
    ], [
        # Newest first: .99 (not authorised) is tried before .10.
        ("192.0.2.99", f"1,{now - 3000}"),
        ("192.0.2.10", f"1,{now - 4000}"),
        ("203.0.113.7", f"1,{now - 4000}"),
    ])


def test_spf_pools_get_their_imported_triplets(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    now = int(time.time())
    dbdir = spf_dbdir(tmp_path, now)
    with start_nsd(tmp_path / "dns", SPF_ZONES) as nsd:
        proc = policyd_factory(tmp_path / "policyd", None, extra=(
            f"client_key = spf\ndns_servers = {nsd.spec}\ndns_timeout = 1s\n"))
        lines = policyd_import(proc, dbdir)
        report = "\n".join(lines)
        assert lines[1] == (
            "SPF: evaluating 4 sender domains for 3 client addresses postgrey knew (4 network "
            "and domain pairs of 6 passed triplets), at most 16 at a time and 900s in all "
            "(--no-spf skips this)")
        assert ("carries over: triplets of IPv4 clients: postgrey keyed them by /24 networks, "
                "policyd by /24 networks when the sender's SPF does not pass") in report
        assert ("carries over in part: client_key = spf: policyd keys a sender whose SPF "
                "passes for the client as spf:DOMAIN, which postgrey did not record; every "
                "record is imported under spf_fallback_client_key = subnet, which serves "
                "senders whose SPF does not pass") in lines
        assert ("SPF of the senders of 6 passed triplets: 1 pass for a client address "
                "postgrey knew in their network: imported under spf:DOMAIN as well; 2 do not "
                "pass (or too broadly); 1 DNS failed; not evaluated: 1 null sender (policyd "
                "checks the HELO name, which postgrey did not record), 1 no client address "
                "known (postgrey's auto-whitelist holds them), 0 past the 900s bound") in lines
        assert ("does not carry over for senders whose SPF passes: pending triplets, passed "
                "ones not imported under spf:DOMAIN, and the auto-whitelist (policyd counts a "
                "domain's passes under spf:DOMAIN): such a sender is greylisted once more for "
                "a new triplet") in lines
        # 7 under the subnet key, alice's also under spf:example.org.
        assert lines[-1].startswith("wrote 8 triplets")
        triplets = contents(f"lmdb:{proc.dir / 'triplets'}")
        assert triplets["spf:example.org/alice@example.org/bob@y.org"] == \
            triplets["192.0.2.0/alice@example.org/bob@y.org"] == f"{now - 5000},{now - 4000},1,0"
        assert not [k for k in triplets if k.startswith("spf:") and "alice" not in k]
        assert policyd_import(proc, dbdir)[-1].startswith("wrote 0 triplets")  # idempotent

        proc.start()
        # The pool's other address, in another network: policyd keys it
        # spf:example.org and finds the imported triplet.
        assert proc.ask(client_address="198.51.100.20", sender="alice@example.org",
                        recipient="bob@y.org") == "DUNNO"
        # SPF fails for 100.64.0.5: the subnet key, imported as before.
        assert proc.ask(client_address="100.64.0.5", sender="gil@example.org",
                        recipient="bob@y.org") == "DUNNO"
        # Not imported under spf:example.org (pending): greylisted again.
        assert proc.ask(client_address="192.0.2.10", sender="hal@example.org",
                        recipient="bob@y.org").startswith("DEFER_IF_PERMIT")
        log = proc.log_text()
        assert re.search(r"reason=passed client=198\.51\.100\.20 .* spf=pass "
                         r"client_key=spf:example\.org", log), log


def test_spf_not_evaluated_is_said(tmp_path: Path) -> None:
    now = int(time.time())
    dbdir = spf_dbdir(tmp_path, now)
    # No DNS server needed: nothing is asked.
    config = lmdb_config(tmp_path, "client_key = spf\ndns_servers = 127.0.0.1:9\n")
    lines: list[str] = []
    import_postgrey(dbdir, DEFAULTS, config, dry_run=True, out=lines.append,
                    evaluate_spf=False)
    assert ("does not carry over: SPF not evaluated (--no-spf): triplets and the "
            "auto-whitelist of senders whose SPF passes: they are greylisted once more under "
            "spf:DOMAIN and count their passes again") in lines
    assert not any(line.startswith("SPF") for line in lines)
    assert lines[-1].startswith("would write 7 triplets")
    # The time bound: past it, the rest is not evaluated (here: all of it).
    lines.clear()
    import_postgrey(dbdir, DEFAULTS, config, dry_run=True, out=lines.append,
                    spf_max_seconds=0)
    assert any(line.endswith("not evaluated: 1 null sender (policyd checks the HELO name, "
                              "which postgrey did not record), 1 no client address known "
                              "(postgrey's auto-whitelist holds them), 4 past the 0s bound")
               for line in lines), lines
    assert lines[-1].startswith("would write 7 triplets")


# --- the real thing ---------------------------------------------------------------


class Postgrey:
    """A private postgrey asked through the policy protocol at chosen times."""

    def __init__(self, server: Server, dbdir: Path) -> None:
        self.server = server
        self.dbdir = dbdir

    def ask(self, client: str, sender: str, recipient: str, at: int) -> str:
        data = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\n"
                f"client_name=unknown\nsender={sender}\nrecipient={recipient}\n"
                f"instance={client}.{at}\npolicy_test_time={at}\n\n").encode()
        with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as sock:
            sock.sendall(data)
            reply = b""
            while not reply.endswith(b"\n\n"):
                chunk = sock.recv(4096)
                assert chunk, "postgrey closed the connection"
                reply += chunk
        return reply.decode().removeprefix("action=").strip()


@pytest.fixture
def postgrey(tmp_path: Path) -> Iterator[Postgrey]:
    if not Path(POSTGREY).exists():
        pytest.fail(f"{POSTGREY} missing: ./dev deps installs Debian's postgrey")
    server = start_postgrey(tmp_path, ("--auto-whitelist-clients=3",))
    try:
        yield Postgrey(server, tmp_path / "postgrey" / "db")
    finally:
        server.stop()


def policyd_import(proc: PolicydProcess, dbdir: Path, *args: str) -> list[str]:
    result = subprocess.run([sys.executable, "-m", "policyd", "-c", str(proc.config),
                             "import-postgrey", *args, str(dbdir)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return [line.removeprefix("policyd import-postgrey: ")
            for line in result.stdout.splitlines()]


def memcached_sets(memcached: Memcached) -> int:
    stats = memcached.raw(b"stats\r\n").decode()
    match = re.search(r"STAT cmd_set (\d+)", stats)
    assert match
    return int(match[1])


def test_postgrey_state_carries_over_to_policyd(
        postgrey: Postgrey, memcached: Memcached, tmp_path: Path) -> None:
    now = int(time.time())
    pg = postgrey.ask
    defer, prepend = "DEFER_IF_PERMIT", "PREPEND X-Greylist"
    # Passed: BATV and +extensions, which postgrey and policyd both fold.
    batv, bob = "prvs=0123456789=alice+news@Example.ORG", "Bob+inbox@example.com"
    assert pg("192.0.2.10", batv, bob, now - 7200).startswith(defer)
    assert pg("192.0.2.10", batv, bob, now - 6000).startswith(prepend)
    assert pg("2001:db8:1::5", "frank@example.org", "bob@example.com", now - 5000) \
        .startswith(defer)
    assert pg("2001:db8:1::5", "frank@example.org", "bob@example.com", now - 4000) \
        .startswith(prepend)
    # Pending, 100 s into postgrey's 300 s delay.
    assert pg("198.51.100.7", "carol@example.net", "dave@example.com", now - 100) \
        .startswith(defer)
    # Pending, but beyond the retry window (2 days).
    assert pg("100.64.1.9", "erin@example.net", "dave@example.com", now - 3 * 86400) \
        .startswith(defer)
    # Three passes, hours apart: postgrey's auto-whitelist.
    for i in range(3):
        at = now - 40000 + i * 4000
        assert pg("203.0.113.20", f"news{i}@lists.example", "bob@example.com", at) \
            .startswith(defer)
        assert pg("203.0.113.20", f"news{i}@lists.example", "bob@example.com", at + 600) \
            .startswith(prepend)
    assert pg("203.0.113.20", "someone@else.example", "bob@example.com", now - 1000) == "DUNNO"
    # Two addresses of one network: 2 passes and 1 (3 together, not one's).
    for client, passes in (("100.64.2.1", ((now - 30000, "ann"), (now - 20000, "bea"))),
                           ("100.64.2.2", ((now - 25000, "cyd"),))):
        for at, name in passes:
            sender = f"{name}@example.org"
            assert pg(client, sender, "bob@example.com", at).startswith(defer)
            assert pg(client, sender, "bob@example.com", at + 400).startswith(prepend)

    proc = PolicydProcess(tmp_path / "policyd", memcached.spec,
                          extra="auto_whitelist_clients = 3\n")
    # While postgrey runs, its writes are in its log, not yet in postgrey.db:
    # a dry run reads a recovered copy and writes nothing.
    sets = memcached_sets(memcached)
    dry = policyd_import(proc, postgrey.dbdir, "--dry-run")
    assert "postgrey is running: read a copy" in dry[0]
    # 8 passed (1 + 1 + 3 + 3), 1 pending and the start-up probe (pending).
    assert ("triplets: 11 read: 8 passed, 2 pending, 1 expired, 0 skipped (0 hashed, "
            "0 not carried over, 0 malformed)") in dry
    # 203.0.113.20, both 100.64.2.x (one network) and the two passed clients.
    assert ("clients: 5 read: 5 addresses in 4 client records (1 auto-whitelisted with "
            "auto_whitelist_clients = 3), 0 expired, 0 skipped (0 hashed, 0 malformed)") in dry
    assert dry[-1].startswith("would write 10 triplets")
    assert memcached_sets(memcached) == sets
    assert not list((tmp_path / "policyd").glob("*.lmdb"))

    postgrey.server.stop()
    done = policyd_import(proc, postgrey.dbdir)
    assert "postgrey is not running" in done[0]
    assert done[-1].startswith("wrote 10 triplets to memcache:")
    assert "and 4 client records" in done[-1]
    again = policyd_import(proc, postgrey.dbdir)
    assert again[-1].startswith("wrote 0 triplets")
    assert "and 0 client records" in again[-1]

    proc.start()
    # Passed triplets: DUNNO at once.
    assert proc.ask(client_address="192.0.2.10", sender=batv, recipient=bob) == "DUNNO"
    assert proc.ask(client_address="2001:db8:1::5", sender="frank@example.org",
                    recipient="bob@example.com") == "DUNNO"
    # Pending: what is left of the delay (100 s of 300 were waited in postgrey).
    reply = proc.ask(client_address="198.51.100.7", sender="carol@example.net",
                     recipient="dave@example.com")
    match = re.fullmatch(r"DEFER_IF_PERMIT 4\.2\.0 Greylisted, please try again in "
                         r"(\d+) seconds", reply)
    assert match, reply
    assert 300 - 100 - (time.time() - now) - 2 <= int(match[1]) <= 200
    # Auto-whitelisted: any triplet of the client passes.
    assert proc.ask(client_address="203.0.113.20", sender="new@sender.example",
                    recipient="bob@example.com") == "DUNNO"
    # Nothing else changed: new triplets, the expired one, and the network
    # whose addresses had 2 and 1 passes, are greylisted for the whole delay.
    full = "DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in 300 seconds"
    assert proc.ask(client_address="192.0.2.10", sender=batv,
                    recipient="other@example.com") == full
    assert proc.ask(client_address="100.64.1.9", sender="erin@example.net",
                    recipient="dave@example.com") == full
    assert proc.ask(client_address="100.64.2.3", sender="new@sender.example",
                    recipient="bob@example.com") == full
    log = proc.log_text()
    assert re.search(r"reason=auto-whitelisted client=203\.0\.113\.20 ", log), log
    assert len(re.findall(r"reason=passed ", log)) == 2, log
    proc.stop()
