"""Real Postfix for tests: a private config for ``postmap`` and private
Postfix instances (smtpd, optional postscreen) in temporary directories.

Nothing here touches /etc/postfix's instance, the system queue or syslog:
every instance has its own config, queue and data directories and logs to
its own maillog file through its own postlogd.

The fixtures ``postfix_instance`` and ``postmap_config`` are imported by
tests/conftest.py, so every test module can use them.
Tests that use Postfix carry ``@pytest.mark.postfix``.

Accepted mail is kept in the HOLD queue (``header_checks`` with ``/^/ HOLD``):
cleanup puts it on hold before qmgr sees it, so it is never delivered,
deferred or bounced, and tests can read it with postcat at leisure.

Postfix behaviour this module works around (Debian Postfix 3.7):

- Postfix programs refuse to read main.cf (and .cf or pattern files they
  load whole) whose mtime is this second: each postfix, postconf, postmap
  process then polls for about 2 s.  Every file written here is backdated
  (tests.postfixcf.write_aged); write test .cf files with it too.
- ``postfix`` reports fatal errors (bad main.cf values) only to a terminal or
  the maillog, and before start there is no postlogd to write the maillog:
  its stderr is attached to a pseudo-terminal to capture them.
- A Postfix fatal error costs 1 s (msg_fatal sleeps before exiting), so
  stop() does not run ``postfix stop`` on an instance that is not running.
- pytest's tmp_path lies under a 0700 directory that the postfix user cannot
  traverse: instances live in their own 0755 directory under /tmp.
- postscreen_access_list defaults to permit_mynetworks, which allowlists
  127.0.0.1 without running (or caching) any test.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import free_port
from tests.postfixcf import backdate, postfix_config_dir


def _tool(name: str) -> str:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin") or ""


POSTMAP = _tool("postmap")
POSTFIX = _tool("postfix")
POSTCAT = _tool("postcat")
POSTQUEUE = _tool("postqueue")
POSTCONF = _tool("postconf")
# The package's pristine master.cf, not the host's /etc/postfix/master.cf
# (the host's configuration is off limits: tests/hostguard).
DIST_MASTER_CF = Path("/usr/share/postfix/master.cf.dist")

HAVE_POSTMAP = bool(POSTMAP)
# A private instance needs root (set-permissions, master runs as root).
HAVE_POSTFIX = bool(POSTFIX and POSTCAT and POSTQUEUE) and DIST_MASTER_CF.exists() \
    and os.geteuid() == 0

# Bounds of every wait in this module (seconds).
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
COMMAND_TIMEOUT = 20.0
SMTP_TIMEOUT = 10.0
QUEUE_WAIT = 10.0
POLL = 0.05

requires_postmap = pytest.mark.skipif(not HAVE_POSTMAP, reason="postmap not installed")
requires_postfix = pytest.mark.skipif(
    not HAVE_POSTFIX, reason="needs Postfix installed and root (private instance)")


def _env() -> dict[str, str]:
    # Postfix's own programs must not inherit a MAIL_CONFIG from outside.
    env = {k: v for k, v in os.environ.items() if k not in ("MAIL_CONFIG", "POSTLOG_SERVICE")}
    env["LANG"] = env["LC_ALL"] = "C"
    return env


# --------------------------------------------------------------------------
# postmap with a private configuration directory
# --------------------------------------------------------------------------

def run_postmap(config_dir: Path, *args: str, input: bytes | None = None,
                stdin: IO[bytes] | None = None, umask: int = -1,
                timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    """``postmap -c config_dir ARGS`` with captured stdout/stderr (standard
    input: ``input``, or the open file ``stdin``)."""
    return subprocess.run([POSTMAP, "-c", str(config_dir), *args], input=input, stdin=stdin,
                          capture_output=True, timeout=timeout, env=_env(), umask=umask,
                          check=False)


_PARAM = re.compile(r"^([A-Za-z0-9_]+)\s*=")


def _merge_main_cf(defaults: Sequence[str], extra: Sequence[str]) -> str:
    """main.cf text: ``extra`` settings replace ``defaults`` of the same name."""
    settings: dict[str, str] = {}
    last = ""
    for n, line in enumerate([*defaults, *extra]):
        if line[:1].isspace() and last:  # continuation of the previous setting
            settings[last] += "\n" + line
            continue
        m = _PARAM.match(line)
        last = m.group(1) if m else f" {n}"
        settings[last] = line
    return "\n".join(settings.values()) + "\n"


# --------------------------------------------------------------------------
# A private Postfix instance
# --------------------------------------------------------------------------

class PostfixError(RuntimeError):
    """A private instance failed to start, stop or answer."""


_SMTP_INET = re.compile(r"^smtp\s+inet\s")
_CONTINUATION = re.compile(r"^\s")
_QUEUED_AS = re.compile(r"queued as ([0-9A-Za-z]+)")


def _master_cf(port: int, postscreen_port: int | None) -> str:
    """The distribution's master.cf, rebound to loopback ports, no chroot.

    Every service gets chroot ``n``: the private queue directory has none of
    the files (resolv.conf, services, ...) a chroot jail needs.
    """
    out: list[str] = []
    for line in DIST_MASTER_CF.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#") or _CONTINUATION.match(line):
            out.append(line)
            continue
        fields = line.split()
        if _SMTP_INET.match(line):
            fields[0] = f"127.0.0.1:{port}"
        if fields[0] == "postlog":
            continue  # added below with known settings
        if len(fields) >= 8:
            fields[4] = "n"
        out.append(" ".join(fields))
    out.append("postlog unix-dgram n - n - 1 postlogd")
    if postscreen_port is not None:
        out.append(f"127.0.0.1:{postscreen_port} inet n - n - 1 postscreen")
        out.append("smtpd pass - - n - - smtpd")
    return "\n".join(out) + "\n"


class PostfixInstance:
    """Postfix in its own temporary directory R: config_directory R/etc
    (``.dir``), queue R/queue, data R/data, log R/maillog; smtpd on
    127.0.0.1:``port``, postscreen (optional) on 127.0.0.1:``postscreen_port``.

    ``main_cf`` lines ("name = value") replace the defaults of the same name
    (Postfix would warn about duplicates, the last one winning); Postfix
    expands ``$config_directory`` in them.  ``files`` are written into the
    config directory before start (e.g. a memcache .cf for postscreen).
    """

    def __init__(self, main_cf: Sequence[str] = (), *, postscreen: bool = False,
                 hold: bool = True, files: dict[str, str] | None = None,
                 base: Path | None = None) -> None:
        # Not under pytest's tmp_path: that lives below a 0700 directory the
        # unprivileged postfix user cannot traverse (postlogd, postscreen).
        self.root = Path(tempfile.mkdtemp(prefix="pflab-", dir=base))
        self.root.chmod(0o755)
        # config_directory is a subdirectory, not root itself: postfix start
        # checks that the config tree is root-owned and would warn about
        # every postfix-owned queue and data directory inside it.
        self.dir = self.root / "etc"
        self.dir.mkdir()
        self.port = free_port()
        self.postscreen_port = free_port() if postscreen else None
        self.maillog_path = self.root / "maillog"
        lines = [
            f"config_directory = {self.dir}",
            f"queue_directory = {self.root}/queue",
            f"data_directory = {self.root}/data",
            "compatibility_level = 3.6",
            "myhostname = pflab.example",
            "mydomain = pflab.example",
            "myorigin = $myhostname",
            "inet_interfaces = 127.0.0.1",
            "inet_protocols = ipv4",
            "mynetworks = 127.0.0.0/8",
            "mydestination = example.com",
            "local_recipient_maps =",
            "alias_maps =",
            "alias_database =",
            "relayhost =",
            "smtpd_banner = $myhostname ESMTP pflab",
            f"maillog_file = {self.maillog_path}",
            f"maillog_file_prefixes = {self.root}",
            # Fast, local-only behaviour: no DNS for clients, short waits.
            "smtpd_peername_lookup = no",
            "smtp_dns_support_level = disabled",
            "smtpd_error_sleep_time = 0",
            "smtpd_policy_service_timeout = 10s",
        ]
        if hold:
            (self.dir / "hold.regexp").write_text("/^/ HOLD\n")
            lines.append("header_checks = regexp:$config_directory/hold.regexp")
        if postscreen:
            lines += [
                # The default permit_mynetworks would allowlist 127.0.0.1
                # without any test, and then nothing is cached.
                "postscreen_access_list =",
                "postscreen_dnsbl_sites =",
                "postscreen_greet_wait = 1s",
                "postscreen_greet_action = enforce",
                "postscreen_cache_cleanup_interval = 0",
            ]
        (self.dir / "main.cf").write_text(_merge_main_cf(lines, main_cf))
        (self.dir / "master.cf").write_text(_master_cf(self.port, self.postscreen_port))
        for name, text in (files or {}).items():
            (self.dir / name).write_text(text)
        backdate(self.dir)
        (self.root / "data").mkdir()
        (self.root / "queue").mkdir()

    # -- commands -----------------------------------------------------------

    def run(self, *argv: str, input: bytes | None = None,
            timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a Postfix command with MAIL_CONFIG pointing at this instance."""
        env = _env()
        env["MAIL_CONFIG"] = str(self.dir)
        return subprocess.run(list(argv), input=input.decode() if input else None,
                              capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``postfix -c D ARGS``, its stderr on a pseudo-terminal.

        The postfix command reports fatal errors (bad main.cf values, ...)
        only to a terminal or to the maillog, and the maillog needs postlogd,
        which is not running before start: without a tty they are lost.
        """
        env = _env()
        env["MAIL_CONFIG"] = str(self.dir)
        primary, secondary = pty.openpty()
        chunks: list[bytes] = []

        def drain() -> None:
            with contextlib.suppress(OSError):  # EIO once the child side closes
                while chunk := os.read(primary, 4096):
                    chunks.append(chunk)

        reader = threading.Thread(target=drain, daemon=True)
        reader.start()
        try:
            proc = subprocess.run([POSTFIX, "-c", str(self.dir), *args], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=secondary,
                                  timeout=COMMAND_TIMEOUT, env=env, check=False)
        finally:
            os.close(secondary)
            reader.join(2)
            os.close(primary)
        err = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")
        return subprocess.CompletedProcess(proc.args, proc.returncode,
                                           proc.stdout.decode(errors="replace"), err)

    def start(self) -> None:
        """set-permissions, start, and wait (bounded) for the SMTP greeting."""
        shutil.chown(self.root / "data", user="postfix")
        for args in (("set-permissions",), ("start",)):
            r = self.postfix(*args)
            if r.returncode != 0:
                raise PostfixError(f"postfix {args[0]} failed ({r.returncode}): "
                                   f"{r.stdout}{r.stderr}\n{self.maillog_tail()}")
        deadline = time.monotonic() + START_TIMEOUT
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError as exc:
                last = exc
            time.sleep(POLL)
        self.stop()
        raise PostfixError(f"no SMTP greeting on 127.0.0.1:{self.port} ({last})\n"
                           f"{self.maillog_tail()}")

    def _own_pids(self) -> list[int]:
        """Processes of this instance: Postfix exports MAIL_CONFIG to them."""
        marker = f"MAIL_CONFIG={self.dir}".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
        return pids

    def stop(self) -> None:
        """postfix stop, wait (bounded) for the processes, kill leftovers."""
        if not self._own_pids():
            return  # never started, or gone (postfix stop would fail slowly)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.postfix("stop")
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and self._own_pids():
            time.sleep(POLL)
        for pid in self._own_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- logs and queue ----------------------------------------------------

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def maillog_tail(self, lines: int = 30) -> str:
        return "\n".join(self.maillog().splitlines()[-lines:])

    def wait_log(self, pattern: str, timeout: float = QUEUE_WAIT) -> re.Match[str]:
        """Wait (bounded) until a maillog line matches the regex ``pattern``."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.maillog())
            if m:
                return m
            if time.monotonic() > deadline:
                raise PostfixError(f"no log line like {pattern!r}\n{self.maillog_tail()}")
            time.sleep(POLL)

    def queue(self) -> list[dict[str, object]]:
        """``postqueue -j``: one dict per queued message (queue_id, queue_name, ...)."""
        r = self.run(POSTQUEUE, "-c", str(self.dir), "-j")
        if r.returncode != 0:
            raise PostfixError(f"postqueue -j: {r.stderr}")
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_queued(self, queue_id: str, timeout: float = QUEUE_WAIT) -> dict[str, object]:
        """Wait (bounded) until ``queue_id`` shows in the queue; its entry."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.queue():
                if entry.get("queue_id") == queue_id:
                    return entry
            if time.monotonic() > deadline:
                raise PostfixError(f"{queue_id} not queued\n{self.maillog_tail()}")
            time.sleep(POLL)

    def message(self, queue_id: str, *, headers_only: bool = False) -> str:
        """A queued message's content (``postcat -q``; ``-h`` for headers)."""
        args = ["-h"] if headers_only else ["-h", "-b"]
        r = self.run(POSTCAT, "-c", str(self.dir), *args, "-q", queue_id)
        if r.returncode != 0:
            raise PostfixError(f"postcat -q {queue_id}: {r.stderr}")
        return r.stdout

    def headers(self, queue_id: str) -> list[str]:
        """Header lines of a queued message, continuation lines unfolded."""
        out: list[str] = []
        for line in self.message(queue_id, headers_only=True).splitlines():
            if line[:1] in (" ", "\t") and out:
                out[-1] += "\n" + line
            elif line:
                out.append(line)
        return out


# --------------------------------------------------------------------------
# SMTP client helpers (smtplib)
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class SmtpReply:
    code: int
    text: str
    queue_id: str | None = None


def _reply(code: int, msg: bytes | str) -> SmtpReply:
    text = msg.decode(errors="replace") if isinstance(msg, bytes) else msg
    m = _QUEUED_AS.search(text)
    return SmtpReply(code, text, m.group(1) if m else None)


@contextlib.contextmanager
def smtp_session(port: int, *, helo: str = "client.example",
                 timeout: float = SMTP_TIMEOUT) -> Iterator[smtplib.SMTP]:
    """An EHLO'ed smtplib session to 127.0.0.1:port, closed on exit.

    Behind postscreen the connect blocks through postscreen_greet_wait (the
    client waits for the whole greeting, as a good client does).
    """
    client = smtplib.SMTP("127.0.0.1", port, local_hostname=helo, timeout=timeout)
    try:
        code, msg = client.ehlo(helo)
        if code != 250:
            raise PostfixError(f"EHLO refused: {code} {msg!r}")
        yield client
    finally:
        with contextlib.suppress(smtplib.SMTPException, OSError):
            client.quit()
        client.close()


def smtp_rcpt(port: int, sender: str, recipient: str, *, helo: str = "client.example",
              timeout: float = SMTP_TIMEOUT) -> SmtpReply:
    """MAIL FROM + RCPT TO; the RCPT reply (or MAIL's, if MAIL failed)."""
    with smtp_session(port, helo=helo, timeout=timeout) as client:
        code, msg = client.mail(sender)
        if code != 250:
            return _reply(code, msg)
        code, msg = client.rcpt(recipient)
        return _reply(code, msg)


def smtp_send(port: int, sender: str, recipients: Sequence[str], body: str, *,
              headers: dict[str, str] | None = None, helo: str = "client.example",
              timeout: float = SMTP_TIMEOUT) -> SmtpReply:
    """A whole transaction; the first non-2xx reply, or DATA's final reply
    (with ``queue_id`` parsed from "queued as ID")."""
    hdrs = {"From": sender, "To": ", ".join(recipients), "Subject": "pflab test",
            **(headers or {})}
    msg = "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n" + body
    with smtp_session(port, helo=helo, timeout=timeout) as client:
        code, reply = client.mail(sender)
        if code != 250:
            return _reply(code, reply)
        accepted = 0
        last = SmtpReply(0, "")
        for rcpt in recipients:
            code, reply = client.rcpt(rcpt)
            last = _reply(code, reply)
            accepted += code in (250, 251)
        if not accepted:
            return last
        code, reply = client.data(msg.encode())
        return _reply(code, reply)


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------

@pytest.fixture
def postmap_config(tmp_path: Path) -> Path:
    """A private ``postmap -c`` directory (see postfix_config_dir)."""
    if not HAVE_POSTMAP:
        pytest.skip("postmap not installed")
    return postfix_config_dir(tmp_path)


PostfixFactory = Callable[..., PostfixInstance]


@pytest.fixture
def postfix_instance() -> Iterator[PostfixFactory]:
    """Factory: ``make(main_cf=(), *, postscreen=False, hold=True, files=None)``
    returns a started PostfixInstance; all are stopped and removed after the
    test (their maillog tail is printed, so a failing test shows it)."""
    if not HAVE_POSTFIX:
        pytest.skip("needs Postfix installed and root (private instance)")
    made: list[PostfixInstance] = []

    def make(main_cf: Sequence[str] = (), *, postscreen: bool = False, hold: bool = True,
             files: dict[str, str] | None = None) -> PostfixInstance:
        inst = PostfixInstance(main_cf, postscreen=postscreen, hold=hold, files=files)
        made.append(inst)
        inst.start()
        return inst

    yield make
    for inst in made:
        inst.stop()
        print(f"--- maillog of {inst.dir} ---\n{inst.maillog_tail()}")
        inst.remove()
