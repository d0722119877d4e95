"""The memcache core without any I/O, as h11 is tested: commands framed
(capture), replies fed whole, byte by byte and with trailing data, then
parsed (replay), and the attempt rules driven by hand."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest

from memtable import clock
from memtable.endpoint import parse_endpoint
from memtable.errors import ProtocolError, ServerUnavailableError
from memtable.mcproto import EXCHANGING, GAVE_UP, READY, AttemptFailed, McCore, Request

SPEC = "inet:127.0.0.1:11211"


def core(**overrides: Any) -> McCore:
    settings: dict[str, Any] = {"timeout": 2.0, "max_try": 3, "retry_pause": 0.5,
                                "line_size_limit": 1024, "data_size_limit": 10240,
                                "name": "t.cf"}
    settings.update(overrides)
    return McCore(parse_endpoint(SPEC), **settings)


@pytest.fixture
def frozen(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    now = [1000.0]
    monkeypatch.setattr(clock, "monotonic", lambda: now[0])

    def shift(seconds: float) -> None:
        now[0] += seconds
    return shift


def exchange(mc: McCore, request: Request[Any], chunks: list[bytes]) -> Any:
    """One successful attempt: the reply arrives in ``chunks``."""
    attempts = mc.attempts(request)
    assert attempts.next_attempt() == 0.0
    attempts.connected()
    replies = [attempts.receive(chunk) for chunk in chunks]
    assert replies == [None] * (len(chunks) - 1) + [b"".join(chunks)]
    result = mc.replay(request, b"".join(chunks))
    attempts.succeeded()
    return result


# -- framing: pymemcache's commands, captured ------------------------------------


def test_commands_are_framed_by_pymemcache() -> None:
    mc = core()
    assert mc.capture(mc.get(b"k")) == b"get k\r\n"
    assert mc.capture(mc.gets(b"k")) == b"gets k\r\n"
    assert mc.capture(mc.set(b"k", b"v\r\n", 7, 60)) == b"set k 7 60 3\r\nv\r\n\r\n"
    assert mc.capture(mc.delete(b"k")) == b"delete k\r\n"
    assert mc.capture(mc.delete_unchanged(b"k", 42)) == b"cas k 0 2592001 0 42\r\n\r\n"
    [many] = mc.get_many([b"a", b"b", b"a"])
    assert mc.capture(many) == b"get a b\r\n"
    [deletes] = mc.delete_many([b"a", b"b"])
    assert mc.capture(deletes) == b"delete a\r\ndelete b\r\n"


def test_a_batch_of_sets_with_their_own_flags_is_one_write() -> None:
    mc = core()
    [batch] = mc.set_many([(b"a", b"1", 1, 0), (b"b", b"2", 2, 60), (b"c", b"3", 1, 0),
                           (b"a", b"4", 1, 0)])
    assert batch.replies == 3  # the last value of a wins
    # One pymemcache set_many per (flags, exptime), in the order they came.
    assert mc.capture(batch) == (b"set b 2 60 1\r\n2\r\n"
                                 b"set c 1 0 1\r\n3\r\nset a 1 0 1\r\n4\r\n")
    assert exchange(mc, batch, [b"STORED\r\n" * 3]) is None
    attempts = mc.attempts(batch)
    attempts.next_attempt()
    attempts.connected()
    reply = attempts.receive(b"STORED\r\nSTORED\r\nNOT_STORED\r\n")
    assert reply is not None
    with pytest.raises(AttemptFailed, match="update failed: NOT_STORED"):
        mc.replay(batch, reply)


def test_one_key_or_item_is_the_single_command() -> None:
    """The tables' usual lookup and update (one key, one item) go through
    get_many and set_many: each is one plain command, parsed as the
    batch's (a dict of the hits; STORED or AttemptFailed)."""
    mc = core()
    [one] = mc.get_many([b"k"])
    assert mc.capture(one) == b"get k\r\n"
    assert exchange(mc, one, [b"VALUE k 3 1\r\nv\r\nEND\r\n"]) == {b"k": (3, b"v")}
    assert exchange(mc, one, [b"END\r\n"]) == {}
    [item] = mc.set_many([(b"k", b"v", 3, 60)])
    assert mc.capture(item) == b"set k 3 60 1\r\nv\r\n"
    assert exchange(mc, item, [b"STORED\r\n"]) is None
    with pytest.raises(AttemptFailed, match="update failed: NOT_STORED"):
        exchange(mc, item, [b"NOT_STORED\r\n"])
    with pytest.raises(ValueError):
        mc.get_many([b"a b"])
    with pytest.raises(ValueError):
        mc.set_many([(b"k", b"v", -1, 0)])


def test_batches_are_bounded() -> None:
    mc = core(pipeline_max_commands=2)
    assert [r.replies for r in mc.set_many([(b"k%d" % i, b"v", 0, 0) for i in range(5)])] \
        == [2, 2, 1]
    assert [r.replies for r in mc.delete_many([b"k%d" % i for i in range(3)])] == [2, 1]
    assert mc.set_many([]) == [] and mc.get_many([]) == [] and mc.delete_many([]) == []


@pytest.mark.parametrize("key", [b"", b"a b", b"nul\x00", b"k" * 251])
def test_invalid_arguments_are_value_errors(key: bytes) -> None:
    mc = core()
    for build in (lambda: mc.get(key), lambda: mc.get_many([b"ok", key]),
                  lambda: mc.set(key, b"v", 0, 0), lambda: mc.delete_many([key])):
        with pytest.raises(ValueError, match="not a valid memcache key"):
            build()
    with pytest.raises(ValueError, match="data_size_limit"):
        mc.set(b"k", b"x" * 10241, 0, 0)
    with pytest.raises(ValueError, match="out of range"):
        mc.set_many([(b"k", b"v", 2**32, 0)])
    with pytest.raises(ValueError, match="cas unique -1 out of range"):
        mc.delete_unchanged(b"k", -1)


# -- replies: whole, byte by byte, trailing data -----------------------------------

HIT = b"VALUE k 5 3\r\nabc\r\nEND\r\n"


def test_a_reply_fed_whole() -> None:
    mc = core()
    assert exchange(mc, mc.get(b"k"), [HIT]) == (5, b"abc")
    assert exchange(mc, mc.get(b"k"), [b"END\r\n"]) is None
    assert exchange(mc, mc.gets(b"k"), [b"VALUE k 5 3 99\r\nabc\r\nEND\r\n"]) == (5, b"abc", 99)
    assert exchange(mc, mc.delete(b"k"), [b"NOT_FOUND\r\n"]) is False
    assert exchange(mc, mc.delete_unchanged(b"k", 1), [b"EXISTS\r\n"]) is False
    assert exchange(mc, mc.set(b"k", b"v", 0, 0), [b"STORED\r\n"]) is None


def test_a_reply_fed_byte_by_byte() -> None:
    mc = core()
    assert exchange(mc, mc.get(b"k"), [HIT[i:i + 1] for i in range(len(HIT))]) == (5, b"abc")
    [many] = mc.get_many([b"k", b"j"])
    reply = HIT[:-5] + b"VALUE j 0 0\r\n\r\nEND\r\n"
    assert exchange(mc, many, [reply[i:i + 1] for i in range(len(reply))]) \
        == {b"k": (5, b"abc"), b"j": (0, b"")}


def test_trailing_data_is_a_protocol_error() -> None:
    mc = core()
    attempts = mc.attempts(mc.get(b"k"))
    attempts.next_attempt()
    attempts.connected()
    with pytest.raises(ProtocolError, match="unexpected data after the reply"):
        attempts.receive(HIT + b"END\r\n")
    assert attempts.failed(ProtocolError("x")) and attempts.state == READY


def test_end_of_file_before_the_reply_is_complete() -> None:
    mc = core()
    attempts = mc.attempts(mc.get(b"k"))
    attempts.next_attempt()
    attempts.connected()
    assert attempts.receive(HIT[:10]) is None
    with pytest.raises(AttemptFailed, match="connection closed by server") as info:
        attempts.receive(b"")
    assert attempts.failed(info.value) and attempts.state == READY


# -- the attempt rules ----------------------------------------------------------------


def fail_every_attempt(mc: McCore, request: Request[Any], exc: Exception) -> list[float]:
    attempts = mc.attempts(request)
    pauses = []
    while (pause := attempts.next_attempt()) is not None:
        pauses.append(pause)
        attempts.connected()
        assert attempts.state == EXCHANGING
        assert attempts.failed(exc)
    error = attempts.give_up()
    assert attempts.state == GAVE_UP
    raise error


def test_max_try_attempts_retry_pause_apart() -> None:
    mc = core()
    attempts = mc.attempts(mc.get(b"k"))
    pauses = []
    while (pause := attempts.next_attempt()) is not None:
        pauses.append(pause)
        attempts.connected()
        attempts.failed(ProtocolError("reply line not terminated by CRLF: 'x'"))
    assert pauses == [0.0, 0.5, 0.5]
    error = attempts.give_up()
    assert isinstance(error, ProtocolError)
    assert str(error) == (f"memcache server {SPEC} (t.cf): reply line not terminated by "
                          "CRLF: 'x' (after 3 attempts)")


def test_no_further_attempt_once_connecting_fails() -> None:
    mc = core()
    attempts = mc.attempts(mc.get(b"k"))
    assert attempts.next_attempt() == 0.0
    attempts.connect_failed(ConnectionRefusedError(111, "Connection refused"))
    assert attempts.next_attempt() is None
    error = attempts.give_up()
    assert isinstance(error, ServerUnavailableError)
    assert str(error).endswith(": connect: Connection refused (after 1 attempt)")
    assert mc.down_until == 0.0  # refused: not held down


def test_timeouts_and_failed_lookups_hold_the_server_down(
        frozen: Callable[[float], None]) -> None:
    mc = core(down_hold_seconds=5.0)
    with pytest.raises(ServerUnavailableError, match=r"timeout after 2 s \(after 3 attempts\)"):
        fail_every_attempt(mc, mc.get(b"k"), TimeoutError())
    frozen(4.0)
    with pytest.raises(ServerUnavailableError, match=r"held down for 1\.0 s more after: "
                                                     r"timeout after 2 s \(after 3 attempts\)"):
        mc.attempts(mc.set(b"k", b"v", 0, 0))
    frozen(1.0)
    attempts = mc.attempts(mc.get(b"k"))  # the hold-down is over
    attempts.next_attempt()
    attempts.connect_failed(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert "host lookup failed: Name or service not known" in str(attempts.give_up())
    with pytest.raises(ServerUnavailableError, match="held down"):
        mc.attempts(mc.get(b"k"))


def test_a_refused_write_is_not_retried_when_a_backup_has_it() -> None:
    refusal = AttemptFailed("update failed: NOT_STORED", protocol=False)
    with_backup = core(fallback="lmdb:/x")
    with pytest.raises(ServerUnavailableError, match=r"NOT_STORED \(after 1 attempt\)"):
        fail_every_attempt(with_backup, with_backup.set(b"k", b"v", 0, 0), refusal)
    assert with_backup.writable is False and with_backup.outage.active is False
    alone = core()
    with pytest.raises(ServerUnavailableError, match=r"NOT_STORED \(after 3 attempts\)"):
        fail_every_attempt(alone, alone.set(b"k", b"v", 0, 0), refusal)


def test_a_bug_is_not_a_failure_of_the_server() -> None:
    mc = core()
    attempts = mc.attempts(mc.get(b"k"))
    attempts.next_attempt()
    attempts.connected()
    assert attempts.failed(KeyError("bug")) is False
    assert attempts.next_attempt() is None
