"""Differential tests: memtable against Postfix's own ``postmap`` (memtable on
both memcache drivers, blocking and asyncio).

For each case both tools run against the same memcached state: flush, seed,
rebuild the lmdb: backup, run ``postmap -c PRIVATE ...`` and snapshot the raw
memcached state (every key, via ``lru_crawler metadump hash``, with value, flags
and remaining ttl from ``mg KEY t f v``) and the backup's contents; then the
same again with ``memtable``.  Standard output, exit status, raw memcached
state (ttl within TTL_SLACK seconds) and backup contents must be equal.

postmap has no bulk update for memcache (``postmap -i`` refuses memcache
tables), so writes are compared through lookups that miss memcache, hit the
backup and write the value back (with the table's key_format, flags and
ttl), and through deletes.  The write-back also reveals the exact memcache
key each tool computed, which is how key_format and domain are checked.

Allowed differences: documented memtable behaviour, tested on its own below
and never compared with postmap:

- ttl over 30 days (2592000 s): Postfix sends the number as is and memcached
  reads it as an absolute time in 1970, so the item expires at once; memtable
  sends now + ttl.
- Keys (after key_format) with white space or control characters: Postfix
  3.7 sends them (breaking the protocol line); memtable skips them, as
  Postfix 3.12 does (lookup: not found; update: warning and failure).
- Keys over 250 bytes after key_format: memcached refuses them; memtable
  skips them before any I/O (not found / warning).
- key_digest: Postfix 3.11's parameter; Postfix 3.7 ignores it.
- Temporary failures (memcached down, bad replies): memtable exits 75
  (EX_TEMPFAIL), postmap exits 1.
- Configuration errors: memtable refuses some settings Postfix accepts
  silently, and warns about unknown parameter names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from memtable import cli as memtable_cli
from tests.conftest import Memcached
from tests.memcache_runners import OPENERS, Opener
from tests.postfixcf import postfix_config_dir, write_aged
from tests.postfixlab import HAVE_POSTMAP, run_postmap

pytestmark = [
    pytest.mark.postfix,
    pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed"),
]

# Seconds two remaining-ttl readings may differ (the two runs are apart).
TTL_SLACK = 2
# The case directory's path, substituted in cf values and files.
DIR = "@DIR@"

MEMTABLE = str(Path(sys.executable).with_name("memtable"))


# --------------------------------------------------------------------------
# Raw memcached state
# --------------------------------------------------------------------------

def _metadump_keys(mc: Memcached) -> list[str]:
    """Every live key in memcached (``lru_crawler metadump hash``)."""
    with mc.connect() as s:
        s.sendall(b"lru_crawler metadump hash\r\n")
        buf = b""
        deadline = time.monotonic() + 5
        while not buf.endswith(b"END\r\n"):
            if time.monotonic() > deadline or buf.startswith(b"ERROR"):
                raise AssertionError(f"metadump failed: {buf[-200:]!r}")
            with contextlib.suppress(socket.timeout):
                buf += s.recv(65536)
    keys = []
    for line in buf.decode().splitlines():
        if line.startswith("key="):
            keys.append(urllib.parse.unquote(line.split()[0][4:]))
    return sorted(keys)


def raw_state(mc: Memcached) -> dict[str, dict[str, object]]:
    state = {}
    for key in _metadump_keys(mc):
        info = mc.meta(key)
        if info is not None:
            state[key] = info
    return state


def assert_same_state(expected: dict[str, dict[str, object]],
                      actual: dict[str, dict[str, object]]) -> None:
    only_pm = {k: expected[k] for k in expected.keys() - actual.keys()}
    only_mt = {k: actual[k] for k in actual.keys() - expected.keys()}
    assert not only_pm and not only_mt, \
        f"memcached keys differ: only after postmap {only_pm}, only after memtable {only_mt}"
    for key, exp in expected.items():
        act = actual[key]
        assert (act["value"], act["flags"]) == (exp["value"], exp["flags"]), key
        et, at = int(str(exp["ttl"])), int(str(act["ttl"]))
        if et == -1 or at == -1:
            assert at == et, f"{key}: ttl {at} != {et}"
        else:
            assert abs(at - et) <= TTL_SLACK, f"{key}: ttl {at} vs {et}"


# --------------------------------------------------------------------------
# Cases and the two runners
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One differential run. ``args`` precede the table, e.g. ("-q", "key")."""

    id: str
    args: tuple[str, ...]
    cf: dict[str, str] = field(default_factory=dict)
    stdin: str = ""
    seed: dict[str, str] = field(default_factory=dict)  # raw key -> value, no ttl
    backup: dict[str, str] | None = None  # lmdb: contents (made with postmap)
    files: dict[str, str] = field(default_factory=dict)  # name -> text, in DIR
    compare_stdout: bool = True


@dataclass
class Outcome:
    stdout: str
    status: int
    state: dict[str, dict[str, object]]
    backup: list[str]
    stderr: str


class Lab:
    """Runs a Case with either tool against one memcached; memtable's
    tables are opened by ``open_table`` (tests.memcache_runners.OPENERS)."""

    def __init__(self, tmp: Path, mc: Memcached, open_table: Opener) -> None:
        self.tmp = tmp
        self.mc = mc
        self.open_table = open_table
        self.pm_cf = postfix_config_dir(tmp)

    def prepare(self, case: Case) -> str:
        """Fresh memcached and backup for a run; returns the table spec."""
        self.mc.flush()
        for key, value in case.seed.items():
            data = value.encode()
            reply = self.mc.raw(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(data), data))
            assert reply == b"STORED\r\n", reply
        for name, text in case.files.items():
            write_aged(self.tmp / name, text.replace(DIR, str(self.tmp)))
        cf = {"memcache": self.mc.spec, **case.cf}
        if case.backup is not None:
            src = self.tmp / "backup"
            (self.tmp / "backup.lmdb").unlink(missing_ok=True)
            src.write_text("".join(f"{k} {v}\n" for k, v in case.backup.items()))
            r = run_postmap(self.pm_cf, f"lmdb:{src}")
            assert r.returncode == 0, r.stderr
            cf["backup"] = f"lmdb:{src}"
        text = "".join(f"{k} = {v.replace(DIR, str(self.tmp))}\n" for k, v in cf.items())
        return "memcache:" + str(write_aged(self.tmp / "table.cf", text))

    def backup_dump(self, case: Case) -> list[str]:
        if case.backup is None:
            return []
        r = run_postmap(self.pm_cf, "-s", f"lmdb:{self.tmp / 'backup'}")
        return sorted(r.stdout.decode().splitlines())

    def postmap(self, case: Case) -> Outcome:
        table = self.prepare(case)
        r = run_postmap(self.pm_cf, *case.args, table, input=case.stdin.encode())
        return Outcome(r.stdout.decode(), r.returncode, raw_state(self.mc),
                       self.backup_dump(case), r.stderr.decode())

    def memtable(self, case: Case) -> Outcome:
        table = self.prepare(case)
        status, out, err = self.run_memtable([*case.args, table], case.stdin)
        return Outcome(out, status, raw_state(self.mc), self.backup_dump(case), err)

    def run_memtable(self, argv: list[str], stdin: str = "") -> tuple[int, str, str]:
        """memtable.cli.main in this process (fast), opening tables with
        ``open_table``; root logging restored after."""
        out, err = io.StringIO(), io.StringIO()
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        try:
            with contextlib.redirect_stderr(err):
                status = memtable_cli.main(argv, out=out, inp=io.StringIO(stdin),
                                           open_table=self.open_table)
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
        return status, out.getvalue(), err.getvalue()

    def compare(self, case: Case) -> tuple[Outcome, Outcome]:
        expected = self.postmap(case)
        actual = self.memtable(case)
        why = f"postmap stderr: {_short(expected.stderr)}\nmemtable stderr: {_short(actual.stderr)}"
        if case.compare_stdout:
            assert actual.stdout == expected.stdout, why
        assert actual.status == expected.status, why
        try:
            assert_same_state(expected.state, actual.state)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\npostmap stdout {_short(expected.stdout)}\n"
                                 f"memtable stdout {_short(actual.stdout)}\n{why}") from None
        assert actual.backup == expected.backup, why
        return expected, actual


def _short(text: str, limit: int = 600) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


@pytest.fixture(params=list(OPENERS))
def lab(request: pytest.FixtureRequest, tmp_path: Path, memcached: Memcached) -> Lab:
    """Every comparison with memtable's table on each way it can run: the
    blocking table with either memcache driver (tests/wire_drivers.py), and
    AsyncMemcacheTable (tests/memcache_runners.py)."""
    return Lab(tmp_path, memcached, OPENERS[request.param])




# --------------------------------------------------------------------------
# key_format: every expansion, through backup write-back
# --------------------------------------------------------------------------

KEYS = [
    "user@mail.example.com", "User@Mail.Example.COM", "user", "USER",
    "@example.com", "user@", "@", "user@com", "user@.example.com",
    "user@example.com.", "user@example..com", "a.b.c.d.e.f.g.h.i.j@x.y.z",
    "first.last@sub.mail.example.co.uk", "a@b@c.example", "a@b.example@",
    "127.0.0.1", "[192.0.2.1]", "%s@example.com", "u%u@example.com",
    "deep@l9.l8.l7.l6.l5.l4.l3.l2.l1.example", "Nine@A.B.C.D.E.F.G.H.I",
]

FORMATS = [
    "%s", "%u", "%d", "%S", "%U", "%D", "%1", "%2", "%3", "%4", "%9", "%%",
    "kf:%s", "%u@%d", "%1.%2", "%3-%2-%1", "x%%y%s", "%u:%s:%d", "%%%s",
    "%U/%D/%S", "%9%8%7%6%5%4%3%2%1", "%s%s", "a%%%%b:%u",
]


def _backup_for(keys: list[str]) -> dict[str, str]:
    # Distinct values so a collision of two expansions shows in the state.
    return {k.lower(): f"v{n}" for n, k in enumerate(keys) if k}


@pytest.mark.parametrize("fmt", FORMATS)
def test_key_format_writeback(lab: Lab, fmt: str) -> None:
    expected, _ = lab.compare(Case(f"kf-{fmt}", ("-q", "-"), cf={"key_format": fmt},
                                   stdin="\n".join(KEYS) + "\n", backup=_backup_for(KEYS)))
    assert expected.state, "nothing written back: the case tests nothing"


@pytest.mark.parametrize("fmt", ["%s", "%u@%d", "%1.%2"])
def test_key_format_writeback_no_fold(lab: Lab, fmt: str) -> None:
    keys = ["user@mail.example.com", "User@Mail.Example.COM", "USER"]
    lab.compare(Case(f"kf-f-{fmt}", ("-f", "-q", "-"), cf={"key_format": fmt},
                     stdin="\n".join(keys) + "\n", backup=_backup_for(keys)))


@pytest.mark.parametrize("fmt", ["%s", "%u", "%d", "%1", "%2", "k:%u@%d", "%%"])
@pytest.mark.parametrize("key", ["user@mail.example.com", "User@Mail.Example.COM",
                                 "user", "@example.com", "user@", "user@com"])
def test_key_format_lookup_hits_seeded(lab: Lab, fmt: str, key: str) -> None:
    # Without a backup: which raw key is read shows in what is found.
    seed = {"user@mail.example.com": "s", "user": "u", "mail.example.com": "d",
            "com": "1", "example": "2", "k:user@mail.example.com": "k", "%": "pct",
            "example.com": "ed"}
    lab.compare(Case(f"seed-{fmt}-{key}", ("-q", key), cf={"key_format": fmt}, seed=seed))


# --------------------------------------------------------------------------
# domain lists
# --------------------------------------------------------------------------

DOMAIN_KEYS = [
    "user@example.com", "User@EXAMPLE.COM", "user@sub.example.com", "user@other.example",
    "user@example.net", "user", "@example.com", "user@", "user@Mail.Example.com",
]

DOMAINS = [
    "example.com",
    "example.com, other.example",
    "example.com other.example",
    "EXAMPLE.COM",
    "!mail.example.com, example.com, mail.example.com",
    "!example.com, example.com",
    f"{DIR}/domains",
    f"!{DIR}/domains, example.net",
    "inline:{example.com=yes, other.example=yes}",
    "!inline:{example.com=yes}, example.com, example.net",
    f"lmdb:{DIR}/domtable",
    ".example.com",
]


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_list(lab: Lab, domain: str) -> None:
    files = {"domains": "# comment\nexample.com\nmail.example.com\n\n"}
    if "domtable" in domain:
        files["domtable"] = "example.com ok\nmail.example.com ok\n"
        write_aged(lab.tmp / "domtable", files["domtable"])
        assert run_postmap(lab.pm_cf, f"lmdb:{lab.tmp / 'domtable'}").returncode == 0
        del files["domtable"]
    expected, _ = lab.compare(Case(f"domain-{domain}", ("-q", "-"),
                                   cf={"domain": domain, "key_format": "dom:%s"},
                                   stdin="\n".join(DOMAIN_KEYS) + "\n", files=files,
                                   backup=_backup_for(DOMAIN_KEYS)))
    # Every list skips some keys (bare names, "@domain", other domains).
    assert len(expected.stdout.splitlines()) < len(DOMAIN_KEYS)


# --------------------------------------------------------------------------
# flags, ttl, sizes
# --------------------------------------------------------------------------

@pytest.mark.parametrize("cf", [
    {},
    {"flags": "7", "ttl": "5"},
    {"flags": "2147483647", "ttl": "0"},
    {"ttl": "10"},  # short: a remaining ttl of 1 s could run out before the state is read
    {"ttl": "2592000"},  # the largest relative ttl
    {"ttl": "60", "key_format": "t:%s"},
], ids=repr)
def test_writeback_flags_and_ttl(lab: Lab, cf: dict[str, str]) -> None:
    expected, _ = lab.compare(Case("ttl", ("-q", "Key@Example.com"), cf=cf,
                                   backup={"key@example.com": "value with  spaces"}))
    [entry] = expected.state.values()
    assert entry["flags"] == int(cf.get("flags", "0"))


def test_writeback_over_data_size_limit_is_not_cached(lab: Lab) -> None:
    expected, _ = lab.compare(Case("size", ("-q", "-"), cf={"data_size_limit": "5"},
                                   stdin="short\nlonger\n",
                                   backup={"short": "12345", "longer": "123456"}))
    assert list(expected.state) == ["short"]


def test_memcache_hit_no_fold(lab: Lab) -> None:
    seed = {"p:User@Example.com": "mixed", "p:user@example.com": "lower"}
    for args in (("-q", "User@Example.com"), ("-f", "-q", "User@Example.com")):
        lab.compare(Case("fold", args, cf={"key_format": "p:%s"}, seed=seed))


def test_memcache_values(lab: Lab) -> None:
    seed = {"a": "plain", "b": "with spaces  inside ", "c": "tab\there", "d": "ünïcödé",
            "e": "x" * 10240, "f": ""}
    expected, _ = lab.compare(Case("values", ("-q", "-"), seed=seed,
                                   stdin="a\nb\nc\nd\ne\nf\nmissing\nA\n"))
    assert expected.stdout.count("\n") == 7  # all but "missing"


def test_memcache_hit_wins_over_backup(lab: Lab) -> None:
    lab.compare(Case("hit", ("-q", "-"), stdin="k\nj\n", seed={"k": "from-memcache"},
                     backup={"k": "from-backup", "j": "only-backup"}))


def test_missing_everywhere(lab: Lab) -> None:
    lab.compare(Case("miss", ("-q", "nothing@example.com")))
    lab.compare(Case("miss-", ("-q", "-"), stdin="x\ny\n"))


# --------------------------------------------------------------------------
# delete and sequence
# --------------------------------------------------------------------------

DELETE_CASES = [
    ("both", {"d:k": "m"}, {"k": "b"}, "K"),
    ("memcache-only", {"d:k": "m"}, {"other": "b"}, "k"),
    ("backup-only", {}, {"k": "b"}, "k"),
    ("neither", {"d:x": "m"}, {"y": "b"}, "k"),
]


@pytest.mark.parametrize(("name", "seed", "backup", "key"), DELETE_CASES,
                         ids=[c[0] for c in DELETE_CASES])
def test_delete_with_backup(lab: Lab, name: str, seed: dict[str, str],
                            backup: dict[str, str], key: str) -> None:
    lab.compare(Case(f"del-{name}", ("-d", key), cf={"key_format": "d:%s"},
                     seed=seed, backup=backup))


@pytest.mark.parametrize("key", ["k", "K", "missing", "user@", "@example.com"])
def test_delete_without_backup(lab: Lab, key: str) -> None:
    seed = {"d:k": "m", "d:other": "o", "d:example.com": "e"}
    lab.compare(Case("del", ("-d", key), cf={"key_format": "d:%s"}, seed=seed))
    lab.compare(Case("del-d", ("-d", key), cf={"key_format": "d:%d"}, seed=seed))


def test_delete_from_stdin(lab: Lab) -> None:
    lab.compare(Case("del-", ("-d", "-"), cf={"key_format": "d:%s"}, stdin="a\nB\nzz\n",
                     seed={"d:a": "1", "d:b": "2", "d:c": "3"}, backup={"a": "1", "c": "3"}))


def test_sequence_through_backup(lab: Lab) -> None:
    backup = {"b": "2", "a": "1", "user@example.com": "three  words here", "c": "3"}
    expected, _ = lab.compare(Case("seq", ("-s",), cf={"key_format": "s:%s"},
                                   seed={"s:zz": "memcache-only"}, backup=backup))
    assert len(expected.stdout.splitlines()) == len(backup)


def test_sequence_without_backup(lab: Lab) -> None:
    # postmap warns and exits 0 with no output.
    expected, _ = lab.compare(Case("seq-none", ("-s",), seed={"a": "1"}))
    assert (expected.status, expected.stdout) == (0, "")


# --------------------------------------------------------------------------
# The real command (console script), a few cases
# --------------------------------------------------------------------------

def test_console_script_matches_postmap(lab: Lab) -> None:
    if not Path(MEMTABLE).exists():
        pytest.skip(f"{MEMTABLE} not installed")
    case = Case("script", ("-q", "-"), cf={"key_format": "cs:%u", "ttl": "30", "flags": "3"},
                stdin="A@example.com\nb@example.com\nnone\n",
                backup={"a@example.com": "1", "b@example.com": "2"})
    expected = lab.postmap(case)
    table = lab.prepare(case)
    r = subprocess.run([MEMTABLE, *case.args, table], input=case.stdin.encode(),
                       capture_output=True, timeout=20, check=False)
    assert (r.stdout.decode(), r.returncode) == (expected.stdout, expected.status)
    assert_same_state(expected.state, raw_state(lab.mc))


# --------------------------------------------------------------------------
# Allowed differences: memtable's documented behaviour
# --------------------------------------------------------------------------

def test_ttl_over_30_days_is_sent_as_absolute_time(lab: Lab) -> None:
    ttl = 90 * 86400
    case = Case("ttl90", ("-q", "k"), cf={"ttl": str(ttl)}, backup={"k": "v"})
    expected = lab.postmap(case)
    # Postfix's relative 7776000 is read as a date in 1970: gone at once.
    assert expected.state == {}
    actual = lab.memtable(case)
    assert actual.status == 0 and actual.stdout == "v\n"
    left = int(str(actual.state["k"]["ttl"]))
    assert ttl - TTL_SLACK <= left <= ttl + 1  # memcached's clock ticks in seconds


@pytest.mark.parametrize("key", ["with space", "tab\there", "ctl\x01char"])
def test_keys_with_space_or_control_chars_are_skipped(lab: Lab, key: str) -> None:
    case = Case("ws", ("-q", key), seed={"k": "v"})
    table = lab.prepare(case)
    status, out, _ = lab.run_memtable(["-q", key, table])
    assert (status, out) == (1, "")
    assert raw_state(lab.mc).keys() == {"k"}  # nothing sent, nothing stored


def test_key_over_250_bytes_is_skipped(lab: Lab) -> None:
    key = "x" * 251
    case = Case("long", ("-q", key), backup={key: "v", "y" * 250: "w"})
    table = lab.prepare(case)
    status, out, _ = lab.run_memtable(["-q", "-", table], f"{key}\n{'y' * 250}\n")
    assert status == 0
    # The 250-byte key is looked up and cached; the 251-byte one never
    # reaches memcached (a lookup that would only fail there).
    assert raw_state(lab.mc).keys() == {"y" * 250}
    assert f"{'y' * 250}\tw\n" in out


def test_key_digest_is_applied(lab: Lab) -> None:
    import hashlib

    # Postfix 3.11: the digest replaces the key_format expansion, as lower-case hex.
    raw = hashlib.sha256(b"kd:user@example.com").hexdigest()
    case = Case("digest", ("-q", "User@Example.com"),
                cf={"key_format": "kd:%s", "key_digest": "sha256"}, seed={raw: "found"})
    table = lab.prepare(case)
    status, out, _ = lab.run_memtable(["-q", "User@Example.com", table])
    assert (status, out) == (0, "found\n")


def test_temporary_failure_exits_75(lab: Lab, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cf = write_aged(tmp_path / "down.cf", f"memcache = inet:127.0.0.1:{port}\n")
    status, out, err = lab.run_memtable(["-q", "k", f"memcache:{cf}"])
    assert (status, out) == (75, "")
    assert err
    r = run_postmap(lab.pm_cf, "-q", "k", f"memcache:{cf}")
    assert r.returncode == 1  # postmap: a fatal error, indistinguishable


@pytest.fixture(autouse=True)
def _no_stray_memcached_state(memcached: Memcached) -> Iterator[None]:
    yield
    memcached.flush()
