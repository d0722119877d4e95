"""policyd's asyncio server: connections, timeouts, replies, shutdown.

It speaks the SMTPD policy protocol (policyd.protocol) and asks a Policy
(policyd.api) for each decision; it knows nothing of greylisting.

A connection's life is one coroutine, PolicyServer._converse, that reads
top to bottom: read a request (``idle_timeout`` until its first byte,
``read_timeout`` from there to its end), decide it (``decision_timeout``),
write the reply, again.  Requests are answered in order, one at a time
(Postfix waits for each reply).  On any trouble the server sends no reply
and closes the connection, which makes Postfix retry later; a protocol
error affects only its own connection and logs one line.  A policy that
fails (raises, PolicyFailure for its stores, or exceeds decision_timeout)
is answered in one place, PolicyServer._failure, as
``failure_action`` says: ``DUNNO`` or ``disconnect``.

Bytes reach the coroutine through a BufferedProtocol (_Connection) rather
than asyncio's streams: it costs less per request (docs/design.md, "The
server").
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import signal
import socket
import threading
from collections.abc import Callable
from typing import Any, cast

from policyd import limits, sdnotify
from policyd.api import Decision, Policy, PolicyFailure
from policyd.config import PolicydConfig
from policyd.errors import PolicyProtocolError
from policyd.listeners import Listener, open_listeners
from policyd.logsetup import DECISION_LOGGER, format_decision, log_decision
from policyd.metrics import MetricsSink, NullMetrics
from policyd.protocol import PolicyParser, Request, format_reply

log = logging.getLogger("policyd.server")
_decision_log = logging.getLogger(DECISION_LOGGER)

_DUNNO_REPLY = format_reply("DUNNO")


class State(enum.Enum):
    """Where a connection's conversation is."""

    WAITING = "waiting for a request"  # no byte of it yet: idle_timeout runs
    READING = "reading a request"      # part of it: read_timeout runs
    DECIDING = "deciding a request"    # decision_timeout runs; shutdown waits for it
    CLOSED = "closed"                  # the conversation is over


def _peer_name(transport: asyncio.BaseTransport) -> str:
    peer: Any = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    sockname: Any = transport.get_extra_info("sockname")
    return f"unix:{sockname}" if sockname else "unix"


class _Connection(asyncio.BufferedProtocol):
    """One client connection: the bytes its conversation awaits (read()),
    and its replies (write())."""

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.state = State.WAITING
        self.task: asyncio.Task[None] | None = None  # the conversation
        self._data = b""              # received, not yet read
        self._ended = False           # the peer sent all it will send, or left
        self._paused = False          # _data is full: the transport reads no more
        self._waiter: asyncio.Future[None] | None = None

    # --- asyncio.Protocol ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's is not an asyncio.Transport subclass).
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _peer_name(self.transport)
        self.server._accept(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        # One buffer for every connection: buffer_updated() copies out
        # what was read before any other connection reads.  (A plain
        # data_received() costs a recv() of 256 KiB, asyncio's default.)
        return self.server._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.state is State.CLOSED:
            return
        chunk = bytes(self.server._read_buffer[:nbytes])
        self._data = self._data + chunk if self._data else chunk
        if len(self._data) >= limits.READ_CHUNK_BYTES and self.transport is not None:
            # A client that sends ahead (Postfix never does) is read no
            # further until its requests are answered: bounded memory.
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        # Requests received before the end are still answered (a client
        # may half-close after sending); the connection closes after that.
        self._ended = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        # A decision in progress runs to its end (its writes complete), as
        # if the peer had left just after the reply; only shutdown cancels.
        self._ended = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- for the conversation -------------------------------------------------

    async def read(self) -> bytes:
        """The bytes received since the last read; b"" once the peer ended."""
        if not self._data and not self._ended:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data, self._data = self._data, b""
        if self._paused:
            self._paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        return data

    def write(self, reply: bytes) -> bool:
        """Send a reply; False when the connection must end instead."""
        transport = self.transport
        assert transport is not None
        if transport.is_closing():
            return False  # the peer left while its request was decided
        transport.write(reply)
        if transport.get_write_buffer_size() > limits.MAX_WRITE_BUFFER_BYTES:
            log.warning("%s: peer does not read its replies; closing", self.peer)
            return False
        return True

    def close(self, abort: bool = False) -> None:
        """End the connection; abort drops replies not yet sent (a peer
        that does not read them, or a stop that cannot wait)."""
        self.state = State.CLOSED
        transport = self.transport
        if transport is None:
            return
        if abort:
            transport.abort()
        elif not transport.is_closing():
            transport.close()


class PolicyServer:
    """Serve ``policy`` on the listeners of ``config`` (or inherited ones).

    ``listeners`` overrides policyd.listeners.open_listeners (tests, or a
    caller that opened sockets before dropping privileges).
    """

    def __init__(self, config: PolicydConfig, policy: Policy,
                 listeners: list[Listener] | None = None,
                 metrics: MetricsSink | None = None) -> None:
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
        self._read_buffer = memoryview(bytearray(limits.READ_CHUNK_BYTES))

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
        loop = asyncio.get_running_loop()
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
        for server in self._servers:
            server.close()
        self._close_listeners()
        busy: list[asyncio.Task[None]] = []
        for conn in list(self._conns):
            if conn.state is State.DECIDING and conn.task is not None:
                busy.append(conn.task)  # it ends after its reply
            else:
                conn.close()  # waiting for a request: nothing to lose
        if busy:
            log.info("waiting up to %ss for %d request(s) in flight",
                     self._config.shutdown_grace, len(busy))
            _, late = await asyncio.wait(busy, timeout=self._config.shutdown_grace)
            if late:
                for task in late:
                    task.cancel()
                log.warning("shutdown_grace expired: cancelled %d request(s)", len(late))
                # Cancelled decisions end at their next await; a policy that
                # ignores cancellation must not hold the process forever.
                await asyncio.wait(late, timeout=limits.SHUTDOWN_CANCEL_WAIT_SECONDS)
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
            conn.state = State.CLOSED
            self._refuse(conn.peer, conn.transport)
            return
        self._conns[conn] = None
        self._metrics.connection_opened()
        conn.task = conn.loop.create_task(self._serve(conn))

    def _refuse(self, peer: str, transport: asyncio.Transport) -> None:
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

    async def _serve(self, conn: _Connection) -> None:
        """The connection's conversation, and its end whatever happens."""
        try:
            await self._converse(conn)
        except asyncio.CancelledError:
            conn.close(abort=True)  # shutdown cancelled a decision: no reply follows
            raise
        except Exception as exc:  # a bug: log one line, keep serving others
            log.error("%s: internal error: %s: %s", conn.peer, type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
            conn.close(abort=True)
        finally:
            conn.close()
            del self._conns[conn]
            self._metrics.connection_closed()

    async def _converse(self, conn: _Connection) -> None:
        """Read a request, decide it, write the reply; again, until the
        connection ends or the server stops."""
        parser = PolicyParser()
        pending: collections.deque[Request] = collections.deque()  # sent ahead
        while not self._closing:
            if not pending:
                pending.extend(await self._read_requests(conn, parser))
                if not pending or self._closing:
                    return  # the peer ended, a timeout, a protocol error; or a stop
            conn.state = State.DECIDING
            reply = await self._answer(pending.popleft())
            if reply is None or not conn.write(reply):
                conn.close(abort=True)  # nothing may follow a request left unanswered
                return

    async def _read_requests(self, conn: _Connection, parser: PolicyParser) -> list[Request]:
        """The requests completed by the next bytes (at least one), or []
        when the connection is to end: the peer ended, a timeout (idle or
        read), a protocol error."""
        config = self._config
        loop = conn.loop
        # A tail left by the last read is a request begun already.
        conn.state = State.READING if parser.buffered else State.WAITING
        wait = config.read_timeout if parser.buffered else config.idle_timeout
        try:
            async with asyncio.timeout(wait) as timeout:
                while True:
                    data = await conn.read()
                    if not data:
                        if parser.buffered:
                            log.debug("%s: connection closed in the middle of a request",
                                      conn.peer)
                        return []
                    requests = parser.feed(data)
                    if requests:
                        for request in requests:
                            self._metrics.request_size(request.size)
                        return requests
                    if conn.state is State.WAITING:
                        # The request's first bytes: read_timeout from now
                        # on, not extended by more bytes.
                        conn.state = State.READING
                        timeout.reschedule(loop.time() + config.read_timeout)
        except TimeoutError:
            if conn.state is State.READING:
                self._metrics.connection_ended("read_timeout")
                log.warning("%s: request incomplete after read_timeout (%ss); closing",
                            conn.peer, config.read_timeout)
            else:
                self._metrics.connection_ended("idle_timeout")
                log.debug("%s: idle for %ss; closing", conn.peer, config.idle_timeout)
            return []
        except PolicyProtocolError as exc:
            self._metrics.connection_ended("protocol_error")
            log.warning("%s: protocol error: %s; closing without reply", conn.peer, exc)
            return []

    # --- decisions -------------------------------------------------------

    async def _answer(self, request: Request) -> bytes | None:
        """The reply to a request, or None to close without one."""
        attrs = request.attrs
        deadline = asyncio.timeout(self._config.decision_timeout)
        try:
            async with deadline:
                decision = await self._policy.decide(attrs)
            reply = None if decision.disconnect else format_reply(decision.action)
        except TimeoutError as exc:
            if not deadline.expired():
                return self._failure(attrs, "policy-failure", f"{type(exc).__name__}: {exc}")
            return self._failure(attrs, "policy-failure", "no decision within decision_timeout "
                                 f"({self._config.decision_timeout}s)")
        except PolicyFailure as exc:
            return self._failure(attrs, exc.reason, str(exc))
        except Exception as exc:
            return self._failure(attrs, "policy-failure", f"{type(exc).__name__}: {exc}")
        log_decision(attrs, decision)
        self._metrics.observe_decision(decision)
        return reply

    def _failure(self, attrs: dict[str, str], reason: str, why: str) -> bytes | None:
        """The one answer to every request without a decision: the policy
        failed (``reason``: ``store-failure`` or ``policy-failure``; ``why``
        says how) or took longer than decision_timeout.  failure_action
        says which: DUNNO, or None to close without a reply."""
        disconnect = self._config.failure_action == "disconnect"
        failure = Decision(action="DUNNO", reason=reason, disconnect=disconnect, detail=why)
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
