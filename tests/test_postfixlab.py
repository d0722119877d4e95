"""Self-tests of the real-Postfix harness (tests/postfixlab.py): a private
instance consults a tiny in-test policy server, keeps accepted mail on hold
for inspection, and postscreen writes its cache into a real memcached."""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest

from tests.conftest import Memcached
from tests.postfixcf import write_aged
from tests.postfixlab import (
    PostfixError,
    PostfixFactory,
    PostfixInstance,
    requires_postfix,
    run_postmap,
    smtp_rcpt,
    smtp_send,
    smtp_session,
)

pytestmark = pytest.mark.postfix

# The harness's fixtures, made visible to this module.


class PolicyStub:
    """Minimal SMTPD policy server on a loopback port (asyncio in a thread):
    records every request and answers each with ``action=<action>``."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.requests: list[dict[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        fut: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self.loop)
        self.server = fut.result(5)
        self.port: int = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attrs: dict[str, str] = {}
        try:
            while line := await asyncio.wait_for(reader.readline(), 30):
                text = line.decode().rstrip("\n")
                if text:
                    name, _, value = text.partition("=")
                    attrs[name] = value
                    continue
                self.requests.append(attrs)
                attrs = {}
                writer.write(f"action={self.action}\n\n".encode())
                await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def policy_stub() -> Iterator[type[PolicyStub]]:
    stubs: list[PolicyStub] = []

    class Made(PolicyStub):
        def __init__(self, action: str) -> None:
            super().__init__(action)
            stubs.append(self)

    yield Made
    for stub in stubs:
        stub.close()


def _policy_main_cf(port: int) -> list[str]:
    return [f"smtpd_recipient_restrictions = reject_unauth_destination, "
            f"check_policy_service inet:127.0.0.1:{port}"]


def test_policy_defer_if_permit_gives_450(postfix_instance: PostfixFactory,
                                          policy_stub: type[PolicyStub]) -> None:
    stub = policy_stub("DEFER_IF_PERMIT test greylisted")
    pf = postfix_instance(_policy_main_cf(stub.port))
    reply = smtp_rcpt(pf.port, "sender@client.example", "user@example.com")
    assert reply.code == 450
    assert re.match(r"4\.\d+\.\d+ ", reply.text), reply.text
    assert reply.text.endswith("test greylisted")
    [req] = stub.requests
    assert req["request"] == "smtpd_access_policy"
    assert req["protocol_state"] == "RCPT"
    assert req["recipient"] == "user@example.com"
    assert req["sender"] == "sender@client.example"
    assert req["client_address"] == "127.0.0.1"


def test_policy_prepend_header_is_in_queued_message(postfix_instance: PostfixFactory,
                                                    policy_stub: type[PolicyStub]) -> None:
    stub = policy_stub("PREPEND X-Test: yes")
    pf = postfix_instance(_policy_main_cf(stub.port))
    reply = smtp_send(pf.port, "sender@client.example", ["user@example.com"], "hello\r\n")
    assert reply.code == 250, reply
    assert reply.queue_id
    entry = pf.wait_queued(reply.queue_id)
    assert entry["queue_name"] == "hold"  # kept for inspection, never delivered
    assert "X-Test: yes" in pf.headers(reply.queue_id)
    assert "hello" in pf.message(reply.queue_id)


def test_unauth_destination_is_refused_before_policy(postfix_instance: PostfixFactory,
                                                     policy_stub: type[PolicyStub]) -> None:
    stub = policy_stub("DUNNO")
    pf = postfix_instance(_policy_main_cf(stub.port))
    # 127.0.0.1 is in mynetworks, but smtpd_recipient_restrictions here
    # begin with reject_unauth_destination, which ignores mynetworks.
    reply = smtp_rcpt(pf.port, "sender@client.example", "user@elsewhere.example")
    assert reply.code == 554
    assert "Relay access denied" in reply.text
    assert stub.requests == []


def test_postscreen_pass_writes_cache_entry_to_memcached(
        postfix_instance: PostfixFactory, memcached: Memcached) -> None:
    ps_cf = f"memcache = {memcached.spec}\nkey_format = postscreen:%s\nttl = 86400\n"
    pf = postfix_instance(["postscreen_cache_map = memcache:$config_directory/ps.cf"],
                          postscreen=True, files={"ps.cf": ps_cf})
    assert pf.postscreen_port is not None
    before = int(time.time())
    # Waits for the whole greeting (postscreen_greet_wait = 1s), then talks.
    with smtp_session(pf.postscreen_port) as client:
        code, _ = client.mail("sender@client.example")
        assert code == 250
        code, _ = client.rcpt("user@example.com")
        assert code == 250
    pf.wait_log(r"PASS NEW \[127\.0\.0\.1\]")
    entry = memcached.meta("postscreen:127.0.0.1")
    assert entry is not None
    fields = str(entry["value"]).split(";")
    assert len(fields) == 5 and all(f.isdigit() for f in fields), entry
    # pregreet passed: expires after postscreen_greet_ttl (1d); the other
    # tests (dnsbl, pipelining, non_smtp, bare_newline) are disabled: 1.
    assert before + 86400 <= int(fields[0]) <= int(time.time()) + 86400 + 1
    assert fields[1:] == ["1", "1", "1", "1"]
    assert entry["flags"] == 0
    assert 86400 - 5 <= int(str(entry["ttl"])) <= 86400


@requires_postfix
def test_start_failure_reports_maillog() -> None:
    pf = PostfixInstance(["inet_protocols = bogus"])
    try:
        with pytest.raises(PostfixError, match="inet_protocols"):
            pf.start()
    finally:
        pf.stop()
        pf.remove()


def test_postmap_private_config(postmap_config: Path, memcached: Memcached,
                                tmp_path: Path) -> None:
    cf = tmp_path / "t.cf"
    write_aged(cf, f"memcache = {memcached.spec}\nkey_format = lab:%s\n")
    memcached.raw(b"set lab:k 0 0 1\r\nv\r\n")
    r = run_postmap(postmap_config, "-q", "k", f"memcache:{cf}")
    assert (r.returncode, r.stdout) == (0, b"v\n")
    r = run_postmap(postmap_config, "-q", "-", f"memcache:{cf}", input=b"k\nmissing\n")
    assert (r.returncode, r.stdout) == (0, b"k\tv\n")
    # Warnings come back on stderr (and stay out of syslog).
    r = run_postmap(postmap_config, "-s", f"memcache:{cf}")
    assert b"first/next support requires backup database" in r.stderr
