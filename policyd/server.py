"""policyd's asyncio server: connections, timeouts, replies, shutdown.

It speaks the SMTPD policy protocol (policyd.protocol) and asks a Policy
(policyd.api) for each decision; it knows nothing of greylisting.

Per connection: requests are answered in order, one at a time (Postfix
waits for each reply).  ``idle_timeout`` bounds the wait between requests
(the connection is then closed quietly), ``read_timeout`` the time from a
request's first byte to its end, ``decision_timeout`` each decision.  On any
trouble the server sends no reply and closes the connection, which makes
Postfix retry later; a protocol error affects only its own connection and
logs one line.  A policy that fails or is too slow gets
``store_failure_action``: ``DUNNO`` (reply action=DUNNO) or ``disconnect``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from dataclasses import dataclass
from typing import Any

from policyd import limits
from policyd.api import Decision, Policy
from policyd.config import PolicydConfig
from policyd.errors import PolicyProtocolError
from policyd.listeners import Listener, open_listeners
from policyd.logsetup import DECISION_LOGGER, format_decision, log_decision
from policyd.metrics import Metrics, NullMetrics
from policyd.protocol import PolicyParser, format_reply

log = logging.getLogger("policyd.server")
_decision_log = logging.getLogger(DECISION_LOGGER)

_DUNNO_REPLY = format_reply("DUNNO")


@dataclass
class ServerStats:
    """Counters since start (read by metrics and tests)."""

    connections: int = 0           # accepted and served
    refused: int = 0               # closed at once: max_connections reached
    requests: int = 0              # complete requests received
    replies: int = 0               # replies written
    protocol_errors: int = 0
    policy_failures: int = 0       # policy raised or exceeded decision_timeout
    read_timeouts: int = 0
    idle_timeouts: int = 0


class _Connection:
    __slots__ = ("busy", "deadline", "expired", "peer", "reading", "task", "timer", "writer")

    def __init__(self, peer: str, writer: asyncio.StreamWriter,
                 task: asyncio.Task[Any]) -> None:
        self.peer = peer
        self.writer = writer
        self.task = task
        self.busy = False      # a request is being decided or answered
        self.reading = False   # waiting for bytes; deadline applies
        self.deadline = 0.0    # loop time when the wait for bytes times out
        self.expired = False   # the watchdog cancelled the wait
        self.timer: asyncio.TimerHandle | None = None


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer: Any = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    sockname: Any = writer.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"


class PolicyServer:
    """Serve ``policy`` on the listeners of ``config`` (or inherited ones).

    ``listeners`` overrides policyd.listeners.open_listeners (tests, or a
    caller that opened sockets before dropping privileges).
    """

    def __init__(self, config: PolicydConfig, policy: Policy,
                 listeners: list[Listener] | None = None,
                 metrics: Metrics | NullMetrics | None = None) -> None:
        self._config = config
        self._policy = policy
        self._metrics = metrics or NullMetrics()
        self._listeners = listeners
        self._servers: list[asyncio.AbstractServer] = []
        self._conns: dict[asyncio.Task[Any], _Connection] = {}
        self._closing = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._refused_unlogged = 0
        self._next_refusal_log = 0.0
        self._signals: list[int] = []
        self.stats = ServerStats()

    # --- public ----------------------------------------------------------

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (after start())."""
        return [listener.sock for listener in self._listeners or ()]

    @property
    def addresses(self) -> list[Any]:
        """getsockname() of each listener: (host, port[, ...]) or a path."""
        return [sock.getsockname() for sock in self.sockets if sock.fileno() >= 0]

    @property
    def active_connections(self) -> int:
        return len(self._conns)

    async def start(self) -> None:
        """Open (or adopt) the listeners and start accepting."""
        if self._stopped is not None:
            return
        self._stopped = asyncio.Event()
        if self._listeners is None:
            self._listeners = open_listeners(self._config)
        try:
            for listener in self._listeners:
                server = await asyncio.start_server(self._on_connect, sock=listener.sock,
                                                    limit=limits.READ_CHUNK_BYTES)
                self._servers.append(server)
                log.info("listening on %s", listener.name)
        except BaseException:
            self._close_listeners()
            raise

    async def serve_forever(self) -> None:
        """Serve until shutdown() (or SIGTERM/SIGINT) has completed."""
        await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop gracefully: stop listening, close idle connections, let
        requests in flight finish for up to shutdown_grace seconds, then
        cancel the rest.  Safe to call more than once."""
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.create_task(self._shutdown())
        await asyncio.shield(self._shutdown_task)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT -> shutdown(); SIGHUP -> reload().  Needs the main
        thread's running loop."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
            self._signals.append(signum)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        self._signals.append(signal.SIGHUP)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in self._signals:
            loop.remove_signal_handler(signum)
        self._signals.clear()

    def reload(self) -> None:
        """Ask the policy to re-read its files (SIGHUP); errors are logged."""
        log.info("reloading policy (SIGHUP)")
        try:
            self._policy.reload()
        except Exception as exc:
            log.error("reload failed, keeping the previous state: %s: %s",
                      type(exc).__name__, exc)

    # --- shutdown --------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self._shutdown_task is None:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())

    async def _shutdown(self) -> None:
        self._closing = True
        for server in self._servers:
            server.close()
        self._close_listeners()
        busy = []
        for task, conn in list(self._conns.items()):
            if conn.busy:
                busy.append(task)
            else:
                task.cancel()  # waiting for a request: nothing to lose
        if busy:
            log.info("waiting up to %ss for %d request(s) in flight",
                     self._config.shutdown_grace, len(busy))
            _, pending = await asyncio.wait(busy, timeout=self._config.shutdown_grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown_grace expired: cancelled %d request(s)", len(pending))
        tasks = list(self._conns)
        if tasks:
            # Cancelled tasks end at their next await; a policy that ignores
            # cancellation must not hold the process forever.
            await asyncio.wait(tasks, timeout=limits.SHUTDOWN_CANCEL_WAIT_SECONDS)
        log.info("stopped")
        if self._stopped is not None:
            self._stopped.set()

    def _close_listeners(self) -> None:
        for listener in self._listeners or ():
            listener.close()

    # --- connections -----------------------------------------------------

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = _peer_name(writer)
        if self._closing or len(self._conns) >= self._config.max_connections:
            self._refuse(peer, writer)
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(peer, writer, task)
        self._conns[task] = conn
        self.stats.connections += 1
        self._metrics.connection_opened()
        try:
            await self._serve(reader, writer, conn)
        except (ConnectionError, TimeoutError):
            pass  # the peer went away; Postfix will retry
        except asyncio.CancelledError:
            # Only shutdown cancels connections.  End normally: Python 3.11's
            # stream callback logs a traceback for a task that ends cancelled.
            pass
        except Exception as exc:  # a bug: log one line, keep serving others
            log.error("%s: internal error: %s: %s", peer, type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
        finally:
            self._metrics.connection_closed()
            if conn.timer is not None:
                conn.timer.cancel()
            del self._conns[task]
            if conn.busy:
                writer.transport.abort()  # cancelled mid-decision: nothing to flush
            else:
                writer.close()

    def _refuse(self, peer: str, writer: asyncio.StreamWriter) -> None:
        self.stats.refused += 1
        self._metrics.connection_refused()
        writer.transport.abort()
        if self._closing:
            return
        self._refused_unlogged += 1
        now = asyncio.get_running_loop().time()
        if now >= self._next_refusal_log:
            log.warning("max_connections (%d) reached: refused %s (%d refused since the "
                        "last such line)", self._config.max_connections, peer,
                        self._refused_unlogged)
            self._refused_unlogged = 0
            self._next_refusal_log = now + limits.REFUSAL_LOG_INTERVAL_SECONDS

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: _Connection) -> None:
        config = self._config
        stats = self.stats
        loop = asyncio.get_running_loop()
        parser = PolicyParser()
        started = 0.0  # loop time of the first byte of the unfinished request
        while not self._closing:
            mid_request = parser.buffered > 0
            deadline = (started + config.read_timeout if mid_request
                        else loop.time() + config.idle_timeout)
            conn.deadline = deadline
            if conn.timer is None or conn.timer.when() > deadline:
                if conn.timer is not None:
                    conn.timer.cancel()
                conn.timer = loop.call_at(deadline, self._watchdog, conn)
            conn.reading = True
            try:
                data = await reader.read(limits.READ_CHUNK_BYTES)
            except asyncio.CancelledError:
                if not conn.expired:
                    raise
                conn.task.uncancel()
                if mid_request:
                    stats.read_timeouts += 1
                    log.warning("%s: request incomplete after read_timeout (%ss); closing",
                                conn.peer, config.read_timeout)
                else:
                    stats.idle_timeouts += 1
                    log.debug("%s: idle for %ss; closing", conn.peer, config.idle_timeout)
                return
            finally:
                conn.reading = False
            if not data:
                if parser.buffered:
                    log.debug("%s: connection closed in the middle of a request", conn.peer)
                return
            if not mid_request:
                started = loop.time()
            try:
                requests = parser.feed(data)
            except PolicyProtocolError as exc:
                stats.protocol_errors += 1
                log.warning("%s: protocol error: %s; closing without reply", conn.peer, exc)
                return
            if requests and parser.buffered:
                started = loop.time()
            for request in requests:
                stats.requests += 1
                self._metrics.request_size(request.size)
                conn.busy = True
                reply = await self._decide(request.attrs)
                if reply is None:
                    return
                writer.write(reply)
                stats.replies += 1
                if writer.transport.get_write_buffer_size() > limits.MAX_WRITE_BUFFER_BYTES:
                    log.warning("%s: peer does not read its replies; closing", conn.peer)
                    writer.transport.abort()
                    return
                conn.busy = False
                if self._closing:
                    return

    def _watchdog(self, conn: _Connection) -> None:
        """Read and idle timeouts, one lazy timer per connection.

        Arming a timer for every read would cost two heap operations per
        request; instead the deadline moves with each read and this timer
        only fires when it might have passed, then re-arms itself.
        """
        loop = asyncio.get_running_loop()
        now = loop.time()
        if conn.reading and now >= conn.deadline:
            conn.timer = None
            conn.expired = True
            conn.task.cancel()
            return
        when = conn.deadline if conn.reading else now + self._config.idle_timeout
        conn.timer = loop.call_at(when, self._watchdog, conn)

    async def _decide(self, attrs: dict[str, str]) -> bytes | None:
        """The reply to one request, or None to close without one."""
        config = self._config
        timeout = asyncio.timeout(config.decision_timeout)
        try:
            async with timeout:
                decision = await self._policy.decide(attrs)
            reply = None if decision.disconnect else format_reply(decision.action)
        except Exception as exc:
            if timeout.expired():
                why = f"no decision within decision_timeout ({config.decision_timeout}s)"
            else:
                why = f"{type(exc).__name__}: {exc}"
        else:
            log_decision(attrs, decision)
            self._metrics.observe_decision(decision)
            return reply
        self.stats.policy_failures += 1
        disconnect = config.store_failure_action == "disconnect"
        failure = Decision(action="DUNNO", reason=f"policy failure: {why}", disconnect=disconnect)
        _decision_log.warning("%s", format_decision(attrs, failure))
        self._metrics.observe_decision(failure)
        return None if disconnect else _DUNNO_REPLY
