"""The SMTPD policy delegation protocol, pure: bytes in, requests out.

No sockets and no asyncio here (h11-style): the server feeds whatever it
read to a PolicyParser and gets back the requests completed so far.

Wire format (Postfix's attr_print_plain): ``name=value`` lines ending with
``\\n``, then an empty line; many requests per connection.  Decisions taken
here, documented:

- Only ``\\n`` ends a line, as Postfix sends it.  ``\\r\\n`` is refused as a
  protocol error with a clear reason rather than half-accepted (a CRLF client
  such as telnet would otherwise never complete a request); a lone ``\\r``
  inside a value is kept.
- A repeated attribute keeps the LAST value; unknown attributes are kept
  (policies ignore what they do not know).
- An empty line where a request should start is an empty request, which
  lacks ``request=`` and is therefore an error.
- Bounds (policyd.limits): a line holds at most MAX_LINE_BYTES bytes without
  its ``\\n``; a request at most MAX_ATTRIBUTES lines and MAX_REQUEST_BYTES
  bytes counting every ``\\n`` and the final empty line.  Overlong partial
  lines and requests are refused as soon as they are certain to break a
  bound, so the parser never buffers more than one bounded request.
- After an error the parser stays broken: every later feed raises.  Requests
  completed earlier in the same feed as the offending bytes are dropped (the
  connection is closed anyway; Postfix never pipelines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from policyd import limits
from policyd.errors import PolicyProtocolError

REQUEST_TYPE = "smtpd_access_policy"


@dataclass(frozen=True, slots=True)
class Request:
    """One complete policy request: attribute name -> value, and its size
    in bytes on the wire (for metrics)."""

    attrs: dict[str, str]
    size: int = field(default=0, compare=False)


def _show(data: bytes | bytearray | str) -> str:
    """A short printable excerpt of offending input for the one log line."""
    text = repr(bytes(data) if not isinstance(data, str) else data)
    return text if len(text) <= 60 else text[:57] + "..."


class PolicyParser:
    """Incremental parser of policy requests for one connection.

    ``feed(data)`` returns the requests that ``data`` completed (possibly
    none) and keeps the unfinished tail for the next call.  Work per feed is
    proportional to the new data (plus at most one line), so a client that
    dribbles bytes cannot make the parser rescan its buffer.
    """

    __slots__ = ("_buf", "_error", "_line_start", "_lines", "_scan")

    def __init__(self) -> None:
        self._buf = bytearray()  # the unfinished request; starts at a request boundary
        self._scan = 0           # where the search for b"\n\n" resumes in _buf
        self._line_start = 0     # offset of the unfinished line in _buf
        self._lines = 0          # complete lines in _buf
        self._error: PolicyProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an unfinished request (0 between requests)."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        return self._error is not None

    def feed(self, data: bytes | bytearray) -> list[Request]:
        """Add received bytes; return the requests they complete, in order.

        Raises PolicyProtocolError when the input breaks the protocol or a
        bound, and on every call after that.
        """
        if self._error is not None:
            raise PolicyProtocolError(str(self._error))
        try:
            return self._feed(data)
        except PolicyProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes | bytearray) -> list[Request]:
        if not data:
            return []
        if b"\0" in data:
            raise PolicyProtocolError("NUL byte in request")
        old = len(self._buf)
        buf: bytes | bytearray
        if old:
            self._buf += data
            buf = self._buf
            scan = self._scan
        else:
            buf = data  # fast path: no copy when requests arrive whole
            scan = 0
        if buf.find(b"\r\n", old - 1 if old else 0) >= 0:
            raise PolicyProtocolError("CRLF line end (the policy protocol uses bare \\n)")

        requests: list[Request] = []
        start = 0
        n = len(buf)
        while start < n:
            if buf[start] == 0x0A:
                raise PolicyProtocolError("empty request (empty line without attributes)")
            end = buf.find(b"\n\n", scan)
            if end < 0:
                break
            requests.append(_parse_request(buf, start, end))
            start = scan = end + 2

        if start >= n:
            if old:
                self._buf = bytearray()
            self._scan = self._line_start = self._lines = 0
            return requests

        # An unfinished request remains: refuse it now if it cannot fit.
        if n - start >= limits.MAX_REQUEST_BYTES:
            raise PolicyProtocolError(f"request longer than {limits.MAX_REQUEST_BYTES} bytes")
        if start == 0 and old:
            region, lines = self._line_start, self._lines  # resume after checked lines
        else:
            region, lines = start, 0
        lines += buf.count(b"\n", region, n)
        last_nl = buf.rfind(b"\n", region, n)
        line_start = last_nl + 1 if last_nl >= 0 else region
        if n - line_start > limits.MAX_LINE_BYTES:
            raise PolicyProtocolError(f"line longer than {limits.MAX_LINE_BYTES} bytes: "
                                      f"{_show(buf[line_start:line_start + 40])}")
        if lines + (line_start < n) > limits.MAX_ATTRIBUTES:
            raise PolicyProtocolError(f"more than {limits.MAX_ATTRIBUTES} attributes")
        if line_start - region > limits.MAX_LINE_BYTES + 1:
            _check_line_lengths(buf[region:line_start - 1])

        if buf is self._buf:
            if start:
                del self._buf[:start]
        else:
            self._buf = bytearray(buf[start:])
        self._scan = n - start - 1
        self._line_start = line_start - start
        self._lines = lines
        return requests


def _check_line_lengths(lines: bytes | bytearray) -> None:
    longest = max(map(len, lines.split(b"\n")))
    if longest > limits.MAX_LINE_BYTES:
        raise PolicyProtocolError(f"line longer than {limits.MAX_LINE_BYTES} bytes")


def _parse_request(buf: bytes | bytearray, start: int, end: int) -> Request:
    """Parse buf[start:end] (lines joined by \\n, terminator excluded)."""
    if end + 2 - start > limits.MAX_REQUEST_BYTES:
        raise PolicyProtocolError(f"request longer than {limits.MAX_REQUEST_BYTES} bytes")
    chunk = buf[start:end]
    if end - start > limits.MAX_LINE_BYTES:  # short requests cannot hold a long line
        _check_line_lengths(chunk)
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyProtocolError(
            f"invalid UTF-8: {_show(chunk[max(0, exc.start - 20):exc.end + 20])}") from None
    lines = text.split("\n")
    if len(lines) > limits.MAX_ATTRIBUTES:
        raise PolicyProtocolError(f"more than {limits.MAX_ATTRIBUTES} attributes")
    # A plain loop: faster than dict(map(...)) of the lines' splits
    # (docs/design.md, "The server and the policy").
    attrs: dict[str, str] = {}
    for line in lines:
        name, equals, value = line.partition("=")
        if not equals:
            raise PolicyProtocolError(f'line without "=": {_show(line)}')
        attrs[name] = value
    if "" in attrs:
        raise PolicyProtocolError(f'empty attribute name: {_show("=" + attrs[""])}')
    request = attrs.get("request")
    if request != REQUEST_TYPE:
        if request is None:
            raise PolicyProtocolError('request without "request=" attribute')
        raise PolicyProtocolError(f"unsupported request={_show(request)}")
    return Request(attrs, end + 2 - start)


def format_reply(action: str) -> bytes:
    """The reply for one request: ``action=ACTION`` and an empty line.

    Raises ValueError for an action that would break the framing (empty,
    or holding a newline, carriage return or NUL).
    """
    if not action or "\n" in action or "\r" in action or "\0" in action:
        raise ValueError(f"invalid policy action {action!r}")
    return f"action={action}\n\n".encode()
