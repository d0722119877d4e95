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

The hot path is plain asyncio.Protocol callbacks (no stream reader, no
coroutine per connection): bytes go straight to the connection's
PolicyParser, each request's decision runs as one task, and its reply is
written from the task's done callback.  Timers are lazy: one watchdog per
connection for read and idle timeouts, and one server-wide queue of
decision deadlines (decision_timeout is the same for every request, so
deadlines come in start order) with a single timer at its head.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from policyd import limits, sdnotify
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


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    sockname: Any = transport.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"


class _Connection(asyncio.BufferedProtocol):
    """One client connection (see the module docstring)."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = PolicyParser()
        self.queue: collections.deque[tuple[dict[str, str], int]] = collections.deque()
        self.started = 0.0          # loop time of the first byte of an unfinished request
        self.deadline = 0.0         # when the current wait for bytes times out
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[Decision] | None = None  # the decision in progress
        self.attrs: dict[str, str] = {}                  # its request
        self.seq = 0                # decisions started (ties deadline entries to them)
        self.timed_out = False      # the current decision exceeded decision_timeout
        self.paused = False         # reading paused: requests waiting
        self.lost = False           # the transport is gone
        self.closed = False         # closing: nothing more is read or answered
        self.eof = False            # the peer sent everything it will send
        self.registered = False     # counted in server._conns
        self.finished: asyncio.Future[None] | None = None  # for shutdown

    @property
    def busy(self) -> bool:
        """A request is being decided or answered."""
        return self.task is not None

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _peer_name(self.transport)
        self.server._accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection: buffer_updated() copies out
        # what was read before any other connection reads.  (A plain
        # data_received() costs a recv() of 256 KiB, asyncio's default:
        # ~13 us per call for the allocation alone.)
        return self.server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.closed or not self.registered:
            return
        try:
            self._received(bytes(self.server._read_buffer[:nbytes]))
        except Exception as exc:  # a bug: log one line, keep serving others
            self._internal_error(exc)

    def eof_received(self) -> bool | None:
        # Requests received before the end are still answered (a client
        # may half-close after sending); the connection closes after that.
        self.eof = True
        if self.parser.buffered:
            log.debug("%s: connection closed in the middle of a request", self.peer)
        if self.task is None and not self.queue:
            self._close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        # A decision in progress runs to its end (its writes complete), as
        # if the peer had left just after the reply; only shutdown cancels.
        if self.task is None:
            self._finish()

    # --- requests -------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        server = self.server
        mid_request = self.parser.buffered > 0
        if not mid_request:
            self.started = self.loop.time()
        try:
            requests = self.parser.feed(data)
        except PolicyProtocolError as exc:
            server.stats.protocol_errors += 1
            log.warning("%s: protocol error: %s; closing without reply", self.peer, exc)
            self._close()
            return
        if requests:
            if self.parser.buffered:
                self.started = self.loop.time()
            for request in requests:
                self.queue.append((request.attrs, request.size))
            if self.task is None:
                self._next()
            if self.queue and not self.paused and not self.closed:
                # A client that sends ahead (Postfix never does) is read no
                # further until its requests are answered: bounded memory.
                self.paused = True
                assert self.transport is not None
                self.transport.pause_reading()
        elif self.task is None:
            self._wait_for_bytes()

    def _next(self) -> None:
        """Start deciding the next queued request, or wait for bytes."""
        server = self.server
        if not self.queue or server._closing or self.closed:
            self.queue.clear()
            if server._closing or self.eof:
                self._close()
            elif not self.closed:
                self._wait_for_bytes()
            return
        attrs, size = self.queue.popleft()
        if self.paused and not self.queue:
            self.paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        server.stats.requests += 1
        server._metrics.request_size(size)
        self.attrs = attrs
        self.timed_out = False
        self.seq += 1
        task = self.loop.create_task(server._policy.decide(attrs))
        self.task = task
        server._decision_started(self)
        task.add_done_callback(self._decided)

    def _decided(self, task: asyncio.Task[Decision]) -> None:
        self.task = None
        try:
            reply = self.server._reply(self, task)
            if reply is None:
                self._close(abort=True)  # nothing may follow a request left unanswered
            elif not self.closed:
                self._send(reply)
        except Exception as exc:
            self._internal_error(exc)
        if self.lost:
            self.queue.clear()
            self._finish()
        else:
            self._next()

    def _send(self, reply: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(reply)
        self.server.stats.replies += 1
        if transport.get_write_buffer_size() > limits.MAX_WRITE_BUFFER_BYTES:
            log.warning("%s: peer does not read its replies; closing", self.peer)
            self._close(abort=True)

    # --- timeouts -------------------------------------------------------------

    def _wait_for_bytes(self) -> None:
        """Arm the read or idle timeout for the wait that begins now."""
        config = self.server._config
        if self.parser.buffered:
            deadline = self.started + config.read_timeout
        else:
            deadline = self.loop.time() + config.idle_timeout
        self.deadline = deadline
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._watchdog)

    def _watchdog(self) -> None:
        """Read and idle timeouts, one lazy timer per connection.

        Arming a timer for every read would cost two heap operations per
        request; instead the deadline moves with each wait and this timer
        only fires when it might have passed, then re-arms itself.
        """
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.task is None and not self.queue and now >= self.deadline:
            config = self.server._config
            stats = self.server.stats
            if self.parser.buffered:
                stats.read_timeouts += 1
                log.warning("%s: request incomplete after read_timeout (%ss); closing",
                            self.peer, config.read_timeout)
            else:
                stats.idle_timeouts += 1
                log.debug("%s: idle for %ss; closing", self.peer, config.idle_timeout)
            self._close()
            return
        busy = self.task is not None or bool(self.queue)
        when = now + self.server._config.idle_timeout if busy else self.deadline
        self.timer = self.loop.call_at(when, self._watchdog)

    # --- ending -------------------------------------------------------------

    def _close(self, abort: bool = False) -> None:
        """Close the connection; abort when nothing may be flushed (a reply
        must not follow a cancelled decision)."""
        transport = self.transport
        if transport is None or self.lost:
            return
        self.closed = True
        if abort or self.task is not None:
            transport.abort()
        else:
            transport.close()

    def _abort(self) -> None:
        """Shutdown: drop the connection, cancel its decision."""
        if self.task is not None:
            self.task.cancel()
        self._close(abort=True)

    def _finish(self) -> None:
        """The connection is over for the server: forget it."""
        if self.task is not None:
            return
        self.server._forget(self)
        if self.finished is not None and not self.finished.done():
            self.finished.set_result(None)

    def _internal_error(self, exc: Exception) -> None:
        log.error("%s: internal error: %s: %s", self.peer, type(exc).__name__, exc)
        log.debug("traceback", exc_info=True)
        self._close(abort=True)


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
        self._conns: dict[_Connection, None] = {}
        self._closing = False
        self._shutdown_task: asyncio.Task[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._refused_unlogged = 0
        self._next_refusal_log = 0.0
        self._signals: list[int] = []
        self._reload_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Decision deadlines in start order: (deadline, connection, seq).
        self._deadlines: collections.deque[tuple[float, _Connection, int]] = \
            collections.deque()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._read_buffer = memoryview(bytearray(limits.READ_CHUNK_BYTES))
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
        self._loop = loop = asyncio.get_running_loop()
        if self._listeners is None:
            self._listeners = open_listeners(self._config)
        try:
            for listener in self._listeners:
                # backlog: create_server calls listen() again with it.
                server = await loop.create_server(lambda: _Connection(self), sock=listener.sock,
                                                  backlog=limits.LISTEN_BACKLOG)
                self._servers.append(server)
                log.info("listening on %s", listener.name)
        except BaseException:
            self._close_listeners()
            raise

    def status(self) -> str:
        """One line for systemd's STATUS= (shown by systemctl status)."""
        names = ", ".join(listener.name for listener in self._listeners or ())
        return f"listening on {names}"

    async def serve_forever(self) -> None:
        """Serve until shutdown() (or SIGTERM/SIGINT) has completed."""
        await self.start()
        assert self._stopped is not None
        await self._stopped.wait()

    async def shutdown(self) -> None:
        """Stop gracefully: stop listening, close idle connections, let
        requests in flight finish for up to shutdown_grace seconds, then
        cancel the rest.  Safe to call more than once."""
        await asyncio.shield(self._begin_shutdown())

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
        """Ask the policy to re-read its files (SIGHUP), in a thread: reading
        and compiling large whitelists must not stall the event loop.  One
        reload at a time; errors are logged and the old state kept."""
        if self._closing:
            log.info("stopping; SIGHUP ignored")
            return
        if self._reload_task is not None and not self._reload_task.done():
            log.info("reload already in progress; SIGHUP ignored")
            return
        log.info("reloading policy (SIGHUP)")
        sdnotify.reloading()
        self._reload_task = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        try:
            await _in_daemon_thread(self._policy.reload, "policyd-reload")
        except Exception as exc:
            log.error("reload failed, keeping the previous state: %s: %s",
                      type(exc).__name__, exc)
        finally:
            if not self._closing:
                sdnotify.ready(self.status())

    # --- shutdown --------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self._shutdown_task is None:
            log.info("%s received: shutting down", signal.Signals(signum).name)
            self._begin_shutdown()

    def _begin_shutdown(self) -> asyncio.Task[None]:
        """The shutdown task, started on the first call."""
        if self._shutdown_task is None:
            self._closing = True  # at once: a SIGHUP handled next must not reload
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown())
        return self._shutdown_task

    async def _shutdown(self) -> None:
        sdnotify.stopping()
        loop = asyncio.get_running_loop()
        for server in self._servers:
            server.close()
        self._close_listeners()
        busy: list[_Connection] = []
        for conn in list(self._conns):
            conn.finished = loop.create_future()
            if conn.busy:
                busy.append(conn)
            else:
                conn.queue.clear()
                conn._close()  # waiting for a request: nothing to lose
        if busy:
            log.info("waiting up to %ss for %d request(s) in flight",
                     self._config.shutdown_grace, len(busy))
            _, pending = await asyncio.wait([c.finished for c in busy if c.finished],
                                            timeout=self._config.shutdown_grace)
            late = [c for c in busy if c.finished in pending]
            for conn in late:
                conn._abort()
            if late:
                log.warning("shutdown_grace expired: cancelled %d request(s)", len(late))
        waiting = [c.finished for c in busy if c.finished and not c.finished.done()]
        if waiting:
            # Cancelled decisions end at their next await; a policy that
            # ignores cancellation must not hold the process forever.
            await asyncio.wait(waiting, timeout=limits.SHUTDOWN_CANCEL_WAIT_SECONDS)
        if self._reload_task is not None and not self._reload_task.done():
            # The policy's files are being read in a thread; let it finish
            # (bounded) before the policy is closed.  A read stuck in the
            # kernel (a hung network filesystem) is left behind: its thread
            # is a daemon thread and does not keep the process alive.
            await asyncio.wait([self._reload_task], timeout=limits.SHUTDOWN_CANCEL_WAIT_SECONDS)
            if not self._reload_task.done():
                log.warning("reload still reading its files after %ss; not waiting for it",
                            limits.SHUTDOWN_CANCEL_WAIT_SECONDS)
                self._reload_task.cancel()
        log.info("stopped")
        if self._stopped is not None:
            self._stopped.set()

    def _close_listeners(self) -> None:
        for listener in self._listeners or ():
            listener.close()

    # --- connections -----------------------------------------------------

    def _accept(self, conn: _Connection) -> None:
        assert conn.transport is not None
        if self._closing or len(self._conns) >= self._config.max_connections:
            self._refuse(conn.peer, conn.transport)
            return
        conn.registered = True
        self._conns[conn] = None
        self.stats.connections += 1
        self._metrics.connection_opened()
        conn._wait_for_bytes()

    def _forget(self, conn: _Connection) -> None:
        if conn.registered:
            conn.registered = False
            del self._conns[conn]
            self._metrics.connection_closed()

    def _refuse(self, peer: str, transport: asyncio.Transport) -> None:
        self.stats.refused += 1
        self._metrics.connection_refused()
        transport.abort()
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

    # --- decisions -------------------------------------------------------

    def _decision_started(self, conn: _Connection) -> None:
        """Queue the decision's deadline (see the module docstring)."""
        loop = conn.loop
        deadlines = self._deadlines
        # Entries of decisions that ended are dropped from the head, so the
        # queue holds about as many entries as there are decisions in flight.
        while deadlines:
            _, head, seq = deadlines[0]
            if head.task is not None and head.seq == seq:
                break
            deadlines.popleft()
        deadlines.append((loop.time() + self._config.decision_timeout, conn, conn.seq))
        if self._deadline_timer is None:
            self._deadline_timer = loop.call_at(deadlines[0][0], self._expire_decisions)

    def _expire_decisions(self) -> None:
        self._deadline_timer = None
        assert self._loop is not None
        now = self._loop.time()
        deadlines = self._deadlines
        while deadlines:
            when, conn, seq = deadlines[0]
            if conn.task is None or conn.seq != seq:
                deadlines.popleft()  # that decision ended
                continue
            if when > now:
                self._deadline_timer = self._loop.call_at(when, self._expire_decisions)
                return
            deadlines.popleft()
            conn.timed_out = True
            conn.task.cancel()

    def _reply(self, conn: _Connection, task: asyncio.Task[Decision]) -> bytes | None:
        """The reply to a decided request, or None to close without one."""
        config = self._config
        attrs = conn.attrs
        if task.cancelled():
            if not conn.timed_out:
                return None  # shutdown cancelled it: no reply, no log line
            why = f"no decision within decision_timeout ({config.decision_timeout}s)"
        else:
            exc = task.exception()
            if exc is None:
                decision = task.result()
                try:
                    reply = None if decision.disconnect else format_reply(decision.action)
                except Exception as error:
                    why = f"{type(error).__name__}: {error}"
                else:
                    log_decision(attrs, decision)
                    self._metrics.observe_decision(decision)
                    return reply
            elif isinstance(exc, Exception):
                why = f"{type(exc).__name__}: {exc}"
            else:
                raise exc
        self.stats.policy_failures += 1
        disconnect = config.store_failure_action == "disconnect"
        failure = Decision(action="DUNNO", reason="policy-failure", disconnect=disconnect,
                           detail=why)
        _decision_log.warning("%s", format_decision(attrs, failure))
        self._metrics.observe_decision(failure)
        return None if disconnect else _DUNNO_REPLY


async def _in_daemon_thread(function: Callable[[], None], name: str) -> None:
    """function() in a daemon thread of its own.  asyncio.to_thread's
    executor threads are joined at exit without a bound, so a call stuck in
    the kernel would keep a stopped policyd alive."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle(error: BaseException | None) -> None:
        if done.done():  # cancelled by shutdown meanwhile
            return
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)

    def run() -> None:
        error: BaseException | None = None
        try:
            function()
        except StopIteration as exc:  # a Future refuses it (TypeError)
            error = RuntimeError(f"StopIteration: {exc}")
        except BaseException as exc:  # delivered to the awaiting task
            error = exc
        # RuntimeError: the loop closed meanwhile, nobody is waiting.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    await done
