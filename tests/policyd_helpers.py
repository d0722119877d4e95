"""Shared by the policyd server and CLI tests: a scripted Policy (our own
interface, implemented for tests), a server running in a thread with its
own event loop, and a blocking policy-protocol client with timeouts."""

from __future__ import annotations

import asyncio
import os
import pathlib
import socket
import threading
import time
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from policyd.api import Decision, PolicyFailure
from policyd.config import PolicydConfig
from policyd.metrics import Metrics
from policyd.server import PolicyServer
from tests.wait import WAIT

T = TypeVar("T")


class ScriptedPolicy:
    """A Policy steered by request attributes the real policy ignores:
    test_action=ACTION, test_sleep=SECONDS, test_raise=MESSAGE,
    test_raise_timeout=MESSAGE (TimeoutError), test_store_failure=MESSAGE
    (PolicyFailure), test_disconnect=1."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.reloads = 0
        self.closed = False
        self.started = threading.Event()  # a decision has begun
        self.decided = 0                  # decisions that ran to their end

    async def decide(self, request: Mapping[str, str]) -> Decision:
        self.seen.append(dict(request))
        self.started.set()
        if "test_sleep" in request:
            await asyncio.sleep(float(request["test_sleep"]))
        if "test_raise" in request:
            raise RuntimeError(request["test_raise"])
        if "test_raise_timeout" in request:
            raise TimeoutError(request["test_raise_timeout"])
        if "test_store_failure" in request:
            raise PolicyFailure("store-failure", request["test_store_failure"])
        self.decided += 1
        if request.get("test_disconnect"):
            return Decision("DUNNO", "test", disconnect=True)
        return Decision(request.get("test_action", "DUNNO"), "test")

    def reload(self) -> None:
        self.reloads += 1
        hang = os.environ.get("TEST_RELOAD_HANGS")
        if hang:
            # A whitelist on a network filesystem that stopped answering.
            pathlib.Path(hang).touch()
            threading.Event().wait()

    async def aclose(self) -> None:
        self.closed = True


def build_policy(config: PolicydConfig, metrics: object = None) -> ScriptedPolicy:
    """Stand-in for policyd.greylist.build_policy in CLI subprocess tests.
    With TEST_BUILD_GATE=PATH it creates PATH.started, then waits (at most
    WAIT) for PATH to exist: a start that reads large files."""
    gate = os.environ.get("TEST_BUILD_GATE")
    if gate:
        pathlib.Path(gate + ".started").touch()
        deadline = time.monotonic() + WAIT
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return ScriptedPolicy()


def request(**attrs: str) -> bytes:
    lines = ["request=smtpd_access_policy", "protocol_state=RCPT",
             "client_address=192.0.2.1", "sender=a@example.org",
             "recipient=b@example.com"]
    lines += [f"{name}={value}" for name, value in attrs.items()]
    return ("\n".join(lines) + "\n\n").encode()


class SteppedLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves forward (ServerThread.advance):
    its timers (asyncio.timeout, asyncio.sleep) then fire as if that much
    time had passed, with no wall-clock margin to miss."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset


class ServerThread:
    """A PolicyServer on its own event loop in a daemon thread, reporting
    to Metrics (not served: count() reads them)."""

    def __init__(self, config: PolicydConfig, policy: ScriptedPolicy) -> None:
        self.policy = policy
        self.loop = SteppedLoop()
        self.metrics = Metrics()
        self.server = PolicyServer(config, policy, metrics=self.metrics)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = WAIT) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def advance(self, seconds: float) -> None:
        """Move the server's clock forward.  What the clients sent before
        (on a UNIX socket: in the server's receive queue once sendall()
        returned) is handled first, at the old time; the timers due at the
        new time have fired when this returns."""
        async def step() -> None:
            await _loop_turns()
            self.loop.offset += seconds
            await _loop_turns()
        self.call(step())

    def count(self, counter: str, **labels: str) -> float:
        """The counter ``policyd_<counter>_total`` as a scrape shows it,
        summed over the label values not given."""
        name = f"policyd_{counter}_total"
        return float(sum(sample.value for metric in self.metrics.registry.collect()
                         for sample in metric.samples
                         if sample.name == name and labels.items() <= sample.labels.items()))

    def connections(self) -> int:
        async def count() -> int:
            return self.server.active_connections
        return self.call(count())

    def stop(self) -> None:
        if self.thread.is_alive():
            self.call(self.server.shutdown(), timeout=WAIT + 5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(WAIT)
        self.loop.close()

    @property
    def inet(self) -> tuple[str, int]:
        return next(a for a in self.server.addresses if isinstance(a, tuple))[:2]

    @property
    def unix(self) -> str:
        return next(a for a in self.server.addresses if isinstance(a, str))


async def _loop_turns() -> None:
    # Bytes read -> the connection's task woken -> it parses and waits
    # again, or: a timer fires -> the task it cancels runs: a few turns.
    for _ in range(5):
        await asyncio.sleep(0)


def connect(address: tuple[str, int] | str) -> socket.socket:
    if isinstance(address, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(WAIT)
        sock.connect(address)
    else:
        sock = socket.create_connection(address, timeout=WAIT)
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """One reply (up to the empty line), or what came before EOF."""
    buf = b""
    while b"\n\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    return buf


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    buf = b""
    while buf.count(b"\n\n") < count:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [part + b"\n\n" for part in buf.split(b"\n\n")[:-1]]


def ask(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return read_reply(sock)


def is_closed(sock: socket.socket) -> bool:
    """True when the server closed (EOF or reset) with nothing more to read."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def wait_until(predicate: Any, timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
