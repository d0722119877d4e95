"""Prometheus metrics of policyd (``metrics_listen = inet:127.0.0.1:9323``).

The server and the policy report events through one small interface:
``Metrics`` (backed by prometheus_client, served over HTTP from a thread of
its own) or ``NullMetrics`` (every method a no-op) when metrics_listen is
empty.  Label values come from fixed sets (anything else counts as
"other"), so no request can grow the number of time series.

Each Metrics has a private CollectorRegistry: several can live in one
process (tests) and nothing leaks into prometheus_client's global one.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import threading
from typing import Any, TypeAlias
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from memtable.endpoint import Endpoint
from policyd import limits
from policyd.api import Decision
from policyd.errors import PolicydError
from policyd.listeners import bind_inet

log = logging.getLogger("policyd.metrics")

NAMESPACE = "policyd"

# First word of an access(5) action; numeric replies count by class.
ACTIONS = frozenset({
    "OK", "DUNNO", "REJECT", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT",
    "PREPEND", "WARN", "INFO", "HOLD", "DISCARD", "FILTER", "REDIRECT", "BCC",
    "4XX", "5XX", "disconnect",
})
# Decision.reason values of policyd.greylist and policyd.server.
REASONS = frozenset({
    "new", "early-retry", "passed", "whitelisted", "auto-whitelisted", "postscreen",
    "authenticated", "not-rcpt", "bad-request", "store-failure", "policy-failure",
    "dnswl", "unlisted",
})
# What DNSBL/DNSWL lookups of a decision gave: a score, or no score.
DNS_RESULTS = frozenset({"answered", "timeout", "failure"})
# DNSBL/DNSWL scores: postscreen-style weights are small integers.
DNS_SCORE_BUCKETS = (-10, -5, -3, -2, -1, 0, 1, 2, 3, 5, 10, 20)
# Store names: the role of each table in policyd.
STORES = frozenset({"triplets", "clients", "postscreen"})
STORE_OPS = frozenset({"get", "put"})
# Why policyd ended a connection itself (policyd.server).
END_REASONS = frozenset({"idle_timeout", "read_timeout", "protocol_error"})
OTHER = "other"
# What DNS contributed to a decision (Decision.fields): SPF results, and
# whether the client was pooled under its sender domain.
SPF_RESULTS = frozenset({"none", "neutral", "pass", "fail", "softfail", "temperror",
                         "permerror"})
DNS_FAILURES = frozenset({"timeout", "failure"})

# Store round trips: memcached on loopback answers in ~0.1 ms, over a LAN or
# twemproxy in ~1 ms; memtable's timeout (2 s) and retry_pause (1 s) show up
# in the top buckets.
STORE_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                         0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Policy requests are a few hundred bytes; limits.MAX_REQUEST_BYTES is 32 KiB.
REQUEST_SIZE_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
# How long greylisting delayed the mail that finally passed.
DELAY_BUCKETS = (60, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400, 172800)


def action_label(action: str) -> str:
    """The bounded label for an access(5) action text."""
    word = action.split(None, 1)[0] if action.strip() else ""
    upper = word.upper()
    if upper in ACTIONS:
        return upper
    if len(word) == 3 and word.isdigit() and word[0] in "45":
        return f"{word[0]}XX"
    return OTHER


def reason_label(reason: str) -> str:
    """The bounded label for a Decision.reason (one of REASONS, else other)."""
    return _bounded(reason, REASONS)


def _bounded(value: str, allowed: frozenset[str]) -> str:
    return value if value in allowed else OTHER


class NullMetrics:
    """Metrics switched off: every call is a no-op."""

    address: tuple[str, int] | None = None

    def decision(self, action_word: str, reason: str, delay: float | None = None) -> None:
        pass

    def observe_decision(self, decision: Decision) -> None:
        pass

    def store_latency(self, store: str, op: str, seconds: float) -> None:
        pass

    def store_error(self, store: str) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self) -> None:
        pass

    def connection_ended(self, reason: str) -> None:
        pass

    def request_size(self, nbytes: int) -> None:
        pass

    def close(self) -> None:
        pass


def require_prometheus_client() -> Any:
    """The prometheus_client module; PolicydError when it is not installed
    (at start and from --check-config: policyd.preflight)."""
    try:
        import prometheus_client
    except ImportError:
        raise PolicydError(
            "metrics_listen is set but prometheus-client is not installed "
            "(pip install 'memtable-policyd[metrics]')") from None
    return prometheus_client


class Metrics:
    """policyd's metrics in a private registry (thread-safe: the stores and
    the server report from the event loop, the metrics endpoint's thread
    reads them)."""

    def __init__(self) -> None:
        prom = require_prometheus_client()
        self._prom: Any = prom
        self.registry: Any = prom.CollectorRegistry(auto_describe=True)
        reg = self.registry
        # process_* (memory, CPU, open fds) and python_* of this process.
        prom.ProcessCollector(registry=reg)
        prom.PlatformCollector(registry=reg)
        prom.GCCollector(registry=reg)
        self._decisions = prom.Counter(
            "decisions", "Policy decisions by action word and reason",
            ["action", "reason"], namespace=NAMESPACE, registry=reg)
        self._delay = prom.Histogram(
            "greylist_delay_seconds", "How long greylisting delayed mail that passed",
            namespace=NAMESPACE, registry=reg, buckets=DELAY_BUCKETS)
        self._dns_results = prom.Counter(
            "dnsbl_lookups", "Decisions that asked the DNSBL/DNSWL sites, by result "
            "(answered: a score; timeout, failure: a site did not answer, score unknown)",
            ["result"], namespace=NAMESPACE, registry=reg)
        self._dns_score = prom.Histogram(
            "dnsbl_score", "DNSBL/DNSWL scores of the clients asked about",
            namespace=NAMESPACE, registry=reg, buckets=DNS_SCORE_BUCKETS)
        self._store_latency = prom.Histogram(
            "store_latency_seconds", "Time of one store operation (memcache, backup)",
            ["store", "op"], namespace=NAMESPACE, registry=reg,
            buckets=STORE_LATENCY_BUCKETS)
        self._store_errors = prom.Counter(
            "store_errors", "Store operations that failed (memcached and backup down, "
            "timeouts, full queue)", ["store"], namespace=NAMESPACE, registry=reg)
        self._open = prom.Gauge(
            "connections_open", "Policy connections open now (Postfix smtpd processes)",
            namespace=NAMESPACE, registry=reg)
        self._accepted = prom.Counter(
            "connections", "Policy connections accepted", namespace=NAMESPACE, registry=reg)
        self._refused = prom.Counter(
            "connections_refused", "Connections closed at once: max_connections reached",
            namespace=NAMESPACE, registry=reg)
        self._ended = prom.Counter(
            "connections_ended", "Connections policyd ended itself: idle_timeout, "
            "read_timeout, protocol_error (the peer broke the policy protocol)",
            ["reason"], namespace=NAMESPACE, registry=reg)
        self._request_bytes = prom.Histogram(
            "request_bytes", "Size of policy requests in bytes", namespace=NAMESPACE,
            registry=reg, buckets=REQUEST_SIZE_BUCKETS)
        self._spf = prom.Counter(
            "spf_checks", "SPF evaluations by result; pooled: the client was keyed "
            "by its sender domain (client_key = spf)", ["result", "pooled"],
            namespace=NAMESPACE, registry=reg)
        self._dns_failures = prom.Counter(
            "dns_failures", "Decisions that DNS could not inform (timeout, other failure)",
            ["kind"], namespace=NAMESPACE, registry=reg)
        # Every label combination exists from the start at 0: rate() and
        # alerts work before the first event of a kind.
        for store in sorted(STORES):
            self._store_errors.labels(store)
        for kind in sorted(DNS_FAILURES):
            self._dns_failures.labels(kind)
        for result in sorted(DNS_RESULTS):
            self._dns_results.labels(result)
        for reason in sorted(END_REASONS):
            self._ended.labels(reason)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # --- events -------------------------------------------------------------

    def decision(self, action_word: str, reason: str, delay: float | None = None) -> None:
        """One answered request; ``action_word`` as action_label() returns it
        (other text is reduced the same way), ``delay`` for mail that passed."""
        word = action_word if action_word in ACTIONS else action_label(action_word)
        self._decisions.labels(word, reason_label(reason)).inc()
        if delay is not None and delay >= 0:
            self._delay.observe(delay)

    def observe_decision(self, decision: Decision) -> None:
        """decision() for a policyd.api.Decision (disconnect counts as such)."""
        word = "disconnect" if decision.disconnect else action_label(decision.action)
        self.decision(word, decision.reason, decision.delay)
        self._dns(decision)

    def _dns(self, decision: Decision) -> None:
        """What DNS contributed: SPF's fields, the DNS lists' score, and
        whether DNS (either) could not inform the decision."""
        fields = dict(decision.fields)
        if "spf" in fields:
            pooled = "yes" if fields.get("client_key", "").startswith("spf:") else "no"
            self._spf.labels(_bounded(fields["spf"], SPF_RESULTS), pooled).inc()
        if decision.dns_score is not None:
            self._dns_results.labels("answered").inc()
            self._dns_score.observe(decision.dns_score)
        elif decision.dns is not None:
            self._dns_results.labels(_bounded(decision.dns, DNS_RESULTS)).inc()
        failure = decision.dns or fields.get("dns")
        if failure is not None:
            self._dns_failures.labels(_bounded(failure, DNS_FAILURES)).inc()

    def store_latency(self, store: str, op: str, seconds: float) -> None:
        self._store_latency.labels(_bounded(store, STORES), _bounded(op, STORE_OPS)) \
            .observe(max(seconds, 0.0))

    def store_error(self, store: str) -> None:
        self._store_errors.labels(_bounded(store, STORES)).inc()

    def connection_opened(self) -> None:
        self._accepted.inc()
        self._open.inc()

    def connection_closed(self) -> None:
        self._open.dec()

    def connection_refused(self) -> None:
        self._refused.inc()

    def connection_ended(self, reason: str) -> None:
        self._ended.labels(_bounded(reason, END_REASONS)).inc()

    def request_size(self, nbytes: int) -> None:
        self._request_bytes.observe(max(nbytes, 0))

    # --- exposition -----------------------------------------------------------

    def render(self) -> bytes:
        """The text exposition format (what a scrape returns)."""
        data: bytes = self._prom.generate_latest(self.registry)
        return data

    def serve(self, endpoint: Endpoint, *,
              max_connections: int = limits.METRICS_MAX_CONNECTIONS,
              connection_seconds: float = limits.METRICS_CONNECTION_SECONDS) -> None:
        """Serve /metrics on an inet endpoint from a daemon thread: at most
        ``max_connections`` scrapes at once, each connection closed after
        ``connection_seconds`` in all."""
        if endpoint.kind != "inet":
            raise PolicydError(f"metrics_listen = {endpoint}: only inet:host:port is "
                               "supported (Prometheus scrapes over TCP)")
        try:
            listener = bind_inet(endpoint)
        except OSError as exc:
            raise PolicydError(f"metrics_listen = {endpoint}: cannot listen: "
                               f"{exc.strerror or exc}") from None
        try:
            server = _BoundedWSGIServer(listener.sock, self._prom.make_wsgi_app(self.registry),
                                        max_connections, connection_seconds)
            thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True,
                                      args=(limits.METRICS_POLL_SECONDS,))
            thread.start()
        except BaseException:
            listener.sock.close()
            raise
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]
        self.address = (str(host), int(port))
        log.info("metrics on http://%s/metrics", _url_host(self.address))

    def close(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=limits.METRICS_CLOSE_WAIT_SECONDS)
            self._thread = None


#: What the server and the policy report events to.
MetricsSink: TypeAlias = "Metrics | NullMetrics"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the decision lines


class _BoundedWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """prometheus_client's start_http_server, bounded: at most
    ``max_connections`` scrapes at once (a thread each; further connections
    are closed at once), each connection closed after ``connection_seconds``
    in all, so idle or slow connections cannot pile up threads or hold
    every slot."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, app: Any, max_connections: int,
                 connection_seconds: float) -> None:
        # The socket comes bound and listening from policyd.listeners (one
        # way to bind inet endpoints: address family, IPV6_V6ONLY), which
        # also skips HTTPServer.server_bind's unbounded getfqdn() lookup.
        super().__init__(sock.getsockname(), _QuietHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.address_family = sock.family
        self.server_address = sock.getsockname()
        self.server_name, self.server_port = str(self.server_address[0]), int(
            self.server_address[1])
        self.setup_environ()
        self.set_app(app)
        self._slots = threading.BoundedSemaphore(max_connections)
        self._connection_seconds = connection_seconds
        self._watchdogs: dict[socket.socket, _Watchdog] = {}

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr (a read timeout, a peer
        # that went away): one debug line is enough.
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            try:
                # The whole connection is bounded, not each read: a client
                # sending a byte now and then must not keep its slot.
                self._watchdogs[request] = _Watchdog(request, self._connection_seconds)
            except BaseException:  # its timer thread could not start
                self.shutdown_request(request)
                raise
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown_request(self, request: Any) -> None:
        watchdog = self._watchdogs.pop(request, None)
        if watchdog is None:
            super().shutdown_request(request)
            return
        with watchdog.lock:  # never while the watchdog shuts it down
            watchdog.closed = True
            watchdog.timer.cancel()
            super().shutdown_request(request)


class _Watchdog:
    """Shuts a metrics connection down after ``seconds``, which ends the
    handler's current or next read; a lock and a flag keep it off a socket
    (and a reused descriptor) once the server closed it."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.closed = False
        self.timer = threading.Timer(seconds, self._shut)
        self.timer.daemon = True
        self.timer.start()

    def _shut(self) -> None:
        with self.lock:
            if not self.closed:
                with contextlib.suppress(OSError):
                    self.sock.shutdown(socket.SHUT_RDWR)


def _url_host(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_metrics(endpoint: Endpoint) -> Metrics:
    """Metrics served on ``endpoint`` (port 0: any free port, see .address).

    Raises PolicydError when prometheus-client is missing, the endpoint is
    not inet or it cannot be bound.
    """
    metrics = Metrics()
    metrics.serve(endpoint)
    return metrics


def metrics_for(endpoint: Endpoint | None) -> MetricsSink:
    """What the server uses for ``config.metrics_listen``: NullMetrics when
    it is empty, else started Metrics (errors as start_metrics)."""
    if endpoint is None:
        return NullMetrics()
    return start_metrics(endpoint)
