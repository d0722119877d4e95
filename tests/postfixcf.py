"""A private main.cf for ``postmap -c DIR``, and files Postfix reads at once.

Shared by the tests (tests.postfixlab) and the benchmark
(bench.memtable_bench); no pytest here, so the benchmark can import it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def postfix_config_dir(tmp: Path) -> Path:
    """A minimal main.cf for ``postmap -c DIR``; returns DIR (tmp/postfix-cf).

    postmap logs warnings to stderr and, by default, also to syslog; setting
    maillog_file points the second copy at a postlogd socket under a queue
    directory that does not exist, so nothing leaves this directory.
    compatibility_level silences the backwards-compatibility warnings.
    Dynamic table types (lmdb:) are still found through the compiled-in
    meta_directory (/etc/postfix/dynamicmaps.cf), which -c does not move.
    """
    d = tmp / "postfix-cf"
    d.mkdir(parents=True, exist_ok=True)
    (d / "main.cf").write_text(
        "compatibility_level = 3.6\n"
        f"queue_directory = {d}/queue\n"
        f"data_directory = {d}/data\n"
        f"maillog_file = {d}/maillog\n"
        f"maillog_file_prefixes = {d}\n"
        "myhostname = postmap.example\n"
    )
    backdate(d)
    return d


def write_aged(path: Path, text: str | bytes) -> Path:
    """Write a file Postfix will read at once (see backdate); returns path."""
    if isinstance(text, str):
        text = text.encode()
    path.write_bytes(text)
    past = time.time() - 60
    os.utime(path, (past, past))
    return path


def backdate(directory: Path) -> None:
    """Age every file in ``directory`` by a minute.

    Postfix reads main.cf (and other files it loads whole) only once their
    mtime is in the past: a file written this second makes every postfix,
    postconf, postmap... process wait and retry for about two seconds.
    """
    for path in directory.iterdir():
        if path.is_file():
            write_aged(path, path.read_bytes())
