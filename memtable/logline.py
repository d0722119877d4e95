"""Log lines as Postfix's commands write them on stderr (msg_vstream):
``program: warning: message``, no prefix for info and debug.  memtable's
command and policyd's one-shot commands use it; policyd's server lines add
the pid, time and journal priority around the same severity prefix."""

from __future__ import annotations

import logging

#: Postfix's severity words (msg_warn, msg_error, msg_fatal).
SEVERITY_PREFIXES = {logging.WARNING: "warning: ", logging.ERROR: "error: ",
                     logging.CRITICAL: "fatal: "}


class CommandFormatter(logging.Formatter):
    """``program: [severity: ]message``."""

    def __init__(self, program: str) -> None:
        super().__init__()
        self.program = program

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.program}: {SEVERITY_PREFIXES.get(record.levelno, '')}{record.getMessage()}"
