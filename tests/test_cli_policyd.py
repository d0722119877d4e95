"""The policyd command: --check-config in-process, and real `policyd`
processes (systemd socket activation, signals, startup errors) run through
a small wrapper that swaps in the scripted test policy."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import sdnotify
from policyd.cli import main
from policyd.config import DEFAULT_CONFIG_PATH
from policyd.limits import SHUTDOWN_CANCEL_WAIT_SECONDS
from tests.conftest import Memcached
from tests.policyd_helpers import ask, is_closed, request, wait_until
from tests.wait import WAIT

REPO = Path(__file__).resolve().parent.parent

# Runs policyd.cli.main with tests.policyd_helpers.build_policy standing in
# for policyd.greylist.build_policy.  With TEST_LISTEN_FD set it does what
# systemd does before exec: the listening socket becomes fd 3, LISTEN_FDS=1
# and LISTEN_PID = this very process.
WRAPPER = f"""
import os, sys, types
sys.path.insert(0, {str(REPO)!r})
from tests import policyd_helpers
shim = types.ModuleType("policyd.greylist")
shim.build_policy = policyd_helpers.build_policy
sys.modules["policyd.greylist"] = shim
fd = os.environ.pop("TEST_LISTEN_FD", None)
if fd is not None:
    if int(fd) != 3:
        os.dup2(int(fd), 3)
        os.close(int(fd))
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
from policyd.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    path = tmp_path / "run_policyd.py"
    path.write_text(WRAPPER)
    return path


def write_cf(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policyd.cf"
    path.write_text(text)
    return path


# --- --check-config ---------------------------------------------------------

def test_check_config_good(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cf = write_cf(tmp_path, "listen = inet:127.0.0.1:10025, unix:/run/p.sock\n"
                            "max_connections = 10\n"
                            f"triplet_table = lmdb:{tmp_path}/triplets\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-c", str(cf)]) == 0
    out = capsys.readouterr().out
    assert "listen = inet:127.0.0.1:10025, unix:/run/p.sock\n" in out
    assert "max_connections = 10\n" in out
    assert "idle_timeout = 600\n" in out  # defaults shown too


def test_check_config_opens_tables_and_whitelists(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Errors in the files policyd.cf names show at --check-config time."""
    table_cf = tmp_path / "triplets.cf"
    table_cf.write_text("memcache = inet:127.0.0.1:11211\nmax_try = 0\n")
    cf = write_cf(tmp_path, f"triplet_table = memcache:{table_cf}\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-c", str(cf)]) == 1
    assert f"{table_cf}, line 2: max_try = 0" in capsys.readouterr().err
    cf = write_cf(tmp_path, f"triplet_table = lmdb:{tmp_path}/t\n"
                            f"client_table = lmdb:{tmp_path}/clients\n"
                            f"whitelist_clients = {tmp_path}/missing\n")
    assert main(["--check-config", "-c", str(cf)]) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.parametrize("host", ["mc..example.com", "x" * 64 + ".example.com"])
def test_check_config_refuses_an_impossible_memcache_host(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], host: str) -> None:
    """A typo in a table's memcache host fails --check-config with the file
    and line, instead of every request failing (policy-failure) at run time."""
    table_cf = tmp_path / "triplets.cf"
    table_cf.write_text(f"memcache = inet:{host}:11211\nbackup = lmdb:{tmp_path}/t\n")
    cf = write_cf(tmp_path, f"triplet_table = memcache:{table_cf}\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-c", str(cf)]) == 1
    err = capsys.readouterr().err
    assert f"{table_cf}, line 1: memcache = inet:{host}:11211: impossible host name" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize(("text", "message"), [
    ("listen = inet:127.0.0.1:10025\nbogus = 1\n", "line 2: unknown parameter bogus"),
    # A renamed parameter: the error names the new one.
    ("\nstore_failure_action = DUNNO\n",
     "line 2: unknown parameter store_failure_action (it is now called failure_action)"),
    ("max_connections = 0\n", "line 1: max_connections = 0"),
    ("listen = ftp:x\n", "line 1: listen"),
    ("listen = inet:127.0.0.1:10025, unix:rel.sock\n",
     "unix:rel.sock: a UNIX socket path must be absolute"),
    ("no equals sign here\n", "line 1:"),
    # Over 4300 digits Python's int() raises ValueError (issue 15).
    ("\nmax_connections = " + "9" * 5000 + "\n", "line 2: max_connections = 999"),
    ("\nmax_connections = " + "9" * 5000 + "\n", "bad numerical configuration"),
    ("greylist_delay = " + "9" * 5000 + "m\n", "line 1: greylist_delay = 999"),
])
def test_check_config_bad(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          text: str, message: str) -> None:
    cf = write_cf(tmp_path, text)
    assert main(["--check-config", "-c", str(cf)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"policyd: {cf}, ")
    assert message in captured.err
    assert captured.err.count("\n") == 1


def test_o_overrides_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """-o NAME=VALUE (repeatable, later wins) replaces the file's setting."""
    cf = write_cf(tmp_path, "greylist_delay = 300s\n"
                            f"triplet_table = lmdb:{tmp_path}/triplets\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-c", str(cf), "-o", "greylist_delay=1m",
                 "-o", "listen_reuse_port=yes", "-o", "greylist_delay=10m"]) == 0
    out = capsys.readouterr().out
    assert "greylist_delay = 600\n" in out
    assert "listen_reuse_port = yes\n" in out


@pytest.mark.parametrize("command", ["run", "report", "cleanup"])
def test_c_and_o_may_follow_any_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        command: str) -> None:
    cf = write_cf(tmp_path, "greylist_delay = 300s\n"
                            f"triplet_table = lmdb:{tmp_path}/triplets\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-o", "greylist_delay=1m", command, "-c", str(cf),
                 "-o", "listen_reuse_port=yes"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# effective configuration from {cf}\n")  # -c after the command
    assert "greylist_delay = 60\n" in out
    assert "listen_reuse_port = yes\n" in out


@pytest.mark.parametrize(("setting", "message"), [
    ("bogus=1", "policyd: -o bogus=1: unknown parameter bogus"),
    ("listen_reuse_port=maybe", "policyd: -o listen_reuse_port=maybe: listen_reuse_port = maybe: "
                                "bad boolean"),
    ("greylist_delay", "policyd: -o greylist_delay: missing '='"),
    ("max_connections=" + "9" * 5000, "policyd: -o max_connections=999"),
])
def test_o_errors_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  setting: str, message: str) -> None:
    cf = write_cf(tmp_path, f"triplet_table = lmdb:{tmp_path}/t\n"
                            f"client_table = lmdb:{tmp_path}/c\n")
    assert main(["--check-config", "-c", str(cf), "-o", setting]) == 1
    err = capsys.readouterr().err
    assert err.startswith(message)
    assert err.count("\n") == 1
    if setting.startswith("max_connections"):
        assert err.endswith(": bad numerical configuration\n")


def test_huge_report_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    for option in ("--top", "--max-entries"):
        with pytest.raises(SystemExit) as caught:
            main(["report", option, "9" * 5000])
        assert caught.value.code == 2
        err = capsys.readouterr().err
        assert err.endswith(f"error: argument {option}: bad numerical value\n")
        assert "999" not in err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--check-config", "-c", str(tmp_path / "nope.cf")]) == 1
    assert "nope.cf: cannot read" in capsys.readouterr().err


def test_default_config_path(capsys: pytest.CaptureFixture[str]) -> None:
    # Whether or not this machine has one, the test run may not read it
    # (tests/hostguard): the error names the default path either way.
    assert main(["--check-config"]) == 1
    assert f"policyd: {DEFAULT_CONFIG_PATH}: cannot read" in capsys.readouterr().err


def test_check_config_as_a_process_prints_no_traceback(tmp_path: Path) -> None:
    cf = write_cf(tmp_path, "bogus = 1\n")
    proc = subprocess.run([sys.executable, "-m", "policyd", "--check-config", "-c", str(cf)],
                          capture_output=True, text=True, timeout=WAIT, cwd=REPO)
    assert proc.returncode == 1
    assert "unknown parameter bogus" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2


# --- real processes ---------------------------------------------------------

@pytest.fixture
def listening() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def spawn(wrapper: Path, cf: Path, *args: str, listen_fd: socket.socket | None = None,
          extra_env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env.update(extra_env or {})
    pass_fds: tuple[int, ...] = ()
    if listen_fd is not None:
        env["TEST_LISTEN_FD"] = str(listen_fd.fileno())
        pass_fds = (listen_fd.fileno(),)
    return subprocess.Popen([sys.executable, str(wrapper), "-c", str(cf), *args],
                            env=env, pass_fds=pass_fds, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)


@contextlib.contextmanager
def running(wrapper: Path, cf: Path, *args: str, listen_fd: socket.socket | None = None,
            extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[str]]:
    """spawn(), and the process killed on the way out if a test left it running."""
    proc = spawn(wrapper, cf, *args, listen_fd=listen_fd, extra_env=extra_env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=WAIT)
        pytest.fail(f"policyd did not exit; stderr:\n{err}")
    return proc.returncode, err


def test_socket_activation_signals_and_clean_exit(tmp_path: Path, wrapper: Path,
                                                  listening: socket.socket) -> None:
    # `listen` names a place that cannot be bound: only fd 3 can work.
    cf = write_cf(tmp_path, f"listen = unix:{tmp_path}/no/such/dir/p.sock\n")
    with running(wrapper, cf, "--uvloop", listen_fd=listening) as proc:
        with socket.create_connection(listening.getsockname(), timeout=WAIT) as sock:
            assert ask(sock, request(test_action="OK from fd 3")) == b"action=OK from fd 3\n\n"
            proc.send_signal(signal.SIGHUP)
            assert ask(sock, request()) == b"action=DUNNO\n\n"
            proc.send_signal(signal.SIGTERM)
            assert is_closed(sock)
        code, err = finish(proc)
    assert code == 0, err
    assert "listening on fd 3 inet:127.0.0.1:" in err
    assert "reloading policy (SIGHUP)" in err
    assert "SIGTERM received: shutting down" in err
    assert 'action="OK from fd 3" reason=test client=192.0.2.1' in err  # decisions on stderr
    assert "Traceback" not in err


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_sighup_while_starting_is_a_reload_once_started(tmp_path: Path, wrapper: Path,
                                                       listening: socket.socket) -> None:
    """SIGHUP's default action would end the process; while policyd starts
    (reading its files) a SIGHUP is remembered and done once it runs."""
    gate = tmp_path / "gate"
    cf = write_cf(tmp_path, "listen = inet:127.0.0.1:0\n")
    env = {"TEST_BUILD_GATE": str(gate)}
    with running(wrapper, cf, listen_fd=listening, extra_env=env) as proc:
        wait_for(Path(f"{gate}.started"))
        proc.send_signal(signal.SIGHUP)
        gate.touch()
        with socket.create_connection(listening.getsockname(), timeout=WAIT) as sock:
            assert ask(sock, request()) == b"action=DUNNO\n\n"
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
    assert code == 0, err
    assert "reloading policy (SIGHUP)" in err
    assert err.index("policyd started") < err.index("reloading policy (SIGHUP)")


def test_sigterm_while_starting_stops_cleanly_once_started(
        tmp_path: Path, wrapper: Path, listening: socket.socket) -> None:
    """SIGTERM's default action would kill the process (exit -15, which
    systemd reports as a failure); while policyd starts it is remembered
    and policyd stops as soon as it has started, with exit status 0."""
    gate = tmp_path / "gate"
    cf = write_cf(tmp_path, "listen = inet:127.0.0.1:0\n")
    env = {"TEST_BUILD_GATE": str(gate)}
    with running(wrapper, cf, listen_fd=listening, extra_env=env) as proc:
        wait_for(Path(f"{gate}.started"))
        proc.send_signal(signal.SIGTERM)
        gate.touch()
        code, err = finish(proc)
    assert code == 0, err
    assert "SIGTERM received while starting: shutting down" in err
    assert "Traceback" not in err


def test_sigterm_does_not_wait_for_a_stuck_reload(tmp_path: Path, wrapper: Path,
                                                  listening: socket.socket) -> None:
    """A reload stuck reading a file (a hung network filesystem) must not
    keep a stopped policyd alive: it is waited for a bounded time."""
    stuck = tmp_path / "stuck"
    cf = write_cf(tmp_path, "listen = inet:127.0.0.1:0\n")
    env = {"TEST_RELOAD_HANGS": str(stuck)}
    with running(wrapper, cf, listen_fd=listening, extra_env=env) as proc:
        with socket.create_connection(listening.getsockname(), timeout=WAIT) as sock:
            assert ask(sock, request()) == b"action=DUNNO\n\n"
        proc.send_signal(signal.SIGHUP)
        wait_for(stuck)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code, err = finish(proc)
        elapsed = time.monotonic() - started
    assert code == 0, err
    assert elapsed < SHUTDOWN_CANCEL_WAIT_SECONDS + WAIT, elapsed
    assert "not waiting for it" in err


def test_tells_systemd_ready_reloading_and_stopping(tmp_path: Path, wrapper: Path,
                                                    listening: socket.socket) -> None:
    """Type=notify: READY=1 once policyd listens, RELOADING=1 then READY=1
    around a SIGHUP's reload, STOPPING=1 on SIGTERM (sd_notify(3)), sent to
    the datagram socket named by $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(WAIT)
        cf = write_cf(tmp_path, "listen = inet:127.0.0.1:0\n")
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        with running(wrapper, cf, listen_fd=listening, extra_env=env) as proc:
            ready = notify.recv(4096).decode().split("\n")
            assert ready[0] == "READY=1"
            assert ready[1].startswith("STATUS=listening on fd 3 inet:127.0.0.1:")
            with socket.create_connection(listening.getsockname(), timeout=WAIT) as sock:
                assert ask(sock, request()) == b"action=DUNNO\n\n"
            proc.send_signal(signal.SIGHUP)
            assert notify.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
            assert notify.recv(4096).decode().startswith("READY=1\n")
            proc.send_signal(signal.SIGTERM)
            assert notify.recv(4096) == b"STOPPING=1"
            code, err = finish(proc)
    assert code == 0, err


def test_sd_notify_addresses_and_absent_supervisor(monkeypatch: pytest.MonkeyPatch) -> None:
    assert sdnotify.notify_address(None) is None
    assert sdnotify.notify_address("") is None
    assert sdnotify.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.notify_address("@abstract/name") == "\0abstract/name"
    assert sdnotify.notify_address("vsock:2:1234") is None
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("x") is False  # outside systemd: nothing to tell
    name = f"policyd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        listener.settimeout(WAIT)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.stopping() is True
        assert listener.recv(100) == b"STOPPING=1"
    # The supervisor went away: no exception, just False.
    assert sdnotify.stopping() is False


def test_sd_notify_waits_for_room_in_a_full_queue(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """systemd busy (its datagram queue full): messages sent while serving
    never wait (a warning); the first READY=1 waits for room, asleep in the
    kernel (not spinning), up to the time it is given."""
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        sent = 0
        while sdnotify.notify("X=1"):  # fill the queue; the next send fails at once
            sent += 1
            assert sent < 10_000
        assert "cannot tell systemd X=1" in caplog.text
        wall = time.monotonic()
        assert sdnotify.ready("listening", wait=0.3) is False
        assert time.monotonic() - wall >= 0.25  # it waited
        result: list[bool] = []
        waiter = threading.Thread(
            target=lambda: result.append(sdnotify.ready("listening", wait=WAIT)))
        waiter.start()
        # It sleeps in poll(2) until systemd makes room (a spinning send
        # would never be asleep there) ...
        assert wait_until(lambda: asleep_in_poll(waiter))
        systemd.recv(100)  # ... systemd reads one ...
        waiter.join(WAIT)
        assert result == [True]  # ... and READY=1 goes out


def asleep_in_poll(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in poll(2) or ppoll(2) (Linux /proc)."""
    task = Path(f"/proc/self/task/{thread.native_id}")
    try:
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        syscall = (task / "syscall").read_text().split()[0]
    except (OSError, IndexError):
        return False  # the thread ended, or has not begun
    return state == "S" and syscall in _POLL_SYSCALLS.get(os.uname().machine, ())


# poll(2) and ppoll(2) system call numbers, as /proc/PID/syscall shows them.
_POLL_SYSCALLS = {"x86_64": ("7", "271"), "aarch64": ("73",)}


def test_socket_activation_refuses_a_non_listening_socket(tmp_path: Path,
                                                          wrapper: Path) -> None:
    cf = write_cf(tmp_path, "listen = inet:127.0.0.1:0\n")
    a, b = socket.socketpair()
    with a, b:
        code, err = finish(spawn(wrapper, cf, listen_fd=a))
    assert code == 1
    assert "fd 3 is not a listening stream socket" in err
    assert "Traceback" not in err


def test_startup_error_is_one_line(tmp_path: Path, wrapper: Path,
                                   listening: socket.socket) -> None:
    port = listening.getsockname()[1]
    cf = write_cf(tmp_path, f"listen = inet:127.0.0.1:{port}\n")
    code, err = finish(spawn(wrapper, cf))
    assert code == 1
    assert f"fatal: cannot listen on inet:127.0.0.1:{port}" in err
    assert "Traceback" not in err


# --- messages operators grep for ---------------------------------------------

def test_configuration_warnings_carry_the_policyd_prefix(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], memcached: Memcached) -> None:
    """As Postfix's own: "policyd: warning: FILE, line N: ...", for
    policyd.cf and for the table .cf files it names."""
    table_cf = tmp_path / "triplets.cf"
    table_cf.write_text(f"backup = lmdb:{tmp_path}/t\nbogus = 1\n"
                        f"memcache = {memcached.spec}\n")
    cf = write_cf(tmp_path, "max_age = 35d\nmax_age = 36d\n"
                            f"triplet_table = memcache:{table_cf}\n"
                            f"client_table = lmdb:{tmp_path}/clients\n")
    assert main(["--check-config", "-c", str(cf)]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [f"policyd: warning: {cf}, line 2: max_age is set again; the later value wins",
                   f"policyd: warning: {table_cf}, line 2: unknown parameter bogus ignored"]


@pytest.mark.parametrize("name", ["triplet_table", "client_table", "postscreen_cache"])
def test_a_missing_table_file_names_the_setting_that_refers_to_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    missing = tmp_path / "missing.cf"
    tables = {"triplet_table": f"lmdb:{tmp_path}/t", "client_table": f"lmdb:{tmp_path}/c",
              "postscreen_cache": ""}
    tables[name] = f"memcache:{missing}"
    cf = write_cf(tmp_path, "".join(f"{k} = {v}\n" for k, v in tables.items()))
    line = list(tables).index(name) + 1
    assert main(["--check-config", "-c", str(cf)]) == 1
    assert capsys.readouterr().err == (
        f"policyd: {cf}, line {line}: {name} = memcache:{missing}: "
        f"{missing}: cannot read: No such file or directory\n")
    # Set with -o: the message names the -o setting.
    assert main(["--check-config", "-c", str(cf), "-o", f"{name}=memcache:{missing}"]) == 1
    assert capsys.readouterr().err.startswith(
        f"policyd: -o {name}=memcache:{missing}: {name} = memcache:{missing}: {missing}: ")


def test_a_missing_whitelist_names_the_setting_that_refers_to_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "whitelist_recipients"
    cf = write_cf(tmp_path, f"triplet_table = lmdb:{tmp_path}/t\n"
                            f"client_table = lmdb:{tmp_path}/c\n"
                            f"whitelist_recipients = {missing}\n")
    assert main(["--check-config", "-c", str(cf)]) == 1
    assert capsys.readouterr().err == (
        f"policyd: {cf}, line 3: whitelist_recipients = {missing}: {missing}: "
        "cannot read whitelist: No such file or directory\n")
