"""``./dev run``: a private memcached plus policyd with the example config.

Writes a working configuration under a state directory (deploy/'s files
with paths moved there), starts a memcached of its own on a free loopback
port (never the 127.0.0.1:11211 a production install uses: the dev
instance must not answer from, or write into, production's triplets), points
the state directory's table files at it, and runs policyd in the
foreground on inet:127.0.0.1:10023 (``-o listen=...`` to change) until
interrupted; the memcached stops with it.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MEMCACHED_HOST = "127.0.0.1"
# What deploy/'s table files name, and so what a production install uses.
PRODUCTION_MEMCACHE = "127.0.0.1:11211"
STARTUP_WAIT_SECONDS = 10.0
START_ATTEMPTS = 3  # a free port may be taken between probe and bind
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "policyd"


def memcached_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"version\r\n")
            return s.recv(64).startswith(b"VERSION")
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((MEMCACHED_HOST, 0))
        return int(s.getsockname()[1])


def start_memcached(state: Path) -> tuple[subprocess.Popen[bytes], int]:
    """A memcached of this dev instance's own on a free loopback port."""
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    user = ["-u", "root"] if os.geteuid() == 0 else []
    for _ in range(START_ATTEMPTS):
        port = _free_port()
        proc = subprocess.Popen([binary, *user, "-l", MEMCACHED_HOST, "-p", str(port),
                                 "-U", "0", "-m", "64"],
                                stdout=open(state / "memcached.log", "ab"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_WAIT_SECONDS
        while proc.poll() is None and time.monotonic() < deadline:
            if memcached_answers(MEMCACHED_HOST, port):
                return proc, port
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    sys.exit(f"memcached did not start; see {state / 'memcached.log'}")


def write_config(state: Path, memcache: str) -> Path:
    """deploy/policyd/*.cf with /etc/policyd and /var/lib/policyd moved to
    state, and the tables on the memcached ``memcache``."""
    for name in ("policyd.cf", "triplets.cf", "clients.cf"):
        text = (DEPLOY / name).read_text()
        text = text.replace("/etc/policyd", str(state)).replace("/var/lib/policyd", str(state))
        text = re.sub(r"(?m)^memcache\s*=.*$", f"memcache = {memcache}", text)
        (state / name).write_text(text)
    return state / "policyd.cf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", default=".run", help="directory for config and lmdb files")
    parser.add_argument("-o", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE", help="passed to policyd (repeatable)")
    args = parser.parse_args(argv)
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    memcached, port = start_memcached(state)
    memcache = f"inet:{MEMCACHED_HOST}:{port}"
    try:
        config = write_config(state, memcache)
        print(f"started a private memcached on {MEMCACHED_HOST}:{port} (pid {memcached.pid}) "
              f"for this dev instance; {PRODUCTION_MEMCACHE} is not used", flush=True)
        overrides = [arg for o in args.overrides for arg in ("-o", o)]
        print(f"policyd -c {config} {' '.join(overrides)}".rstrip(), flush=True)
        print(f"its cache: memtable -s memcache:{state / 'triplets.cf'}", flush=True)
        policyd = subprocess.Popen([sys.executable, "-m", "policyd", "-c", str(config),
                                    *overrides])

        def stop(signum: int, frame: object) -> None:
            policyd.send_signal(signal.SIGTERM)  # policyd shuts down gracefully

        # Ctrl-C reaches policyd itself (same process group); SIGTERM to us
        # is passed on.  Either way we wait for policyd, then stop memcached.
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        status = policyd.wait()
        if status < 0 and -status not in (signal.SIGTERM, signal.SIGINT):
            # Killed (kill -9, the OOM killer): it could say nothing itself.
            print(f"dev run: policyd (pid {policyd.pid}) was killed by "
                  f"{signal.Signals(-status).name}; stopping its private memcached "
                  f"(pid {memcached.pid})", file=sys.stderr, flush=True)
            return 128 - status
        return status
    finally:
        memcached.terminate()
        memcached.wait()


if __name__ == "__main__":
    sys.exit(main())
