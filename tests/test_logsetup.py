"""policyd.logsetup: the decision line (logfmt) and where lines go
(stderr, and a real UNIX datagram socket standing in for /dev/log)."""

from __future__ import annotations

import logging
import os
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from freezegun import freeze_time

from policyd import logsetup
from policyd.api import Decision
from policyd.config import PolicydConfig
from policyd.logsetup import (
    DECISION_LOGGER,
    format_decision,
    log_decision,
    logfmt_value,
    setup_logging,
)

REQUEST = {"request": "smtpd_access_policy", "client_address": "192.0.2.1",
           "client_name": "mx.example.com", "sender": "a@b.example",
           "recipient": "c@d.example", "queue_id": "ABC123"}


def test_decision_line() -> None:
    line = format_decision(REQUEST, Decision("DEFER_IF_PERMIT Greylisted", "new"))
    assert line == ('action="DEFER_IF_PERMIT Greylisted" reason=new client=192.0.2.1 '
                    "client_name=mx.example.com sender=a@b.example recipient=c@d.example "
                    "delay=- queue_id=ABC123")


def test_decision_line_delay_null_sender_missing_and_disconnect() -> None:
    request = {"client_address": "192.0.2.1", "sender": ""}
    line = format_decision(request, Decision("DUNNO", "pass", delay=312.6))
    assert line == ("action=DUNNO reason=pass client=192.0.2.1 client_name=- sender=<> "
                    "recipient=- delay=313 queue_id=-")
    line = format_decision(request, Decision("DUNNO", "store", disconnect=True))
    assert line.startswith("action=disconnect reason=store ")


@pytest.mark.parametrize("request_", [REQUEST, {"client_address": "192.0.2.1", "sender": ""}])
def test_decision_line_detail_comes_last_quoted(request_: dict[str, str]) -> None:
    # Both ways of building the line (every field plain, or some missing).
    decision = Decision("DUNNO", "policy-failure", detail='no "decision" in 1s')
    line = format_decision(request_, decision)
    assert line.startswith("action=DUNNO reason=policy-failure client=192.0.2.1 ")
    assert line.endswith(r' detail="no \"decision\" in 1s"')
    assert line.count("detail=") == 1


@pytest.mark.parametrize(("value", "shown"), [
    ("plain@example.com", "plain@example.com"),
    ("", "-"),
    (None, "-"),
    ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("a=b", '"a=b"'),
    ("back\\slash", '"back\\\\slash"'),
    ("line\rbreak\x7f", '"line\\x0dbreak\\x7f"'),
    ("tab\there", '"tab\\x09here"'),
    ("j\u00f6rg", "j\u00f6rg"),
])
def test_logfmt_value(value: str | None, shown: str) -> None:
    assert logfmt_value(value) == shown


def test_client_cannot_forge_fields() -> None:
    request = dict(REQUEST, client_name='x action=OK reason="forged"')
    line = format_decision(request, Decision("DUNNO", "r"))
    fields = dict(token.split("=", 1) for token in shlex.split(line))
    assert list(fields) == ["action", "reason", "client", "client_name", "sender",
                            "recipient", "delay", "queue_id"]
    assert fields["action"] == "DUNNO"
    assert fields["client_name"] == 'x action=OK reason="forged"'


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_syslog_and_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "log")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as devlog:
        devlog.bind(path)
        devlog.settimeout(5)
        config = PolicydConfig(syslog=True, syslog_socket=path, syslog_facility="mail",
                               log_level="info")
        handlers = setup_logging(config)
        assert len(handlers) == 2
        logging.getLogger("policyd.test").warning("disk %s", "full")
        logging.getLogger("policyd.test").debug("not shown at info")
        datagram = devlog.recv(4096).decode()
    # mail (2) * 8 + warning (4) = <20>
    assert datagram == f"<20>policyd[{os.getpid()}]: warning: disk full\x00"
    err = capsys.readouterr().err
    assert f"policyd[{os.getpid()}]: warning: disk full" in err
    assert "not shown" not in err


@pytest.mark.usefixtures("restore_root_logger")
def test_syslog_socket_absent_at_start(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "log")
    handlers = setup_logging(PolicydConfig(syslog=True, syslog_socket=path))
    log = logging.getLogger("policyd.test")
    log.info("while syslog is away")
    err = capsys.readouterr().err
    assert "is not available yet" in err
    assert "while syslog is away" in err
    assert "Traceback" not in err and "Logging error" not in err
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as devlog:
        devlog.bind(path)  # syslog comes up: lines reach it again
        devlog.settimeout(5)
        log.info("back")
        assert devlog.recv(4096).endswith(b"]: back\x00")
    # A second call replaces the handlers instead of adding more.
    setup_logging(PolicydConfig())
    assert not [h for h in logging.getLogger().handlers if h in handlers]


@pytest.mark.usefixtures("restore_root_logger")
def test_decision_line_without_record_matches_logging(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The shortcut past logging's handler chain writes what logging would,
    and gives way to logging's own path as soon as a filter or a handler
    is added on the way (which it would otherwise skip)."""
    root = logging.getLogger()
    handlers = setup_logging(PolicydConfig(log_level="info"))
    monkeypatch.setattr(root, "handlers", list(handlers))  # without pytest's capture
    decision = Decision("DEFER_IF_PERMIT 4.2.0 Greylisted", "new")
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    with freeze_time("2026-11-21 12:34:56.789"):
        log_decision(REQUEST, decision)                      # the shortcut
        decisions = logging.getLogger(DECISION_LOGGER)
        decisions.addFilter(lambda record: False)            # drops every decision
        try:
            log_decision(REQUEST, decision)
        finally:
            decisions.filters.clear()
        keep = Keep()
        logging.getLogger("policyd").addHandler(keep)        # sees every decision
        try:
            log_decision(REQUEST, decision)
        finally:
            logging.getLogger("policyd").removeHandler(keep)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]          # the filtered one is gone
    assert lines[0].startswith(f"2026-11-21 12:34:56,789 policyd[{os.getpid()}]: action=")
    assert len(seen) == 1 and seen[0].getMessage() == lines[0].split(": ", 1)[1]


@pytest.mark.usefixtures("restore_root_logger")
@pytest.mark.parametrize("journal", [True, False])
def test_stderr_to_the_journal_carries_priorities(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: bool) -> None:
    """systemd says which stream is the journal's in $JOURNAL_STREAM; lines
    on it get sd-daemon(3) priority prefixes instead of time and tag, so
    that `journalctl -p warning` selects warnings.  On any other stream
    (a redirected child inherits the variable) lines are as before."""
    out = tmp_path / "stderr"
    other = tmp_path / "other"
    other.touch()
    with out.open("w") as stream:
        st = os.fstat(stream.fileno()) if journal else os.stat(other)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        monkeypatch.setattr("sys.stderr", stream)
        root = logging.getLogger()
        handlers = setup_logging(PolicydConfig(log_level="info"))
        monkeypatch.setattr(root, "handlers", list(handlers))  # without pytest's capture
        logging.getLogger("policyd.test").warning("disk %s", "full")
        logging.getLogger("policyd.test").error("broken")
        log_decision(REQUEST, Decision("DUNNO", "new"))              # the shortcut
        logging.getLogger(DECISION_LOGGER).addFilter(logging.Filter())
        try:
            log_decision(REQUEST, Decision("DUNNO", "new"))          # logging's path
        finally:
            logging.getLogger(DECISION_LOGGER).filters.clear()
        print(logsetup.error_line("policyd: bad.cf, line 1: oops"), file=stream)
        try:
            raise ValueError("with a traceback")
        except ValueError:
            logging.getLogger("policyd.test").exception("failed")
        for handler in handlers:
            handler.flush()
    lines = out.read_text().splitlines()
    traceback = lines[5:]
    lines = lines[:5]
    assert traceback[0].endswith("failed") and traceback[-1].endswith(
        "ValueError: with a traceback")
    if journal:
        # Every line of the record at its priority: the journal reads lines.
        assert all(line.startswith("<3>") for line in traceback), traceback
    decision = format_decision(REQUEST, Decision("DUNNO", "new"))
    if journal:
        assert lines == ["<4>warning: disk full", "<3>error: broken", f"<6>{decision}",
                         f"<6>{decision}", "<3>policyd: bad.cf, line 1: oops"]
    else:
        tag = f"policyd[{os.getpid()}]: "
        assert [line.split(tag, 1)[1] for line in lines[:4]] == [
            "warning: disk full", "error: broken", decision, decision]
        assert lines[4] == "policyd: bad.cf, line 1: oops"


def test_config_error_to_the_journal_is_an_error(tmp_path: Path) -> None:
    """The real command: a configuration error before logging is set up."""
    cf = tmp_path / "policyd.cf"
    cf.write_text("no_such_parameter = 1\n")
    err = tmp_path / "err"
    with err.open("w") as stream:
        st = os.fstat(stream.fileno())
        env = dict(os.environ, JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}")
        done = subprocess.run([sys.executable, "-m", "policyd", "-c", str(cf), "--check-config"],
                              stderr=stream, stdout=subprocess.DEVNULL, env=env, timeout=60)
    assert done.returncode == 1
    text = err.read_text()
    assert text.startswith(f"<3>policyd: {cf}, line 1: "), text
