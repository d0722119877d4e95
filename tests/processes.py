"""Stopping the servers tests start: one sequence for all of them."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen[bytes], wait: float = 5.0) -> None:
    """SIGTERM, up to ``wait`` seconds for the exit, then SIGKILL: a test
    never leaves a server behind, nor hangs on one that ignores SIGTERM."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(wait)
