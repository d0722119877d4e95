"""What Postfix's configuration says, asked of ``postconf``: one place for
``memtable ttl``, policyd's checks (smtpd_policy_service_timeout) and
policyd's ``hostname`` default (myhostname).

Postfix's programs read main.cf from ``-c DIR``, else ``$MAIL_CONFIG``, else
/etc/postfix, and stop with a fatal error when there is none.  A host
without a Postfix configuration (a fresh install, policyd on a host of its
own) is no error here: what a Postfix there would use are its defaults, and
``postconf -d`` prints them without a main.cf.  postconf itself is not
required: without it the values are empty and callers say so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from memtable.errors import ConfigError, clip
from memtable.limits import POSTCONF_TIMEOUT_SECONDS, POSTFIX_CONFIG_DIRECTORY


@dataclass(frozen=True)
class PostfixSettings:
    """Parameter values as Postfix uses them (``postconf -x``: expanded, so
    that postscreen_dnsbl_max_ttl's ``${postscreen_dnsbl_ttl?...}h`` is a
    time).  Empty when postconf is not installed."""

    values: Mapping[str, str]
    config_dir: str
    configured: bool  # DIR has a main.cf; else the values are Postfix's defaults

    @property
    def source(self) -> str:
        """Where the values come from, for messages."""
        return f"postconf -c {self.config_dir}" if self.configured else "Postfix's default"

    @property
    def note(self) -> str:
        """The line that says the values are only Postfix's defaults."""
        return ("" if self.configured else
                f"no Postfix configuration in {self.config_dir}: Postfix's defaults assumed")


def config_directory(config_dir: str | None = None) -> str:
    """The directory Postfix's programs would read main.cf from."""
    return config_dir or os.environ.get("MAIL_CONFIG") or POSTFIX_CONFIG_DIRECTORY


def postfix_settings(names: Sequence[str], config_dir: str | None = None) -> PostfixSettings:
    """``names``' values from the Postfix configuration in ``config_dir``
    (None: $MAIL_CONFIG, else /etc/postfix), or Postfix's defaults when it
    has no main.cf.  ConfigError when an explicitly given directory does not
    exist (a typo is not "no configuration"), or when postconf runs but
    fails (a broken or unreadable main.cf): its own message says why."""
    directory = config_directory(config_dir)
    if config_dir and not os.path.isdir(config_dir):
        raise ConfigError(f"Postfix configuration directory {config_dir}: "
                          "No such directory")
    # lexists: a main.cf that is a dangling link is a broken configuration.
    configured = os.path.lexists(os.path.join(directory, "main.cf"))
    # Without main.cf postconf stops with a fatal error; -d does not read it.
    options = ["-x", "-c", directory] + ([] if configured else ["-d"])
    return PostfixSettings(_postconf(options, names), directory, configured)


def _postconf(options: list[str], names: Sequence[str]) -> dict[str, str]:
    postconf = shutil.which("postconf") or ("/usr/sbin/postconf"
                                            if os.path.exists("/usr/sbin/postconf") else None)
    if postconf is None:
        return {}
    try:
        proc = subprocess.run([postconf, *options, *names], capture_output=True, text=True,
                              errors="replace", timeout=POSTCONF_TIMEOUT_SECONDS, check=False)
    except OSError as exc:
        raise ConfigError(f"cannot run {postconf}: {exc.strerror or exc}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{postconf} did not answer within "
                          f"{POSTCONF_TIMEOUT_SECONDS:g} s") from None
    if proc.returncode != 0:
        # postconf's own "postconf: fatal: ..." line (its warnings come first).
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise ConfigError(clip(why))
    values = {}
    for line in proc.stdout.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            values[name.strip()] = value.strip()
    return values
