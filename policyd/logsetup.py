"""policyd's logging: where lines go, and the one line per decision.

Lines go to stderr always and to syslog when ``syslog = yes`` (tagged
``policyd[pid]:`` like Postfix's daemons).  Warnings and errors carry
Postfix's ``warning:`` / ``error:`` prefixes so the usual greps work.

Each decision is ONE logfmt-style line (logger ``policyd.decision``):

    action=DEFER_IF_PERMIT reason=new client=192.0.2.1 client_name=mx.example.com
    sender=a@example.org recipient=b@example.com delay=- queue_id=-

(on one line).  A decision to close without reply shows
``action=disconnect``; what DNS contributed follows ``queue_id``: SPF's
``fields`` (``spf=pass client_key=spf:example.org``, see
policyd.greylist), ``dns_score=N`` (the DNSBL/DNSWL score), or
``dns=timeout`` / ``dns=failure`` when DNS did not answer; a decision
with a ``detail`` (a policy failure says what failed) ends with
``detail="..."``.  A missing or empty value is ``-``
(the null sender is ``<>``); values holding white space, ``"``, ``=``, ``\\`` or control
characters are double-quoted with ``\\"``, ``\\\\`` and ``\\xNN`` escapes, so a
client cannot forge fields or lines.  ``delay`` is whole seconds.

Cost per decision matters (one line per request): the line is built only
when info is enabled; while the handlers are setup_logging's own, it goes
to them without a LogRecord and logging's handler chain (else through
logging, without the caller lookup logging does for every call); the time
stamp is formatted once per second, and the stderr handler writes the lines
of one event-loop iteration with one write (at once outside an event loop,
and for warnings and errors).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import logging.handlers
import os
import re
import socket
import sys
import time
from collections.abc import Iterator, Mapping
from typing import TextIO

from memtable.logline import SEVERITY_PREFIXES, CommandFormatter
from policyd import limits
from policyd.api import Decision
from policyd.config import PolicydConfig

DECISION_LOGGER = "policyd.decision"
_decision_log = logging.getLogger(DECISION_LOGGER)

_NEEDS_QUOTES = re.compile(r'[\s"=\\\x00-\x1f\x7f]')
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F]}
_ESCAPES.update({ord("\\"): "\\\\", ord('"'): '\\"'})

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}
# sd-daemon(3) priority prefixes, for stderr lines that go to the journal.
_JOURNAL_PRIORITIES = {logging.DEBUG: "<7>", logging.INFO: "<6>", logging.WARNING: "<4>",
                       logging.ERROR: "<3>", logging.CRITICAL: "<2>"}

_installed: list[logging.Handler] = []
_root = logging.getLogger()
# The loggers a decision line passes on its way to the root's handlers.
_decision_path = (_decision_log, logging.getLogger("policyd"))

# The pid for the ``policyd[pid]`` tag, kept here: with logging.logProcesses
# on, every LogRecord makes a getpid() system call (one per decision line).
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


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
    delay = "-" if decision.delay is None else str(round(decision.delay))
    get = request.get
    client, name, sender, recipient, queue_id = (
        get("client_address"), get("client_name"), get("sender"), get("recipient"),
        get("queue_id"))
    head = f"action={_logfmt_action(action)} reason={logfmt_value(decision.reason)}"
    if (client and name and sender and recipient and _NEEDS_QUOTES.search(
            f"{client}{name}{sender}{recipient}{queue_id or ''}") is None):
        # Nearly every request: every value present and none needs quotes.
        line = (f"{head} client={client} client_name={name} sender={sender} "
                f"recipient={recipient} delay={delay} queue_id={queue_id or '-'}")
    else:
        parts = [head]
        for field, value in (("client", client), ("client_name", name), ("sender", sender),
                             ("recipient", recipient)):
            if field == "sender" and value == "":
                parts.append("sender=<>")
            else:
                parts.append(f"{field}={logfmt_value(value)}")
        parts.append(f"delay={delay}")
        parts.append(f"queue_id={logfmt_value(queue_id)}")
        line = " ".join(parts)
    if decision.fields:
        line += "".join(f" {name}={logfmt_value(value)}" for name, value in decision.fields)
    if decision.dns_score is not None:
        line = f"{line} dns_score={decision.dns_score}"
    if decision.dns is not None:
        line = f"{line} dns={logfmt_value(decision.dns)}"
    if decision.detail is None:
        return line
    return f"{line} detail={logfmt_value(decision.detail)}"


# Few distinct actions (the greylist text varies with the wait and the
# recipient domain): remember the last ones formatted.
_logfmt_action = functools.lru_cache(maxsize=limits.DECISION_ACTION_CACHE)(logfmt_value)


def log_decision(request: Mapping[str, str], decision: Decision) -> None:
    """Log ONE line for one decision (at info level)."""
    if not _decision_log.isEnabledFor(logging.INFO):
        return
    message = format_decision(request, decision)
    created = time.time()
    if _installed and _root.handlers == _installed and _plain_path():
        # The handlers are setup_logging's own: skip logging's record and
        # handler chain, which cost more than building the line.
        for handler in _installed:
            handler.emit_info(message, created)  # type: ignore[attr-defined]
    else:
        _decision_log.handle(_info_record(message, created))


def _plain_path() -> bool:
    """The decision logger filters nothing, and no logger between it and
    the root adds handlers: a decision line reaches exactly the root's."""
    if _decision_log.filters:
        return False
    return all(not logger.handlers and logger.propagate for logger in _decision_path)


def _info_record(message: str, created: float) -> logging.LogRecord:
    # Logger.info() would also look up the caller's file and line, which no
    # policyd format shows.
    record = _decision_log.makeRecord(DECISION_LOGGER, logging.INFO, __file__, 0,
                                      message, (), None)
    record.created = created
    record.msecs = _msecs(created)
    return record


def _msecs(created: float) -> float:
    return int((created - int(created)) * 1000) + 0.0  # as LogRecord computes it


class _ServerFormatter(logging.Formatter):
    """``[time ]policyd[pid]: [severity: ]message``: Postfix's severity
    prefix (none for info); the time stamp (logging's default format)
    formatted once per second.  For the journal (``journal=True``):
    ``<N>[severity: ]message``, the priority prefix systemd reads (so that
    ``journalctl -p warning`` works) and neither time nor tag, which the
    journal adds itself."""

    _second = -1
    _stamp = ""

    def __init__(self, with_time: bool, journal: bool = False) -> None:
        if journal:
            fmt = "%(priority)s%(severity)s%(message)s"
        else:
            fmt = ("%(asctime)s " if with_time else "") + \
                "policyd[%(process)d]: %(severity)s%(message)s"
        super().__init__(fmt)
        self.with_time = with_time and not journal
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        record.severity = SEVERITY_PREFIXES.get(record.levelno, "")
        if record.process is None:  # logging.logProcesses is off: see setup_logging
            record.process = _pid
        if not self.journal:
            return super().format(record)
        priority = record.priority = _JOURNAL_PRIORITIES.get(record.levelno, "<6>")
        # The journal reads each line on its own: a traceback's lines need
        # the priority too, or `journalctl -p err` shows only the first.
        return super().format(record).replace("\n", "\n" + priority)

    def info_line(self, message: str, created: float) -> str:
        """What format() makes of an info record of ``message`` created at
        ``created`` (plain text, no exception), without the record."""
        if self.journal:
            return f"<6>{message}"
        if self.with_time:
            return f"{self._time(created, _msecs(created))} policyd[{_pid}]: {message}"
        return f"policyd[{_pid}]: {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        return self._time(record.created, record.msecs)

    def _time(self, created: float, msecs: float) -> str:
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(second))
            self._second = second
        return f"{self._stamp},{int(msecs):03d}"  # logging's default format


class _BatchingStreamHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that, inside a running event loop, writes the lines of
    one loop iteration together (one write instead of one per line), at the
    end of the iteration.  Warnings and errors, and lines from other
    threads, are written at once (with anything pending before them)."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._pending.append(self.format(record) + self.terminator)
            if record.levelno < logging.WARNING and self._defer():
                return
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def emit_info(self, message: str, created: float) -> None:
        """emit() of an info line without a record (see log_decision)."""
        if self.level > logging.INFO:
            return
        formatter = self.formatter
        if self.filters or not isinstance(formatter, _ServerFormatter):
            self.handle(_info_record(message, created))
            return
        line = formatter.info_line(message, created) + self.terminator
        self.acquire()
        try:
            self._pending.append(line)
        finally:
            self.release()
        if not self._defer():
            self.flush()

    def _defer(self) -> bool:
        if self._scheduled:
            return True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        loop.call_soon(self.flush)
        self._scheduled = True
        return True

    def flush(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            if self._pending:
                data = "".join(self._pending)
                self._pending.clear()
                self.stream.write(data)
            if hasattr(self.stream, "flush"):
                self.stream.flush()
        finally:
            self.release()


class _QuietSysLogHandler(logging.handlers.SysLogHandler):
    """Like openlog(3): reconnects on each line while syslog is away, and a
    line it cannot send is dropped silently (stderr has it) instead of
    printing a "--- Logging error ---" traceback per line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass

    def emit_info(self, message: str, created: float) -> None:
        self.handle(_info_record(message, created))


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream: $JOURNAL_STREAM names its
    device and inode (systemd.exec(5)), and still matches stderr (a child
    whose stderr was redirected inherits the variable, not the stream)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(part) for part in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def error_line(message: str) -> str:
    """An error line printed before logging is set up (configuration errors):
    with the journal's error priority when stderr is the journal."""
    return f"{_JOURNAL_PRIORITIES[logging.ERROR]}{message}" if stderr_is_journal() else message


_COMMAND_FORMATTER = CommandFormatter("policyd")


class _CommandHandler(logging.Handler):
    """Warnings and errors before setup_logging, and in the commands that
    never call it (--check-config, report, cleanup): one line on stderr,
    ``policyd: warning: ...`` as Postfix's commands print them (with the
    journal's priority when stderr is the journal).  sys.stderr is looked up
    at each line, so a replaced stderr (tests) gets them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = _COMMAND_FORMATTER.format(record)
            if stderr_is_journal():
                line = _JOURNAL_PRIORITIES.get(record.levelno, "<6>") + line
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


_command_handlers: list[logging.Handler] = []


def setup_command_logging() -> None:
    """Install _CommandHandler (replacing an earlier one) for warnings and
    errors; setup_logging replaces it with the server's handlers."""
    end_command_logging()
    handler = _CommandHandler(logging.WARNING)
    _command_handlers.append(handler)
    _root.addHandler(handler)


def end_command_logging() -> None:
    for handler in _command_handlers:
        _root.removeHandler(handler)
    _command_handlers.clear()


def setup_logging(config: PolicydConfig) -> list[logging.Handler]:
    """Send log lines to stderr and, when configured, to syslog.

    Replaces the handlers of an earlier call, so it can run again after a
    configuration change.  A syslog socket that is not there (yet) is
    reported on stderr and does not stop policyd.  Returns the handlers installed.
    """
    root = logging.getLogger()
    end_command_logging()
    # No getpid() and thread lookup per record: the formatters add the pid
    # (_ServerFormatter), and no policyd format shows the thread.
    logging.logProcesses = False
    logging.logThreads = False
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()

    stderr = _BatchingStreamHandler(sys.stderr)
    stderr.setFormatter(_ServerFormatter(with_time=True, journal=stderr_is_journal()))
    _installed.append(stderr)

    problem = ""
    if config.syslog:
        facility = logging.handlers.SysLogHandler.facility_names[config.syslog_facility]
        syslog = _QuietSysLogHandler(address=config.syslog_socket, facility=facility)
        sock: socket.socket | None = getattr(syslog, "socket", None)  # untyped in typeshed
        if sock is None or sock.fileno() < 0:
            problem = (f"syslog socket {config.syslog_socket} is not available yet; "
                       "lines go to stderr only until it is")
        syslog.setFormatter(_ServerFormatter(with_time=False))
        _installed.append(syslog)

    for handler in _installed:
        root.addHandler(handler)
    root.setLevel(_LEVELS[config.log_level])
    if problem:
        logging.getLogger("policyd").warning("%s", problem)
    return list(_installed)


@contextlib.contextmanager
def command_logging() -> Iterator[None]:
    """Warnings of a one-shot command (--check-config) to stderr, as
    Postfix's commands write them: ``policyd: warning: ...``; the handlers
    before it are back afterwards."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_COMMAND_FORMATTER)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
