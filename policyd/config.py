"""policyd.cf: every policyd parameter, its default and its bounds.

Postfix-style file (``name = value``, ``#`` comments, continuation lines,
time units s m h d w).  Unknown names and bad values are errors naming the
file and line: a policy server must not start with a setting it ignores.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from memtable import cf
from memtable.endpoint import Endpoint, parse_endpoint
from memtable.errors import ConfigError, CorruptError, MemtableError
from memtable.limits import CF_INT_MAX
from memtable.postconf import postfix_settings
from policyd import limits
from policyd.dnsbl import DnsblSite, parse_sites

DEFAULT_CONFIG_PATH = "/etc/policyd/policyd.cf"

CLIENT_KEYS = ("subnet", "host", "smart", "spf")
# What client_key = spf falls back to when SPF does not pass.
SPF_FALLBACK_CLIENT_KEYS = ("subnet", "host", "smart")
FAILURE_ACTIONS = ("DUNNO", "disconnect")
# Parameters that were renamed: the error for the old name gives the new one.
RENAMED = {"store_failure_action": "failure_action"}
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class PolicydConfig:
    """The effective configuration; defaults are the documented ones."""

    path: str = "(defaults)"
    # --- server -----------------------------------------------------------
    listen: tuple[Endpoint, ...] = (Endpoint("inet", host="127.0.0.1", port=10023),)
    listen_reuse_port: bool = False
    unix_socket_mode: int = 0o660
    max_connections: int = 2000
    idle_timeout: int = 600
    read_timeout: int = 60
    decision_timeout: int = 20
    shutdown_grace: int = 10
    syslog: bool = False
    syslog_socket: str = "/dev/log"
    syslog_facility: str = "mail"
    log_level: str = "info"
    metrics_listen: Endpoint | None = None
    # --- stores -----------------------------------------------------------
    triplet_table: str = "memcache:/etc/policyd/triplets.cf"
    client_table: str = "memcache:/etc/policyd/clients.cf"
    failure_action: str = "DUNNO"
    # --- greylisting ------------------------------------------------------
    greylist_delay: int = 300
    retry_window: int = 2 * 86400
    max_age: int = 35 * 86400
    greylist_action: str = "DEFER_IF_PERMIT"
    greylist_text: str = "Greylisted, please try again in %s seconds"
    greylist_header: bool = True
    greylist_header_text: str = "X-Greylist: delayed %t seconds by policyd at %h; %d"
    hostname: str = ""
    client_key: str = "subnet"
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64
    privacy: bool = False
    privacy_salt: str = ""
    whitelist_clients: tuple[str, ...] = ()
    whitelist_recipients: tuple[str, ...] = ()
    auto_whitelist_clients: int = 5
    postscreen_cache: str = ""
    postscreen_skip: bool = True
    # --- DNS ----------------------------------------------------------------
    # (address, port) pairs; empty: the system's resolv.conf.
    dns_servers: tuple[tuple[str, int], ...] = ()
    dns_timeout: int = int(limits.DNS_TIMEOUT_DEFAULT_SECONDS)
    # --- DNSBL/DNSWL scores (policyd.dnsbl) ----------------------------------
    dnsbl_sites: tuple[DnsblSite, ...] = ()
    dnsbl_allowlist_threshold: int = 0          # as postscreen: off unless negative
    dnsbl_greylist_threshold: int | None = None  # None: greylist everyone
    greylist_delay_listed: int | None = None     # None: greylist_delay
    # --- SPF (policyd.spf) ----------------------------------------------------
    spf_fallback_client_key: str = "subnet"
    # None: SPF does not change the delay.
    greylist_delay_spf_pass: int | None = None

    @property
    def uses_spf(self) -> bool:
        """Is the sender's SPF evaluated (for the key or the delay)?"""
        return self.client_key == "spf" or self.greylist_delay_spf_pass is not None

    @property
    def spf_timeout(self) -> float:
        """The bound on one whole SPF evaluation."""
        return float(self.dns_timeout * limits.SPF_CHECK_TIMEOUT_FACTOR)

    @property
    def dns_bound(self) -> float:
        """The longest DNS may take in one decision.  With SPF in use, SPF's
        bound, which covers the DNS lists too: they are asked together with
        SPF (greylist_delay_spf_pass), or after it and the stores
        (client_key = spf) and then cut at what is left of the bound
        (policyd.greylist).  The lists alone: one query's bound (they are
        asked together)."""
        if self.uses_spf:
            return self.spf_timeout
        if self.dnsbl_sites:
            return self.dns_timeout + limits.DNS_TIMEOUT_SLACK_SECONDS
        return 0.0

    @property
    def uses_dns(self) -> bool:
        """Does any setting need DNS answers?  (No resolver otherwise.)"""
        return self.uses_spf or bool(self.dnsbl_sites)

    # Where each parameter was set (file and line, or -o): errors about what
    # a parameter names (a missing table file) say which setting named it.
    sources: Mapping[str, cf.CfEntry] = field(default_factory=dict, compare=False,
                                              repr=False)

    @property
    def effective_hostname(self) -> str:
        """``hostname``, else Postfix's myhostname, else the system's host
        name (asks postconf, maybe DNS: read it once, at start)."""
        return self.hostname or default_hostname()

    @classmethod
    def from_file(cls, path: str, overrides: Sequence[str] = ()) -> PolicydConfig:
        """Read ``path``; ``overrides`` are ``name=value`` settings (the
        command line's ``-o``) that replace the file's."""
        entries = cf.read_cf(path)
        entries.update(cf.parse_overrides(overrides))
        return cls.from_entries(path, entries)

    @classmethod
    def from_entries(cls, path: str, entries: dict[str, cf.CfEntry]) -> PolicydConfig:
        cf.reject_unknown(entries, frozenset(_PARSERS), RENAMED)
        values: dict[str, Any] = {"path": path, "sources": dict(entries)}
        for name, entry in entries.items():
            values[name] = _PARSERS[name](entry)
        config = cls(**values)
        config._check_together(entries)
        return config

    def parameter_error(self, name: str, message: str) -> ConfigError:
        """An error about parameter ``name``: ``FILE, line N: name = value:
        message`` where it was set, ``FILE: name = value (default): message``
        where it was not."""
        entry = self.sources.get(name)
        if entry is not None:
            return entry.error(message)
        value = _render_value(name, getattr(self, name))
        return ConfigError(f"{name} = {value} (default): {message}", self.path)

    def blame(self, name: str, exc: MemtableError) -> MemtableError:
        """``exc``, raised while opening what parameter ``name`` names, as
        operators should see it: an error at a line of the named file's own,
        or a damaged file's (which names the file and says what to do), says
        enough; any other (a missing file) also names the setting."""
        if (isinstance(exc, ConfigError) and exc.line is not None) \
                or isinstance(exc, CorruptError):
            return exc
        return self.parameter_error(name, str(exc))

    def whitelist_parameter(self, path: str | None) -> str:
        """The parameter that names whitelist file ``path``."""
        return ("whitelist_recipients" if path in self.whitelist_recipients
                else "whitelist_clients")

    def _check_together(self, entries: dict[str, cf.CfEntry]) -> None:
        """Rules that involve more than one parameter."""
        def fail(name: str, message: str) -> ConfigError:
            entry = entries.get(name)
            return entry.error(message) if entry else ConfigError(message, self.path)

        if self.privacy and not self.privacy_salt:
            raise fail("privacy", "privacy = yes needs privacy_salt (the same on every host)")
        if self.retry_window <= self.greylist_delay:
            raise fail("retry_window", "retry_window must be longer than greylist_delay")
        if not self.listen:
            raise fail("listen", "no listener")
        self._check_spf(fail)
        self._check_dnsbl(fail)
        if self.uses_dns and self.dns_bound >= self.decision_timeout:
            # Otherwise DNS that never answers fails the whole decision
            # instead of leaving its contribution unknown.
            if self.uses_spf:
                why = f"{limits.SPF_CHECK_TIMEOUT_FACTOR} x dns_timeout for SPF"
                if self.dnsbl_sites:
                    why += ", the DNS lists within it"
            else:
                why = "dns_timeout for the DNS lists"
            raise fail("dns_timeout",
                       f"DNS may take up to {self.dns_bound:g}s of a decision "
                       f"({why}): it must be shorter than decision_timeout "
                       f"({self.decision_timeout}s)")

    def _check_spf(self, fail: Callable[[str, str], ConfigError]) -> None:
        if (self.greylist_delay_spf_pass is not None
                and self.greylist_delay_spf_pass > self.greylist_delay):
            raise fail("greylist_delay_spf_pass",
                       "greylist_delay_spf_pass must not be longer than greylist_delay")

    def _check_dnsbl(self, fail: Callable[[str, str], ConfigError]) -> None:
        """The DNSBL settings together (policyd.dnsbl)."""
        for name in ("dnsbl_allowlist_threshold", "dnsbl_greylist_threshold"):
            if getattr(self, name) not in (0, None) and not self.dnsbl_sites:
                raise fail(name, "needs dnsbl_sites (without them every score is 0)")
        if self.greylist_delay_listed is not None:
            if self.dnsbl_greylist_threshold is None:
                raise fail("greylist_delay_listed",
                           "needs dnsbl_greylist_threshold (the score that counts as listed)")
            if self.retry_window <= self.greylist_delay_listed:
                raise fail("retry_window", "retry_window must be longer than "
                           "greylist_delay_listed")

    def render(self) -> str:
        """The effective configuration as policyd.cf text (--check-config)."""
        lines = [f"# effective configuration from {self.path}"]
        for f in fields(self):
            if f.name not in PARAMETERS:
                continue
            lines.append(f"{f.name} = {_render_value(f.name, getattr(self, f.name))}")
        return "\n".join(lines) + "\n"


_HOST_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


# What a resolver may call this host that names no host: /etc/hosts lines
# such as "127.0.1.1 localhost mx1" make the system's own name "localhost".
_LOOPBACK_NAME = re.compile(r"(?:ip6-)?(?:localhost|loopback)[46]?(?:\..*)?", re.IGNORECASE)


def default_hostname() -> str:
    """Postfix's ``myhostname`` when this host has a Postfix configuration
    (postconf: MAIL_CONFIG honoured, waiting at most POSTCONF_TIMEOUT_SECONDS):
    the X-Greylist header then names the host Postfix's own Received: header
    names.  Without one (a fresh install; policyd on a host of its own),
    the system's host name as Postfix takes it (gethostname()), qualified by
    the resolver when it has no dot, as ``hostname -f`` does, unless that
    gives a loopback name (then as is, as postgrey says it)."""
    try:
        settings = postfix_settings(["myhostname"])
    except ConfigError:
        settings = None
    if settings is not None and settings.configured:
        name = settings.values.get("myhostname", "")
        if _HOST_NAME.fullmatch(name):
            return name
    name = socket.gethostname()
    if "." not in name:
        qualified = _canonical_name(name)
        if ("." in qualified and _HOST_NAME.fullmatch(qualified)
                and not _LOOPBACK_NAME.fullmatch(qualified)):
            return qualified
    return name if _HOST_NAME.fullmatch(name) else "localhost"


def _canonical_name(name: str) -> str:
    """``name``'s canonical name from the resolver (/etc/hosts, then DNS,
    as nsswitch.conf says), or "" when there is none within
    HOSTNAME_LOOKUP_TIMEOUT_SECONDS: getaddrinfo() cannot be interrupted, so
    it runs in a daemon thread left behind if the resolver never answers."""
    answer: list[str] = []

    def lookup() -> None:
        with contextlib.suppress(OSError, UnicodeError):
            infos = socket.getaddrinfo(name, None, flags=socket.AI_CANONNAME)
            answer.extend(info[3] for info in infos[:1])

    thread = threading.Thread(target=lookup, name="policyd hostname lookup", daemon=True)
    thread.start()
    thread.join(limits.HOSTNAME_LOOKUP_TIMEOUT_SECONDS)
    return answer[0] if answer else ""


def _render_value(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) and name == "unix_socket_mode":
        return f"{value:04o}"
    if value is None:
        return ""
    if name == "dnsbl_sites":
        return ", ".join(str(site) for site in value)  # type: ignore[attr-defined]
    if name == "dns_servers":
        return ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                         for h, p in value)  # type: ignore[attr-defined]
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value)
    return str(value)


def _endpoints(entry: cf.CfEntry) -> tuple[Endpoint, ...]:
    items = cf.split_list(entry.value)
    if len(items) > limits.MAX_LISTENERS:
        raise entry.error(f"more than {limits.MAX_LISTENERS} listeners")
    try:
        endpoints = tuple(parse_endpoint(item) for item in items)
    except ConfigError as exc:
        raise entry.error(exc.message) from None
    for endpoint in endpoints:
        # A relative path would be relative to wherever policyd was started
        # ("/" under systemd): never what was meant.
        if endpoint.kind == "unix" and not endpoint.path.startswith("/"):
            raise entry.error(f"unix:{endpoint.path}: a UNIX socket path must be absolute")
    return endpoints


def _optional_endpoint(entry: cf.CfEntry) -> Endpoint | None:
    if not entry.value:
        return None
    try:
        return parse_endpoint(entry.value)
    except ConfigError as exc:
        raise entry.error(exc.message) from None


def _mode(entry: cf.CfEntry) -> int:
    try:
        mode = int(entry.value, 8)
    except ValueError:
        raise entry.error("bad octal file mode") from None
    if not 0 <= mode <= 0o777:
        raise entry.error("file mode out of range")
    return mode


def _choice(options: tuple[str, ...], fold: bool = True) -> Callable[[cf.CfEntry], str]:
    def parse(entry: cf.CfEntry) -> str:
        for option in options:
            if entry.value == option or (fold and entry.value.lower() == option.lower()):
                return option
        raise entry.error(f"expected one of: {', '.join(options)}")
    return parse


def _time(minimum: int = 0, maximum: int = CF_INT_MAX) -> Callable[[cf.CfEntry], int]:
    return lambda entry: cf.parse_time(entry, minimum=minimum, maximum=maximum)


def _int(minimum: int, maximum: int) -> Callable[[cf.CfEntry], int]:
    return lambda entry: cf.parse_int(entry, minimum, maximum)


def _text(entry: cf.CfEntry) -> str:
    if any(ch in entry.value for ch in "\r\n\0"):
        raise entry.error("control characters are not allowed")
    return entry.value


# access(5) actions that make Postfix's smtpd defer the recipient when
# followed by text (smtpd_check.c, check_table_result: names compared
# without case; "4NN text"); REJECT and 5NN refuse for good, DEFER_IF_REJECT
# defers only what is rejected anyway, and any other word is taken as a
# restriction name: Postfix answers 451 4.3.5 "Server configuration error".
GREYLIST_ACTIONS = ("DEFER_IF_PERMIT", "DEFER")
# The % escapes of each text parameter (policyd.greylist expands them).
TEXT_ESCAPES = {"greylist_text": "sr", "greylist_header_text": "thd"}
_ESCAPE = re.compile(r"%(.?)", re.DOTALL)
# Postfix's is_header(): a name of printable characters but ":", then ":".
_HEADER = re.compile(r"[\x21-\x39\x3b-\x7e]+:")


def _action(entry: cf.CfEntry) -> str:
    value = _text(entry).strip()
    for action in GREYLIST_ACTIONS:
        if value.upper() == action:
            return action
    if re.fullmatch(r"4[0-9][0-9]", value):
        return value
    raise entry.error(f'"{value}" is not an access(5) action with which Postfix defers the '
                      f"recipient: expected {', '.join(GREYLIST_ACTIONS)} or an SMTP code 4NN")


def _escaped_text(entry: cf.CfEntry) -> str:
    value = _text(entry)
    valid = TEXT_ESCAPES[entry.name]
    for match in _ESCAPE.finditer(value):
        if not match[1] or match[1] not in valid:
            shown = f"%{match[1]}" if match[1] else "% at the end"
            raise entry.error(f"unknown escape {shown} (valid: "
                              + ", ".join(f"%{c}" for c in valid) + ")")
    return value


def _header_text(entry: cf.CfEntry) -> str:
    value = _escaped_text(entry)
    if not _HEADER.match(value):
        # Postfix ignores a PREPEND that is not a header, with a warning.
        raise entry.error('not a header: expected "Name: text"')
    return value


def _dns_servers(entry: cf.CfEntry) -> tuple[tuple[str, int], ...]:
    """``address`` or ``address:port`` (``[v6]:port``), port 53 by default:
    addresses, not names (a resolver's own servers cannot need one)."""
    servers = []
    for item in cf.split_list(entry.value):
        host, port_text = item, "53"
        if item.startswith("["):
            host, sep, rest = item[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise entry.error(f'"{item}": expected [address]:port')
            port_text = rest[1:] or "53"
        elif item.count(":") == 1:
            host, port_text = item.split(":")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise entry.error(f'"{item}": not an IP address') from None
        # A number as every number of the configuration (cf.decimal).
        port = cf.decimal(port_text) if port_text.isascii() and port_text.isdigit() else None
        if port is None or not 0 < port < 65536:
            raise entry.error(f'"{item}": bad port')
        servers.append((str(address), port))
    if len(servers) > limits.DNS_MAX_SERVERS:
        raise entry.error(f"more than {limits.DNS_MAX_SERVERS} DNS servers")
    return tuple(servers)


def _dnsbl_sites(entry: cf.CfEntry) -> tuple[DnsblSite, ...]:
    try:
        return parse_sites(cf.split_list(entry.value))
    except ValueError as exc:
        raise entry.error(str(exc)) from None


def _optional(parse: Callable[[cf.CfEntry], int]) -> Callable[[cf.CfEntry], int | None]:
    """An empty value is None (the setting is off)."""
    return lambda entry: parse(entry) if entry.value else None


def _files(entry: cf.CfEntry) -> tuple[str, ...]:
    return tuple(cf.split_list(entry.value))


_PARSERS: dict[str, Callable[[cf.CfEntry], Any]] = {
    "listen": _endpoints,
    "listen_reuse_port": cf.parse_bool,
    "unix_socket_mode": _mode,
    "max_connections": _int(1, limits.MAX_CONNECTIONS_CEILING),
    "idle_timeout": _time(1, limits.MAX_TIMEOUT_SECONDS),
    "read_timeout": _time(1, limits.MAX_TIMEOUT_SECONDS),
    "decision_timeout": _time(1, limits.MAX_TIMEOUT_SECONDS),
    "shutdown_grace": _time(0, limits.MAX_TIMEOUT_SECONDS),
    "syslog": cf.parse_bool,
    "syslog_socket": _text,
    "syslog_facility": _choice(("mail", "daemon", "user", "local0", "local1", "local2",
                                "local3", "local4", "local5", "local6", "local7")),
    "log_level": _choice(LOG_LEVELS),
    "metrics_listen": _optional_endpoint,
    "triplet_table": _text,
    "client_table": _text,
    "failure_action": _choice(FAILURE_ACTIONS),
    "greylist_delay": _time(0),
    "retry_window": _time(1),
    "max_age": _time(1),
    "greylist_action": _action,
    "greylist_text": _escaped_text,
    "greylist_header": cf.parse_bool,
    "greylist_header_text": _header_text,
    "hostname": _text,
    "client_key": _choice(CLIENT_KEYS),
    "ipv4_prefix": _int(0, 32),
    "ipv6_prefix": _int(0, 128),
    "privacy": cf.parse_bool,
    "privacy_salt": _text,
    "whitelist_clients": _files,
    "whitelist_recipients": _files,
    "auto_whitelist_clients": _int(0, 1_000_000),
    "postscreen_cache": _text,
    "postscreen_skip": cf.parse_bool,
    "dns_servers": _dns_servers,
    "dns_timeout": _time(1, limits.DNS_TIMEOUT_MAX_SECONDS),
    "spf_fallback_client_key": _choice(SPF_FALLBACK_CLIENT_KEYS),
    "greylist_delay_spf_pass": _optional(_time(0)),
    "dnsbl_sites": _dnsbl_sites,
    "dnsbl_allowlist_threshold": _int(-limits.DNSBL_THRESHOLD_MAX, 0),
    # postscreen_dnsbl_threshold's lower bound: 1.
    "dnsbl_greylist_threshold": _optional(_int(1, limits.DNSBL_THRESHOLD_MAX)),
    "greylist_delay_listed": _optional(_time(0)),
}

# Every policyd.cf parameter, in PolicydConfig's order (fields that are not
# parameters: path, sources).
PARAMETERS = tuple(f.name for f in fields(PolicydConfig) if f.name in _PARSERS)
assert set(_PARSERS) == {f.name for f in fields(PolicydConfig)} - {"path", "sources"}
