"""Scale-out: three memcached behind twemproxy (nutcracker) as the one
``memcache =`` endpoint of memtable tables and of several policyd processes.

Everything runs on loopback: the memcached fixtures of conftest, nutcracker
in the foreground with deploy/nutcracker/nutcracker.yml (pool settings kept
as shipped; only the listen address and the server list are rewritten to
this test's ports), memtable through the proxy, and policyd subprocesses.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from memtable import TemporaryError, open_table
from memtable.memcache_table import MemcacheTable
from memtable.table import Outcome, Table
from tests.conftest import Memcached, free_port, start_memcached
from tests.policyd_helpers import ask as ask_raw
from tests.policyd_helpers import connect
from tests.policyd_proc import PolicydProcess
from tests.processes import stop_process
from tests.wait import WAIT

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_NUTCRACKER = ROOT / "deploy" / "nutcracker" / "nutcracker.yml"
NUTCRACKER = shutil.which("nutcracker") or shutil.which("nutcracker", path="/usr/sbin") or ""
KEYS = 60

pytestmark = pytest.mark.skipif(not NUTCRACKER, reason="nutcracker (twemproxy) not installed")


def deploy_setting(name: str) -> str:
    match = re.search(rf"^\s+{name}:\s*(\S+)", DEPLOY_NUTCRACKER.read_text(), re.M)
    assert match, name
    return match.group(1)


FAILURE_LIMIT = int(deploy_setting("server_failure_limit"))
PROXY_TIMEOUT = int(deploy_setting("timeout")) / 1000


def pool_config(listen_port: int, servers: list[Memcached]) -> str:
    """deploy/nutcracker/nutcracker.yml with this test's addresses."""
    text = DEPLOY_NUTCRACKER.read_text()
    text, n = re.subn(r"(?m)^(\s+listen:\s*)\S+", rf"\g<1>127.0.0.1:{listen_port}", text)
    assert n == 1
    lines = re.findall(r"(?m)^(\s+- )\S+:(\d+) (\S+)$", text)
    assert len(lines) == len(servers), "the deploy pool has as many servers as this test"
    for (indent, weight, name), mc in zip(lines, servers, strict=True):
        text = re.sub(rf"(?m)^{re.escape(indent)}\S+:{weight} {name}$",
                      f"{indent}127.0.0.1:{mc.port}:{weight} {name}", text)
    return text


@dataclass
class Proxy:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> None:
        stop_process(self.proc, WAIT)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"get nutcracker-ready-probe\r\n")
            return s.recv(64) == b"END\r\n"
    except OSError:
        return False


def start_nutcracker(tmp: Path, servers: list[Memcached]) -> Proxy:
    port = free_port()
    conf = tmp / "nutcracker.yml"
    conf.write_text(pool_config(port, servers))
    check = subprocess.run([NUTCRACKER, "-t", "-c", str(conf)], capture_output=True,
                           timeout=WAIT, check=False)
    assert check.returncode == 0, check.stderr
    log = tmp / "nutcracker.log"
    proc = subprocess.Popen([NUTCRACKER, "-c", str(conf), "-o", str(log),
                             "-a", "127.0.0.1", "-s", str(free_port())])
    proxy = Proxy(proc, port, log)
    deadline = time.monotonic() + WAIT
    while not _answers(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            proxy.stop()
            raise RuntimeError(f"nutcracker did not start: {log.read_text()[-2000:]}")
        time.sleep(0.02)
    return proxy


@dataclass
class Cluster:
    servers: list[Memcached]
    proxy: Proxy
    tmp: Path

    def table(self, name: str = "triplets", prefix: str = "policyd-triplet:",
              **params: int) -> Table:
        cf = self.tmp / f"{name}-{len(list(self.tmp.glob('*.cf')))}.cf"
        lines = [f"memcache = inet:127.0.0.1:{self.proxy.port}", f"key_format = {prefix}%s"]
        lines += [f"{k} = {v}" for k, v in params.items()]
        cf.write_text("\n".join(lines) + "\n")
        return open_table(f"memcache:{cf}", read_write=True)

    def owners(self, raw_key: str) -> list[int]:
        """Indexes of the servers that hold raw_key (read directly)."""
        return [i for i, mc in enumerate(self.servers)
                if mc.proc.poll() is None and mc.meta(raw_key) is not None]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    servers: list[Memcached] = []
    proxy = None
    try:
        for _ in range(3):
            servers.append(start_memcached(tmp_path))
        proxy = start_nutcracker(tmp_path, servers)
        yield Cluster(servers, proxy, tmp_path)
    finally:
        if proxy is not None:
            proxy.stop()
        for mc in servers:
            if mc.proc.poll() is None:
                os.kill(mc.proc.pid, signal.SIGCONT)  # in case a test stopped it
                mc.proc.terminate()  # all at once: memcached takes ~1 s to exit
        for mc in servers:
            mc.stop()


def fill(cluster: Cluster, table: Table, count: int = KEYS) -> dict[str, int]:
    """Write count triplet-like keys through the proxy; {key: server index}."""
    placed: dict[str, int] = {}
    for i in range(count):
        key = f"192.0.2.0/sender{i}@example.org/rcpt@example.com"
        table.update(key, f"{1700000000 + i},0", ttl=600)
        owners = cluster.owners(f"policyd-triplet:{key}")
        assert len(owners) == 1, (key, owners)
        placed[key] = owners[0]
    return placed


def test_deploy_config_passes_nutcracker_check() -> None:
    result = subprocess.run([NUTCRACKER, "-t", "-c", str(DEPLOY_NUTCRACKER)],
                            capture_output=True, text=True, timeout=WAIT, check=False)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr + result.stdout


def test_keys_spread_over_all_servers(cluster: Cluster) -> None:
    table = cluster.table()
    placed = fill(cluster, table)
    share = [list(placed.values()).count(i) for i in range(3)]
    # ketama with md5: every server gets a real share (none under 10%).
    assert all(n >= KEYS // 10 for n in share), share
    # Through the proxy every key reads back, with Postfix's flags and ttl.
    for key in placed:
        assert table.lookup(key) is not None
    info = cluster.servers[placed[key]].meta(f"policyd-triplet:{key}")
    assert info is not None and info["flags"] == 0 and 0 < int(str(info["ttl"])) <= 600
    # delete goes to the owning server too
    assert table.delete(key) is True
    assert cluster.owners(f"policyd-triplet:{key}") == []
    table.close()


def test_cas_guarded_delete_passes_through_the_proxy(cluster: Cluster) -> None:
    """policyd cleanup's delete (gets, then a cas with a past expiration)
    works through nutcracker and reaches the server that holds the key."""
    table = cluster.table()
    assert isinstance(table, MemcacheTable)
    with table:
        for i in range(30):
            table.update(f"k{i}", "old")
        assert table.delete_cached_if("k1", lambda value: value == "new") is Outcome.KEPT
        for i in range(30):
            assert table.delete_cached_if(f"k{i}", lambda value: value == "old") is (
                Outcome.DELETED)
            assert table.lookup(f"k{i}") is None, i
    assert cluster.owners("policyd-triplet:k1") == []


def test_dead_server_loses_only_its_share(cluster: Cluster) -> None:
    # max_try = 1: every failure the proxy returns reaches us and is counted.
    table = cluster.table(max_try=1)
    placed = fill(cluster, table)
    dead = max(range(3), key=lambda i: list(placed.values()).count(i))
    cluster.servers[dead].proc.kill()
    cluster.servers[dead].proc.wait(WAIT)

    # Before ejection: at most server_failure_limit requests fail (the proxy
    # counts the closed connection as a failure too), only for dead keys.
    failed = []
    for key in placed:
        try:
            table.lookup(key)
        except TemporaryError as exc:
            assert "SERVER_ERROR" in str(exc)
            failed.append(key)
    assert 1 <= len(failed) <= FAILURE_LIMIT
    assert all(placed[key] == dead for key in failed)

    # After ejection: no errors; the dead server's keys are misses, the
    # others all still hit.
    for key, owner in placed.items():
        hit = table.lookup(key)
        assert (hit is None) == (owner == dead), (key, owner, dead)
    # New writes succeed and are spread over the two survivors.
    new = {}
    for i in range(KEYS):
        key = f"198.51.100.0/new{i}@example.org/rcpt@example.com"
        table.update(key, "1", ttl=600)
        assert table.lookup(key) == "1"
        new[key] = cluster.owners(f"policyd-triplet:{key}")
    assert {o for owners in new.values() for o in owners} == set(range(3)) - {dead}
    table.close()


def test_postfix_retry_hides_the_ejection(cluster: Cluster) -> None:
    # Postfix's defaults (max_try = 2, retry_pause = 1): the retry after the
    # proxy's first SERVER_ERROR finds the server ejected, so no caller
    # ever sees an error.
    table = cluster.table()
    placed = fill(cluster, table)
    dead = placed[next(iter(placed))]
    cluster.servers[dead].proc.kill()
    cluster.servers[dead].proc.wait(WAIT)
    # policyd's stores coalesce gets into one multi-key get; the proxy fails
    # such a get whole (and closes the connection) while any fragment's
    # server is down: the retry gets every key.
    assert isinstance(table, MemcacheTable)
    found = table.lookup_many(list(placed))
    assert {k for k, v in found.items() if v is None} == \
        {k for k, owner in placed.items() if owner == dead}
    for key, owner in placed.items():
        assert (table.lookup(key) is None) == (owner == dead)
    table.close()


def test_hung_server_costs_timeouts_then_is_ejected(cluster: Cluster) -> None:
    # A stopped memcached accepts connections but never answers, like a host
    # that vanished from the network: each request to it waits for the
    # proxy's timeout until server_failure_limit of them failed.
    table = cluster.table(max_try=1)
    placed = fill(cluster, table, count=30)
    hung = placed[next(iter(placed))]
    cluster.servers[hung].pause()
    failed = 0
    started = time.monotonic()
    for key, owner in placed.items():
        try:
            hit = table.lookup(key)
        except TemporaryError as exc:
            assert owner == hung and "timed out" in str(exc).lower(), exc
            failed += 1
        else:
            assert (hit is None) == (owner == hung)
    assert failed == FAILURE_LIMIT
    # The proxy answered within its own timeout, never memtable's 2 s.
    assert time.monotonic() - started < FAILURE_LIMIT * (PROXY_TIMEOUT + 1) + 2
    table.update("after/ejection", "ok", ttl=60)
    assert table.lookup("after/ejection") == "ok"
    table.close()


# --------------------------------------------------------------------------
# two policyd processes sharing greylisting state through the proxy
# --------------------------------------------------------------------------

POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                  b"client_address=192.0.2.25\nclient_name=mx.example.org\n"
                  b"helo_name=mx.example.org\nsender=alice@example.org\n"
                  b"recipient=bob@example.com\ninstance=1.2.3\n\n")


def test_two_policyd_share_triplets(cluster: Cluster,
                                    policyd_factory: type[PolicydProcess]) -> None:
    proxy = f"inet:127.0.0.1:{cluster.proxy.port}"
    fast = "greylist_delay = 1s\nretry_window = 1h\n"
    a = policyd_factory(cluster.tmp / "mx1", proxy, backup=False, extra=fast).start()
    b = policyd_factory(cluster.tmp / "mx2", proxy, backup=False,
                        extra=fast + "hostname = mx2.example\n").start()
    def ask(p: PolicydProcess) -> str:
        with connect(("127.0.0.1", p.port)) as sock:
            return ask_raw(sock, POLICY_REQUEST).decode()

    first = ask(a)
    assert first.startswith("action=DEFER_IF_PERMIT "), first
    # mx2 knows the triplet from mx1: too early there as well ...
    assert ask(b).startswith("action=DEFER_IF_PERMIT "), first
    time.sleep(1.2)  # greylist_delay = 1s; another process's clock can't be moved
    # ... and the retry that lands on mx2 passes.
    passed = ask(b)
    assert passed.startswith(("action=PREPEND X-Greylist: delayed", "action=DUNNO")), passed
    assert "mx2.example" in passed
    assert ask(a).startswith("action=DUNNO")
