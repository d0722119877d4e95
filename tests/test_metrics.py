"""policyd.metrics: the Prometheus endpoint, scraped over real HTTP."""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memtable.endpoint import parse_endpoint
from policyd.api import Decision
from policyd.errors import PolicydError
from policyd.metrics import (
    Metrics,
    NullMetrics,
    action_label,
    metrics_for,
    reason_label,
    start_metrics,
)
from tests.conftest import Memcached, free_port
from tests.policyd_helpers import ask, connect
from tests.processes import stop_process
from tests.wait import WAIT

SCRAPE_TIMEOUT = 5.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(metrics: Metrics) -> Samples:
    assert metrics.address is not None
    return scrape_at(metrics.address)


def scrape_at(address: tuple[str, int]) -> Samples:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics",
                                timeout=SCRAPE_TIMEOUT) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = start_metrics(parse_endpoint("inet:127.0.0.1:0"))
    yield m
    m.close()


def test_scrape_reflects_decisions(metrics: Metrics) -> None:
    before = scrape(metrics)
    assert value(before, "policyd_decisions_total",
                 action="DEFER_IF_PERMIT", reason="new") == 0
    metrics.decision("DEFER_IF_PERMIT", "new")
    metrics.decision("DEFER_IF_PERMIT", "new")
    metrics.decision("DUNNO", "whitelisted")
    metrics.observe_decision(Decision("PREPEND X-Greylist: delayed 310 seconds", "passed",
                                      delay=310.0))
    metrics.observe_decision(Decision("", "store-failure", disconnect=True))
    after = scrape(metrics)
    assert value(after, "policyd_decisions_total", action="DEFER_IF_PERMIT", reason="new") == 2
    assert value(after, "policyd_decisions_total", action="DUNNO", reason="whitelisted") == 1
    assert value(after, "policyd_decisions_total", action="PREPEND", reason="passed") == 1
    assert value(after, "policyd_decisions_total",
                 action="disconnect", reason="store-failure") == 1
    assert value(after, "policyd_greylist_delay_seconds_count") == 1
    assert value(after, "policyd_greylist_delay_seconds_sum") == 310
    assert value(after, "policyd_greylist_delay_seconds_bucket", le="300.0") == 0
    assert value(after, "policyd_greylist_delay_seconds_bucket", le="600.0") == 1


def test_spf_results_and_dns_failures_are_counted(metrics: Metrics) -> None:
    assert value(scrape(metrics), "policyd_dns_failures_total", kind="timeout") == 0
    metrics.observe_decision(Decision("DUNNO", "passed", fields=(
        ("spf", "pass"), ("client_key", "spf:example.org"))))
    metrics.observe_decision(Decision("DUNNO", "passed", fields=(
        ("spf", "pass"), ("spf_broad", "all"))))
    metrics.observe_decision(Decision("DUNNO", "new", fields=(
        ("spf", "temperror"), ("dns", "timeout"))))
    metrics.observe_decision(Decision("DUNNO", "new", fields=(("spf", "bogus"),)))
    after = scrape(metrics)
    assert value(after, "policyd_spf_checks_total", result="pass", pooled="yes") == 1
    assert value(after, "policyd_spf_checks_total", result="pass", pooled="no") == 1
    assert value(after, "policyd_spf_checks_total", result="temperror", pooled="no") == 1
    assert value(after, "policyd_spf_checks_total", result="other", pooled="no") == 1
    assert value(after, "policyd_dns_failures_total", kind="timeout") == 1


def test_store_latency_errors_connections_and_sizes(metrics: Metrics) -> None:
    # Store errors exist at 0 before any failure, so alerts on rate() work.
    assert ("policyd_store_errors_total", (("store", "triplets"),)) in scrape(metrics)
    metrics.store_latency("triplets", "get", 0.0003)
    metrics.store_latency("triplets", "get", 0.002)
    metrics.store_latency("clients", "put", 1.5)
    metrics.store_error("triplets")
    for _ in range(3):
        metrics.connection_opened()
    metrics.connection_closed()
    metrics.connection_refused()
    metrics.connection_ended("read_timeout")
    metrics.connection_ended("hung up")
    metrics.request_size(300)
    metrics.request_size(5000)
    s = scrape(metrics)
    get = {"store": "triplets", "op": "get"}
    assert value(s, "policyd_store_latency_seconds_count", **get) == 2
    assert value(s, "policyd_store_latency_seconds_bucket", le="0.0005", **get) == 1
    assert value(s, "policyd_store_latency_seconds_bucket", le="0.0025", **get) == 2
    assert value(s, "policyd_store_latency_seconds_bucket", le="1.0",
                 store="clients", op="put") == 0
    assert value(s, "policyd_store_errors_total", store="triplets") == 1
    assert value(s, "policyd_store_errors_total", store="clients") == 0
    assert value(s, "policyd_connections_open") == 2
    assert value(s, "policyd_connections_total") == 3
    assert value(s, "policyd_connections_refused_total") == 1
    assert value(s, "policyd_connections_ended_total", reason="read_timeout") == 1
    assert value(s, "policyd_connections_ended_total", reason="other") == 1
    assert ("policyd_connections_ended_total", (("reason", "idle_timeout"),)) in s
    assert value(s, "policyd_request_bytes_count") == 2
    assert value(s, "policyd_request_bytes_bucket", le="512.0") == 1
    assert value(s, "policyd_request_bytes_sum") == 5300
    # The process collector is there for memory and file descriptors.
    assert value(s, "process_open_fds") > 0


def test_labels_stay_bounded(metrics: Metrics) -> None:
    # Whatever text arrives, the number of series does not grow with it.
    for i in range(50):
        metrics.decision(f"FILTER{i} smtp:[x]", f"made-up reason {i}")
        metrics.store_latency(f"table{i}", f"op{i}", 0.001)
        metrics.store_error(f"table{i}")
    s = scrape(metrics)
    decisions = [k for k in s if k[0] == "policyd_decisions_total"]
    assert decisions == [("policyd_decisions_total", (("action", "other"), ("reason", "other")))]
    assert value(s, "policyd_decisions_total", action="other", reason="other") == 50
    assert value(s, "policyd_store_errors_total", store="other") == 50
    assert value(s, "policyd_store_latency_seconds_count", store="other", op="other") == 50


@pytest.mark.parametrize(("action", "label"), [
    ("DUNNO", "DUNNO"),
    ("dunno", "DUNNO"),
    ("DEFER_IF_PERMIT Greylisted, please try again in 300 seconds", "DEFER_IF_PERMIT"),
    ("PREPEND X-Greylist: delayed 300 seconds", "PREPEND"),
    ("450 4.7.1 try later", "4XX"),
    ("554 go away", "5XX"),
    ("250 ok", "other"),
    ("", "other"),
    ("   ", "other"),
    ("X-Greylist: hello", "other"),
])
def test_action_label(action: str, label: str) -> None:
    assert action_label(action) == label


@pytest.mark.parametrize(("reason", "label"), [
    ("new", "new"),
    ("early-retry", "early-retry"),
    ("policy-failure", "policy-failure"),
    ("store-failure", "store-failure"),
    ("Store-Failure", "other"),
    ("policy failure: no decision within decision_timeout (20s)", "other"),
    ("", "other"),
    ("something else", "other"),
])
def test_reason_label(reason: str, label: str) -> None:
    assert reason_label(reason) == label


def test_registries_are_private() -> None:
    a = start_metrics(parse_endpoint("inet:127.0.0.1:0"))
    b = start_metrics(parse_endpoint("inet:127.0.0.1:0"))
    try:
        a.decision("DUNNO", "passed")
        assert value(scrape(a), "policyd_decisions_total", action="DUNNO", reason="passed") == 1
        assert value(scrape(b), "policyd_decisions_total", action="DUNNO", reason="passed") == 0
    finally:
        a.close()
        b.close()


def test_close_stops_serving() -> None:
    m = start_metrics(parse_endpoint("inet:127.0.0.1:0"))
    assert m.address is not None
    address = m.address
    m.close()
    m.close()  # idempotent
    with pytest.raises(OSError), socket.create_connection(address, timeout=SCRAPE_TIMEOUT):
        pass


def wait_until(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + SCRAPE_TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def scrapes(metrics: Metrics) -> bool:
    try:
        return ("policyd_connections_total", ()) in scrape(metrics)
    except OSError:  # refused while the slots are taken
        return False


def serve_bounded(max_connections: int, connection_seconds: float) -> Metrics:
    m = Metrics()
    m.serve(parse_endpoint("inet:127.0.0.1:0"), max_connections=max_connections,
            connection_seconds=connection_seconds)
    return m


def test_idle_connections_are_bounded(capfd: pytest.CaptureFixture[str]) -> None:
    """Connections that never finish their request hold at most
    max_connections threads, further ones are closed at once, and each is
    closed after connection_seconds, quietly; then scrapes work again."""
    m = serve_bounded(max_connections=3, connection_seconds=1.5)
    assert m.address is not None
    before = threading.active_count()
    idle = [socket.create_connection(m.address, timeout=SCRAPE_TIMEOUT) for _ in range(10)]
    try:
        for sock in idle:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line

        def closed() -> list[socket.socket]:
            return [sock for sock in idle if select.select([sock], [], [], 0)[0]]
        assert wait_until(lambda: len(closed()) == 7)
        assert all(sock.recv(1) == b"" for sock in closed())
        # A handler thread and its watchdog timer per held connection.
        assert threading.active_count() <= before + 2 * 3
        for sock in idle:  # the held ones, closed by the server in time
            assert sock.recv(65536) == b""
        assert wait_until(lambda: threading.active_count() == before)
        assert ("policyd_connections_total", ()) in scrape(m)
    finally:
        for sock in idle:
            sock.close()
        m.close()
    assert "Traceback" not in capfd.readouterr().err


def test_a_dripping_client_is_closed_in_time() -> None:
    """The bound is on the whole connection, not on each read: a client
    sending a byte now and then does not keep its slot."""
    m = serve_bounded(max_connections=1, connection_seconds=1.0)
    assert m.address is not None
    try:
        with socket.create_connection(m.address, timeout=SCRAPE_TIMEOUT) as sock:
            started = time.monotonic()
            sent = 0
            for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"x" * 100:
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    break
                sent += 1
                if select.select([sock], [], [], 0.2)[0]:
                    break  # the server closed it
            assert sock.recv(65536) == b""
            assert time.monotonic() - started < 1.0 + SCRAPE_TIMEOUT / 2
            assert sent < 30  # a byte every 0.2 s for 1 s, not the whole request
        assert wait_until(lambda: scrapes(m))  # the slot is free again
    finally:
        m.close()


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PolicydError, match=rf"metrics_listen = inet:127.0.0.1:{port}: "
                                               "cannot listen"):
            start_metrics(parse_endpoint(f"inet:127.0.0.1:{port}"))


def test_unix_endpoint_is_refused() -> None:
    with pytest.raises(PolicydError, match="only inet"):
        start_metrics(parse_endpoint("unix:/run/policyd/metrics"))


def test_metrics_off() -> None:
    null = metrics_for(None)
    assert isinstance(null, NullMetrics)
    # Same interface, no effect, no server.
    null.decision("DUNNO", "passed")
    null.observe_decision(Decision("DUNNO", "passed"))
    null.store_latency("triplets", "get", 0.1)
    null.store_error("triplets")
    null.connection_opened()
    null.connection_closed()
    null.connection_refused()
    null.connection_ended("idle_timeout")
    null.request_size(100)
    null.close()
    assert null.address is None


def test_metrics_for_endpoint() -> None:
    m = metrics_for(parse_endpoint("inet:127.0.0.1:0"))
    try:
        assert isinstance(m, Metrics)
        assert value(scrape(m), "policyd_connections_open") == 0
    finally:
        m.close()


# --------------------------------------------------------------------------
# through a running policyd
# --------------------------------------------------------------------------

POLICY_REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                  b"client_address=192.0.2.25\nclient_name=unknown\n"
                  b"sender=alice@example.org\nrecipient=bob@example.com\n\n")


def _ask(port: int, data: bytes) -> bytes:
    with connect(("127.0.0.1", port)) as sock:
        return ask(sock, data)


def test_policyd_serves_metrics_that_follow_traffic(tmp_path: Path,
                                                    memcached: Memcached) -> None:
    for name in ("triplets", "clients"):
        (tmp_path / f"{name}.cf").write_text(
            f"memcache = {memcached.spec}\nkey_format = policyd-{name}:%s\n")
    port, metrics_port = free_port(), free_port()
    cf = tmp_path / "policyd.cf"
    cf.write_text(f"listen = inet:127.0.0.1:{port}\n"
                  f"metrics_listen = inet:127.0.0.1:{metrics_port}\n"
                  f"triplet_table = memcache:{tmp_path}/triplets.cf\n"
                  f"client_table = memcache:{tmp_path}/clients.cf\n")
    proc = subprocess.Popen([sys.executable, "-m", "policyd", "-c", str(cf)],
                            cwd=Path(__file__).resolve().parent.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.05)
        # The start-up probe above was a connection too: wait until it is
        # counted (it is accepted after the probe returned), then count the
        # difference.
        deadline = time.monotonic() + WAIT
        while value(before := scrape_at(("127.0.0.1", metrics_port)),
                    "policyd_connections_total") < 1:
            assert time.monotonic() < deadline, "the probe connection was never counted"
            time.sleep(0.01)
        assert value(before, "policyd_decisions_total", action="DEFER_IF_PERMIT",
                     reason="new") == 0
        assert _ask(port, POLICY_REQUEST).startswith(b"action=DEFER_IF_PERMIT")
        assert _ask(port, POLICY_REQUEST).startswith(b"action=DEFER_IF_PERMIT")
        after = scrape_at(("127.0.0.1", metrics_port))
        assert value(after, "policyd_decisions_total", action="DEFER_IF_PERMIT",
                     reason="new") == 1
        assert value(after, "policyd_decisions_total", action="DEFER_IF_PERMIT",
                     reason="early-retry") == 1
        assert (value(after, "policyd_connections_total")
                - value(before, "policyd_connections_total")) == 2
        assert value(after, "policyd_request_bytes_count") == 2
        assert value(after, "policyd_request_bytes_sum") == 2 * len(POLICY_REQUEST)
        assert value(after, "policyd_store_latency_seconds_count",
                     store="triplets", op="get") >= 2
    finally:
        stop_process(proc, 10)
