"""Client and recipient whitelists in postgrey's file formats.

whitelist_clients (one entry a line, ``#`` comments):
  ``192.0.2.7``, ``192.0.2.0/24``, ``2001:db8::/32``  addresses and networks;
  ``192.0.2`` / ``192.0``   partial IPv4 addresses (/24, /16);
  ``example.com``           client_name equal to it or ending in ``.example.com``;
  ``/regex/``               searched in client_name, case-insensitively.
whitelist_recipients:
  ``user@example.com``      that address, also user+extension@example.com;
  ``postmaster@``           that local part (and +extension) at any domain;
  ``example.com``           any address at that domain or one of its subdomains;
  ``/regex/``               searched in the recipient, case-insensitively.
A missing file is an error, except one whose name ends in ``.local``
(postgrey's local additions, which Debian does not ship): a warning.

Matching is by sets and per-prefix-length network sets, not by trying every
entry; only regular expressions are tried one by one.  A bad entry is a
ConfigError naming file and line (postgrey warns and skips it; a policy
server must not run with a whitelist it half ignores).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from memtable.errors import ConfigError
from memtable.files import read_regular_file
from policyd import limits
from policyd.triplet import IPAddress, split_address

log = logging.getLogger(__name__)

_REGEX_LINE = re.compile(r"/(\S+)/")
_IPV4_FULL = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}(?:/\d{1,2})?")
_IPV4_24 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}")
_IPV4_16 = re.compile(r"\d{1,3}\.\d{1,3}")
_IPV6 = re.compile(r".*:.*:.*")


@dataclass
class _Networks:
    """Networks by prefix length: a client matches when its address masked
    to one of the lengths is in that length's set."""

    by_prefix: dict[tuple[int, int], set[int]] = field(default_factory=dict)

    def add(self, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
        self.by_prefix.setdefault((net.version, net.prefixlen), set()).add(
            int(net.network_address))

    def contains(self, ip: IPAddress) -> bool:
        bits = 32 if ip.version == 4 else 128
        value = int(ip)
        for (version, prefix), nets in self.by_prefix.items():
            if version != ip.version:
                continue
            mask = ((1 << prefix) - 1) << (bits - prefix) if prefix else 0
            if value & mask in nets:
                return True
        return False

    def __len__(self) -> int:
        return sum(len(nets) for nets in self.by_prefix.values())


def _domain_suffixes(name: str) -> Iterable[str]:
    """name, then each parent: a.b.c -> a.b.c, b.c, c."""
    while name:
        yield name
        _, dot, name = name.partition(".")
        if not dot:
            return


@dataclass
class ClientWhitelist:
    names: set[str] = field(default_factory=set)
    networks: _Networks = field(default_factory=_Networks)
    regexes: list[re.Pattern[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names) + len(self.networks) + len(self.regexes)

    def matches(self, ip: IPAddress, client_name: str) -> bool:
        if not self:  # every request asks: no work for an empty list
            return False
        name = client_name.strip().lower().rstrip(".")
        if name and any(s in self.names for s in _domain_suffixes(name)):
            return True
        if self.networks.contains(ip):
            return True
        return any(r.search(client_name) for r in self.regexes)

    def add_line(self, entry: str, path: str, line: int) -> None:
        regex = _REGEX_LINE.fullmatch(entry)
        if regex:
            self.regexes.append(_compile(regex[1], path, line))
        elif _IPV4_FULL.fullmatch(entry) or _IPV6.fullmatch(entry):
            self.networks.add(_network(entry, path, line))
        elif _IPV4_24.fullmatch(entry):
            self.networks.add(_network(entry + ".0/24", path, line))
        elif _IPV4_16.fullmatch(entry):
            # postgrey's comment says /16 (its code passes 24 by mistake).
            self.networks.add(_network(entry + ".0.0/16", path, line))
        elif re.fullmatch(r"\S+", entry):
            self.names.add(entry.lower().rstrip("."))
        else:
            raise ConfigError(f'"{entry}" does not look like a host name', path, line)


@dataclass
class RecipientWhitelist:
    addresses: set[tuple[str, str]] = field(default_factory=set)
    users: set[str] = field(default_factory=set)
    domains: set[str] = field(default_factory=set)
    regexes: list[re.Pattern[str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.addresses) + len(self.users) + len(self.domains) + len(self.regexes)

    def matches(self, recipient: str) -> bool:
        if not self:  # every request asks: no work for an empty list
            return False
        address = recipient.strip().lower()
        user, domain = split_address(address)
        if domain is not None:
            # postgrey: ^user(?:\+[^@]+)?@ -- each cut at a "+" with text after.
            for local in _local_candidates(user):
                if local in self.users or (local, domain) in self.addresses:
                    return True
            if domain and any(s in self.domains for s in _domain_suffixes(domain)):
                return True
        return any(r.search(recipient) for r in self.regexes)

    def add_line(self, entry: str, path: str, line: int) -> None:
        regex = _REGEX_LINE.fullmatch(entry)
        if regex:
            self.regexes.append(_compile(regex[1], path, line))
            return
        if not re.fullmatch(r"\S+", entry):
            raise ConfigError(f'"{entry}" does not look like an address', path, line)
        entry = entry.lower()
        user, at, domain = entry.partition("@")
        if at and domain:
            self.addresses.add((user, domain))
        elif at:
            self.users.add(user)
        else:
            self.domains.add(user.rstrip("."))


def _local_candidates(user: str) -> Iterable[str]:
    yield user
    for i, ch in enumerate(user):
        if ch == "+" and i + 1 < len(user):
            yield user[:i]


def _compile(pattern: str, path: str, line: int) -> re.Pattern[str]:
    try:
        return re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        raise ConfigError(f"bad regular expression /{pattern}/: {exc}", path, line) from None


def _network(text: str, path: str, line: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise ConfigError(f'bad address "{text}": {exc}', path, line) from None
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None \
            and net.prefixlen >= 96:
        # Clients arrive as plain IPv4 (see parse_client_address).
        mapped = net.network_address.ipv4_mapped
        return ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}", strict=False)
    return net


def _read_lines(path: str) -> list[tuple[int, str]]:
    """(line number, entry) for each non-empty line, comments removed; no
    lines, with a warning, for a missing optional (``.local``) file."""
    try:
        data, _ = read_regular_file(path, limits.WHITELIST_FILE_MAX_BYTES)
    except OSError as exc:
        # postgrey's rule: a *.local file is the site's optional addition to
        # the distribution's list (Debian ships none).  postgrey is silent;
        # a warning tells a typo from "none yet".
        if isinstance(exc, FileNotFoundError) and path.endswith(".local"):
            log.warning("%s: whitelist not found, skipped (a missing .local file is "
                        "allowed, as in postgrey)", path)
            return []
        raise ConfigError(f"cannot read whitelist: {exc.strerror or exc}", path) from None
    if len(data) > limits.WHITELIST_FILE_MAX_BYTES:
        raise ConfigError(f"whitelist larger than {limits.WHITELIST_FILE_MAX_BYTES} bytes", path)
    text = data.decode("utf-8", "replace")
    entries = []
    for number, raw in enumerate(text.splitlines(), 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if len(entry) > limits.WHITELIST_MAX_LINE_CHARS:
            raise ConfigError(f"entry longer than {limits.WHITELIST_MAX_LINE_CHARS} characters",
                              path, number)
        entries.append((number, entry))
    return entries


@dataclass
class Whitelists:
    """Both whitelists, read from their files; ``reload()`` on SIGHUP.
    Each list holds at most ``max_entries`` entries."""

    client_files: tuple[str, ...] = ()
    recipient_files: tuple[str, ...] = ()
    clients: ClientWhitelist = field(default_factory=ClientWhitelist)
    recipients: RecipientWhitelist = field(default_factory=RecipientWhitelist)
    max_entries: int = limits.WHITELIST_MAX_ENTRIES

    @classmethod
    def load(cls, client_files: Iterable[str], recipient_files: Iterable[str], *,
             max_entries: int = limits.WHITELIST_MAX_ENTRIES) -> Whitelists:
        """Read every file; ConfigError (naming file and line) on any problem."""
        lists = cls(tuple(client_files), tuple(recipient_files), max_entries=max_entries)
        lists.clients, lists.recipients = lists._read()
        return lists

    def _read(self) -> tuple[ClientWhitelist, RecipientWhitelist]:
        clients = ClientWhitelist()
        recipients = RecipientWhitelist()
        for path in self.client_files:
            for number, entry in _read_lines(path):
                clients.add_line(entry, path, number)
                self._check_count(len(clients), path, number)
        for path in self.recipient_files:
            for number, entry in _read_lines(path):
                recipients.add_line(entry, path, number)
                self._check_count(len(recipients), path, number)
        return clients, recipients

    def reload(self) -> bool:
        """Re-read all files; on any error keep the old lists, log, return False."""
        try:
            clients, recipients = self._read()
        except ConfigError as exc:
            log.error("whitelist reload failed, keeping the old whitelists: %s", exc)
            return False
        self.clients, self.recipients = clients, recipients
        log.info("whitelists reloaded: %d client entries, %d recipient entries",
                 len(clients), len(recipients))
        return True

    def _check_count(self, count: int, path: str, line: int) -> None:
        if count > self.max_entries:
            raise ConfigError(f"more than {self.max_entries} whitelist entries", path, line)

    def recipient_whitelisted(self, recipient: str) -> bool:
        return self.recipients.matches(recipient)

