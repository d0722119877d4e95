"""The ``domain`` list of a memcache table (Postfix's db_common + string_list).

Postfix builds it with string_list_init(): items are names, ``/file/name``s
(pattern files expanded in place, one logical line at a time) and
``type:table``s; ``!`` negates.  A key's domain part (after the LAST '@') is
case-folded and compared with each pattern in order, and the first pattern
that matches decides.  Names match exactly (no subdomains: this is a string
list, not a host list); a table matches when it has any value for the domain.
A failing table lookup is an error (TemporaryError), never "no match".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from memtable.cf import split_list
from memtable.errors import ConfigError, MemtableError, TemporaryError
from memtable.files import read_regular_file
from memtable.limits import (
    CF_MAX_LOGICAL_LINE_BYTES,
    DOMAIN_LIST_MAX_FILE_DEPTH,
    DOMAIN_LIST_MAX_TOTAL_BYTES,
    LOOKUP_FILE_MAX_BYTES,
)
from memtable.syntax import readllines
from memtable.table import Table, fold_case

log = logging.getLogger("memtable.domainlist")

#: Opens a ``type:table`` named in a domain list (injected by the caller, so
#: that this module does not depend on the table registry).
OpenLookup = Callable[[str], Table]

def is_table_pattern(item: str) -> bool:
    """Postfix's MATCH_DICTIONARY(): ``type:name``, but not ``[addr:...]``."""
    return not item.startswith("[") and ":" in item


@dataclass(frozen=True)
class _TableRule:
    table: Table
    match: bool  # the result when the table has the domain (False for !type:table)


# A run of consecutive names, compiled into one dict (first occurrence wins).
_NameRule = dict[str, bool]


@dataclass(frozen=True, eq=False)
class DomainFilter:
    """A compiled ``domain`` list; see the module docstring for the rules."""

    #: The items as given in the configuration.
    items: tuple[str, ...]
    utf8: bool = True
    _rules: tuple[_NameRule | _TableRule, ...] = field(default=(), repr=False)
    _tables: tuple[Table, ...] = field(default=(), repr=False)

    @classmethod
    def build(cls, items: Iterable[str], open_lookup: OpenLookup, *,
              utf8: bool = True) -> DomainFilter | None:
        """Compile the configuration's ``domain`` items (already split).

        Returns None for an empty list (no domain filtering).  Raises
        ConfigError for a missing, unreadable, oversized or non-UTF-8 pattern
        file, for ``!`` without a pattern and for files nested too deeply;
        errors from ``open_lookup`` propagate unchanged.
        """
        items = tuple(items)
        if not items:
            return None
        builder = _Builder(open_lookup, utf8)
        builder.parse(items, match=True, depth=0)
        return cls(items=items, utf8=utf8, _rules=builder.finish(),
                   _tables=tuple(builder.tables.values()))

    def matches(self, domain: str) -> bool:
        """Whether a domain is on the list (first matching pattern decides).

        Raises TemporaryError when a table cannot answer.
        """
        folded = fold_case(domain, self.utf8)
        for rule in self._rules:
            if isinstance(rule, dict):
                result = rule.get(folded)
                if result is not None:
                    return result
                continue
            try:
                value = rule.table.lookup(folded)
            except TemporaryError:
                raise
            except MemtableError as exc:
                raise TemporaryError(
                    f"domain list: {rule.table.spec}: table lookup problem: {exc}") from exc
            if value is not None:
                return rule.match
        return False

    def check(self, key: str) -> bool:
        """False when a key must be skipped: no '@', an empty local part or
        domain (after the last '@'), or a domain that is not on the list.

        Raises TemporaryError when a table cannot answer.
        """
        at = key.rfind("@")
        if at <= 0 or at == len(key) - 1:
            return False
        return self.matches(key[at + 1:])

    @property
    def tables(self) -> tuple[Table, ...]:
        """The tables this list opened through ``open_lookup``."""
        return self._tables

    def close(self) -> None:
        """Close the tables this list opened."""
        for table in self._tables:
            table.close()


class _Builder:
    """Expands a domain list into rules, the way match_list_parse() does."""

    def __init__(self, open_lookup: OpenLookup, utf8: bool):
        self.open_lookup = open_lookup
        self.utf8 = utf8
        self.tables: dict[str, Table] = {}
        self.rules: list[_NameRule | _TableRule] = []
        self.total_bytes = 0

    def finish(self) -> tuple[_NameRule | _TableRule, ...]:
        return tuple(self.rules)

    def parse(self, items: Iterable[str], match: bool, depth: int,
              where: tuple[str | None, int | None] = (None, None)) -> None:
        for item in items:
            if item.startswith("#"):
                # Postfix's tokenizer stops at a '#' word: a comment after text.
                log.warning("%s%s: #comment after other text is not allowed; "
                            "ignoring the rest of the line: %s",
                            where[0] or "domain", f", line {where[1]}" if where[1] else "",
                            item)
                return
            item_match = match
            pattern = item
            while pattern.startswith("!"):
                item_match = not item_match
                pattern = pattern[1:]
            if not pattern:
                raise ConfigError(f'domain: no pattern after "!" in "{item}"', *where)
            if pattern.startswith("/"):
                self.parse_file(pattern, item_match, depth + 1)
            elif is_table_pattern(pattern):
                table = self.tables.get(pattern)
                if table is None:
                    table = self.open_lookup(pattern)
                    self.tables[pattern] = table
                self.rules.append(_TableRule(table, item_match))
            else:
                self.add_name(fold_case(pattern, self.utf8), item_match)

    def add_name(self, name: str, result: bool) -> None:
        last = self.rules[-1] if self.rules else None
        if isinstance(last, dict):
            last.setdefault(name, result)
        else:
            self.rules.append({name: result})

    def parse_file(self, path: str, match: bool, depth: int) -> None:
        if depth > DOMAIN_LIST_MAX_FILE_DEPTH:
            raise ConfigError(f"domain: pattern files nested deeper than "
                              f"{DOMAIN_LIST_MAX_FILE_DEPTH} levels", path)
        try:
            data, _ = read_regular_file(path, LOOKUP_FILE_MAX_BYTES)
        except OSError as exc:
            raise ConfigError(f"domain: cannot read pattern file: {exc.strerror or exc}",
                              path) from None
        if len(data) > LOOKUP_FILE_MAX_BYTES:
            raise ConfigError(f"domain: pattern file larger than {LOOKUP_FILE_MAX_BYTES} bytes",
                              path)
        self.total_bytes += len(data)
        if self.total_bytes > DOMAIN_LIST_MAX_TOTAL_BYTES:
            raise ConfigError(f"domain: pattern files hold more than "
                              f"{DOMAIN_LIST_MAX_TOTAL_BYTES} bytes together", path)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"domain: pattern file is not UTF-8 text "
                              f"(byte offset {exc.start})", path) from None
        for line in readllines(data, path, max_bytes=CF_MAX_LOGICAL_LINE_BYTES):
            self.parse(split_list(line.text.decode("utf-8")), match, depth, (path, line.first))

