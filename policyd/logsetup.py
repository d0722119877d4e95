"""policyd's logging: where lines go, and the one line per decision.

Lines go to stderr always and to syslog when ``syslog = yes`` (tagged
``policyd[pid]:`` like Postfix's daemons).  Warnings and errors carry
Postfix's ``warning:`` / ``error:`` prefixes so the usual greps work.

Each decision is ONE logfmt-style line (logger ``policyd.decision``):

    action=DEFER_IF_PERMIT reason=new client=192.0.2.1 client_name=mx.example.com
    sender=a@example.org recipient=b@example.com delay=- queue_id=-

(on one line).  A decision to close without reply shows
``action=disconnect``.  A missing or empty value is ``-`` (the null sender is
``<>``); values holding white space, ``"``, ``=``, ``\\`` or control
characters are double-quoted with ``\\"``, ``\\\\`` and ``\\xNN`` escapes, so a
client cannot forge fields or lines.  ``delay`` is whole seconds.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import socket
import sys
from collections.abc import Mapping

from policyd.api import Decision
from policyd.config import PolicydConfig

DECISION_LOGGER = "policyd.decision"
_decision_log = logging.getLogger(DECISION_LOGGER)

# Log field -> request attribute, in line order (after action and reason).
_REQUEST_FIELDS = (("client", "client_address"), ("client_name", "client_name"),
                   ("sender", "sender"), ("recipient", "recipient"))

_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"'})

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}
_PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
             logging.CRITICAL: "fatal: "}

_installed: list[logging.Handler] = []


def logfmt_value(value: str | None) -> str:
    """One value as logfmt: bare when safe, ``-`` when empty, else quoted."""
    if not value:
        return "-"
    if _NEEDS_QUOTES.search(value) is None:
        return value
    return '"' + value.translate(_ESCAPES) + '"'


def format_decision(request: Mapping[str, str], decision: Decision) -> str:
    """The decision line for ``request`` (see the module docstring)."""
    action = "disconnect" if decision.disconnect else decision.action
    parts = [f"action={logfmt_value(action)}",
             f"reason={logfmt_value(decision.reason)}"]
    for field, attr in _REQUEST_FIELDS:
        value = request.get(attr)
        if attr == "sender" and value == "":
            parts.append("sender=<>")
        else:
            parts.append(f"{field}={logfmt_value(value)}")
    delay = "-" if decision.delay is None else str(round(decision.delay))
    parts.append(f"delay={delay}")
    parts.append(f"queue_id={logfmt_value(request.get('queue_id'))}")
    return " ".join(parts)


def log_decision(request: Mapping[str, str], decision: Decision) -> None:
    """Log ONE line for one decision (at info level)."""
    if _decision_log.isEnabledFor(logging.INFO):
        _decision_log.info(format_decision(request, decision))


class _PostfixFormatter(logging.Formatter):
    """Adds Postfix's severity prefix (none for info) before the message."""

    def format(self, record: logging.LogRecord) -> str:
        record.severity = _PREFIXES.get(record.levelno, "")
        return super().format(record)


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    """Like openlog(3): reconnects on each line while syslog is away, and a
    line it cannot send is dropped silently (stderr has it) instead of
    printing a "--- Logging error ---" traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def setup_logging(config: PolicydConfig) -> list[logging.Handler]:
    """Send log lines to stderr and, when configured, to syslog.

    Replaces the handlers of an earlier call, so it can run again after a
    configuration change.  A syslog socket that is not there (yet) is
    reported on stderr and does not stop policyd.  Returns the handlers installed.
    """
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()

    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(_PostfixFormatter(
        "%(asctime)s policyd[%(process)d]: %(severity)s%(message)s"))
    _installed.append(stderr)

    problem = ""
    if config.syslog:
        facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
        syslog = _QuietSysLogHandler(address=config.syslog_socket, facility=facility)
        sock: socket.socket | None = getattr(syslog, "socket", None)  # untyped in typeshed
        if sock is None or sock.fileno() < 0:
            problem = (f"syslog socket {config.syslog_socket} is not available yet; "
                       "lines go to stderr only until it is")
        syslog.setFormatter(_PostfixFormatter("policyd[%(process)d]: %(severity)s%(message)s"))
        _installed.append(syslog)

    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(_LEVELS[config.log_level])
    if problem:
        logging.getLogger("policyd").warning("%s", problem)
    return list(_installed)
