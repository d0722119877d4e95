"""Shared pieces of the greylisting tests: builders for policies over
in-memory tables (tests.dict_table)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from memtable.registry import as_async
from memtable.table import Table
from policyd.config import PolicydConfig
from policyd.dns import Resolver
from policyd.greylist import GreylistPolicy
from policyd.store import Store
from policyd.whitelist import Whitelists
from tests.dict_table import DictTable

T = TypeVar("T")


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
    policy = GreylistPolicy(cfg, Store(as_async(ttable)), Store(as_async(ctable)),
                            Store(as_async(postscreen)) if postscreen is not None else None,
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
