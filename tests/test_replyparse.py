"""ReplyGuard: memcache replies fed whole, byte by byte, split at every
position, and with trailing data."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from memtable.errors import ProtocolError
from memtable.replyparse import Kind, ReplyGuard

LINE = 64
DATA = 32


def chunkings(data: bytes) -> Iterator[list[bytes]]:
    """The same bytes as one chunk, byte by byte, and in two at every split."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def guard(kind: Kind = "get", replies: int = 1,
          keys: tuple[bytes, ...] | None = None) -> ReplyGuard:
    g = ReplyGuard(LINE, DATA)
    g.start(kind, replies=replies, keys=keys)
    return g


VALID: list[tuple[Kind, int, bytes]] = [
    ("get", 1, b"END\r\n"),
    ("get", 1, b"VALUE k 5 3\r\nabc\r\nEND\r\n"),
    # Data that looks like protocol lines is still data.
    ("get", 1, b"VALUE k 0 7\r\nEND\r\n\r\n\r\nEND\r\n"),
    ("get", 1, b"VALUE k 0 0\r\n\r\nEND\r\n"),
    ("get", 1, b"VALUE k 4294967295 3\r\n\x00\r\n\r\nEND\r\n"),
    ("get", 1, b"VALUE k 0 1\r\na\r\nVALUE k2 1 2\r\nbb\r\nEND\r\n"),
    ("get", 1, b"VALUE k 0 %d\r\n" % DATA + b"d" * DATA + b"\r\nEND\r\n"),
    ("get", 1, b"ERROR\r\n"),
    ("get", 1, b"SERVER_ERROR out of memory\r\n"),
    ("get", 1, b"VALUE k 0 1\r\na\r\nCLIENT_ERROR oops\r\n"),
    ("storage", 1, b"STORED\r\n"),
    ("storage", 1, b"NOT_STORED\r\n"),
    ("storage", 1, b"SERVER_ERROR object too large for cache\r\n"),
    ("storage", 3, b"STORED\r\nSTORED\r\nSTORED\r\n"),
    ("storage", 3, b"STORED\r\nSERVER_ERROR out of memory\r\nSTORED\r\n"),
    ("delete", 1, b"DELETED\r\n"),
    ("delete", 1, b"NOT_FOUND\r\n"),
    ("delete", 1, b"CLIENT_ERROR bad command line format\r\n"),
    ("gets", 1, b"END\r\n"),
    ("gets", 1, b"VALUE k 5 3 18446744073709551615\r\nabc\r\nEND\r\n"),
    ("cas", 1, b"STORED\r\n"),
    ("cas", 1, b"EXISTS\r\n"),
    ("cas", 1, b"NOT_FOUND\r\n"),
    ("cas", 1, b"SERVER_ERROR out of memory\r\n"),
    # A line of exactly line_size_limit - 1 bytes of text (Postfix's bound).
    ("get", 1, b"VALUE " + b"k" * (LINE - 1 - len(b"VALUE  0 1")) + b" 0 1\r\nx\r\nEND\r\n"),
]


@pytest.mark.parametrize(("kind", "replies", "reply"), VALID)
def test_valid_replies_complete_exactly_at_their_last_byte(
        kind: Kind, replies: int, reply: bytes) -> None:
    for chunks in chunkings(reply):
        g = guard(kind, replies)
        for i, chunk in enumerate(chunks):
            assert not g.done, chunks
            g.feed(chunk)
            assert g.done == (i == len(chunks) - 1), chunks


@pytest.mark.parametrize(("kind", "replies", "reply"), VALID)
@pytest.mark.parametrize("extra", [b"X", b"END\r\n", b"\r\n"])
def test_trailing_data_is_a_protocol_error(kind: Kind, replies: int, reply: bytes,
                                           extra: bytes) -> None:
    for chunks in chunkings(reply + extra):
        g = guard(kind, replies)
        with pytest.raises(ProtocolError, match="after the reply"):
            for chunk in chunks:
                g.feed(chunk)


INVALID: list[tuple[Kind, bytes, str]] = [
    ("get", b"HELLO\r\n", "unexpected reply to get"),
    ("get", b"STORED\r\n", "unexpected reply"),
    ("get", b"DELETED\r\n", "unexpected reply"),
    ("get", b"ERRORS\r\n", "unexpected reply"),
    ("get", b"\r\n", "unexpected reply"),
    ("get", b"END\n", "CRLF"),
    ("get", b"\n", "CRLF"),
    ("get", b"END\r\r\n", "unexpected reply"),
    ("get", b"VALUE k 0 -1\r\n", "bad length"),
    ("get", b"VALUE k 0 abc\r\n", "bad length"),
    ("get", b"VALUE k 0 +3\r\n", "bad length"),
    ("get", b"VALUE k 0 \r\n", "bad length"),
    ("get", b"VALUE k 0 %d\r\n" % (DATA + 1), "over data_size_limit"),
    ("get", b"VALUE k 0 1073741824\r\n", "over data_size_limit"),
    ("get", b"VALUE k 0 99999999999999999999999999\r\n", "over data_size_limit"),
    ("get", b"VALUE k 0\r\n", "malformed VALUE"),
    ("get", b"VALUE k 0 1 7\r\n", "malformed VALUE"),
    ("get", b"VALUE  k 0 1\r\n", "malformed VALUE"),
    ("get", b"VALUE k x 1\r\n", "bad flags"),
    ("get", b"VALUE k 4294967296 1\r\n", "bad flags"),
    ("get", b"VALUE k 0 3\r\nabcX\r\nEND\r\n", "not followed by CRLF"),
    ("get", b"VALUE k 0 3\r\nabc\rXEND\r\n", "not followed by CRLF"),
    ("get", b"VALUE k 0 3\r\nabc\n\rEND\r\n", "not followed by CRLF"),
    ("get", b"X" * LINE + b"\r\n", "longer than line_size_limit"),
    ("storage", b"END\r\n", "unexpected reply to storage"),
    ("storage", b"EXISTS\r\n", "unexpected reply"),
    ("storage", b"STORED\n", "CRLF"),
    ("delete", b"STORED\r\n", "unexpected reply to delete"),
    ("delete", b"VALUE k 0 1\r\na\r\nEND\r\n", "unexpected reply"),
    ("delete", b"EXISTS\r\n", "unexpected reply to delete"),
    ("gets", b"VALUE k 0 1\r\na\r\nEND\r\n", "malformed VALUE"),  # no cas unique
    ("gets", b"VALUE k 0 1 x\r\n", "bad cas unique"),
    ("gets", b"VALUE k 0 1 18446744073709551616\r\n", "bad cas unique"),
    ("gets", b"VALUE k 0 1 -1\r\n", "bad cas unique"),
    ("get", b"VALUE k 0 1 1\r\n", "malformed VALUE"),
    ("cas", b"DELETED\r\n", "unexpected reply to cas"),
    ("cas", b"NOT_STORED\r\n", "unexpected reply to cas"),
]


@pytest.mark.parametrize(("kind", "reply", "message"), INVALID)
def test_invalid_replies_raise_however_they_arrive(kind: Kind, reply: bytes,
                                                   message: str) -> None:
    for chunks in chunkings(reply):
        g = guard(kind)
        with pytest.raises(ProtocolError, match=message):
            for chunk in chunks:
                g.feed(chunk)
        assert not g.done
        # Broken until the next start().
        with pytest.raises(ProtocolError):
            g.feed(b"END\r\n")


def test_value_for_a_key_not_asked_for() -> None:
    g = guard(keys=(b"a", b"b"))
    with pytest.raises(ProtocolError, match="not asked for"):
        g.feed(b"VALUE c 0 1\r\n")
    g = guard(keys=(b"a", b"b"))
    g.feed(b"VALUE b 0 1\r\nx\r\nVALUE a 0 0\r\n\r\nEND\r\n")
    assert g.done


def test_oversized_value_is_refused_from_its_header_alone() -> None:
    # No data follows: the header is enough, so nothing of it is ever read.
    g = guard()
    with pytest.raises(ProtocolError, match="over data_size_limit=32"):
        g.feed(b"VALUE k 0 1073741824\r\n")


def test_endless_line_is_refused_once_it_passes_the_limit() -> None:
    g = guard()
    g.feed(b"x" * LINE)  # may still end with CR LF: not yet too long
    with pytest.raises(ProtocolError, match="line_size_limit=64"):
        g.feed(b"x")
    g = guard()
    for _ in range(LINE):
        g.feed(b"x")
    with pytest.raises(ProtocolError, match="line_size_limit"):
        g.feed(b"x")


def test_line_limit_is_postfix_bound_text_plus_cr() -> None:
    ok = ReplyGuard(line_size_limit=4, data_size_limit=1)
    ok.start("get")
    ok.feed(b"END\r\n")
    assert ok.done
    short = ReplyGuard(line_size_limit=3, data_size_limit=1)
    short.start("get")
    with pytest.raises(ProtocolError, match="line_size_limit=3"):
        short.feed(b"END\r\n")


def test_bytes_before_any_command_are_trailing_data() -> None:
    g = ReplyGuard(LINE, DATA)
    assert g.done
    with pytest.raises(ProtocolError, match="after the reply"):
        g.feed(b"END\r\n")


def test_start_resets_after_an_error_and_empty_feed_is_a_no_op() -> None:
    g = guard()
    with pytest.raises(ProtocolError):
        g.feed(b"junk\r\n")
    g.start("delete")
    g.feed(b"")
    assert not g.done
    g.feed(b"DELETED\r\n")
    assert g.done


def test_reply_count_counts_pipelined_storage_replies() -> None:
    g = guard("storage", replies=2)
    g.feed(b"STORED\r\n")
    assert not g.done
    g.feed(b"STORED\r\n")
    assert g.done


@pytest.mark.parametrize(("args", "kwargs"), [
    (("fetch",), {}),
    (("get",), {"replies": 2}),
    (("storage",), {"replies": 0}),
])
def test_bad_start_arguments(args: tuple[str], kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ReplyGuard(LINE, DATA).start(*args, **kwargs)  # type: ignore[arg-type]


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        ReplyGuard(0, 1)
    with pytest.raises(ValueError):
        ReplyGuard(1, 0)
