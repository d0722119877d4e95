"""Strict validation of memcached's text-protocol replies, bytes in, no I/O.

pymemcache frames the replies; a ReplyGuard sees every chunk first (the
memcache core, memtable.mcproto, feeds it each chunk a driver receives)
and raises ProtocolError as soon as the reply breaks the protocol or one
of Postfix's limits, so no oversized line or value is ever buffered, and
pymemcache parses only a reply the guard found complete:

- a reply line longer than line_size_limit, caught while the line is still
  arriving (memory stays bounded by the limit, not by the server);
- ``VALUE key flags len`` with a bad, negative or too large len (over
  data_size_limit), caught from the header before any data is read;
- a data block not followed by CRLF, a line that is no valid reply to the
  command sent, and any byte after the reply is complete (trailing data).

Line limit, as Postfix's memcache_get(): a line's text plus its CR must fit
in line_size_limit bytes (text of at most line_size_limit - 1 bytes).

Postfix also accepts a bare LF as line end; the guard does not: memcached
always sends CRLF and pymemcache frames on CRLF only, so a bare LF can only
come from a peer that is not memcached, and is a protocol error.

``ERROR``, ``CLIENT_ERROR ...`` and ``SERVER_ERROR ...`` are accepted as
complete replies (to any command): pymemcache turns them into exceptions and
the core counts the attempt as failed, as Postfix does.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final, Literal, NoReturn

from memtable.errors import ProtocolError
from memtable.limits import MEMCACHED_CAS_MAX, MEMCACHED_FLAGS_MAX

Kind = Literal["get", "gets", "storage", "delete", "cas"]

_CRLF: Final = b"\r\n"

# Command kinds, as small ints for cheap comparisons on the fast path.
_GET: Final = 0
_STORAGE: Final = 1
_DELETE: Final = 2
_GETS: Final = 3  # get with the item's cas unique in each VALUE line
_CAS: Final = 4  # STORED, EXISTS (changed since gets) or NOT_FOUND
_KINDS: Final = {"get": _GET, "storage": _STORAGE, "delete": _DELETE, "gets": _GETS,
                 "cas": _CAS}
_NAMES: Final = ("get", "storage", "delete", "gets", "cas")

# Parser states.
_DONE: Final = 0  # no reply expected: any byte is trailing data
_LINE: Final = 1  # inside a reply line
_DATA: Final = 2  # inside the data block of a VALUE
_BROKEN: Final = 3  # a violation was found; start() resets


def _is_error_line(line: bytes) -> bool:
    if line == b"ERROR":
        return True
    head = line[:13]
    return head in (b"CLIENT_ERROR", b"SERVER_ERROR", b"CLIENT_ERROR ", b"SERVER_ERROR ")


def _show(line: bytes | bytearray) -> str:
    """A short, printable excerpt for messages (Postfix shows %.30s)."""
    return repr(bytes(line[:40]))[1:] + ("..." if len(line) > 40 else "")


class ReplyGuard:
    """Validates the reply stream of one command at a time.

    Call start() before sending each command, then feed() every chunk
    received, in order; ``done`` turns True when the reply is complete.
    After a ProtocolError the guard stays broken until the next start().
    """

    __slots__ = ("_data_limit", "_keys", "_kind", "_line_limit", "_need",
                 "_partial", "_replies", "_state")

    def __init__(self, line_size_limit: int, data_size_limit: int) -> None:
        if line_size_limit < 1 or data_size_limit < 1:
            raise ValueError("line_size_limit and data_size_limit must be at least 1")
        self._line_limit = line_size_limit
        self._data_limit = data_size_limit
        self._kind = _GET
        self._keys: Collection[bytes] | None = None
        self._state = _DONE
        self._replies = 0
        self._need = 0  # bytes left of the current data block, CRLF included
        self._partial = b""  # start of a line split across chunks (< limit)

    def start(self, kind: Kind, *, replies: int = 1,
              keys: Collection[bytes] | None = None) -> None:
        """Expect the reply to a command of ``kind``.

        ``replies``: how many pipelined storage or delete commands were
        sent (one reply line each).  ``keys``: the keys a ``get`` asked for; a VALUE for any
        other key is a protocol error (None: not checked).
        """
        code = _KINDS.get(kind)
        if code is None:
            raise ValueError(f"unknown command kind {kind!r}")
        if replies < 1 or (replies != 1 and code == _GET):
            raise ValueError(f"bad reply count {replies} for {kind}")
        self._kind = code
        self._keys = keys
        self._replies = replies
        self._state = _LINE
        self._partial = b""

    @property
    def done(self) -> bool:
        """True when the whole reply has been fed (or none is expected)."""
        return self._state == _DONE

    def _fail(self, reason: str) -> NoReturn:
        self._state = _BROKEN
        self._partial = b""
        raise ProtocolError(reason)

    def feed(self, data: bytes) -> None:
        """Check the next chunk of the reply; raise ProtocolError on a violation."""
        if self._partial:
            # Rare: a line split across chunks.  The copy is bounded by
            # line_size_limit plus one chunk.
            data = self._partial + data
            self._partial = b""
        pos = 0
        end = len(data)
        limit = self._line_limit
        while pos < end:
            state = self._state
            if state == _LINE:
                # Never look further than the longest acceptable line.
                nl = data.find(b"\n", pos, pos + limit + 1)
                if nl < 0:
                    if end - pos > limit:
                        self._fail(f"reply line longer than line_size_limit={limit}: "
                                   f"{_show(data[pos:pos + 41])}")
                    self._partial = data[pos:]
                    return
                if nl == pos or data[nl - 1] != 13:
                    self._fail(f"reply line not terminated by CRLF: {_show(data[pos:nl])}")
                line = data[pos:nl - 1]
                pos = nl + 1
                kind = self._kind
                if kind in (_GET, _GETS):
                    if line == b"END":
                        self._state = _DONE
                        continue
                    if line[:6] == b"VALUE ":
                        need = self._value_header(line)
                        if end - pos >= need:  # the whole block is here: usual case
                            if data[pos + need - 2:pos + need] != _CRLF:
                                self._fail("data block not followed by CRLF")
                            pos += need
                        else:
                            self._need = need
                            self._state = _DATA
                        continue
                elif kind == _STORAGE:
                    if line == b"STORED" or line == b"NOT_STORED":
                        self._reply_done()
                        continue
                elif kind == _DELETE:
                    if line == b"DELETED" or line == b"NOT_FOUND":
                        self._reply_done()
                        continue
                elif line == b"STORED" or line == b"EXISTS" or line == b"NOT_FOUND":
                    self._reply_done()  # cas
                    continue
                if not _is_error_line(line):
                    name = _NAMES[kind]
                    self._fail(f"unexpected reply to {name}: {_show(line)}")
                if kind != _GET and kind != _GETS:
                    # One pipelined command failed; the others still reply.
                    self._reply_done()
                else:
                    self._state = _DONE
            elif state == _DATA:
                need = self._need
                avail = end - pos
                if avail >= need:
                    t = 2 if need >= 2 else need
                    if data[pos + need - t:pos + need] != _CRLF[2 - t:]:
                        self._fail("data block not followed by CRLF")
                    pos += need
                    self._state = _LINE
                else:
                    rest = need - avail
                    if rest == 1 and data[end - 1] != 13:  # the CR of the CRLF
                        self._fail("data block not followed by CRLF")
                    self._need = rest
                    return
            elif state == _DONE:
                self._fail(f"unexpected data after the reply: {_show(data[pos:])}")
            else:
                self._fail("reply stream already broken")

    def _reply_done(self) -> None:
        self._replies -= 1
        if self._replies == 0:
            self._state = _DONE

    def _value_header(self, line: bytes) -> int:
        """Check ``VALUE key flags len`` (gets: ``... len cas``); the bytes
        to come (len + CRLF)."""
        parts = line.split(b" ")
        if len(parts) != (5 if self._kind == _GETS else 4) or not parts[1]:
            self._fail(f"malformed VALUE line: {_show(line)}")
        if self._kind == _GETS:
            cas = parts.pop()
            if not (cas.isdigit() and len(cas) <= 20 and int(cas) <= MEMCACHED_CAS_MAX):
                self._fail(f"bad cas unique in VALUE line: {_show(line)}")
        _, key, flags, size = parts
        keys = self._keys
        if keys is not None and key not in keys:
            self._fail(f"VALUE for a key that was not asked for: {_show(line)}")
        if not (flags.isdigit() and (len(flags) < 10
                                     or (len(flags) == 10 and int(flags) <= MEMCACHED_FLAGS_MAX))):
            self._fail(f"bad flags in VALUE line: {_show(line)}")
        if not size.isdigit():
            self._fail(f"bad length in VALUE line: {_show(line)}")
        if len(size) > 20 or int(size) > self._data_limit:
            self._fail(f"VALUE length {_show(size)} over data_size_limit={self._data_limit}")
        return int(size) + 2
