"""What would break policyd at run time, found before it runs.

One implementation for two callers:

- ``errors(config)``: problems that make a running policyd fail or
  misbehave silently (metrics_listen without prometheus-client, a
  decision_timeout Postfix does not wait for, a table .cf whose ``domain`` or
  ``key_format`` skips every policyd key).  policyd does not start with one,
  and ``--check-config`` reports each on one line.
- ``probe(config)``: for ``--check-config`` only, what start-up would open,
  opened without creating or changing anything (a check run as root must
  leave no root-owned lmdb file behind): whitelists, table files, existing
  lmdb backups (read-only), the directories of missing ones (policyd creates
  them at start); memcached is asked once, and a memcached that does not
  answer is a warning (policyd then answers from the backup).
"""

from __future__ import annotations

import logging
import os

from memtable import cf
from memtable.backends.lmdb_table import not_created
from memtable.config import MemcacheConfig
from memtable.errors import ConfigError, MemtableError, TemporaryError
from memtable.keys import KeyFormat
from memtable.postconf import postfix_settings
from memtable.registry import split_spec
from memtable.wire import MemcacheWire
from policyd import limits
from policyd.config import PolicydConfig
from policyd.errors import PolicydError
from policyd.store import open_checked
from policyd.whitelist import Whitelists

log = logging.getLogger(__name__)

Problem = MemtableError | PolicydError
POLICY_TIMEOUT = "smtpd_policy_service_timeout"
# A key no policyd table holds: asking for it only tells whether memcached answers.
_PROBE_KEY = b"policyd-check-config"


def _tables(config: PolicydConfig) -> list[tuple[str, str]]:
    named = [("triplet_table", config.triplet_table), ("client_table", config.client_table),
             ("postscreen_cache", config.postscreen_cache)]
    return [(param, spec) for param, spec in named if spec]


def postfix_policy_timeout() -> tuple[int, str]:
    """Postfix's smtpd_policy_service_timeout in seconds, and where it came
    from: postconf, when this host has a Postfix configuration ($MAIL_CONFIG,
    else /etc/postfix), else Postfix's default.  postconf is not required."""
    default = limits.POSTFIX_POLICY_TIMEOUT_DEFAULT_SECONDS
    try:
        settings = postfix_settings([POLICY_TIMEOUT])
    except ConfigError as exc:
        log.warning("cannot read %s from postconf (%s); assuming Postfix's default %ds",
                    POLICY_TIMEOUT, exc, default)
        return default, "Postfix's default"
    seconds = cf.time_seconds(settings.values.get(POLICY_TIMEOUT, ""))
    if seconds is None:  # no postconf here
        return default, "Postfix's default"
    return seconds, settings.source


def _key_problem(param: str, spec: str) -> ConfigError | None:
    """A memcache table whose domain or key_format skips policyd's keys
    (client networks, triplets, IP addresses: never user@domain)."""
    try:
        type_, path = split_spec(spec)
        entries = cf.read_cf(path) if type_ == "memcache" else {}
    except ConfigError:
        return None  # opening the table says what is wrong
    domain = entries.get("domain")
    if domain is not None and domain.value.strip():
        return domain.error(f"memcache tables then take only user@domain keys, and the keys "
                            f"of {param} are not addresses: every update would be skipped; "
                            "remove this line")
    key_format = entries.get("key_format")
    if key_format is None:
        return None
    try:
        fmt = KeyFormat.compile(key_format.value)
    except ValueError:
        return None
    if fmt.uses_user or fmt.uses_domain or fmt.labels:
        return key_format.error(f"needs user@domain keys, and the keys of {param} are not "
                                "addresses: every update would be skipped; use a prefix and "
                                "%s (e.g. policyd-triplet:%s)")
    return None


def errors(config: PolicydConfig) -> list[Problem]:
    """What stops policyd at start (and fails --check-config), one each."""
    from policyd.metrics import require_prometheus_client

    found: list[Problem] = []
    if config.metrics_listen is not None:
        try:
            require_prometheus_client()
        except PolicydError as exc:
            found.append(exc)
    limit, source = postfix_policy_timeout()
    if config.decision_timeout >= limit:
        found.append(ConfigError(
            f"decision_timeout ({config.decision_timeout}s) must be below Postfix's "
            f"{POLICY_TIMEOUT} ({limit}s, {source}): Postfix would give up on policyd "
            "before it decides", config.path))
    for param, spec in _tables(config):
        problem = _key_problem(param, spec)
        if problem is not None:
            found.append(problem)
    return found


def probe(config: PolicydConfig) -> list[Problem]:
    """Open what start-up opens, creating nothing (--check-config)."""
    found: list[Problem] = []
    try:
        Whitelists.load(config.whitelist_clients, config.whitelist_recipients)
    except ConfigError as exc:
        found.append(config.blame(config.whitelist_parameter(exc.path), exc))
    for param, spec in _tables(config):
        try:
            _probe_table(spec)
        except (MemtableError, OSError) as exc:
            error = exc if isinstance(exc, MemtableError) else ConfigError(str(exc))
            found.append(config.blame(param, error))
    return found


def _probe_table(spec: str, *, check: bool = True) -> None:
    """Open ``spec`` read-only and check its files (store.open_checked), or,
    for a missing lmdb file policyd would create, its directory (all that
    ``check = False`` looks at)."""
    type_, name = split_spec(spec)
    if type_ == "memcache":
        config = MemcacheConfig.from_file(name)
        if config.backup:
            try:
                _probe_table(config.backup, check=False)
            except ConfigError as exc:
                raise type(exc)(f"backup = {config.backup}: {exc}", name) from None
            if _exists(config.backup):
                # Checked as the memcache table (whose recovery differs:
                # memcached still holds the state).
                open_checked(spec, read_write=False).close()
        _ask_memcached(config)
    elif not _exists(spec):
        # policyd creates (or initialises) it at start, as the service's
        # user: only its directory must exist.
        directory = os.path.dirname(name) or "."
        if not os.path.isdir(directory):
            raise ConfigError(f"{spec}: directory {directory} does not exist "
                              "(policyd creates the file at start, not the directory)")
    elif check:  # (a backup is opened and checked with its memcache table)
        open_checked(spec, read_write=False).close()


def _exists(spec: str) -> bool:
    """False for an lmdb table whose file is not there yet, or is empty (0
    bytes): policyd creates or initialises it at start, as LMDB does."""
    type_, name = split_spec(spec)
    return type_ != "lmdb" or not not_created(name)


def _ask_memcached(config: MemcacheConfig) -> None:
    """Ask memcached once.  One that does not answer is logged as policyd
    would log it running (the outage line names the backup that answers
    meanwhile); without a backup, also what that costs."""
    wire = MemcacheWire(config.memcache, timeout=config.timeout, max_try=config.max_try,
                        retry_pause=config.retry_pause,
                        line_size_limit=config.line_size_limit,
                        data_size_limit=config.data_size_limit,
                        name=f"memcache:{config.path}", fallback=config.backup or "")
    try:
        wire.get(_PROBE_KEY)
    except TemporaryError:
        if not config.backup:
            log.warning("memcache:%s has no backup: until memcached answers, requests fail "
                        "as failure_action says", config.path)
    finally:
        wire.close()
