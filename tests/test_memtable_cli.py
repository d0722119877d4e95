"""The memtable command: postmap's interface, exit codes and output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtable.limits import MESSAGE_QUOTE_MAX_CHARS
from tests.conftest import Memcached, free_port
from tests.postfixcf import postfix_config_dir
from tests.postfixlab import run_postmap

MEMTABLE = [sys.executable, "-m", "memtable.cli"]


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MEMTABLE, *args], input=stdin, capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.fixture
def table(tmp_path: Path, memcached: Memcached) -> str:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = {memcached.spec}\nbackup = lmdb:{tmp_path / 'bk'}\n")
    return f"memcache:{cf}"


def test_seeding_a_new_backup_from_a_private_dump_leaves_it_private(
        tmp_path: Path, table: str) -> None:
    """docs/operations.md's "seed a new MX": `memtable -i memcache:...` from
    a 0640 dump (umask 022, as a root shell has) creates the lmdb backup
    0640, not 0644: it holds addresses."""
    dump = tmp_path / "triplets.txt"
    dump.write_text("192.0.2.0/a@example.org/b@example.com 1700000000,1700000300\n")
    dump.chmod(0o640)
    with open(dump, "rb") as src:
        done = subprocess.run([*MEMTABLE, "-i", table], stdin=src, capture_output=True,
                              umask=0o022, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bk.lmdb").stat().st_mode & 0o777 == 0o640


def test_insert_query_delete_sequence(table: str, memcached: Memcached) -> None:
    done = run("-i", table, stdin="# comment\nOne@Example.com value one\ntwo\tvalue\ttwo\n")
    assert done.returncode == 0, done.stderr
    meta = memcached.meta("one@example.com")
    assert meta is not None and meta["value"] == "value one" and meta["flags"] == 0

    q = run("-q", "ONE@example.com", table)
    assert (q.returncode, q.stdout) == (0, "value one\n")
    assert run("-q", "missing", table).returncode == 1

    many = run("-q", "-", table, stdin="two\nmissing\none@example.com\n")
    assert many.returncode == 0
    assert many.stdout == "two\tvalue\ttwo\none@example.com\tvalue one\n"
    assert run("-q", "-", table, stdin="missing\n").returncode == 1

    seq = run("-s", table)
    assert seq.returncode == 0
    assert sorted(seq.stdout.splitlines()) == ["one@example.com\tvalue one", "two\tvalue\ttwo"]

    assert run("-d", "two", table).returncode == 0
    assert run("-d", "two", table).returncode == 1
    assert run("-q", "two", table).returncode == 1


def test_fold_and_json(table: str) -> None:
    assert run("-f", "-i", table, stdin="KeY v\n").returncode == 0
    assert run("-f", "-q", "key", table).returncode == 1
    out = run("-f", "-j", "-q", "KeY", table)
    assert out.stdout == '{"KeY": "v"}\n'


def test_temporary_failure_exits_75(tmp_path: Path) -> None:
    cf = tmp_path / "down.cf"
    cf.write_text(f"memcache = inet:127.0.0.1:{free_port()}\n")
    done = run("-q", "k", f"memcache:{cf}")
    assert done.returncode == 75
    assert "temporary failure" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_error_names_file_and_line(tmp_path: Path) -> None:
    cf = tmp_path / "bad.cf"
    cf.write_text("ttl = 10\nmax_try = zero\n")
    done = run("-q", "k", f"memcache:{cf}")
    assert done.returncode == 1
    assert f"{cf}, line 2" in done.stderr
    assert "Traceback" not in done.stderr


def test_huge_number_in_a_table_cf_is_one_line(tmp_path: Path) -> None:
    """5,000 digits: Python's int() would raise ValueError (issue 15)."""
    cf = tmp_path / "bad.cf"
    cf.write_text("# table\nttl = " + "9" * 5000 + "\n")
    done = run("-q", "k", f"memcache:{cf}")
    assert done.returncode == 1
    assert done.stderr.startswith(f"memtable: fatal: {cf}, line 2: ttl = 999")
    assert done.stderr.endswith(": bad numerical configuration\n")
    assert done.stderr.count("\n") == 1


def test_usage_errors_are_clean() -> None:
    for args in ([], ["-q", "k"], ["-q", "k", "-s", "memcache:/x"], ["-q", "k", "nocolon"]):
        done = run(*args)
        assert done.returncode != 0 and "Traceback" not in done.stderr


def test_sequence_without_backup_warns_and_prints_nothing(tmp_path: Path,
                                                          memcached: Memcached) -> None:
    cf = tmp_path / "nb.cf"
    cf.write_text(f"memcache = {memcached.spec}\n")
    done = run("-s", f"memcache:{cf}")
    assert (done.returncode, done.stdout) == (0, "")
    assert "requires backup database" in done.stderr


def test_ttl_command_explains_and_warns(tmp_path: Path) -> None:
    # A private Postfix configuration (-c): the host's may not exist.
    done = ttl_report(tmp_path, 7776000, "")
    assert "absolute" in done.stdout and "1970" in done.stdout
    assert "memtable: warning: ttl 7776000 is over 30 days" in done.stderr


def test_ttl_command_without_a_postfix_configuration_assumes_postfix_defaults(
        tmp_path: Path) -> None:
    """A fresh host has no main.cf: postconf alone stops with a fatal error,
    `memtable ttl` explains the table with Postfix's defaults and says so.
    Without -c it reads $MAIL_CONFIG, as every Postfix program; the test
    run points it at an empty directory (conftest), so the host's
    /etc/postfix is never what a test sees."""
    cf = tmp_path / "t.cf"
    cf.write_text("ttl = 3600\n")
    empty = tmp_path / "postfix"
    empty.mkdir()
    for args, directory in ((), os.environ["MAIL_CONFIG"]), (("-c", str(empty)), str(empty)):
        done = run("ttl", *args, f"memcache:{cf}")
        assert (done.returncode, done.stderr) == (0, "")
        assert done.stdout == (
            f"table: memcache:{cf}\n"
            "ttl = 3600: 3600s: relative; memtable and Postfix both send 3600\n"
            f"postfix: no Postfix configuration in {directory}: Postfix's defaults assumed\n"
            "postfix: not used as postscreen_cache_map or address_verify_map\n")


def ttl_report(tmp_path: Path, ttl: int, main_cf: str) -> subprocess.CompletedProcess[str]:
    """`memtable ttl` of a table with ``ttl``, against a Postfix configuration
    directory whose main.cf is ``main_cf`` (``{table}`` names the table)."""
    cf = tmp_path / "t.cf"
    cf.write_text(f"ttl = {ttl}\n")
    conf = tmp_path / "postfix"
    conf.mkdir()
    (conf / "main.cf").write_text("compatibility_level = 3.6\n"
                                  + main_cf.format(table=f"memcache:{cf}"))
    done = run("ttl", "-c", str(conf), f"memcache:{cf}")
    assert done.returncode == 0, done.stderr
    return done


def test_ttl_command_checks_postscreen_ttls(tmp_path: Path) -> None:
    """With Postfix's configuration, `memtable ttl` finds the table in
    postscreen_cache_map and warns that its ttl is shorter than the
    postscreen ttls it has to keep."""
    done = ttl_report(tmp_path, 3600, "postscreen_cache_map = {table}\n"
                      "postscreen_pipelining_ttl = 30d\npostscreen_cache_cleanup_interval = 12h\n")
    assert "postscreen_cache_map uses this table" in done.stdout
    assert "shorter than postscreen_pipelining_ttl" in done.stderr
    assert "set ttl = 2592000" in done.stderr
    assert "memtable: warning: postscreen_cache_cleanup_interval should be 0" in done.stderr


def test_ttl_command_reads_expanded_postfix_values(tmp_path: Path) -> None:
    """postscreen_dnsbl_max_ttl's default is ``${postscreen_dnsbl_ttl?...}h``:
    only postconf -x turns it into the time Postfix uses."""
    done = ttl_report(tmp_path, 2592000, "postscreen_cache_map = {table}\n"
                      "postscreen_cache_cleanup_interval = 0\n")
    assert "postscreen_dnsbl_max_ttl = 1h" in done.stdout
    assert "warning" not in done.stdout + done.stderr


@pytest.mark.parametrize(("ttl", "expire", "warned"), [
    # Postfix's default 31d cannot be covered: lower it, not the ttl.
    (2592000, "", ["address_verify_positive_expire_time is over 30 days"]),
    (86400, "", ["ttl 86400s is shorter than address_verify_positive_expire_time "
                 "(2678400s): verify entries vanish before they expire, so addresses "
                 "are probed again; set ttl = 2592000",
                 "address_verify_positive_expire_time is over 30 days"]),
    (86400, "address_verify_positive_expire_time = 20d\n",
     ["ttl 86400s is shorter than address_verify_positive_expire_time (1728000s): "
      "verify entries vanish before they expire, so addresses are probed again; "
      "set ttl = 1728000"]),
    (1728000, "address_verify_positive_expire_time = 20d\n", []),
])
def test_ttl_command_verify_advice(tmp_path: Path, ttl: int, expire: str,
                                   warned: list[str]) -> None:
    done = ttl_report(tmp_path, ttl, "address_verify_map = {table}\n"
                      f"address_verify_cache_cleanup_interval = 0\n{expire}")
    warnings = [line for line in done.stderr.splitlines()
                if line.startswith("memtable: warning: ")]
    assert len(warnings) == len(warned), done.stderr
    for line, text in zip(warnings, warned, strict=True):
        assert text in line


def test_ttl_command_says_why_postconf_failed(tmp_path: Path) -> None:
    """A -c directory that does not exist is a typo, not "no configuration";
    a main.cf postconf cannot read is postconf's own fatal error."""
    cf = tmp_path / "t.cf"
    cf.write_text("ttl = 3600\n")
    done = run("ttl", "-c", str(tmp_path / "missing"), f"memcache:{cf}")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (f"memtable: fatal: Postfix configuration directory "
                           f"{tmp_path / 'missing'}: No such directory\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "main.cf").symlink_to(tmp_path / "nowhere")
    done = run("ttl", "-c", str(broken), f"memcache:{cf}")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith("memtable: fatal: ")  # postconf's own line, one line
    assert done.stderr.endswith(f"postconf: fatal: open {broken}/main.cf: "
                                "No such file or directory\n")
    assert done.stderr.count("\n") == 1


def test_a_huge_key_is_not_echoed_whole(table: str) -> None:
    """A key too long for memcached is skipped with a warning that quotes
    only the start of it."""
    key = "k" * 65000
    done = run("-i", table, stdin=f"{key} value\n")
    assert done.returncode == 1
    warning = [line for line in done.stderr.splitlines() if "skipping update" in line]
    assert len(warning) == 1 and len(warning[0]) < 1000, done.stderr[:2000]
    shown = "k" * MESSAGE_QUOTE_MAX_CHARS
    left = len(key) - MESSAGE_QUOTE_MAX_CHARS
    assert f'"{shown}... ({left} more characters)"' in warning[0]


def test_insert_that_fails_says_which_line_stopped_it(tmp_path: Path) -> None:
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = inet:127.0.0.1:{free_port()}\n")  # nobody listens
    done = run("-i", f"memcache:{cf}", stdin="\n# comment\nfirst value\nsecond value\n")
    assert done.returncode == 75
    assert f'memtable: error: stdin, line 3: key "first" not stored in memcache:{cf}' \
        in done.stderr
    assert "memtable: temporary failure: " in done.stderr


def test_missing_lmdb_file_is_fatal_not_temporary(tmp_path: Path) -> None:
    """As postmap: a table file that cannot be opened exits 1 (fatal), not 75."""
    done = run("-q", "k", f"lmdb:{tmp_path / 'missing'}")
    assert done.returncode == 1
    assert "open database" in done.stderr and "No such file" in done.stderr


# Everything postmap's input parser does with a line: leading white space on
# the first logical line, continuations through blank and comment lines,
# NUL bytes, non-UTF-8 text, quotes and backslashes, CRLF, a missing value.
POSTMAP_INPUT = (b"  dropped x\n# comment\nk1 a\n  b\n\n# inner\n\tc\nlonely\n\n  # c\n"
                 b"span\"q\n  v\nk2 \xff\xfe\nalias: target\n\x00lead v\nk3 v\x00after\n"
                 b"k4 crlf\r\n  cont\r\n\"q k\" quoted\nesc\\ aped value\nlast line")


@pytest.mark.postfix
def test_insert_reads_its_input_as_postmap_i(postmap_config: Path, tmp_path: Path) -> None:
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    pm = run_postmap(postmap_config, "-i", f"lmdb:{theirs}", input=POSTMAP_INPUT)
    mt = subprocess.run([*MEMTABLE, "-i", f"lmdb:{ours}"], input=POSTMAP_INPUT,
                        capture_output=True, timeout=30, check=False)
    assert pm.returncode == 0, pm.stderr
    assert mt.returncode == 1, mt.stderr  # memtable: 1 when a line was skipped

    def entries(db: Path) -> list[bytes]:
        return sorted(run_postmap(postmap_config, "-s", f"lmdb:{db}").stdout.splitlines())

    assert entries(ours) == entries(theirs)
    assert b"k1\ta  b\tc" in entries(ours)

    def warnings(stderr: bytes, prog: str) -> list[str]:
        # Postfix 3.7 does not warn about NUL bytes (later Postfix and
        # memtable do); the two render non-UTF-8 bytes differently.
        found = []
        for line in stderr.decode(errors="replace").splitlines():
            warning = line.split(f"{prog}: warning: ", 1)[1]
            if "null byte" not in warning:
                found.append(warning.split('"')[0] if "non-UTF-8" in warning else warning)
        return found

    assert warnings(mt.stderr, "memtable") == warnings(pm.stderr, "postmap")
    assert len(warnings(mt.stderr, "memtable")) >= 5


@pytest.mark.parametrize("io_encoding", ["utf-8", "latin-1", "utf-8:surrogateescape"])
def test_insert_reads_bytes_whatever_the_locale(tmp_path: Path, io_encoding: str) -> None:
    # postmap reads bytes: a non-UTF-8 line is warned about and skipped,
    # never a traceback (strict UTF-8) or re-encoded text (latin-1).
    env = {**os.environ, "PYTHONIOENCODING": io_encoding}
    done = subprocess.run([*MEMTABLE, "-i", f"lmdb:{tmp_path / 'db'}"],
                          input="ok vé\n".encode() + b"bad v\xe9\n", capture_output=True,
                          timeout=30, check=False, env=env)
    assert done.returncode == 1, done.stderr
    assert b'stdin, line 2: non-UTF-8 input "bad v' in done.stderr
    assert b"Traceback" not in done.stderr
    q = subprocess.run([*MEMTABLE, "-q", "-", f"lmdb:{tmp_path / 'db'}"], input=b"ok\nbad\n",
                       capture_output=True, timeout=30, check=False)
    assert q.stdout == "ok\tvé\n".encode()


def test_ttl_command_warnings_carry_the_memtable_prefix(tmp_path: Path) -> None:
    """The table file's own warnings too, as every other memtable command's."""
    cf = tmp_path / "t.cf"
    cf.write_text("ttl = 3600\nbogus = 1\n")
    done = run("ttl", "-c", str(postfix_config_dir(tmp_path)), f"memcache:{cf}")
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"memtable: warning: {cf}, line 2: unknown parameter bogus ignored\n"


def test_impossible_memcache_host_is_fatal_with_file_and_line(tmp_path: Path) -> None:
    """A typo in the host name (empty label) is a configuration error naming
    the file and line: no traceback, and not a run-time failure that would
    leave the backup unused."""
    cf = tmp_path / "t.cf"
    cf.write_text(f"backup = lmdb:{tmp_path / 'bk'}\nmemcache = inet:mc..example.com:11211\n")
    assert run("-i", f"lmdb:{tmp_path / 'bk'}", stdin="key value\n").returncode == 0
    done = run("-q", "key", f"memcache:{cf}")
    assert done.returncode == 1
    assert done.stderr == (f"memtable: fatal: {cf}, line 2: memcache = inet:mc..example.com:11211"
                           ': impossible host name "mc..example.com": empty label\n')


def backup_with(tmp_path: Path, lines: str) -> str:
    """An lmdb backup holding ``lines`` (postmap's input format)."""
    backup = f"lmdb:{tmp_path / 'bk'}"
    assert run("-i", backup, stdin=lines).returncode == 0
    return backup


def test_host_lookup_that_never_answers_is_bounded_by_the_timeout(tmp_path: Path) -> None:
    """A DNS server that never answers: looking the memcache host up counts
    against the attempt's timeout (1 s) instead of glibc's 30 s, the server
    is then held down, and the backup answers every key."""
    from tests.hostile import PrivateResolver

    backup = backup_with(tmp_path, "k1 v1\nk2 v2\nk3 v3\n")
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = inet:memcache.stall.test:11211\ntimeout = 1\nbackup = {backup}\n")
    with PrivateResolver(tmp_path) as resolver:
        done = subprocess.run(resolver.wrap([*MEMTABLE, "-q", "-", f"memcache:{cf}"]),
                              input="k1\nk2\nk3\n", capture_output=True, text=True,
                              timeout=20, check=False)
        asked = list(resolver.queries)
    assert asked and all(b"\x08memcache\x05stall\x04test\x00" in q for q in asked)
    assert (done.returncode, done.stdout) == (0, "k1\tv1\nk2\tv2\nk3\tv3\n"), done.stderr
    assert "host lookup of memcache.stall.test: no answer within 1 s" in done.stderr
    assert "held down" in done.stderr
    assert "Traceback" not in done.stderr


def test_failed_host_lookup_holds_the_server_down(tmp_path: Path) -> None:
    """A resolver that refuses: the lookup fails at once, the server is held
    down like one that timed out (one lookup for all the keys: no
    resolver traffic per operation), and the backup answers."""
    from tests.hostile import PrivateResolver

    backup = backup_with(tmp_path, "k1 v1\nk2 v2\nk3 v3\nk4 v4\n")
    cf = tmp_path / "t.cf"
    cf.write_text(f"memcache = inet:memcache.refused.test:11211\nbackup = {backup}\n")
    with PrivateResolver(tmp_path, refuse=True) as resolver:
        done = subprocess.run(resolver.wrap([*MEMTABLE, "-v", "-q", "-", f"memcache:{cf}"]),
                              input="k1\nk2\nk3\nk4\n", capture_output=True, text=True,
                              timeout=20, check=False)
    assert (done.returncode, done.stdout) == (0, "k1\tv1\nk2\tv2\nk3\tv3\nk4\tv4\n"), \
        done.stderr
    lookups = "connect to inet:memcache.refused.test:11211: host lookup failed"
    assert done.stderr.count(lookups) == 1, done.stderr
    assert "held down" in done.stderr
