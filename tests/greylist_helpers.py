"""Shared pieces of the greylisting tests: an in-memory Table that honours
ttls by memtable's clock (so freezegun can expire entries), and builders
for policies over it."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from memtable import clock
from memtable.table import Table
from policyd.config import PolicydConfig
from policyd.dns import Resolver
from policyd.greylist import GreylistPolicy
from policyd.store import Store
from policyd.whitelist import Whitelists

T = TypeVar("T")


class DictTable(Table):
    """A read-write Table over a dict; entries expire after their ttl."""

    def __init__(self, spec: str = "dict:test") -> None:
        self.spec = spec
        self.read_write = True
        self.fold = False
        self.data: dict[str, tuple[str, float | None]] = {}
        self.lookups = 0
        self.updates = 0
        self.closed = False

    def lookup(self, key: str) -> str | None:
        self.lookups += 1
        item = self.data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and clock.now() >= expires:
            del self.data[key]
            return None
        return value

    def update(self, key: str, value: str, ttl: int | None = None) -> None:
        self.updates += 1
        self.data[key] = (value, clock.now() + ttl if ttl else None)

    def sequence(self) -> Iterator[tuple[str, str]]:
        for key, (value, _) in list(self.data.items()):
            yield key, value

    def close(self) -> None:
        self.closed = True


def config(**overrides: Any) -> PolicydConfig:
    base = PolicydConfig(hostname="mx.example.net")
    return replace(base, **overrides)


def make_policy(cfg: PolicydConfig, *, postscreen: Table | None = None,
                whitelist: Whitelists | None = None,
                triplets: DictTable | None = None, clients: DictTable | None = None,
                resolver: Resolver | None = None) \
        -> tuple[GreylistPolicy, DictTable, DictTable]:
    """A policy over fresh DictTables (or the given tables); must be called
    inside a running event loop's thread, closed with aclose()."""
    ttable = triplets or DictTable("dict:triplets")
    ctable = clients or DictTable("dict:clients")
    policy = GreylistPolicy(cfg, Store(ttable), Store(ctable),
                            Store(postscreen) if postscreen is not None else None,
                            whitelist or Whitelists(), resolver)
    return policy, ttable, ctable


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def request(**attrs: str) -> dict[str, str]:
    base = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "mail.example.org",
        "reverse_client_name": "mail.example.org",
        "helo_name": "mail.example.org",
        "sender": "alice@example.org",
        "recipient": "bob@example.com",
        "instance": "",
        "sasl_username": "",
    }
    base.update(attrs)
    return base


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)
