"""``make run``: memcached on loopback plus policyd with the example config.

Writes a working configuration under a state directory (deploy/'s files
with paths moved there), starts memcached on 127.0.0.1:11211 unless one
already answers there, and runs policyd in the foreground on
inet:127.0.0.1:10023 until interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MEMCACHED_HOST = "127.0.0.1"
MEMCACHED_PORT = 11211
STARTUP_WAIT_SECONDS = 10.0
DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "policyd"


def memcached_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"version\r\n")
            return s.recv(64).startswith(b"VERSION")
    except OSError:
        return False


def start_memcached(state: Path) -> subprocess.Popen[bytes] | None:
    if memcached_answers(MEMCACHED_HOST, MEMCACHED_PORT):
        print(f"using the memcached already on {MEMCACHED_HOST}:{MEMCACHED_PORT}")
        return None
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    user = ["-u", "root"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([binary, *user, "-l", MEMCACHED_HOST, "-p", str(MEMCACHED_PORT),
                             "-U", "0", "-m", "64"],
                            stdout=open(state / "memcached.log", "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_WAIT_SECONDS
    while not memcached_answers(MEMCACHED_HOST, MEMCACHED_PORT):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            sys.exit(f"memcached did not start; see {state / 'memcached.log'}")
        time.sleep(0.05)
    print(f"started memcached on {MEMCACHED_HOST}:{MEMCACHED_PORT} (pid {proc.pid})")
    return proc


def write_config(state: Path) -> Path:
    """deploy/policyd/*.cf with /etc/policyd and /var/lib/policyd moved to state."""
    for name in ("policyd.cf", "triplets.cf", "clients.cf"):
        text = (DEPLOY / name).read_text()
        text = text.replace("/etc/policyd", str(state)).replace("/var/lib/policyd", str(state))
        (state / name).write_text(text)
    return state / "policyd.cf"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state", default=".run", help="directory for config and lmdb files")
    args = parser.parse_args(argv)
    state = Path(args.state).resolve()
    state.mkdir(parents=True, exist_ok=True)
    memcached = start_memcached(state)
    config = write_config(state)
    print(f"policyd -c {config}  (Postfix: check_policy_service inet:127.0.0.1:10023)")
    print(f"query the cache: memtable -q KEY memcache:{state / 'triplets.cf'}")
    policyd = subprocess.Popen([sys.executable, "-m", "policyd", "-c", str(config)])

    def stop(signum: int, frame: object) -> None:
        policyd.send_signal(signal.SIGTERM)  # policyd shuts down gracefully

    # Ctrl-C reaches policyd itself (same process group); SIGTERM to us is
    # passed on.  Either way we wait for policyd, then stop our memcached.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return policyd.wait()
    finally:
        if memcached is not None:
            memcached.terminate()
            memcached.wait()

if __name__ == "__main__":
    sys.exit(main())
