"""The exception hierarchy of policyd.

Configuration errors are memtable.errors.ConfigError (policyd.cf is read by
the same parser as table files); everything policyd itself raises derives
from PolicydError.
"""

from __future__ import annotations


class PolicydError(Exception):
    """Root of every error raised by policyd."""


class PolicyProtocolError(PolicydError):
    """Raised when a client breaks the SMTPD policy protocol or one of its
    bounds; the server logs it and closes that connection without a reply."""


class ListenerError(PolicydError):
    """Raised when a listening socket cannot be created or an inherited
    (systemd) socket is unusable; ``str(err)`` names the endpoint."""
