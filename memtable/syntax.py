"""Postfix's small text parsers, as the inline:, static: and texthash: tables
use them (util/balpar.c, extpar.c, mystrtok.c, split_qnameval.c,
readlline.c); readllines() also reads .cf files, domain pattern files and
``memtable -i`` input, as Postfix's cfg_parser, match_list and postmap do.

Pure functions on strings and bytes: no files, no tables.  They reproduce
Postfix's quirks on purpose (quotes kept in keys, a backslash escaping the
next character only while scanning, continuation lines joined without a
separator), because a table must mean the same to memtable as to postmap.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from memtable.errors import ConfigError

log = logging.getLogger("memtable.syntax")

#: Postfix's ISSPACE(): ASCII white space only.
SPACE = " \t\n\v\f\r"
SPACE_BYTES = SPACE.encode("ascii")
#: CHARS_COMMA_SP: the separators of inline: lists.
COMMA_SP = ", \t\r\n"
BRACES = "{}"


def balpar(text: str, parens: str = BRACES) -> int:
    """Length of the balanced ``{...}`` group that text starts with, else 0."""
    if not text or text[0] != parens[0]:
        return 0
    level = 1
    for i in range(1, len(text)):
        ch = text[i]
        if ch == parens[1]:
            level -= 1
            if level == 0:
                return i + 1
        elif ch == parens[0]:
            level += 1
    return 0


def extpar(text: str, parens: str = BRACES) -> tuple[str, str | None]:
    """Postfix's extpar(EXTPAR_FLAG_STRIP): the text inside ``{...}`` with
    surrounding white space removed, and an error message or None."""
    if not text or text[0] != parens[0]:
        return text, f"no '{parens[0]}' at start of text in \"{text}\""
    length = balpar(text, parens)
    if length == 0:
        return text[1:].strip(SPACE), f"missing '{parens[1:]}' in \"{text}\""
    inner = text[1:length - 1].strip(SPACE)
    if length != len(text):
        return inner, f"syntax error after '{parens[1:]}' in \"{text}\""
    return inner, None


def strtokq(text: str, separators: str = COMMA_SP, parens: str = BRACES) -> list[str]:
    """Postfix's mystrtokq(): split on runs of separators, except inside
    (possibly nested) braces.  Never returns empty tokens."""
    tokens: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in separators:
            i += 1
        if i >= n:
            return tokens
        start, level = i, 0
        while i < n:
            ch = text[i]
            if ch == parens[0]:
                level += 1
            elif level > 0 and ch == parens[1]:
                level -= 1
            elif level == 0 and ch in separators:
                break
            i += 1
        tokens.append(text[start:i])


def quoted_key_end(text: str, start: int, stops: str) -> int:
    """Where a key that starts at ``start`` ends: the first character of
    ``stops`` outside double quotes, or the end; a backslash protects the
    next character.  ValueError("unbalanced '\"'") for an open quote."""
    i, n, in_quotes = start, len(text), False
    while i < n:
        ch = text[i]
        if ch == "\\":
            i += 1
            if i == n:
                break
        elif ch in stops:
            if not in_quotes:
                break
        elif ch == '"':
            in_quotes = not in_quotes
        i += 1
    if in_quotes:
        raise ValueError("unbalanced '\"'")
    return i


def split_qnameval(text: str) -> tuple[str, str]:
    """Postfix's split_qnameval(): ``key = value`` where the key may hold
    quoted white space or '='; the quotes stay in the key.  ValueError with
    Postfix's wording when there is no key, no '=' or an open quote."""
    i, n = 0, len(text)
    while i < n and text[i] in SPACE:
        i += 1
    if i == n:
        raise ValueError("no key found; expected format: key = value")
    key_start = i
    i = quoted_key_end(text, i, SPACE + "=")
    key = text[key_start:i]
    while i < n and text[i] in SPACE:
        i += 1
    if i == n or text[i] != "=":
        raise ValueError("missing '=' after attribute name")
    return key, text[i + 1:].strip(SPACE)


@dataclass(frozen=True)
class LogicalLine:
    """One logical line of a Postfix text file, as bytes (NUL-truncated)."""

    text: bytes
    first: int  # line number where it starts
    last: int  # line number where it ends


def readllines(source: bytes | Iterable[bytes], path: str, *,
               max_bytes: int | None = None) -> Iterator[LogicalLine]:
    """Postfix's readllines(): yield logical lines of a text file.

    ``source`` is the whole file, or its lines without their newlines (a
    stream, read one line ahead).  Empty, all-blank and comment lines (first
    non-blank is '#') are skipped; a line that starts with white space
    continues the logical line before it and is appended as is (no
    separator: "a b" + "  c" is "a b  c"); only a newline ends a line.  A
    logical line that itself starts with white space is dropped with a
    warning.  A NUL byte anywhere gets a warning and the logical line ends
    before it, as a C string would (a line that starts with NUL is yielded
    empty).  A logical line longer than ``max_bytes`` is a ConfigError
    naming its first line.
    """
    lines = _physical_lines(source) if isinstance(source, bytes) else iter(source)
    lineno = 0
    nxt = next(lines, None)
    while nxt is not None:
        buf = b""
        first = lineno + 1
        got_null = False  # in any line read for this logical line, comments too
        while nxt is not None:
            raw, nxt = nxt, next(lines, None)
            lineno += 1
            got_null = got_null or b"\0" in raw
            if not buf:
                first = lineno
            stripped = raw.lstrip(SPACE_BYTES)
            if stripped and not stripped.startswith(b"#"):
                buf += raw
                if max_bytes is not None and len(buf) > max_bytes:
                    raise ConfigError(f"logical line longer than {max_bytes} bytes", path, first)
            if buf and nxt is not None:
                # Postfix peeks at the next character: '#', white space or
                # the newline of an empty line keep the logical line open.
                peek = nxt[:1]
                if peek == b"" or peek == b"#" or peek in _SPACE_SINGLE:
                    continue
                break
        if got_null:
            where = f"line {first}" if first == lineno else f"line {first}-{lineno}"
            log.warning("%s, %s: text after null byte may be ignored", path, where)
        if not buf:
            continue  # only blank and comment lines up to the end
        # Postfix's callers see a C string: the text up to the first NUL,
        # possibly empty (they then report a missing key or name).
        text = buf.split(b"\0", 1)[0]
        if buf[:1] in _SPACE_SINGLE:
            log.warning('%s: logical line must not start with whitespace: "%s%s"',
                        path, text[:30].decode("utf-8", "replace"),
                        "..." if len(buf) > 30 else "")
            continue
        yield LogicalLine(text, first, lineno)


def parse_key_value(line: LogicalLine, path: str, *,
                    missing_note: str = "") -> tuple[str, str] | None:
    """A ``key whitespace value`` logical line, as postmap -i and texthash
    read it (postmap.c and dict_thash.c, one parser written twice there).

    The key ends at the first white space outside double quotes (a
    backslash protects the next character; the quotes stay in the key);
    the value is the rest, trimmed.  None, after Postfix's warning naming
    the logical line's first line, for a line that is not UTF-8, has an
    unbalanced quote, or lacks a key or a value (``missing_note`` ends that
    last warning: dict_thash adds " -- ignoring this line", postmap not).
    A key that ends in ':' is kept, with Postfix's alias-file warning.
    """
    try:
        text = line.text.decode("utf-8")
    except UnicodeDecodeError:
        log.warning('%s, line %d: non-UTF-8 input "%s" -- ignoring this line',
                    path, line.first, line.text.decode("utf-8", "replace"))
        return None
    try:
        end = quoted_key_end(text, 0, SPACE)
    except ValueError:
        log.warning("%s, line %d: unbalanced '\"' in '%s' -- ignoring this line",
                    path, line.first, text)
        return None
    key, value = text[:end], text[end + 1:].strip(SPACE)
    if not key or not value:
        log.warning("%s, line %d: expected format: key whitespace value%s",
                    path, line.first, missing_note)
        return None
    if key.endswith(":"):
        log.warning('%s, line %d: record is in "key: value" format; is this an alias file?',
                    path, line.first)
    return key, value


def _physical_lines(data: bytes) -> Iterator[bytes]:
    lines = data.split(b"\n")
    # A final newline does not start another (empty) line.
    if data.endswith(b"\n"):
        lines.pop()
    return iter(lines)


_SPACE_SINGLE = frozenset(bytes([c]) for c in SPACE_BYTES)
