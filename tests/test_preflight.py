"""`policyd --check-config` checks what breaks at run time and changes
nothing; the same checks (policyd.preflight) stop policyd at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from policyd.cli import main
from tests.conftest import Memcached, free_port
from tests.postfixcf import backdate, postfix_config_dir
from tests.postfixlab import POSTCONF
from tests.wait import WAIT

REPO = Path(__file__).resolve().parent.parent


def policyd_cf(tmp_path: Path, text: str = "") -> Path:
    """policyd.cf: lmdb tables in tmp_path (lines 1 and 2), then ``text``."""
    tables = {name: f"{name} = lmdb:{tmp_path}/{name}\n"
              for name in ("triplet_table", "client_table")}
    path = tmp_path / "policyd.cf"
    path.write_text("".join(line if f"{name} =" not in text else "# set below\n"
                            for name, line in tables.items()) + text)
    return path


def table_cf(path: Path, memcache: str, backup: str, extra: str = "") -> Path:
    """A memcache table file; ``extra`` is its line 4."""
    key_format = "" if "key_format" in extra else "key_format = policyd-x:%s"
    path.write_text(f"memcache = {memcache}\n{key_format}\nbackup = lmdb:{backup}\n{extra}")
    return path


def check(cf: Path, capsys: pytest.CaptureFixture[str], *options: str) -> tuple[int, str]:
    code = main(["--check-config", "-c", str(cf), *[a for o in options for a in ("-o", o)]])
    return code, capsys.readouterr().err


def run_policyd(cf: Path, *python: str) -> subprocess.CompletedProcess[str]:
    """Start policyd (``python`` lines run first in the process); the tests
    that use it expect it to stop at once, before it listens."""
    code = "\n".join([*python, "from policyd.cli import main", "sys.exit(main(sys.argv[1:]))"])
    return subprocess.run([sys.executable, "-c", "import sys\n" + code, "-c", str(cf)],
                          capture_output=True, text=True, timeout=WAIT, check=False, cwd=REPO)


# --- a check changes nothing -------------------------------------------------

def test_check_creates_no_file(tmp_path: Path, memcached: Memcached,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """Run as root on an empty state directory, the check used to create the
    lmdb backups, owned by root: the service's user then could not open them.
    Now only their directory must exist; policyd creates them at start."""
    state = tmp_path / "state"
    state.mkdir()
    triplets = table_cf(tmp_path / "triplets.cf", memcached.spec, f"{state}/triplets")
    clients = table_cf(tmp_path / "clients.cf", memcached.spec, f"{state}/clients")
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"triplet_table = memcache:{triplets}\nclient_table = memcache:{clients}\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, err = check(cf, capsys)
    assert (code, err) == (0, "")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert list(state.iterdir()) == []


def test_an_empty_lmdb_file_is_one_policyd_initialises(
        tmp_path: Path, memcached: Memcached, capsys: pytest.CaptureFixture[str]) -> None:
    """A 0-byte file: policyd's start initialises it (as LMDB does), so the
    check accepts it too.  Before: `open database ...: Bad file descriptor`."""
    clients = table_cf(tmp_path / "clients.cf", memcached.spec, f"{tmp_path}/cb")
    cf = policyd_cf(tmp_path, f"client_table = memcache:{clients}\n")
    for name in ("triplets.lmdb", "cb.lmdb"):
        (tmp_path / name).write_bytes(b"")
    code, err = check(cf, capsys)
    assert (code, err) == (0, "")
    assert [(tmp_path / n).stat().st_size for n in ("triplets.lmdb", "cb.lmdb")] == [0, 0]
    # policyd report (read-only too) sees an empty table.
    assert main(["report", "-c", str(cf)]) == 0
    assert "Triplets (lmdb:" in capsys.readouterr().out


def test_missing_backup_directory_is_an_error(tmp_path: Path, memcached: Memcached,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    triplets = table_cf(tmp_path / "triplets.cf", memcached.spec, f"{tmp_path}/none/triplets")
    cf = policyd_cf(tmp_path, f"triplet_table = memcache:{triplets}\n")
    code, err = check(cf, capsys)
    assert code == 1
    # Names the setting that named the table, then the table's own words.
    assert err == (f"policyd: {cf}, line 3: triplet_table = memcache:{triplets}: "
                   f"{triplets}: backup = lmdb:{tmp_path}/none/triplets: "
                   f"lmdb:{tmp_path}/none/triplets: directory {tmp_path}/none does not exist "
                   "(policyd creates the file at start, not the directory)\n")
    assert not (tmp_path / "none").exists()


def test_unreachable_memcached_is_a_warning(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    down = f"inet:127.0.0.1:{free_port()}"  # nobody listens
    triplets = table_cf(tmp_path / "triplets.cf", down, f"{tmp_path}/triplets")
    cf = policyd_cf(tmp_path, f"triplet_table = memcache:{triplets}\n")
    code, err = check(cf, capsys)
    assert code == 0
    # One line, the one policyd logs running with memcached down.
    assert err.splitlines() == [
        f"policyd: warning: memcache server {down} (memcache:{triplets}): unavailable: "
        f"connect: Connection refused (after 1 attempt); answering from the backup "
        f"lmdb:{tmp_path}/triplets"], err


# --- what breaks at run time --------------------------------------------------

def test_metrics_listen_without_prometheus_client(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cf = policyd_cf(tmp_path, "metrics_listen = inet:127.0.0.1:0\n")
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    code, err = check(cf, capsys)
    assert code == 1
    assert err == ("policyd: metrics_listen is set but prometheus-client is not installed "
                   "(pip install 'memtable-policyd[metrics]')\n")


@pytest.mark.parametrize(("value", "shown"), [
    ("DEFER_IF_PERMIT", "DEFER_IF_PERMIT"), ("defer_if_permit", "DEFER_IF_PERMIT"),
    ("DEFER", "DEFER"), ("450", "450"), ("421", "421")])
def test_greylist_actions_postfix_defers_with(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             value: str, shown: str) -> None:
    cf = policyd_cf(tmp_path, f"greylist_action = {value}\n")
    code = main(["--check-config", "-c", str(cf)])
    assert f"\ngreylist_action = {shown}\n" in capsys.readouterr().out
    assert code == 0


@pytest.mark.parametrize("value", ["REJECT", "550", "DEFER_IF_REJECT", "DEFFER", "45",
                                   "450 4.2.0", "OK", "reject_unauth_destination"])
def test_greylist_action_that_does_not_defer(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            value: str) -> None:
    cf = policyd_cf(tmp_path, f"greylist_action = {value}\n")
    code, err = check(cf, capsys)
    assert code == 1
    assert err == (f"policyd: {cf}, line 3: greylist_action = {value}: \"{value}\" is not an "
                   "access(5) action with which Postfix defers the recipient: expected "
                   "DEFER_IF_PERMIT, DEFER or an SMTP code 4NN\n")


@pytest.mark.parametrize(("setting", "message"), [
    ("greylist_text = try again in %x seconds", "unknown escape %x (valid: %s, %r)"),
    ("greylist_text = wait %S seconds", "unknown escape %S (valid: %s, %r)"),
    ("greylist_text = 100%", "unknown escape % at the end (valid: %s, %r)"),
    ("greylist_header_text = X-Greylist: %s seconds", "unknown escape %s (valid: %t, %h, %d)"),
    ("greylist_header_text = delayed %t seconds", 'not a header: expected "Name: text"'),
])
def test_unknown_escapes_and_a_header_that_is_none(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str],
                                                   setting: str, message: str) -> None:
    cf = policyd_cf(tmp_path, setting + "\n")
    code, err = check(cf, capsys)
    assert code == 1
    assert err == f"policyd: {cf}, line 3: {setting}: {message}\n"


def test_decision_timeout_below_postfix_default(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """No Postfix configuration here (the test run's MAIL_CONFIG is empty):
    Postfix's default smtpd_policy_service_timeout, 100s, is the limit."""
    cf = policyd_cf(tmp_path)
    assert check(cf, capsys, "decision_timeout=99s") == (0, "")
    code, err = check(cf, capsys, "decision_timeout=100s")
    assert code == 1
    assert err == (f"policyd: {cf}: decision_timeout (100s) must be below Postfix's "
                   "smtpd_policy_service_timeout (100s, Postfix's default): Postfix would "
                   "give up on policyd before it decides\n")


@pytest.mark.skipif(not POSTCONF, reason="postconf not installed")
def test_decision_timeout_below_postfix_setting(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    postfix = postfix_config_dir(tmp_path)
    with open(postfix / "main.cf", "a") as main_cf:
        main_cf.write("smtpd_policy_service_timeout = 30s\n")
    backdate(postfix)
    monkeypatch.setenv("MAIL_CONFIG", str(postfix))
    cf = policyd_cf(tmp_path)
    assert check(cf, capsys, "decision_timeout=29s") == (0, "")
    code, err = check(cf, capsys, "decision_timeout=30s")
    assert code == 1
    assert (f"smtpd_policy_service_timeout (30s, postconf -c {postfix}): Postfix would give "
            "up on policyd before it decides\n") in err


@pytest.mark.parametrize(("setting", "param"), [
    ("domain = example.com", "triplet_table"),
    ("key_format = policyd-triplet:%d", "triplet_table"),
    ("key_format = %u-%s", "client_table"),
    ("key_format = x:%2", "postscreen_cache"),
])
def test_table_whose_keys_policyd_cannot_use(tmp_path: Path, memcached: Memcached,
                                             capsys: pytest.CaptureFixture[str],
                                             setting: str, param: str) -> None:
    """The troubleshooting table's "skipping update ...: domain mismatch":
    a setting that skips every key of policyd is fatal, not a warning per
    request."""
    table = table_cf(tmp_path / "t.cf", memcached.spec, f"{tmp_path}/t", setting + "\n")
    cf = policyd_cf(tmp_path, f"{param} = memcache:{table}\n")
    code, err = check(cf, capsys)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"policyd: {table}, line 4: {setting}: ")
    assert f"the keys of {param} are not addresses: every update would be skipped" in lines[0]


# --- the same checks at start -------------------------------------------------

def test_start_stops_on_the_same_problems(tmp_path: Path, memcached: Memcached) -> None:
    table = table_cf(tmp_path / "t.cf", memcached.spec, f"{tmp_path}/t", "domain = example.com\n")
    cf = policyd_cf(tmp_path, f"listen = inet:127.0.0.1:{free_port()}\n"
                              f"triplet_table = memcache:{table}\n"
                              "decision_timeout = 100s\nmetrics_listen = inet:127.0.0.1:0\n")
    done = run_policyd(cf, "sys.modules['prometheus_client'] = None")
    assert done.returncode == 1
    fatal = [line.split("policyd[", 1)[1].split(": ", 1)[1] for line in done.stderr.splitlines()]
    assert fatal == [
        "fatal: metrics_listen is set but prometheus-client is not installed "
        "(pip install 'memtable-policyd[metrics]')",
        f"fatal: {cf}: decision_timeout (100s) must be below Postfix's "
        "smtpd_policy_service_timeout (100s, Postfix's default): Postfix would give up on "
        "policyd before it decides",
        f"fatal: {table}, line 4: domain = example.com: memcache tables then take only "
        "user@domain keys, and the keys of triplet_table are not addresses: every update "
        "would be skipped; remove this line"], done.stderr
    assert not (tmp_path / "t.lmdb").exists()  # stopped before opening anything


def test_missing_local_whitelist_is_a_warning_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The docs' postgrey example on Debian, which ships no .local file."""
    main_list = tmp_path / "whitelist_clients"
    main_list.write_text("example.org\n")
    cf = policyd_cf(tmp_path, f"whitelist_clients = {main_list}, {main_list}.local\n")
    code, err = check(cf, capsys)
    assert code == 0
    assert err == (f"policyd: warning: {main_list}.local: whitelist not found, skipped "
                   "(a missing .local file is allowed, as in postgrey)\n")
    main_list.unlink()
    code, err = check(cf, capsys)
    assert code == 1
    assert err.splitlines()[-1] == (
        f"policyd: {cf}, line 3: whitelist_clients = {main_list}, {main_list}.local: "
        f"{main_list}: cannot read whitelist: No such file or directory")
