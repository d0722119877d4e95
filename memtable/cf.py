"""Postfix-style configuration files: table .cf files and policyd.cf.

Reads files the way Postfix's cfg_parser does, with readllines() (see
memtable.syntax: blank and comment lines ignored, a line that starts with
white space continues the logical line before it, joined as is) and
split_nameval(): each logical line is ``name = value``.  Values are strings;
the typed helpers below turn them into numbers, times and booleans with
errors that name the file and line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from memtable.errors import ConfigError
from memtable.files import read_regular_file
from memtable.limits import (
    CF_INT_MAX,
    CF_MAX_FILE_BYTES,
    CF_MAX_LOGICAL_LINE_BYTES,
    CF_NUMBER_MAX_DIGITS,
)
from memtable.syntax import readllines

log = logging.getLogger("memtable.cf")


@dataclass(frozen=True)
class CfEntry:
    """One ``name = value`` setting and where it was read."""

    name: str
    value: str
    path: str
    line: int | None  # None: not from a file (a command line override)

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.name} = {self.value}: {message}", self.path, self.line)


def parse_cf_text(text: str, path: str) -> dict[str, CfEntry]:
    """Parse the text of a .cf file; a later setting of a name wins."""
    entries: dict[str, CfEntry] = {}
    for line in readllines(text.encode("utf-8"), path, max_bytes=CF_MAX_LOGICAL_LINE_BYTES):
        entry = _split_nameval(line.text.decode("utf-8"), path, line.first)
        if entry.name in entries:
            log.warning("%s, line %d: %s is set again; the later value wins",
                        path, line.first, entry.name)
        entries[entry.name] = entry
    return entries


def read_cf(path: str) -> dict[str, CfEntry]:
    """Read and parse a .cf file; unreadable or oversized files are ConfigErrors."""
    try:
        data, _ = read_regular_file(path, CF_MAX_FILE_BYTES)
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", path) from None
    if len(data) > CF_MAX_FILE_BYTES:
        raise ConfigError(f"file larger than {CF_MAX_FILE_BYTES} bytes", path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (byte offset {exc.start})", path) from None
    return parse_cf_text(text, path)


_NAME_RE = re.compile(r"[A-Za-z0-9_.\-]+")


def _split_nameval(text: str, path: str, line: int | None) -> CfEntry:
    name, sep, value = text.partition("=")
    name = name.strip()
    if not name:  # Postfix's split_nameval() checks this first
        raise ConfigError(f'missing attribute name: "{text}"', path, line)
    if not sep:
        raise ConfigError(f'missing \'=\' after attribute name: "{text}"', path, line)
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f'bad attribute name "{name}"', path, line)
    return CfEntry(name, value.strip(), path, line)


def parse_overrides(settings: Iterable[str], source: str = "-o") -> dict[str, CfEntry]:
    """``name=value`` settings given on a command line (like ``postconf
    -o``), as entries that name ``source`` in their errors; a later setting
    of a name wins."""
    entries: dict[str, CfEntry] = {}
    for text in settings:
        entry = _split_nameval(text, f"{source} {text}", None)
        entries[entry.name] = entry
    return entries


def warn_unknown(entries: dict[str, CfEntry], known: set[str] | frozenset[str]) -> None:
    """Log a warning per unknown parameter (Postfix ignores them silently)."""
    for entry in entries.values():
        if entry.name not in known:
            log.warning("%s", ConfigError(f"unknown parameter {entry.name} ignored",
                                          entry.path, entry.line))


def reject_unknown(entries: dict[str, CfEntry], known: set[str] | frozenset[str],
                   renamed: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError for the first unknown parameter name; one that
    ``renamed`` maps to its new name says so."""
    for entry in entries.values():
        if entry.name not in known:
            new = (renamed or {}).get(entry.name)
            hint = f" (it is now called {new})" if new else ""
            raise ConfigError(f"unknown parameter {entry.name}{hint}", entry.path, entry.line)


_DECIMAL_RE = re.compile(r"([+-]?)0*([0-9]+)")


def decimal(text: str) -> int | None:
    """``text`` (ASCII digits, an optional sign) as an integer, or None when
    it is not one or has more than CF_NUMBER_MAX_DIGITS significant digits:
    out of range for every setting, as strtol() overflows for Postfix (and
    Python's int() refuses strings over 4300 digits with a ValueError).
    Every number read from configuration goes through here."""
    match = _DECIMAL_RE.fullmatch(text)
    if match is None or len(match.group(2)) > CF_NUMBER_MAX_DIGITS:
        return None
    return int(match.group(1) + match.group(2))


def parse_int(entry: CfEntry, minimum: int = 0, maximum: int = CF_INT_MAX) -> int:
    """A decimal integer within [minimum, maximum] (Postfix's cfg_get_int, stricter:
    negative numbers are refused where Postfix has no lower bound)."""
    number = decimal(entry.value)
    if number is None:
        raise entry.error("bad numerical configuration")
    if number < minimum:
        raise entry.error(f"invalid value {number} < {minimum}")
    if number > maximum:
        raise entry.error(f"invalid value {number} > {maximum}")
    return number


_TIME_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def time_seconds(text: str, default_unit: str = "s") -> int | None:
    """``300``, ``300s``, ``5m``, ``2h``, ``2d``, ``1w`` in seconds (white
    space around is ignored), or None when text is not a time value."""
    match = re.fullmatch(r"\s*([0-9]+)([smhdw]?)\s*", text)
    number = None if match is None else decimal(match.group(1))
    if match is None or number is None:
        return None
    return number * _TIME_UNITS[match.group(2) or default_unit]


def parse_time(entry: CfEntry, default_unit: str = "s", minimum: int = 0,
               maximum: int = CF_INT_MAX) -> int:
    """A Postfix time value in seconds: ``300``, ``300s``, ``5m``, ``2h``, ``2d``, ``1w``."""
    seconds = time_seconds(entry.value.strip().lower(), default_unit)
    if seconds is None:
        raise entry.error("bad time value (use a number with an optional unit s, m, h, d or w)")
    if seconds < minimum:
        raise entry.error(f"invalid time {seconds}s < {minimum}s")
    if seconds > maximum:
        raise entry.error(f"invalid time {seconds}s > {maximum}s")
    return seconds


def parse_bool(entry: CfEntry) -> bool:
    """``yes``/``no`` (also true/false, on/off, 1/0), as Postfix's booleans."""
    value = entry.value.strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise entry.error("bad boolean configuration (use yes or no)")


def split_list(value: str) -> list[str]:
    """Split a Postfix list: items separated by commas and/or white space,
    where ``{...}`` (as in ``inline:{a=1, b=2}``) is kept whole."""
    items: list[str] = []
    current: list[str] = []
    depth = 0
    for char in value:
        if char == "{":
            depth += 1
        elif char == "}" and depth:
            depth -= 1
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                items.append("".join(current))
                current = []
            continue
        current.append(char)
    if current:
        items.append("".join(current))
    return items
