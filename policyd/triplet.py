"""Greylisting triplets: address normalisation, client keys and store keys.

Pure functions, no I/O.  The sender rules follow postgrey (lower case, BATV
tag removed, ``+extension`` cut, numbers that are whole words folded to
``#``) so that VERP and BATV senders of mailing lists do not make a new
triplet per message; SRS rewriting (which postgrey leaves alone) is folded
too.  The client part is a subnet, a host or (``smart``) the registrable
domain of a verified client name, so one provider's pool of outbound servers
counts as one client.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass
from functools import lru_cache

from policyd import limits
from policyd.config import PolicydConfig

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NULL_SENDER = "<>"

# A BATV tag value: key number, day and hash (postgrey's test, RFC draft
# "prvs=tag-val=loc-core" with a 10 character tag).
_BATV_TAG = re.compile(r"[0-9a-z]{10}")
# postgrey: $user =~ s/\b\d+\b/#/g  (numbers that are whole words only).
_NUMBER_WORD = re.compile(r"\b\d+\b", re.ASCII)
# SRS0=HHH=TT=domain=local and SRS1=HHH=forwarder==HHH=TT=domain=local
# (the hash and time stamp change every day; the rest identifies the sender).
_SRS0 = re.compile(r"srs0[=+-][^=]*=[^=]*=([^=]+)=(.+)")
_SRS1 = re.compile(r"srs1[=+-][^=]*=([^=]+)==[^=]*=[^=]*=([^=]+)=(.+)")


def parse_client_address(address: str) -> IPAddress:
    """The client IP; IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes IPv4.

    Raises ValueError when ``address`` is not an IP address.
    """
    text = address.strip()
    try:
        # Every request parses one: inet_pton accepts exactly the dotted
        # quads ipaddress does (no leading zeros or short forms), at a
        # fraction of the cost; anything else takes ipaddress's path.
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except OSError:
        pass
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def split_address(address: str) -> tuple[str, str | None]:
    """(local, domain) at the last ``@``; domain None when there is none."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, None
    return local, domain


def _strip_batv(user: str) -> str:
    """postgrey's BATV rule: prvs=TAG=user, sometimes prvs=user=TAG."""
    if not user.startswith("prvs="):
        return user
    parts = user.split("=")
    if len(parts) != 3:
        return user
    first_is_tag = _BATV_TAG.match(parts[1]) is not None
    second_is_tag = _BATV_TAG.match(parts[2]) is not None
    if second_is_tag and not first_is_tag:
        return parts[1]
    return parts[2]  # the standard order, also when unsure (as postgrey)


def _strip_srs(user: str) -> str:
    match = _SRS1.fullmatch(user)
    if match:
        return f"srs1={match[1]}={match[2]}={match[3]}"
    match = _SRS0.fullmatch(user)
    if match:
        return f"srs0={match[1]}={match[2]}"
    return user


def normalise_sender(sender: str) -> str:
    """The sender as it goes into the triplet; ``<>`` for the null sender."""
    sender = sender.strip().lower()
    if sender in ("", "<>"):
        return NULL_SENDER
    user, domain = split_address(sender)
    if domain is None:
        return sender  # postgrey leaves addresses without a domain alone
    user = _strip_srs(_strip_batv(user))
    user = user.split("+", 1)[0]  # VERP of mailing lists: user+extension
    user = _NUMBER_WORD.sub("#", user)
    return f"{user}@{domain}"


def normalise_recipient(recipient: str) -> str:
    """The recipient in the triplet: lower case, ``+extension`` cut.

    postgrey only lower-cases the recipient; cutting the extension as well
    means user+a@ and user+b@ share one greylisting delay, as postgrey's
    recipient whitelist already treats them as one user.
    """
    recipient = recipient.strip().lower()
    user, domain = split_address(recipient)
    if domain is None or "+" not in user:
        return recipient
    return f"{user.split('+', 1)[0]}@{domain}"


def recipient_domain(recipient: str) -> str:
    """The text after the last ``@`` (postgrey's %r), or the whole value."""
    return split_address(recipient)[1] or recipient


@lru_cache(maxsize=1)
def _psl() -> object:
    # Loading the bundled list takes a few tens of milliseconds: once.
    from publicsuffixlist import PublicSuffixList

    return PublicSuffixList()


def registrable_domain(name: str) -> str | None:
    """The registrable domain of a host name (mail1.example.co.uk ->
    example.co.uk), or None when the name is itself a public suffix."""
    name = name.strip().lower().rstrip(".")
    if not name or "." not in name:
        return None
    result = _psl().privatesuffix(name)  # type: ignore[attr-defined]
    return result if isinstance(result, str) else None


def spf_key(domain: str) -> str:
    """The client part for a sender whose domain's SPF passed (narrowly)
    for the client: every address the domain authorises is one client."""
    return "spf:" + domain.strip().lower().rstrip(".")


def subnet_key(ip: IPAddress, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The network address of ip's subnet (postgrey --lookup-by-subnet)."""
    if ip.version == 4 and 0 <= ipv4_prefix <= 32:
        # Every request computes this: integer arithmetic instead of an
        # ip_network() built from text (~8 us), same dotted-quad text.
        n = int(ip) & (0xFFFFFFFF ^ ((1 << (32 - ipv4_prefix)) - 1))
        return f"{n >> 24}.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False).network_address)


def client_key(config: PolicydConfig, ip: IPAddress, client_name: str) -> str:
    """The client part of a triplet, by ``config.client_key``; for ``spf``
    the key used when SPF does not pass (``spf_fallback_client_key``; the
    ``spf:domain`` key itself needs DNS: policyd.greylist)."""
    kind = config.client_key
    if kind == "spf":
        kind = config.spf_fallback_client_key
    if kind == "host":
        return str(ip)
    if kind == "smart":
        name = client_name.strip().lower()
        # Postfix sends "unknown" unless the name resolved back to the address.
        if name and name != "unknown":
            domain = registrable_domain(name)
            if domain is not None:
                return domain
    return subnet_key(ip, config.ipv4_prefix, config.ipv6_prefix)


_SAFE_KEY = re.compile(r"[\x21-\x7e]*")

# ``/`` separates a key's fields and may appear in an address: inside a
# field it is written %2f, and ``%`` itself %25, so that two triplets can
# never share a key (x@a.org + y/z@example.com, x@a.org/y + z@example.com).
KEY_SEPARATOR = "/"


def escape_field(field: str) -> str:
    """One field of a store key, ``%`` and ``/`` percent-encoded."""
    if "%" not in field and KEY_SEPARATOR not in field:
        return field  # nearly every field: unchanged
    return field.replace("%", "%25").replace(KEY_SEPARATOR, "%2f")


def join_fields(*fields: str) -> str:
    """The fields of a key, each escaped (escape_field), joined by ``/``."""
    return KEY_SEPARATOR.join(escape_field(field) for field in fields)


def sanitise_key(raw: str) -> str:
    """A memcache-safe key from join_fields' output: bytes outside printable
    ASCII (white space, control characters, non-ASCII) percent-encoded in
    lower case (so a folding table leaves the key unchanged; ``%`` is
    already join_fields' escape), and the sha256 hex digest instead when the
    result is over STORE_KEY_MAX_BYTES."""
    if _SAFE_KEY.fullmatch(raw):
        # Fast path (nearly every key): nothing to encode.
        if len(raw) > limits.STORE_KEY_MAX_BYTES:
            return hashlib.sha256(raw.encode("ascii")).hexdigest()
        return raw
    data = raw.encode("utf-8", "backslashreplace")
    out = []
    for byte in data:
        if 0x21 <= byte <= 0x7E:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02x}")
    key = "".join(out)
    if len(key) > limits.STORE_KEY_MAX_BYTES:
        return hashlib.sha256(data).hexdigest()
    return key


@dataclass(frozen=True)
class KeyMaker:
    """Store keys for triplets and client records.

    With ``privacy`` only an HMAC-SHA256 (keyed with privacy_salt, the same
    on every host sharing the store) is stored, never an address.
    """

    privacy: bool = False
    salt: str = ""

    @classmethod
    def from_config(cls, config: PolicydConfig) -> KeyMaker:
        return cls(privacy=config.privacy, salt=config.privacy_salt)

    def _key(self, *fields: str) -> str:
        # Privacy hashes the same escaped text: a hash of ambiguous text
        # would be just as shared.
        raw = join_fields(*fields)
        if self.privacy:
            data = raw.encode("utf-8", "backslashreplace")
            return hmac.new(self.salt.encode("utf-8"), data, hashlib.sha256).hexdigest()
        return sanitise_key(raw)

    def triplet_key(self, client: str, sender: str, recipient: str) -> str:
        """Key of an already normalised triplet: ``client/sender/recipient``,
        ``/`` and ``%`` inside a field percent-encoded (join_fields)."""
        return self._key(client, sender, recipient)

    def client_record_key(self, client: str) -> str:
        return self._key(client)
