"""policyd.protocol: the pure SMTPD policy parser, fed whole, byte by byte,
at every split point, with trailing data, and at every bound."""

from __future__ import annotations

import pytest

from policyd import limits
from policyd.errors import PolicydError, PolicyProtocolError
from policyd.protocol import PolicyParser, Request, format_reply

REQ = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
       b"client_address=192.0.2.1\nclient_name=mx.example.com\n"
       b"sender=a@example.org\nrecipient=b@example.com\nqueue_id=\n"
       b"helo_name=mx.example.com\nsize=1234\n\n")
ATTRS = {
    "request": "smtpd_access_policy", "protocol_state": "RCPT", "protocol_name": "ESMTP",
    "client_address": "192.0.2.1", "client_name": "mx.example.com",
    "sender": "a@example.org", "recipient": "b@example.com", "queue_id": "",
    "helo_name": "mx.example.com", "size": "1234",
}


def feed_all(parser: PolicyParser, chunks: list[bytes]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for chunk in chunks:
        out.extend(r.attrs for r in parser.feed(chunk))
    return out


def build(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines) + b"\n"


def test_whole_request() -> None:
    parser = PolicyParser()
    assert parser.feed(REQ) == [Request(ATTRS)]
    assert parser.buffered == 0


def test_byte_by_byte() -> None:
    parser = PolicyParser()
    got = feed_all(parser, [REQ[i:i + 1] for i in range(len(REQ))])
    assert got == [ATTRS]
    assert parser.buffered == 0


@pytest.mark.parametrize("data", [REQ, REQ + REQ])
def test_every_split_point(data: bytes) -> None:
    for cut in range(len(data) + 1):
        parser = PolicyParser()
        assert feed_all(parser, [data[:cut], data[cut:]]) == [ATTRS] * (len(data) // len(REQ))


def test_several_requests_in_one_feed_and_trailing_partial() -> None:
    parser = PolicyParser()
    second = REQ.replace(b"192.0.2.1", b"192.0.2.2")
    got = parser.feed(REQ + second + REQ[:30])
    assert [r.attrs["client_address"] for r in got] == ["192.0.2.1", "192.0.2.2"]
    assert parser.buffered == 30
    assert parser.feed(REQ[30:]) == [Request(ATTRS)]
    assert parser.buffered == 0


def test_partial_then_rest_split_inside_terminator() -> None:
    parser = PolicyParser()
    assert parser.feed(REQ[:-1]) == []
    assert parser.feed(b"\n" + REQ[:5]) == [Request(ATTRS)]
    assert parser.feed(REQ[5:]) == [Request(ATTRS)]


def test_repeated_attribute_keeps_last_and_unknown_kept() -> None:
    data = build([b"request=smtpd_access_policy", b"sender=first@x", b"x_custom=1",
                  b"sender=last@x", b"empty=", b"eq=a=b"])
    (req,) = PolicyParser().feed(data)
    assert req.attrs["sender"] == "last@x"
    assert req.attrs["x_custom"] == "1"
    assert req.attrs["empty"] == ""
    assert req.attrs["eq"] == "a=b"


def test_utf8_values_and_lone_cr_kept() -> None:
    data = build([b"request=smtpd_access_policy", "sender=j\u00f6rg@b\u00fccher.de".encode(),
                  b"helo_name=a\rb"])
    (req,) = PolicyParser().feed(data)
    assert req.attrs["sender"] == "j\u00f6rg@b\u00fccher.de"
    assert req.attrs["helo_name"] == "a\rb"


def test_values_keep_every_character_but_newline() -> None:
    # Only \n ends a line: other line breaks Unicode knows, "=" and white
    # space stay in the value; the name ends at the first "=".
    values = ["a=b=c", "x\x0by\x0cz", "p\x85q\u2028r\u2029s", "\x1c\x1d\x1e", " lead", "trail ",
              "", "=", "c\rr"]
    lines = [b"request=smtpd_access_policy"]
    lines += [f"v{i}={value}".encode() for i, value in enumerate(values)]
    lines.append("na\u2028me=1".encode())
    (req,) = PolicyParser().feed(build(lines))
    assert req.attrs == {"request": "smtpd_access_policy", "na\u2028me": "1",
                         **{f"v{i}": value for i, value in enumerate(values)}}


@pytest.mark.parametrize(("data", "reason"), [
    (b"request=smtpd_access_policy\ngarbage\n\n", 'without "="'),
    ("garbage\x85=x\nrequest=smtpd_access_policy\nnothing\n\n".encode(),
     'without "=": .nothing'),
    (b"request=smtpd_access_policy\n=value\n\n", "empty attribute name"),
    (b"request=smtpd_access_policy\nsender=a\0b\n\n", "NUL"),
    (b"request=smtpd_access_policy\nsender=\xff\xfe\n\n", "UTF-8"),
    (b"sender=a@b\n\n", 'without "request="'),
    (b"request=other\n\n", "unsupported request"),
    (b"\n", "empty request"),
    (REQ + b"\n", "empty request"),
    (b"request=smtpd_access_policy\r\n\r\n", "CRLF"),
])
def test_errors(data: bytes, reason: str) -> None:
    for chunks in ([data], [data[i:i + 1] for i in range(len(data))]):
        parser = PolicyParser()
        with pytest.raises(PolicyProtocolError, match=reason):
            feed_all(parser, chunks)
        assert parser.broken


def test_error_is_a_policyd_error_and_parser_stays_broken() -> None:
    parser = PolicyParser()
    with pytest.raises(PolicydError):
        parser.feed(b"junk\n\n")
    with pytest.raises(PolicyProtocolError, match='without "="'):
        parser.feed(REQ)
    assert parser.buffered == 0


def test_error_after_good_request_in_same_feed() -> None:
    parser = PolicyParser()
    with pytest.raises(PolicyProtocolError):
        parser.feed(REQ + b"junk\n\n")


# --- bounds ---------------------------------------------------------------

def line_of(length: int) -> bytes:
    return b"x=" + b"v" * (length - 2)


def test_line_exactly_at_limit_accepted() -> None:
    data = build([b"request=smtpd_access_policy", line_of(limits.MAX_LINE_BYTES)])
    assert PolicyParser().feed(data)[0].attrs["x"] == "v" * (limits.MAX_LINE_BYTES - 2)
    parser = PolicyParser()
    assert len(feed_all(parser, [data[i:i + 7] for i in range(0, len(data), 7)])) == 1


def test_line_one_over_limit_refused_whole() -> None:
    data = build([b"request=smtpd_access_policy", line_of(limits.MAX_LINE_BYTES + 1)])
    with pytest.raises(PolicyProtocolError, match="line longer"):
        PolicyParser().feed(data)


def test_line_one_over_limit_refused_before_newline() -> None:
    parser = PolicyParser()
    head = b"request=smtpd_access_policy\n" + line_of(limits.MAX_LINE_BYTES)
    assert parser.feed(head) == []  # still fits
    with pytest.raises(PolicyProtocolError, match="line longer"):
        parser.feed(b"v")  # one byte over, no newline yet


def test_long_complete_line_in_unfinished_request_refused_early() -> None:
    parser = PolicyParser()
    with pytest.raises(PolicyProtocolError, match="line longer"):
        parser.feed(b"request=smtpd_access_policy\n" + line_of(limits.MAX_LINE_BYTES + 1)
                    + b"\nsender=a")


def test_attribute_count_at_and_over_limit() -> None:
    lines = [b"request=smtpd_access_policy"] + [b"a%d=1" % i
                                                 for i in range(limits.MAX_ATTRIBUTES - 1)]
    assert len(PolicyParser().feed(build(lines))[0].attrs) == limits.MAX_ATTRIBUTES
    over = build([*lines, b"one=more"])
    with pytest.raises(PolicyProtocolError, match="more than"):
        PolicyParser().feed(over)
    parser = PolicyParser()
    with pytest.raises(PolicyProtocolError, match="more than"):
        parser.feed(over[:-2])  # detected before the request ends


def test_attribute_count_with_repeats_counts_lines() -> None:
    lines = [b"request=smtpd_access_policy"] + [b"a=1"] * limits.MAX_ATTRIBUTES
    with pytest.raises(PolicyProtocolError, match="more than"):
        PolicyParser().feed(build(lines))


def request_of_size(size: int) -> bytes:
    """A valid request exactly ``size`` bytes long, lines under MAX_LINE_BYTES."""
    head = b"request=smtpd_access_policy\n"
    body = size - len(head) - 1  # final empty line
    lines = []
    while body > 0:
        n = min(body, 2000)
        if body - n in (1, 2, 3):  # keep every line at least "x=\n" long
            n -= 4
        lines.append(b"x=" + b"v" * (n - 3) + b"\n")
        body -= n
    data = head + b"".join(lines) + b"\n"
    assert len(data) == size
    return data


def test_request_exactly_at_size_limit_accepted() -> None:
    data = request_of_size(limits.MAX_REQUEST_BYTES)
    assert len(PolicyParser().feed(data)) == 1
    parser = PolicyParser()
    assert parser.feed(data[:-1]) == []
    assert parser.buffered == limits.MAX_REQUEST_BYTES - 1
    assert len(parser.feed(data[-1:])) == 1


def test_request_one_over_size_limit_refused() -> None:
    data = request_of_size(limits.MAX_REQUEST_BYTES + 1)
    with pytest.raises(PolicyProtocolError, match="request longer"):
        PolicyParser().feed(data)
    parser = PolicyParser()
    with pytest.raises(PolicyProtocolError, match="request longer"):
        feed_all(parser, [data[i:i + 1000] for i in range(0, len(data), 1000)])


def test_buffer_never_exceeds_bounds_under_flood() -> None:
    parser = PolicyParser()
    chunk = (b"a=" + b"b" * 1000 + b"\n")
    with pytest.raises(PolicyProtocolError):
        for _ in range(1000):
            parser.feed(chunk)
            assert parser.buffered < limits.MAX_REQUEST_BYTES
    assert parser.buffered == 0


# --- replies --------------------------------------------------------------

def test_format_reply() -> None:
    assert format_reply("DUNNO") == b"action=DUNNO\n\n"
    assert format_reply("DEFER_IF_PERMIT Greylisted, try in 300 s") == \
        b"action=DEFER_IF_PERMIT Greylisted, try in 300 s\n\n"
    assert format_reply("PREPEND X-Gr\u00fc: x") == "action=PREPEND X-Gr\u00fc: x\n\n".encode()


@pytest.mark.parametrize("action", ["", "DUNNO\n", "a\nb", "a\0", "a\r"])
def test_format_reply_refuses_framing_breakers(action: str) -> None:
    with pytest.raises(ValueError):
        format_reply(action)
