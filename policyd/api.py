"""The contract between policyd's server and its policies.

The server (policyd.server) speaks the SMTPD policy protocol and knows
nothing of greylisting; a policy (policyd.greylist) is a plain object that
turns one request into a Decision.  Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Decision:
    """What to answer one policy request, and why (for the log line).

    ``action`` is an access(5) action such as ``DUNNO``,
    ``DEFER_IF_PERMIT Greylisted ...`` or ``PREPEND X-Greylist: ...``.
    When ``disconnect`` is true the server sends no reply and closes the
    connection (Postfix then retries later).  ``reason`` is one word (the
    log line's and the metrics' ``reason``); ``detail``, when given, is free
    text the log line adds as ``detail="..."``.  ``dns_score`` is the
    client's DNSBL/DNSWL score when the DNS lists were asked and answered;
    ``dns`` says why DNS could not inform the decision (``timeout``,
    ``failure``).  ``fields`` are further ``name=value`` pairs of the log
    line: what SPF contributed (``spf=pass client_key=spf:example.org``).
    """

    action: str
    reason: str
    delay: float | None = None  # seconds the mail was delayed, on pass
    disconnect: bool = False
    detail: str | None = None
    fields: tuple[tuple[str, str], ...] = ()
    dns_score: int | None = None
    dns: str | None = None


class PolicyFailure(Exception):
    """decide() could not decide (its stores failed, say).  The server
    answers as ``failure_action`` says, as for any other failure of
    the policy, and logs ``reason`` and the message as the decision line's
    ``reason`` and ``detail``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class Policy(Protocol):
    """A policy the server can run."""

    async def decide(self, request: Mapping[str, str]) -> Decision:
        """Decide one request (attribute name -> value, already validated).
        Raises PolicyFailure (or any exception) when it cannot."""
        ...

    def reload(self) -> None:
        """Re-read whitelist files (SIGHUP); keep the old ones on error."""
        ...

    async def aclose(self) -> None:
        """Release stores and threads at shutdown."""
        ...
