"""memcache_table(5) configuration: one frozen dataclass per .cf file.

Parameter names, defaults and lower bounds are Postfix's (dict_memcache.c),
plus Postfix 3.11's key_digest.  A bad value is a ConfigError naming the
file and line (fatal in Postfix too); an unknown name is a warning naming the
file and line (Postfix ignores it silently).
"""

from __future__ import annotations

from dataclasses import dataclass

from memtable import cf
from memtable.endpoint import Endpoint, parse_endpoint
from memtable.errors import ConfigError

# name -> (default, lower bound); bounds as in dict_memcache_open().
INT_PARAMS: dict[str, tuple[int, int]] = {
    "flags": (0, 0),
    "ttl": (3600, 0),
    "data_size_limit": (10240, 1),
    "line_size_limit": (1024, 1),
    "max_try": (2, 1),
    "retry_pause": (1, 1),
    "timeout": (2, 0),
}
STR_PARAMS: dict[str, str] = {
    "memcache": "inet:localhost:11211",
    "backup": "",
    "key_format": "%s",
    "key_digest": "",
    "domain": "",
}
KNOWN_PARAMS = frozenset(INT_PARAMS) | frozenset(STR_PARAMS)


@dataclass(frozen=True)
class MemcacheConfig:
    """The effective settings of one memcache: table."""

    path: str
    memcache: Endpoint
    backup: str | None
    flags: int
    ttl: int
    key_format: str
    key_digest: str
    domain: tuple[str, ...]
    data_size_limit: int
    line_size_limit: int
    max_try: int
    retry_pause: int
    timeout: int

    @classmethod
    def from_file(cls, path: str) -> MemcacheConfig:
        return cls.from_entries(path, cf.read_cf(path))

    @classmethod
    def from_entries(cls, path: str, entries: dict[str, cf.CfEntry]) -> MemcacheConfig:
        # Imported here: keys depends on nothing in this module, and this
        # keeps the configuration importable on its own.
        from memtable.keys import KeyFormat, resolve_digest

        cf.warn_unknown(entries, KNOWN_PARAMS)
        ints = {name: (cf.parse_int(entries[name], minimum)
                       if name in entries else default)
                for name, (default, minimum) in INT_PARAMS.items()}
        strs = {name: entries[name].value if name in entries else default
                for name, default in STR_PARAMS.items()}

        try:
            endpoint = parse_endpoint(strs["memcache"])
        except ConfigError as exc:
            raise _at(entries, "memcache", path, exc.message) from None
        try:
            KeyFormat.compile(strs["key_format"])
        except ValueError as exc:
            raise _at(entries, "key_format", path, str(exc)) from None
        digest = strs["key_digest"].strip().lower()
        if digest:
            try:
                resolve_digest(digest)
            except ValueError as exc:
                raise _at(entries, "key_digest", path, str(exc)) from None
        return cls(
            path=path,
            memcache=endpoint,
            backup=strs["backup"].strip() or None,
            key_format=strs["key_format"],
            key_digest=digest,
            domain=tuple(cf.split_list(strs["domain"])),
            **ints,
        )


def _at(entries: dict[str, cf.CfEntry], name: str, path: str, message: str) -> ConfigError:
    entry = entries.get(name)
    if entry is None:
        return ConfigError(f"{name}: {message}", path)
    return entry.error(message)
