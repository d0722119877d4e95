"""The inline: and static: table types (Postfix's dict_inline.c, dict_static.c).

``inline:{key=value, { key = value with spaces }, ...}`` is a small
read-only table written in place; ``static:value`` (or ``static:{value with
spaces}``) answers the same value for every key.  Both are parsed once, at
open, with Postfix's own syntax and error messages.
"""

from __future__ import annotations

from collections.abc import Iterator

from memtable.errors import AccessError, ConfigError
from memtable.syntax import balpar, extpar, split_qnameval, strtokq
from memtable.table import Table, fold_case


class InlineTable(Table):
    """``inline:{name=value, ...}``: read-only; supports sequence()."""

    def __init__(self, name: str, *, read_write: bool, fold: bool) -> None:
        self.spec = f"inline:{name}"
        self.read_write = read_write
        self.fold = fold
        if read_write:
            # dict_inline_open() refuses anything but O_RDONLY.
            raise AccessError(f"{self.spec} map requires O_RDONLY access mode")
        self._entries = self._parse(name)

    def _parse(self, name: str) -> dict[str, str]:
        need = 'need "inline:{name=value...}"'
        length = balpar(name)
        if length == 0 or length != len(name) or length == 2:
            raise ConfigError(f'bad syntax: "{self.spec}"; {need}')
        entries: dict[str, str] = {}
        for token in strtokq(name[1:-1]):
            err: str | None = None
            if token.startswith("{"):
                token, err = extpar(token)
            if err is None:
                try:
                    key, value = split_qnameval(token)
                except ValueError as exc:
                    err = str(exc)
            if err is not None:
                raise ConfigError(f'{err}: "{self.spec}"; {need}')
            # No duplicate check: the last value wins, as in Postfix.
            entries[self._key(key)] = value
        if not entries:
            raise ConfigError(f'empty table: "{self.spec}"; {need}')
        return entries

    def _key(self, key: str) -> str:
        return fold_case(key) if self.fold else key

    def lookup(self, key: str) -> str | None:
        return self._entries.get(self._key(key))

    def sequence(self) -> Iterator[tuple[str, str]]:
        # Postfix walks its hash table; memtable keeps the order of writing.
        yield from list(self._entries.items())


class StaticTable(Table):
    """``static:value``: every lookup finds value; no update, no sequence.

    Opening it read-write is allowed (Postfix does); update() and delete()
    then fail with AccessError like any table without update support.
    """

    def __init__(self, name: str, *, read_write: bool, fold: bool) -> None:
        self.spec = f"static:{name}"
        self.read_write = read_write
        self.fold = fold
        value = name
        if name.startswith("{"):
            value, err = extpar(name)
            if err is not None:
                raise ConfigError(f"bad static:name syntax: {err}")
        self._value = value

    def lookup(self, key: str) -> str | None:
        return self._value
