"""The test run's guard against reading the host's mail configuration.

tests/conftest.py imports this module (installing the guard in the pytest
process) and puts its directory on PYTHONPATH, so that every Python process
a test starts (``python -m policyd``, ``python -m memtable.cli``) imports it
at start-up as ``sitecustomize``.  From then on, opening anything under
/etc/postfix or /etc/policyd raises PermissionError, whether the file exists
or not: a test that would read the host's Postfix or policyd configuration
(a missing ``-c``, a default table path) fails the same way on every
machine, instead of passing here and failing on a fresh one, or being
skipped where the file exists.  Postfix's own programs are kept from the
host's main.cf by MAIL_CONFIG (see conftest).

Only the standard library: this runs before anything else in each process.
"""

from __future__ import annotations

import errno
import os
import sys

FORBIDDEN = ("/etc/postfix", "/etc/policyd")
MESSAGE = "host configuration is off limits in tests (tests/hostguard)"


def forbidden(path: object) -> bool:
    """True for FORBIDDEN directories and anything under them."""
    if isinstance(path, int) or not isinstance(path, str | bytes | os.PathLike):
        return False  # an open file descriptor
    text = os.path.abspath(os.fsdecode(path))
    return any(text == top or text.startswith(top + "/") for top in FORBIDDEN)


def _audit(event: str, args: tuple[object, ...]) -> None:
    # "open" covers open(), io.open, os.open and pathlib; directory listings
    # have their own events.
    if event in ("open", "os.listdir", "os.scandir") and args and forbidden(args[0]):
        raise PermissionError(errno.EACCES, MESSAGE, os.fsdecode(args[0]))  # type: ignore[arg-type]


if not getattr(sys, "_tests_hostguard", False):
    sys._tests_hostguard = True  # type: ignore[attr-defined]  # once per process
    sys.addaudithook(_audit)
