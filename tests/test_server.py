"""policyd.server and policyd.listeners with real sockets: a PolicyServer
runs on ephemeral loopback ports and a UNIX socket; clients are plain
blocking sockets with timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from memtable.endpoint import Endpoint
from policyd import limits
from policyd.config import PolicydConfig
from policyd.errors import ListenerError
from policyd.listeners import open_listeners
from policyd.server import PolicyServer, _in_daemon_thread
from tests.policyd_helpers import (
    ScriptedPolicy,
    ServerThread,
    ask,
    connect,
    is_closed,
    read_replies,
    read_reply,
    request,
    wait_until,
)
from tests.wait import WAIT

StartServer = Callable[..., ServerThread]


@pytest.fixture(autouse=True)
def no_loop_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing may reach asyncio's exception handler, even at teardown."""
    yield
    records = caplog.get_records("call") + caplog.get_records("teardown")
    assert not [r for r in records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not [r for r in records if r.exc_info]


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[StartServer]:
    """start_server(**config overrides) -> ServerThread on inet + unix."""
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        base = PolicydConfig(listen=(Endpoint("inet", host="127.0.0.1", port=0),
                                     Endpoint("unix", path=str(tmp_path / "policyd.sock"))))
        thread = ServerThread(replace(base, **overrides), ScriptedPolicy())
        started.append(thread)
        return thread

    yield start
    for thread in started:
        thread.stop()


@pytest.fixture
def server(start_server: StartServer) -> ServerThread:
    return start_server()


@pytest.mark.parametrize("kind", ["inet", "unix"])
def test_request_reply(server: ServerThread, kind: str) -> None:
    with connect(server.inet if kind == "inet" else server.unix) as sock:
        assert ask(sock, request(test_action="DEFER_IF_PERMIT try later")) == \
            b"action=DEFER_IF_PERMIT try later\n\n"
    assert server.policy.seen[0]["client_address"] == "192.0.2.1"
    assert server.policy.seen[0]["test_action"] == "DEFER_IF_PERMIT try later"


def test_unix_socket_mode_and_cleanup(start_server: StartServer, tmp_path: Path) -> None:
    path = tmp_path / "policyd.sock"
    path.touch()  # a plain file is never removed
    with pytest.raises(ListenerError, match="not a socket"):
        start_server()
    path.unlink()
    srv = start_server(unix_socket_mode=0o600)
    assert (path.stat().st_mode & 0o777) == 0o600
    srv.stop()
    assert not path.exists()


def test_stale_unix_socket_replaced_live_one_kept(start_server: StartServer,
                                                  tmp_path: Path) -> None:
    path = str(tmp_path / "policyd.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # file left behind, nobody listening
    srv = start_server()
    with connect(srv.unix) as sock:
        assert ask(sock, request()) == b"action=DUNNO\n\n"
    with pytest.raises(ListenerError, match="another server"):
        start_server()


def test_inet6_listener() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    config = PolicydConfig(listen=(Endpoint("inet", host="::1", port=0),))
    try:
        listeners = open_listeners(config, environ={})
    except ListenerError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    try:
        assert listeners[0].sock.family == socket.AF_INET6
        assert listeners[0].name.startswith("inet:[::1]:")
    finally:
        for listener in listeners:
            listener.close()


def test_listener_error_names_endpoint() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = PolicydConfig(listen=(Endpoint("inet", host="127.0.0.1", port=port),))
        with pytest.raises(ListenerError, match=f"inet:127.0.0.1:{port}"):
            open_listeners(config, environ={})


def test_activation_env_for_another_pid_is_ignored_and_removed() -> None:
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "x"}
    config = PolicydConfig(listen=(Endpoint("inet", host="127.0.0.1", port=0),))
    listeners = open_listeners(config, environ=env)
    try:
        assert env == {}
        assert listeners[0].name.startswith("inet:127.0.0.1:")
    finally:
        for listener in listeners:
            listener.close()


def test_activation_env_with_a_huge_number_is_one_clear_error() -> None:
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "9" * 5000}
    config = PolicydConfig(listen=(Endpoint("inet", host="127.0.0.1", port=0),))
    with pytest.raises(ListenerError, match="bad LISTEN_FDS"):
        open_listeners(config, environ=env)
    env = {"LISTEN_PID": "9" * 5000, "LISTEN_FDS": "1"}  # another process's
    for listener in open_listeners(config, environ=env):
        listener.close()


def test_many_requests_on_one_connection(server: ServerThread) -> None:
    with connect(server.inet) as sock:
        for i in range(50):
            assert ask(sock, request(test_action=f"OK {i}")) == f"action=OK {i}\n\n".encode()
    assert len(server.policy.seen) == 50


def test_pipelined_requests_answered_in_order(server: ServerThread) -> None:
    with connect(server.inet) as sock:
        # The first decision is the slowest: order must still hold.
        data = request(test_action="OK 0", test_sleep="0.05") + b"".join(
            request(test_action=f"OK {i}") for i in range(1, 20))
        sock.sendall(data)
        replies = read_replies(sock, 20)
    assert replies == [f"action=OK {i}\n\n".encode() for i in range(20)]


@pytest.mark.parametrize("bad", [
    b"this is not a policy request\n\n",
    b"request=smtpd_access_policy\nsender=a\0\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    request(x="v" * (limits.MAX_LINE_BYTES + 10)),
    b"".join(b"a%d=1\n" % i for i in range(limits.MAX_ATTRIBUTES + 5)) + b"\n",
])
def test_bad_input_closes_only_that_connection(server: ServerThread, bad: bytes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="policyd")
    with connect(server.inet) as good, connect(server.inet) as evil:
        assert ask(good, request()) == b"action=DUNNO\n\n"
        with contextlib.suppress(OSError):  # closed already on the first bad bytes
            evil.sendall(bad)
        assert is_closed(evil)
        assert ask(good, request(test_action="OK")) == b"action=OK\n\n"
    errors = [r for r in caplog.records if "protocol error" in r.getMessage()]
    assert len(errors) == 1
    assert "127.0.0.1:" in errors[0].getMessage()
    assert errors[0].exc_info is None
    assert server.count("connections_ended", reason="protocol_error") == 1


@pytest.mark.parametrize("flood", ["random", "no_newline", "endless_attributes"])
def test_flood_is_cut_off_with_bounded_buffering(server: ServerThread, flood: str) -> None:
    chunk = {"random": os.urandom(65536),
             "no_newline": b"x" * 65536,
             "endless_attributes": b"a=b\n" * 16384}[flood]
    sent = 0
    with connect(server.inet) as sock:
        try:
            for _ in range(1000):  # up to 64 MB, far beyond every bound
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        assert wait_until(lambda: server.connections() == 0)
    # Cut off well before the flood ended: the server stopped reading at the
    # first chunk that broke a bound (kernel buffers hold the rest).
    assert sent < 64 * 1024 * 1024
    assert server.count("connections_ended", reason="protocol_error") == 1


def test_idle_timeout_closes_quietly(start_server: StartServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="policyd")
    srv = start_server(idle_timeout=0.2)
    with connect(srv.inet) as sock:
        assert ask(sock, request()) == b"action=DUNNO\n\n"
        began = time.monotonic()
        assert is_closed(sock)
        assert time.monotonic() - began < WAIT
    assert srv.count("connections_ended", reason="idle_timeout") == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_activity_and_slow_decisions_do_not_count_as_idle(start_server: StartServer) -> None:
    srv = start_server(idle_timeout=60, decision_timeout=600)
    with connect(srv.unix) as sock:
        for _ in range(4):  # 200 s of traffic, each gap under idle_timeout
            assert ask(sock, request()) == b"action=DUNNO\n\n"
            srv.advance(50)
        sock.sendall(request(test_sleep="100"))  # a decision longer than idle_timeout
        srv.advance(100)
        assert read_reply(sock) == b"action=DUNNO\n\n"
        assert ask(sock, request(test_action="OK")) == b"action=OK\n\n"
    assert srv.count("connections_ended", reason="idle_timeout") == 0


def test_read_timeout_bounds_an_unfinished_request(start_server: StartServer,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    srv = start_server(read_timeout=30, idle_timeout=600)
    with connect(srv.unix) as sock:
        data = request()
        sock.sendall(data[:10])
        srv.advance(20)
        assert srv.connections() == 1
        sock.sendall(data[10:20])  # trickling does not extend read_timeout
        srv.advance(20)
        assert is_closed(sock)
    assert srv.count("connections_ended", reason="read_timeout") == 1
    assert any("read_timeout" in r.getMessage() for r in caplog.records)


def test_read_timeout_bounds_a_request_begun_behind_another(
        start_server: StartServer) -> None:
    """Bytes of the next request that came with the last one start its
    read_timeout, not an idle_timeout."""
    srv = start_server(read_timeout=0.3, idle_timeout=60)
    with connect(srv.inet) as sock:
        assert ask(sock, request() + request()[:10]) == b"action=DUNNO\n\n"
        assert is_closed(sock)
    assert srv.count("connections_ended", reason="read_timeout") == 1
    assert srv.count("connections_ended", reason="idle_timeout") == 0


def test_max_connections_refuses_extra(start_server: StartServer,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="policyd")
    srv = start_server(max_connections=2)
    with connect(srv.inet) as one, connect(srv.inet) as two:
        assert ask(one, request()) == b"action=DUNNO\n\n"
        assert ask(two, request()) == b"action=DUNNO\n\n"
        for _ in range(3):
            with connect(srv.inet) as extra:
                assert is_closed(extra)
        assert ask(one, request(test_action="OK")) == b"action=OK\n\n"
    assert srv.count("connections_refused") == 3
    refusals = [r for r in caplog.records if "max_connections" in r.getMessage()]
    assert len(refusals) == 1  # rate-limited
    # Freed slots are usable again.
    assert wait_until(lambda: srv.connections() == 0)
    with connect(srv.inet) as again:
        assert ask(again, request()) == b"action=DUNNO\n\n"


@pytest.mark.parametrize("failure", [{"test_sleep": "5"}, {"test_raise": "store down"}])
@pytest.mark.parametrize("failure_action", ["DUNNO", "disconnect"])
def test_policy_failure(start_server: StartServer, failure: dict[str, str],
                        failure_action: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="policyd")
    srv = start_server(decision_timeout=0.2, failure_action=failure_action)
    with connect(srv.inet) as sock:
        reply = ask(sock, request(**failure))
        if failure_action == "DUNNO":
            assert reply == b"action=DUNNO\n\n"
            assert ask(sock, request(test_action="OK")) == b"action=OK\n\n"
        else:
            assert reply == b""
            assert is_closed(sock)
    lines = [r.getMessage() for r in caplog.records if "reason=policy-failure" in r.getMessage()]
    assert len(lines) == 1
    detail = ('detail="no decision within decision_timeout (0.2s)"' if "test_sleep" in failure
              else 'detail="RuntimeError: store down"')
    assert lines[0].endswith(detail), lines[0]
    action = "disconnect" if failure_action == "disconnect" else "DUNNO"
    assert lines[0].startswith(f"action={action} reason=policy-failure "), lines[0]
    assert "client=192.0.2.1" in lines[0]
    assert srv.count("decisions", reason="policy-failure") == 1


@pytest.mark.parametrize("failure_action", ["DUNNO", "disconnect"])
def test_store_failure_answered_by_the_server(start_server: StartServer,
                                              failure_action: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    """A policy whose stores failed raises PolicyFailure; the server answers
    it as failure_action says, with one warning decision line."""
    caplog.set_level(logging.INFO, logger="policyd")
    srv = start_server(failure_action=failure_action)
    with connect(srv.inet) as sock:
        reply = ask(sock, request(test_store_failure="memcached down"))
        if failure_action == "DUNNO":
            assert reply == b"action=DUNNO\n\n"
            assert ask(sock, request(test_action="OK")) == b"action=OK\n\n"
        else:
            assert reply == b""
            assert is_closed(sock)
    (line,) = [r for r in caplog.records
               if r.name == "policyd.decision" and "reason=test" not in r.getMessage()]
    action = "disconnect" if failure_action == "disconnect" else "DUNNO"
    assert line.levelno == logging.WARNING
    assert line.getMessage().startswith(f"action={action} reason=store-failure client=192.0.2.1 ")
    assert line.getMessage().endswith('detail="memcached down"')


def test_policy_timeout_error_is_not_the_decision_timeout(
        server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    """A TimeoutError of the policy's own (a socket's, say) is reported as
    what it is, not as decision_timeout."""
    caplog.set_level(logging.INFO, logger="policyd")
    with connect(server.inet) as sock:
        assert ask(sock, request(test_raise_timeout="memcached")) == b"action=DUNNO\n\n"
    (line,) = [r.getMessage() for r in caplog.records if "reason=policy-failure" in r.getMessage()]
    assert line.endswith('detail="TimeoutError: memcached"'), line


def test_invalid_action_is_a_policy_failure(server: ServerThread) -> None:
    with connect(server.inet) as sock:
        assert ask(sock, request(test_action="")) == b"action=DUNNO\n\n"
    assert server.count("decisions", reason="policy-failure") == 1


def test_decision_disconnect_closes_without_reply(server: ServerThread) -> None:
    with connect(server.inet) as sock:
        assert ask(sock, request(test_disconnect="1")) == b""
        assert is_closed(sock)


@pytest.mark.parametrize("leave", ["close", "reset"])
def test_peer_leaving_does_not_cut_its_decision_short(start_server: StartServer,
                                                      leave: str) -> None:
    """A peer that leaves while its request is decided (FIN or RST) does not
    cancel the decision (its store writes complete); only the reply is
    dropped."""
    server = start_server(decision_timeout=600)
    with connect(server.inet) as sock:
        sock.sendall(request(test_sleep="30"))
        assert server.policy.started.wait(WAIT)
        if leave == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.advance(10)  # the peer's leaving is seen; the decision goes on
    assert server.policy.decided == 0
    server.advance(20)
    assert server.policy.decided == 1
    assert wait_until(lambda: server.connections() == 0)


def test_decision_logged_as_one_line(server: ServerThread,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="policyd")
    with connect(server.inet) as sock:
        ask(sock, request(test_action="DEFER_IF_PERMIT Greylisted", queue_id="ABC123"))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "policyd.decision"]
    assert line == ('action="DEFER_IF_PERMIT Greylisted" reason=test client=192.0.2.1 '
                    "client_name=- sender=a@example.org recipient=b@example.com delay=- "
                    "queue_id=ABC123")


def test_write_buffer_bound_disconnects_peer_that_never_reads(
        server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    big = request(test_action="OK " + "x" * 4000)  # 4 KB replies fill buffers fast
    with connect(server.unix) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        try:
            for _ in range(5000):  # ~20 MB if never cut off
                sock.sendall(big)
        except OSError:
            pass
        assert wait_until(lambda: server.connections() == 0)
    assert any("does not read" in r.getMessage() for r in caplog.records)


# --- shutdown ---------------------------------------------------------------

def test_graceful_shutdown_finishes_request_in_flight(start_server: StartServer) -> None:
    srv = start_server(shutdown_grace=5)
    with connect(srv.inet) as busy, connect(srv.inet) as idle:
        assert ask(idle, request()) == b"action=DUNNO\n\n"
        srv.policy.started.clear()  # set again when the busy request is decided
        busy.sendall(request(test_action="OK late", test_sleep="0.5"))
        assert srv.policy.started.wait(WAIT)
        address = srv.inet
        done = srv.submit(srv.server.shutdown())
        # The listener closes at once, while the request is still in flight.
        assert wait_until(lambda: _refused(address))
        assert not done.done()
        assert is_closed(idle)  # idle connections do not wait
        assert read_reply(busy) == b"action=OK late\n\n"
        assert is_closed(busy)
        done.result(WAIT)


def _refused(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=WAIT).close()
    except ConnectionRefusedError:
        return True
    return False


def test_shutdown_grace_expiry_cancels(start_server: StartServer) -> None:
    srv = start_server(shutdown_grace=0.2)
    with connect(srv.inet) as sock:
        sock.sendall(request(test_sleep="30"))
        assert srv.policy.started.wait(WAIT)
        began = time.monotonic()
        srv.call(srv.server.shutdown())
        assert time.monotonic() - began < 2
        assert read_reply(sock) == b""


def test_signals_in_process(tmp_path: Path) -> None:
    """SIGHUP -> policy.reload(); SIGTERM -> graceful stop (main thread loop)."""
    policy = ScriptedPolicy()
    config = PolicydConfig(listen=(Endpoint("unix", path=str(tmp_path / "s.sock")),))

    async def scenario() -> None:
        server = PolicyServer(config, policy)
        await server.start()
        server.install_signal_handlers()
        try:
            serving = asyncio.create_task(server.serve_forever())
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(500):
                if policy.reloads:
                    break
                await asyncio.sleep(0.01)
            assert policy.reloads == 1
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(serving, WAIT)
        finally:
            server.remove_signal_handlers()

    asyncio.run(scenario())
    assert not (tmp_path / "s.sock").exists()


def test_reload_while_stopping_is_ignored(tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    """A SIGHUP during shutdown_grace must not start a reload of a policy
    about to be closed."""
    caplog.set_level(logging.INFO, logger="policyd")
    policy = ScriptedPolicy()
    config = PolicydConfig(listen=(Endpoint("unix", path=str(tmp_path / "s.sock")),))

    async def scenario() -> None:
        server = PolicyServer(config, policy)
        await server.start()
        # SIGTERM and SIGHUP handled in one loop iteration: the stop wins.
        server._on_stop_signal(signal.SIGTERM)
        server.reload()
        await server.shutdown()
        server.reload()

    asyncio.run(scenario())
    # Both refused when asked (the line), so no reload was ever started.
    assert caplog.text.count("stopping; SIGHUP ignored") == 2
    assert policy.reloads == 0


def test_daemon_thread_calls_deliver_results_and_any_error() -> None:
    async def scenario() -> None:
        results: list[int] = []
        await _in_daemon_thread(lambda: results.append(1), "t")
        assert results == [1]
        with pytest.raises(ValueError, match="bad"):
            await _in_daemon_thread(lambda: int("bad"), "t")
        # A Future refuses StopIteration itself: it must still end the wait.
        with pytest.raises(RuntimeError, match="StopIteration"):
            await _in_daemon_thread(lambda: next(iter([])), "t")

    asyncio.run(asyncio.wait_for(scenario(), WAIT))


def test_request_before_half_close_is_answered(server: ServerThread) -> None:
    """A client may send its request and shut down its sending side (as
    ``nc -N`` does): the reply still comes, then the connection closes."""
    with connect(server.inet) as sock:
        sock.sendall(request(test_action="OK half"))
        sock.shutdown(socket.SHUT_WR)
        assert read_reply(sock) == b"action=OK half\n\n"
        assert is_closed(sock)


def test_decision_deadlines_apply_to_their_own_decisions(start_server: StartServer) -> None:
    """One slow decision times out while quick ones on other connections
    (which started later and finished) are unaffected, and a later slow one
    gets its own full decision_timeout."""
    srv = start_server(decision_timeout=30, failure_action="DUNNO")
    with connect(srv.unix) as slow, connect(srv.unix) as quick:
        slow.sendall(request(test_sleep="500"))
        for i in range(5):
            assert ask(quick, request(test_action=f"OK {i}")) == f"action=OK {i}\n\n".encode()
        srv.advance(30)
        assert read_reply(slow) == b"action=DUNNO\n\n"  # the timeout's answer
        slow.sendall(request(test_action="OK", test_sleep="20"))
        srv.advance(20)
        assert read_reply(slow) == b"action=OK\n\n"
    assert srv.count("decisions", reason="policy-failure") == 1
