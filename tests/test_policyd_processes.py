"""policyd processes against real memcached: sharing state between hosts,
and memcached going away and coming back."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from memtable.limits import MEMCACHE_DOWN_HOLD_SECONDS as MEMCACHE_DOWN_HOLD
from memtable.registry import open_table
from policyd.config import PolicydConfig
from policyd.triplet import (
    KeyMaker,
    client_key,
    normalise_recipient,
    normalise_sender,
    parse_client_address,
)
from tests.conftest import Memcached, free_port, start_memcached
from tests.hostile import PrivateResolver
from tests.policyd_helpers import ask, connect, request, wait_until
from tests.policyd_proc import PolicydProcess
from tests.postfixcf import postfix_config_dir
from tests.postfixlab import requires_postmap, run_postmap
from tests.wait import WAIT

# greylist_delay in these tests: real processes, so a delay is never waited
# for; the stored triplets are aged instead (PolicydProcess.age_triplets).
DELAY = 60
FAST = f"greylist_delay = {DELAY}s\nauto_whitelist_clients = 0\n"


def triplet(n: int) -> dict[str, str]:
    return {"client_address": f"198.51.100.{n}", "client_name": "unknown",
            "sender": f"sender{n}@example.org", "recipient": f"rcpt{n}@example.com",
            "instance": f"inst{n}"}


def test_two_policyd_share_one_memcached(tmp_path: Path, memcached: Memcached,
                                         policyd_factory: type[PolicydProcess]) -> None:
    """A triplet first seen by one host passes on the other (no shared disk:
    each has its own lmdb backup)."""
    a = policyd_factory(tmp_path / "a", memcached.spec, extra=FAST).start()
    b = policyd_factory(tmp_path / "b", memcached.spec, extra=FAST).start()
    assert a.ask(**triplet(1)).startswith("DEFER_IF_PERMIT")
    assert b.ask(**triplet(1)).startswith("DEFER_IF_PERMIT")  # early retry, seen by A
    a.age_triplets(DELAY)
    assert b.ask(**triplet(1)).startswith("PREPEND X-Greylist: delayed")
    assert a.ask(**triplet(1)) == "DUNNO"
    assert "reason=new" in a.log_text()
    assert "reason=early-retry" in b.log_text() and "reason=passed" in b.log_text()


def test_reuse_port_instances_share_one_port_and_backups(
        tmp_path: Path, memcached: Memcached, policyd_factory: type[PolicydProcess]) -> None:
    """listen_reuse_port = yes: two processes with one configuration (one
    port, one memcached, the same lmdb backup files) both take connections;
    their concurrent backup writes (fcntl-locked) all land."""
    port = free_port()
    extra = FAST + "listen_reuse_port = yes\n"
    a = policyd_factory(tmp_path, memcached.spec, extra=extra, port=port).start()
    b = policyd_factory(tmp_path, memcached.spec, extra=extra, port=port).start()
    assert a.proc is not None and b.proc is not None
    # b.start() returned as soon as the port answered, which a does already.
    listening = f"policyd[{b.proc.pid}]: listening on"
    wait_until(lambda: listening in b.log_text() or b.proc.poll() is not None)
    assert listening in b.log_text() and b.proc.poll() is None, b.log_text()

    def ask_many(first: int) -> list[str]:
        return [a.ask(**triplet(n)) for n in range(first, first + 20)]

    with ThreadPoolExecutor(4) as pool:
        replies = [r for batch in pool.map(ask_many, (1, 21, 41, 61)) for r in batch]
    assert all(r.startswith("DEFER_IF_PERMIT") for r in replies), replies
    log = a.log_text()  # one log file: both run in tmp_path
    for proc in (a.proc, b.proc):
        assert f"policyd[{proc.pid}]: action=\"DEFER_IF_PERMIT 4.2.0 " in log
    assert "warning:" not in log and "error:" not in log
    backup = open_table(f"lmdb:{tmp_path / 'triplets'}", read_write=False)
    try:
        assert sum(1 for _ in backup.sequence()) == 80
    finally:
        backup.close()


def test_second_instance_without_reuse_port_is_refused(
        tmp_path: Path, memcached: Memcached, policyd_factory: type[PolicydProcess]) -> None:
    port = free_port()
    policyd_factory(tmp_path / "a", memcached.spec, port=port,
                    extra="listen_reuse_port = yes\n").start()
    b = policyd_factory(tmp_path / "b", memcached.spec, port=port)
    with contextlib.suppress(RuntimeError):  # it may exit before the port check
        b.start()  # returns once the port answers, which a does
    assert b.proc is not None and b.proc.wait(WAIT) == 1
    assert f"cannot listen on inet:127.0.0.1:{port}: Address already in use" in b.log_text()
    assert "Traceback" not in b.log_text()


def test_memcached_outage_with_backup(tmp_path: Path,
                                      policyd_factory: type[PolicydProcess]) -> None:
    """memcached stops mid-run: answers go on from the lmdb backup (the
    failure is logged), and triplets that had passed still pass, during the
    outage and after memcached returns empty."""
    server = start_memcached(tmp_path)
    port = server.port
    try:
        p = policyd_factory(tmp_path / "p", server.spec, extra=FAST).start()
        assert p.ask(**triplet(2)).startswith("DEFER_IF_PERMIT")
        p.age_triplets(DELAY)
        assert p.ask(**triplet(2)).startswith("PREPEND")
        server.stop()
        assert p.ask(**triplet(2)) == "DUNNO"           # passed, from the backup
        assert p.ask(**triplet(3)).startswith("DEFER_IF_PERMIT")  # still greylisting
        assert "127.0.0.1" in p.log_text() and "warning" in p.log_text().lower()
        server = start_memcached(tmp_path, port=port)  # back, but empty
        assert p.ask(**triplet(2)) == "DUNNO"
        p.age_triplets(DELAY, backup_only=True)  # memcached has none
        assert p.ask(**triplet(3)).startswith("PREPEND")  # first sight kept in the backup
    finally:
        server.stop()


def test_failure_action(tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """Without a backup, a dead memcached is a store failure: DUNNO (fail
    open) or no reply at all, as failure_action says, and it is logged."""
    server = start_memcached(tmp_path)
    try:
        open_ = policyd_factory(tmp_path / "open", server.spec, backup=False,
                                extra=FAST).start()
        closed = policyd_factory(tmp_path / "closed", server.spec, backup=False,
                                 extra=FAST + "failure_action = disconnect\n").start()
        assert open_.ask(**triplet(4)).startswith("DEFER_IF_PERMIT")
        server.stop()
        assert open_.ask(**triplet(4)) == "DUNNO"
        assert closed.ask(**triplet(4)) == ""
        assert "reason=store-failure" in open_.log_text()
        assert "store-failure" in closed.log_text()
    finally:
        server.stop()


def test_hung_memcached_does_not_stall_policyd(tmp_path: Path,
                                               policyd_factory: type[PolicydProcess]) -> None:
    """memcached that accepts connections but never answers (SIGSTOP):
    after the first timeout the server is held down and requests are
    answered from the lmdb backup at once, instead of each paying
    max_try x timeout; when memcached wakes up it is used again."""
    server = start_memcached(tmp_path)
    try:
        p = policyd_factory(tmp_path / "p", server.spec, extra=FAST).start()
        assert p.ask(**triplet(5)).startswith("DEFER_IF_PERMIT")
        p.age_triplets(DELAY)
        assert p.ask(**triplet(5)).startswith("PREPEND")
        server.pause()
        started = time.monotonic()
        answers = [p.ask(**triplet(5)) for _ in range(10)]
        answers.append(p.ask(**triplet(6)))
        elapsed = time.monotonic() - started
        assert answers[:10] == ["DUNNO"] * 10  # passed, from the backup
        assert answers[10].startswith("DEFER_IF_PERMIT")
        # One attempt's timeout (1 s per table) at most, not one per request.
        assert elapsed < 5, elapsed
        assert "held down" in p.log_text()
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(MEMCACHE_DOWN_HOLD + 0.5)
        assert p.ask(**triplet(7)).startswith("DEFER_IF_PERMIT")
        assert server.meta("policyd-triplets:198.51.100.0/sender7@example.org/"
                           "rcpt7@example.com") is not None
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


@requires_postmap
def test_x_greylist_names_postfix_myhostname(tmp_path: Path,
                                             policyd_factory: type[PolicydProcess]) -> None:
    """Without ``hostname``, the header names Postfix's myhostname, read with
    postconf from the configuration directory MAIL_CONFIG names."""
    postfix = postfix_config_dir(tmp_path)  # myhostname = postmap.example
    policyd = policyd_factory(tmp_path / "p", None, hostname=None,
                              extra="greylist_delay = 0\n",
                              env={"MAIL_CONFIG": str(postfix)}).start()
    header = policyd.ask(**triplet(1))
    assert header.startswith("PREPEND X-Greylist: delayed 0 seconds by policyd at "
                             "postmap.example; "), header


# The trial's host: its /etc/hosts puts its name after localhost, so the
# resolver's name for it (socket.getfqdn()) is "localhost".
TRIAL_HOSTS = "127.0.0.1 localhost\n127.0.1.1 localhost vm\n"


@requires_postmap
def test_x_greylist_names_the_host_without_a_postfix_configuration(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """A fresh machine: no main.cf, postconf would fail; policyd starts and
    names the host as gethostname() does (as postgrey), not "localhost"."""
    empty = tmp_path / "no-main-cf"
    empty.mkdir()
    with PrivateResolver(tmp_path, refuse=True) as resolver:
        policyd = policyd_factory(tmp_path / "p", None, hostname=None,
                                  extra="greylist_delay = 0\n", env={"MAIL_CONFIG": str(empty)},
                                  wrap=resolver.as_host("vm", TRIAL_HOSTS)).start()
        header = policyd.ask(**triplet(1))
    assert header.startswith("PREPEND X-Greylist: delayed 0 seconds by policyd at vm; "), header
    assert "postconf" not in policyd.log_text()


@pytest.mark.parametrize(("hostname", "hosts", "named"), [
    ("vm", TRIAL_HOSTS, "vm"),
    ("mx1", "127.0.0.1 localhost.localdomain localhost mx1\n", "mx1"),
    ("mx1", "::1 ip6-localhost ip6-loopback mx1\n", "mx1"),
    # Qualified by /etc/hosts, as `hostname -f` does.
    ("mx1", "127.0.0.1 localhost\n192.0.2.25 mx1.example.org mx1\n", "mx1.example.org"),
    # Already a domain name; or unknown to the resolver (which refuses).
    ("mx1.example.net", "127.0.0.1 localhost\n", "mx1.example.net"),
    ("mx1", "127.0.0.1 localhost\n", "mx1"),
])
def test_the_default_hostname_without_a_postfix_configuration(
        tmp_path: Path, hostname: str, hosts: str, named: str) -> None:
    empty = tmp_path / "no-main-cf"
    empty.mkdir()
    with PrivateResolver(tmp_path, refuse=True) as resolver:
        done = subprocess.run(
            resolver.as_host(hostname, hosts)(
                [sys.executable, "-c",
                 "from policyd.config import default_hostname; print(default_hostname())"]),
            capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "MAIL_CONFIG": str(empty)}, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, named + "\n", "")


def test_the_default_hostname_waits_a_bounded_time_for_the_resolver(tmp_path: Path) -> None:
    """A DNS server that never answers (glibc would wait 30 s): the name is
    the unqualified one after HOSTNAME_LOOKUP_TIMEOUT_SECONDS (shortened)."""
    empty = tmp_path / "no-main-cf"
    empty.mkdir()
    with PrivateResolver(tmp_path) as resolver:
        done = subprocess.run(
            resolver.as_host("mx1", "127.0.0.1 localhost\n")(
                [sys.executable, "-c",
                 "from policyd import limits; limits.HOSTNAME_LOOKUP_TIMEOUT_SECONDS = 0.2\n"
                 "from policyd.config import default_hostname; print(default_hostname())"]),
            capture_output=True, text=True, timeout=WAIT,
            env={**os.environ, "MAIL_CONFIG": str(empty)}, check=False)
        assert resolver.queries  # it was asked, and never answered
    assert (done.returncode, done.stdout, done.stderr) == (0, "mx1\n", "")


def test_lmdb_files_are_not_world_readable_whatever_the_umask(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """Started by hand with umask 0 (or 022), the backups policyd creates
    are still 0640: triplets hold addresses."""
    policyd = policyd_factory(tmp_path / "p", None, umask=0).start()
    policyd.ask(**triplet(1))
    for name in ("triplets", "clients"):
        mode = stat.S_IMODE((tmp_path / "p" / f"{name}.lmdb").stat().st_mode)
        assert mode == 0o640, (name, oct(mode))


def test_host_lookup_that_never_answers_does_not_stall_policyd(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """The memcache host's DNS server never answers: the first request waits
    one attempt's timeout for the lookup, the server is held down, and every
    request is answered from the backup, not `policy-failure` after
    decision_timeout."""
    with PrivateResolver(tmp_path) as resolver:
        p = policyd_factory(tmp_path / "p", "inet:memcache.stall.test:11211",
                            extra="greylist_delay = 1h\nauto_whitelist_clients = 0\n"
                                  "decision_timeout = 8s\n", wrap=resolver.wrap).start()
        answers = [p.ask(**triplet(n)) for n in (8, 9, 8)]
        assert resolver.queries
    assert answers[0].startswith("DEFER_IF_PERMIT"), p.log_text()
    assert answers[1].startswith("DEFER_IF_PERMIT")
    assert answers[2].startswith("DEFER_IF_PERMIT")  # an early retry, from the backup
    log = p.log_text()
    assert "reason=early-retry" in log
    assert "policy-failure" not in log
    assert "host lookup of memcache.stall.test: no answer within 1 s" in log


def test_a_pass_recorded_during_a_memcached_hang_is_not_undone(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """The retry that ends greylisting comes while memcached hangs: the pass
    goes to the lmdb backup only, and memcached keeps its "not passed"
    copy.  Once memcached answers again that stale copy is not served: the
    next message passes without a second X-Greylist header, the backup's
    passed_at stays, and memcached gets the backup's record back."""
    server = start_memcached(tmp_path)
    try:
        p = policyd_factory(tmp_path / "p", server.spec, extra=FAST).start()
        assert p.ask(**triplet(10)).startswith("DEFER_IF_PERMIT")
        p.age_triplets(DELAY)
        server.pause()
        assert p.ask(**triplet(10)).startswith("PREPEND X-Greylist: delayed")
        server.proc.send_signal(signal.SIGCONT)
        time.sleep(MEMCACHE_DOWN_HOLD + 0.5)
        backup = open_table(f"lmdb:{tmp_path / 'p' / 'triplets'}")
        try:
            [(key, passed)] = list(backup.sequence())
        finally:
            backup.close()
        assert passed.split(",")[2] == "1"
        assert server.meta(f"policyd-triplets:{key}") is not None  # the stale copy
        assert p.ask(**{**triplet(10), "instance": "next-message"}) == "DUNNO"
        log = p.log_text()
        assert log.count("X-Greylist") == 1, log
        backup = open_table(f"lmdb:{tmp_path / 'p' / 'triplets'}")
        try:
            assert backup.lookup(key) == passed
        finally:
            backup.close()
        meta = server.meta(f"policyd-triplets:{key}")  # written back from the backup
        assert meta is not None and meta["value"] == passed
    finally:
        server.proc.send_signal(signal.SIGCONT)
        server.stop()


def test_a_memcached_outage_is_logged_once_per_table(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    """memcached dies: every request is answered from the backup, and the
    log gets one warning per table for the outage, not several per request."""
    server = start_memcached(tmp_path)
    try:
        p = policyd_factory(tmp_path / "p", server.spec, extra=FAST).start()
        assert p.ask(**triplet(11)).startswith("DEFER_IF_PERMIT")
        server.stop()
        answers = [p.ask(**triplet(n)) for n in range(12, 42)]
        assert all(a.startswith("DEFER_IF_PERMIT") for a in answers), answers
        warnings = [line for line in p.log_text().splitlines() if "warning:" in line]
        assert len(warnings) == 2, warnings
        for name in ("clients", "triplets"):
            table = tmp_path / "p" / name
            assert any(line.endswith(
                f"(memcache:{table}.cf): unavailable: connect: Connection refused (after 1 "
                f"attempt); answering from the backup lmdb:{table}") for line in warnings), \
                warnings
    finally:
        server.stop()


@pytest.mark.parametrize("tables", ["memcache-with-backup", "lmdb"])
def test_kill_9_loses_no_acknowledged_triplet(
        tmp_path: Path, memcached: Memcached, postmap_config: Path,
        policyd_factory: type[PolicydProcess], tables: str) -> None:
    """The write-ahead guarantee end to end: clients on several connections
    send new triplets and note each DEFER that comes back; policyd is
    killed (SIGKILL) while requests are in flight; every triplet whose
    DEFER was received is in the lmdb file, read by memtable and by
    postmap."""
    p = policyd_factory(tmp_path / "p", memcached.spec if tables != "lmdb" else None,
                        extra=FAST).start()
    config = PolicydConfig.from_file(str(p.config))
    keys = KeyMaker.from_config(config)
    acknowledged: list[str] = []  # the triplet keys of the DEFERs received
    unexpected: list[str] = []
    enough = threading.Event()

    def send_until_killed(thread: int) -> None:
        with contextlib.suppress(OSError), connect(("127.0.0.1", p.port)) as sock:
            for n in itertools.count():
                attrs = {"client_address": f"198.51.100.{thread}", "client_name": "unknown",
                         "sender": f"s{thread}@example.org",
                         "recipient": f"rcpt-{thread}-{n}@example.com"}
                reply = ask(sock, request(**attrs)).decode()
                if not reply:
                    return  # policyd is gone
                if not reply.startswith("action=DEFER_IF_PERMIT"):
                    unexpected.append(reply)
                    return
                client = client_key(config, parse_client_address(attrs["client_address"]),
                                    "unknown")
                acknowledged.append(keys.triplet_key(
                    client, normalise_sender(attrs["sender"]),
                    normalise_recipient(attrs["recipient"])))
                if len(acknowledged) >= 300:
                    enough.set()

    threads = [threading.Thread(target=send_until_killed, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    try:
        assert enough.wait(WAIT), unexpected
        assert p.proc is not None
        p.proc.send_signal(signal.SIGKILL)
        assert p.proc.wait(WAIT) == -signal.SIGKILL
    finally:
        for thread in threads:
            thread.join(WAIT)
    assert unexpected == []
    assert len(set(acknowledged)) == len(acknowledged) >= 300
    backup = tmp_path / "p" / "triplets"
    with open_table(f"lmdb:{backup}") as table:
        in_memtable = dict(table.sequence())
    result = run_postmap(postmap_config, "-s", f"lmdb:{backup}")
    assert result.returncode == 0, result.stderr
    in_postmap = dict(line.split("\t", 1) for line in result.stdout.decode().splitlines())
    assert [key for key in acknowledged if key not in in_memtable] == []
    assert [key for key in acknowledged if key not in in_postmap] == []
