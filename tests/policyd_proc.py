"""Real policyd processes for end-to-end tests: ``python -m policyd -c CFG``
on an ephemeral loopback port, with its log captured in a file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memtable.registry import open_table
from policyd.config import PolicydConfig
from policyd.greylist import TripletRecord
from tests.conftest import free_port
from tests.policyd_helpers import ask, connect, request
from tests.wait import WAIT

START_WAIT = 15.0  # seconds for a policyd process to answer


class PolicydProcess:
    """One policyd process with its own config directory."""

    def __init__(self, directory: Path, memcache: str | None, *, backup: bool = True,
                 extra: str = "", port: int | None = None,
                 hostname: str | None = "mx.test.example",
                 env: dict[str, str] | None = None, umask: int = -1,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # wrap: the command line around policyd's (a private resolver, ...).
        self.wrap = wrap or (lambda argv: argv)
        self.dir = directory
        self.port = port or free_port()
        self.log = directory / "policyd.log"
        tables = {}
        for name in ("triplets", "clients"):
            if memcache is None:
                tables[name] = f"lmdb:{directory / name}"
                continue
            cf = directory / f"{name}.cf"
            lines = [f"memcache = {memcache}", f"key_format = policyd-{name}:%s",
                     "timeout = 1", "max_try = 1"]
            if backup:
                lines.append(f"backup = lmdb:{directory / name}")
            cf.write_text("\n".join(lines) + "\n")
            tables[name] = f"memcache:{cf}"
        self.config = directory / "policyd.cf"
        self.config.write_text(
            f"listen = inet:127.0.0.1:{self.port}\n"
            f"triplet_table = {tables['triplets']}\n"
            f"client_table = {tables['clients']}\n"
            + (f"hostname = {hostname}\n" if hostname is not None else "") + extra)
        self.env = env or {}
        self.umask = umask  # the umask policyd starts with (-1: this process's)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PolicydProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.wrap([sys.executable, "-m", "policyd", "-c", str(self.config)]),
                stdout=log, stderr=subprocess.STDOUT, cwd=self.dir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env}, umask=self.umask)
        deadline = time.monotonic() + START_WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"policyd exited: {self.log.read_text()[-2000:]}")
            try:
                with connect(("127.0.0.1", self.port)):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"policyd did not answer: {self.log.read_text()[-2000:]}")

    def ask(self, **attrs: str) -> str:
        """One request on a fresh connection; the action, or "" when the
        server closed without a reply."""
        with connect(("127.0.0.1", self.port)) as sock:
            reply = ask(sock, request(**attrs)).decode()
        return reply.removeprefix("action=").rstrip("\n")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(WAIT + 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(WAIT)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def age_triplets(self, seconds: int, *, backup_only: bool = False) -> None:
        """Move every stored triplet ``seconds`` into the past, as if that
        much time had gone by since it was seen: a real process's
        greylist_delay runs out without sleeping through it.  The triplets
        are read from the lmdb backup (every one is there) and rewritten
        through the triplet table (memcached and backup), or with
        ``backup_only`` in the backup alone."""
        config = PolicydConfig.from_file(str(self.config))
        backup = f"lmdb:{self.dir / 'triplets'}"
        with open_table(backup) as table:
            records = [(key, TripletRecord.parse(value)) for key, value in table.sequence()]
        assert records, f"no triplet in {backup}"
        with open_table(backup if backup_only else config.triplet_table,
                        read_write=True) as table:
            for key, old in records:
                table.update(key, TripletRecord(
                    old.first_seen - seconds, old.last_seen - seconds, old.passed,
                    old.passed_at - seconds if old.passed_at else 0).serialise(),
                    config.max_age if old.passed else config.retry_window)


@pytest.fixture
def policyd_factory(tmp_path: Path) -> Iterator[type[PolicydProcess]]:
    """Make PolicydProcess objects that are stopped after the test."""
    made: list[PolicydProcess] = []

    class Tracked(PolicydProcess):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Tracked
    for proc in made:
        proc.stop()


__all__ = ["PolicydProcess", "policyd_factory"]
