"""The test run cannot read the host's Postfix or policyd configuration
(tests/hostguard, tests/conftest.py): whether /etc/postfix/main.cf or
/etc/policyd exist on this machine changes no test's outcome."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from memtable.errors import ConfigError
from memtable.registry import open_table
from policyd.config import DEFAULT_CONFIG_PATH
from tests.hostguard.sitecustomize import MESSAGE
from tests.postfixlab import POSTCONF

REPO = Path(__file__).resolve().parent.parent
HOST_FILES = ["/etc/postfix/main.cf", "/etc/postfix/master.cf", DEFAULT_CONFIG_PATH,
              "/etc/policyd/triplets.cf", "/etc/postfix/../policyd/clients.cf"]


@pytest.mark.parametrize("path", HOST_FILES)
def test_opening_host_configuration_fails_in_the_test_process(path: str) -> None:
    with pytest.raises(PermissionError, match=r"off limits in tests"):
        open(path).close()
    with pytest.raises(PermissionError):
        Path(path).read_bytes()
    with pytest.raises(PermissionError):
        os.listdir(os.path.dirname(os.path.abspath(path)))


def test_other_files_open_as_usual(tmp_path: Path) -> None:
    # Only the two directories: a private instance's files and the package's
    # own (/usr/share/postfix) are read as usual.
    (tmp_path / "etc" / "postfix").mkdir(parents=True)
    (tmp_path / "etc" / "postfix" / "main.cf").write_text("x = 1\n")
    assert (tmp_path / "etc" / "postfix" / "main.cf").read_text() == "x = 1\n"
    assert "smtp" in Path("/usr/share/postfix/master.cf.dist").read_text()


def test_default_table_paths_fail_loudly() -> None:
    """A policyd.cf without triplet_table would use /etc/policyd/triplets.cf."""
    with pytest.raises(ConfigError, match="off limits in tests"):
        open_table("memcache:/etc/policyd/triplets.cf", read_write=True)


def test_python_processes_started_by_tests_are_guarded_too() -> None:
    done = subprocess.run([sys.executable, "-c", "open('/etc/postfix/main.cf')"],
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1 and MESSAGE in done.stderr, done.stderr
    # policyd without -c reads its default path: refused, whatever the host has.
    done = subprocess.run([sys.executable, "-m", "policyd", "--check-config"],
                          capture_output=True, text=True, timeout=30, check=False, cwd=REPO)
    assert done.returncode == 1
    assert done.stderr == f"policyd: {DEFAULT_CONFIG_PATH}: cannot read: {MESSAGE}\n"


@pytest.mark.skipif(not POSTCONF, reason="postconf not installed")
def test_postfix_programs_without_c_read_an_empty_directory() -> None:
    empty = os.environ["MAIL_CONFIG"]
    assert os.listdir(empty) == []
    done = subprocess.run([POSTCONF, "-h", "mail_version"], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode != 0
    assert f"open {empty}/main.cf: No such file or directory" in done.stderr
