"""``policyd import-postgrey``: carry postgrey's database over to policyd.

    policyd -c FILE import-postgrey [--dry-run] [--delay N] [--lookup-by-host]
            [--ipv4cidr N] [--ipv6cidr N] DBDIR

postgrey (1.37, /usr/sbin/postgrey) keeps two BerkeleyDB btrees in a
transactional environment in its --dbdir:

- ``postgrey.db``: key ``lc "CLIENT/SENDER/RECIPIENT"``, CLIENT the network
  address of the client's /ipv4cidr or /ipv6cidr (NetAddr::IP's text:
  IPv6 uncompressed, ``2001:db8:0:0:0:0:0:0``), or the address itself with
  --lookup-by-host; SENDER with its BATV tag, ``+extension`` and
  whole-word numbers folded; RECIPIENT as given.  Value
  ``first_seen,last_seen`` (older versions appended a host part); the
  triplet passed when last_seen - first_seen >= --delay.
- ``postgrey_clients.db`` (the auto-whitelist): key the client's address,
  value ``count,last_seen``; count passes, each at most once an hour.

With --privacy both keys are SHA1 hex digests: they cannot be turned back
into addresses, so they cannot become policyd keys.

Reading: a copy, never postgrey's files in place.  postgrey holds an
exclusive flock on ``postgrey.lock`` while it runs and writes through a
BerkeleyDB cache whose pages reach ``postgrey.db`` only at its hourly
checkpoint; what it wrote since is in its log files.  So the database files
and then the log files are copied into a private directory (BerkeleyDB's
hot-backup order), and ``db_recover -c`` replays the log there, giving every
committed write.  When postgrey is not running, its lock is held (shared)
during the copy so that it cannot start meanwhile.  The recovered copy is
read with ``db_dump -p`` (Debian's db5.3-util) and its printable output
parsed here, rather than through a compiled Python binding of libdb.

Writing: each record becomes the record policyd would have written for the
same requests, under policyd's configuration (keys through
policyd.triplet's functions and KeyMaker), with the ttl policyd would have
given it: pending triplets expire ``retry_window`` after their first sight,
passed triplets and client records ``max_age`` after they were last seen.
A policyd record as new or newer is kept, so a second run changes nothing.

With ``client_key = spf`` policyd keys a sender whose SPF passes as
``spf:DOMAIN``, which postgrey never recorded: the passed triplets' SPF is
evaluated first (SpfStage, bounded in concurrency and time; --no-spf skips
it), and those that pass are written under ``spf:DOMAIN`` as well.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import fcntl
import grp
import ipaddress
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from memtable import clock
from memtable.cf import decimal
from memtable.config import MemcacheConfig
from memtable.errors import MemtableError
from memtable.limits import CF_INT_MAX, MAX_TABLE_NESTING
from memtable.registry import split_spec
from memtable.table import Table
from policyd import limits, spf
from policyd.config import PolicydConfig
from policyd.dns import Resolver
from policyd.errors import PolicydError
from policyd.greylist import TripletRecord
from policyd.logsetup import error_line
from policyd.reputation import ClientRecord
from policyd.spf import split_sender
from policyd.store import open_checked
from policyd.storewalk import memcache_front
from policyd.triplet import (
    IPAddress,
    KeyMaker,
    client_key,
    normalise_recipient,
    normalise_sender,
    parse_client_address,
    spf_key,
)

TRIPLET_DB = "postgrey.db"
CLIENT_DB = "postgrey_clients.db"
LOCK_FILE = "postgrey.lock"
# Debian's db5.3-util names the tools after the version; db-util adds the
# plain names.
DUMP_TOOLS = ("db5.3_dump", "db_dump")
RECOVER_TOOLS = ("db5.3_recover", "db_recover")

# first_seen,last_seen[,host part of older postgrey versions]
_TRIPLET_VALUE = re.compile(r"(\d{1,18}),(\d{1,18})(?:,[^,]*)?", re.ASCII)
# count,last_seen
_CLIENT_VALUE = re.compile(r"(\d{1,18}),(\d{1,18})", re.ASCII)
_SHA1_HEX = re.compile(r"[0-9a-f]{40}")
_ESCAPE = re.compile(rb"\\(\\|[0-9a-fA-F]{2})")
R = TypeVar("R", TripletRecord, ClientRecord)
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PostgreyImportError(PolicydError):
    """postgrey's database cannot be read, or a store failed; one line."""


@dataclass(frozen=True)
class PostgreyOptions:
    """The postgrey options that shaped its database (postgrey's defaults)."""

    delay: int = 300
    lookup_by_host: bool = False
    ipv4cidr: int = 24
    ipv6cidr: int = 64

    def prefix(self, version: int) -> int:
        """postgrey's client prefix length for IP version ``version``."""
        if self.lookup_by_host:
            return 32 if version == 4 else 128
        return self.ipv4cidr if version == 4 else self.ipv6cidr

    def render(self) -> str:
        lookup = ("--lookup-by-host" if self.lookup_by_host else
                  f"--lookup-by-subnet --ipv4cidr={self.ipv4cidr} --ipv6cidr={self.ipv6cidr}")
        return f"--delay={self.delay} {lookup}"


def address_key_kind(config: PolicydConfig) -> str:
    """How policyd keys a client by its address: client_key, or for ``spf``
    (senders whose SPF does not pass) spf_fallback_client_key."""
    return config.spf_fallback_client_key if config.client_key == "spf" else config.client_key


def policyd_prefix(config: PolicydConfig, version: int) -> int:
    """The prefix length policyd keys clients of IP ``version`` by (``smart``:
    for clients without a verified name; ``spf``: senders whose SPF does not
    pass)."""
    if address_key_kind(config) == "host":
        return 32 if version == 4 else 128
    return config.ipv4_prefix if version == 4 else config.ipv6_prefix


def carries(options: PostgreyOptions, config: PolicydConfig, version: int) -> bool:
    """postgrey's triplets of IP ``version`` clients map to policyd keys: its
    networks are no larger than policyd's (a network cannot be split)."""
    return policyd_prefix(config, version) <= options.prefix(version)


# ---------------------------------------------------------------------------
# db_dump -p output


def _unescape(text: bytes, where: str) -> bytes:
    """db_dump -p's printable form: ``\\\\`` is a backslash, ``\\xx`` a byte."""
    if b"\\" not in text:
        return text
    if _ESCAPE.sub(b"", text).count(b"\\"):
        raise PostgreyImportError(f"{where}: bad escape in {text[:80]!r}")
    return _ESCAPE.sub(lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1], 16)]), text)


def parse_dump(stream: BinaryIO, name: str,
               max_entries: int = limits.POSTGREY_MAX_ENTRIES) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of one database in ``db_dump -p`` output.

    PostgreyImportError naming ``name`` and the line on anything else: no
    ``format=print`` header, a data line without its leading space, a key
    without a value, a line over POSTGREY_DUMP_LINE_MAX_BYTES, more than
    ``max_entries`` pairs, a second database, no ``DATA=END``.
    """
    lineno = 0

    def read() -> bytes | None:
        nonlocal lineno
        line = stream.readline(limits.POSTGREY_DUMP_LINE_MAX_BYTES + 1)
        if not line:
            return None
        lineno += 1
        if len(line) > limits.POSTGREY_DUMP_LINE_MAX_BYTES:
            raise PostgreyImportError(
                f"{name}, line {lineno}: longer than {limits.POSTGREY_DUMP_LINE_MAX_BYTES} bytes")
        return line.rstrip(b"\n")

    header: dict[bytes, bytes] = {}
    while (line := read()) != b"HEADER=END":
        if line is None:
            raise PostgreyImportError(f"{name}: no HEADER=END: not db_dump output")
        item, eq, value = line.partition(b"=")
        if not eq:
            raise PostgreyImportError(f"{name}, line {lineno}: not a header line: "
                                      f"{line[:80]!r}")
        header[item] = value
    if header.get(b"format") != b"print":
        raise PostgreyImportError(f"{name}: format is not print: not db_dump -p output")
    entries = 0
    while True:
        line = read()
        if line is None:
            raise PostgreyImportError(f"{name}, line {lineno}: ends without DATA=END "
                                      "(db_dump cut short?)")
        if line == b"DATA=END":
            break
        if not line.startswith(b" "):
            raise PostgreyImportError(f"{name}, line {lineno}: expected a key line "
                                      f"(a space, then the key), got {line[:80]!r}")
        key = _unescape(line[1:], f"{name}, line {lineno}")
        value_at = lineno + 1
        value_line = read()
        if value_line is None or not value_line.startswith(b" "):
            raise PostgreyImportError(f"{name}, line {value_at}: key without a value")
        if entries >= max_entries:
            raise PostgreyImportError(
                f"{name}: more than {max_entries} records; nothing was written")
        entries += 1
        yield key, _unescape(value_line[1:], f"{name}, line {value_at}")
    if read() is not None:
        raise PostgreyImportError(f"{name}, line {lineno}: more than one database in "
                                  "the dump: postgrey's files hold one each")


# ---------------------------------------------------------------------------
# postgrey's records as policyd's


@dataclass(frozen=True)
class Mapped:
    """What one postgrey record becomes.  ``outcome``: ``passed``,
    ``pending``, ``client`` (carried over: ``key`` and ``record`` set),
    ``expired``, ``hashed`` (--privacy), ``malformed``, ``not-carried``."""

    outcome: str
    key: str = ""
    record: TripletRecord | ClientRecord | None = None
    host_bits: bool = False  # client part is no network address of postgrey's prefix
    # A triplet's client network and postgrey's sender (for SPF).
    network: IPNetwork | None = None
    sender: str = ""
    # client_key = spf, a passed triplet: what SPF made of it (SpfStage.outcome)
    # and the spf:DOMAIN key it is written under as well ("" when none).
    spf: str = ""
    spf_key: str = ""


def _text(data: bytes) -> str | None:
    # policyd reads requests as strict UTF-8: other bytes can never match.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def map_triplet(key: bytes, value: bytes, *, options: PostgreyOptions, config: PolicydConfig,
                keys: KeyMaker, now: int, spf: SpfStage | None = None) -> Mapped:
    """postgrey.db's ``key``/``value`` as a policyd triplet record; with
    ``spf`` (client_key = spf) a passed one also under its spf:DOMAIN key."""
    text, value_text = _text(key), _text(value)
    if text is None or value_text is None:
        return Mapped("malformed")
    if "/" not in text and _SHA1_HEX.fullmatch(text):
        return Mapped("hashed")
    match = _TRIPLET_VALUE.fullmatch(value_text)
    client, slash, rest = text.partition("/")
    if match is None or not slash or "/" not in rest:
        return Mapped("malformed")
    # Addresses rarely hold a '/'; when one does, it is taken to be the sender's.
    sender, _, recipient = rest.rpartition("/")
    try:
        ip = parse_client_address(client)
    except ValueError:
        return Mapped("malformed")
    if not carries(options, config, ip.version):
        return Mapped("not-carried")
    first, last = int(match[1]), int(match[2])
    passed = last - first >= options.delay
    record = TripletRecord(first, last, passed)
    if ((not passed and first > now)
            or record.expired(now, config.retry_window, config.max_age)
            or _ttl(record, now, config) <= 0):
        return Mapped("expired")
    network = ipaddress.ip_network(f"{ip}/{options.prefix(ip.version)}", strict=False)
    # The client part through policyd's own function, as for a request
    # from that network (client_name unknown: postgrey never recorded one).
    policyd_sender, policyd_recipient = normalise_sender(sender), normalise_recipient(recipient)
    policyd_key = keys.triplet_key(client_key(config, ip, "unknown"), policyd_sender,
                                   policyd_recipient)
    spf_outcome, pool = spf.outcome(network, sender) if spf is not None and passed else ("", "")
    return Mapped("passed" if passed else "pending", policyd_key, record,
                  host_bits=network.network_address != ip, network=network, sender=sender,
                  spf=spf_outcome,
                  spf_key=keys.triplet_key(pool, policyd_sender, policyd_recipient) if pool
                  else "")


def map_client(key: bytes, value: bytes, *, config: PolicydConfig, keys: KeyMaker,
               now: int) -> Mapped:
    """postgrey_clients.db's ``key``/``value`` as a policyd client record: the
    count is policyd's count of passes, last_seen its last pass."""
    text, value_text = _text(key), _text(value)
    if text is None or value_text is None:
        return Mapped("malformed")
    if _SHA1_HEX.fullmatch(text):
        return Mapped("hashed")
    match = _CLIENT_VALUE.fullmatch(value_text)
    if match is None:
        return Mapped("malformed")
    try:
        ip = parse_client_address(text)
    except ValueError:
        return Mapped("malformed")
    count, last = int(match[1]), int(match[2])
    record = ClientRecord(last, last, 0, count, last)
    if record.expired(now, config.max_age) or _ttl(record, now, config) <= 0:
        return Mapped("expired")
    return Mapped("client", keys.client_record_key(client_key(config, ip, "unknown")), record)


def _ttl(record: TripletRecord | ClientRecord, now: int, config: PolicydConfig) -> int:
    """The ttl policyd would have given ``record`` when it wrote it, counted
    from now: pending triplets live retry_window from their first sight,
    passed ones and client records max_age from their last sight."""
    if isinstance(record, TripletRecord) and not record.passed:
        return min(record.first_seen + config.retry_window - now, config.retry_window)
    return min(record.last_seen + config.max_age - now, config.max_age)


def merge_triplet(old: TripletRecord | None, new: TripletRecord) -> TripletRecord | None:
    """The record to store when ``old`` is stored and ``new`` is imported;
    None to keep ``old``: it passed while ``new`` did not, or was seen at
    the same time or later.  Several postgrey triplets can be one policyd
    triplet (user+a@ and user+b@): the one furthest along wins, and when
    ``old`` had passed already its first sight and pass stay, with the
    later last sighting."""
    if old is None:
        return new
    if (new.passed, new.last_seen) <= (old.passed, old.last_seen):
        return None
    if old.passed:
        # Seen later by postgrey: policyd's own pass (and its delay) stays.
        return TripletRecord(old.first_seen, new.last_seen, True, old.passed_at)
    return new


def merge_client(old: ClientRecord | None, new: ClientRecord) -> ClientRecord | None:
    """One client record for several addresses of one network, or for a
    policyd record and an imported one: the HIGHEST count of passes (not
    the sum: postgrey counts each address's passes at most once an hour,
    policyd the network's, so passes of two addresses in one hour are one
    for policyd; the highest is what policyd would have counted at least),
    the latest sighting and pass.  None when ``old`` already holds it."""
    if old is None:
        return new
    merged = ClientRecord(min(old.first_seen, new.first_seen), max(old.last_seen, new.last_seen),
                          old.deferred, max(old.passed, new.passed),
                          max(old.last_pass, new.last_pass))
    return None if merged == old else merged


# ---------------------------------------------------------------------------
# client_key = spf: the spf:DOMAIN key of passed triplets

# SpfStage.outcome's categories, in the report's order.
SPF_POOLED = "pooled"            # SPF passes narrowly: written under spf:DOMAIN as well
SPF_NOT_POOLED = "not-pooled"    # evaluated: none, fail, ..., or a broad pass
SPF_DNS_FAILED = "dns-failed"    # temperror
SPF_NO_DOMAIN = "no-domain"      # null sender: policyd checks the HELO name, not recorded
SPF_NO_ADDRESS = "no-address"    # no client address of the network is known
SPF_NOT_EVALUATED = "not-evaluated"  # --no-spf, or past the time bound


@dataclass
class SpfStage:
    """What SPF says for the passed triplets, evaluated once per client
    network and sender domain before anything is reported or written.

    postgrey keyed triplets by network (--lookup-by-subnet) and never kept
    the HELO name; the addresses of a network are those its auto-whitelist
    holds (every address that passed a triplet, within --max-age), the most
    recently seen first.  A network's triplets from a sender domain are
    keyed ``spf:DOMAIN`` when the domain's SPF passes narrowly for one of
    them: the sender's retry from any address its domain authorises then
    finds them, as policyd would have keyed them."""

    evaluate: bool  # False: --no-spf
    max_seconds: float
    addresses: dict[IPNetwork, list[IPAddress]] = field(default_factory=dict)
    # (network, sender domain) -> "spf:domain", or an outcome when not pooled;
    # a pair absent once evaluated is SPF_NOT_EVALUATED.
    verdicts: dict[tuple[IPNetwork, str], str] = field(default_factory=dict)
    pairs: dict[tuple[IPNetwork, str], tuple[str, list[IPAddress]]] = field(
        default_factory=dict)  # to evaluate: a sender of the domain, the addresses
    triplets: int = 0  # passed triplets asked about
    _seen: dict[IPNetwork, list[tuple[int, IPAddress]]] = field(default_factory=dict)

    def candidates(self, network: IPNetwork) -> list[IPAddress]:
        if network.prefixlen == network.max_prefixlen:
            return [network.network_address]  # --lookup-by-host: the address itself
        return self.addresses.get(network, [])

    def classify(self, network: IPNetwork, sender: str) -> tuple[str, tuple[IPNetwork, str]]:
        domain = split_sender(sender, "")[1].lower()
        if not domain:
            return SPF_NO_DOMAIN, (network, "")
        if not self.candidates(network):
            return SPF_NO_ADDRESS, (network, domain)
        return "", (network, domain)

    def outcome(self, network: IPNetwork, sender: str) -> tuple[str, str]:
        """(category, the ``spf:DOMAIN`` client part or "") of a passed
        triplet of ``network`` from ``sender``."""
        category, pair = self.classify(network, sender)
        if category:
            return category, ""
        if not self.evaluate:
            return SPF_NOT_EVALUATED, ""
        verdict = self.verdicts.get(pair, SPF_NOT_EVALUATED)
        if verdict.startswith("spf:"):
            return SPF_POOLED, verdict
        return verdict, ""

    def add_client(self, options: PostgreyOptions, key: bytes, value: bytes) -> None:
        """Remember an auto-whitelist entry's address under postgrey's
        network of it (hashed and malformed entries name none)."""
        match = _CLIENT_VALUE.fullmatch(value.decode("ascii", "replace"))
        if match is None:
            return
        try:
            ip = parse_client_address(key.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            return
        network = ipaddress.ip_network(f"{ip}/{options.prefix(ip.version)}", strict=False)
        self._seen.setdefault(network, []).append((int(match[2]), ip))

    def keep_recent(self) -> None:
        """Each network's most recently seen addresses, at most
        POSTGREY_SPF_ADDRESSES of them."""
        for network, seen in self._seen.items():
            seen.sort(key=lambda item: item[0], reverse=True)
            self.addresses[network] = [ip for _, ip in seen[:limits.POSTGREY_SPF_ADDRESSES]]
        self._seen.clear()

    def add_triplet(self, mapped: Mapped) -> None:
        if mapped.outcome != "passed" or mapped.network is None:
            return
        self.triplets += 1
        category, pair = self.classify(mapped.network, mapped.sender)
        # One sender per domain: the local part (folded by postgrey anyway)
        # only reaches SPF through %{l} and %{s}, which make a pass broad.
        if not category and pair not in self.pairs:
            self.pairs[pair] = (mapped.sender, self.candidates(mapped.network))

    def run(self, config: PolicydConfig) -> None:
        """Evaluate every pair, at most POSTGREY_SPF_CONCURRENCY at a time and
        max_seconds in all; pairs left are SPF_NOT_EVALUATED."""
        if self.evaluate and self.pairs:
            asyncio.run(self._evaluate_all(config))

    async def _evaluate_all(self, config: PolicydConfig) -> None:
        resolver = Resolver(config.dns_servers or None, timeout=config.dns_timeout)
        todo = iter(self.pairs.items())

        async def worker() -> None:
            for pair, (sender, addresses) in todo:
                verdict = SPF_NOT_POOLED
                for ip in addresses:
                    result = await spf.check(resolver, ip, sender, "",
                                             timeout=config.spf_timeout)
                    if result.pooled:
                        verdict = spf_key(result.domain)
                        break
                    if result.result == spf.TEMPERROR:
                        verdict = SPF_DNS_FAILED
                        break  # the next address would wait for the same DNS
                self.verdicts[pair] = verdict

        workers = min(limits.POSTGREY_SPF_CONCURRENCY, len(self.pairs))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.max_seconds):
                await asyncio.gather(*(worker() for _ in range(workers)))


def spf_stage(snap: Snapshot, dbdir: Path, options: PostgreyOptions, config: PolicydConfig,
              now: int, *, evaluate: bool, max_seconds: float,
              out: Callable[[str], None]) -> SpfStage:
    """Read both dumps for the passed triplets' client networks and sender
    domains and (unless --no-spf) evaluate SPF for them; says what it asks
    before it does (it may take a while)."""
    stage = SpfStage(evaluate, max_seconds)
    keys = KeyMaker.from_config(config)
    if snap.clients is not None:
        with open(snap.clients, "rb") as stream:
            for key, value in parse_dump(stream, str(dbdir / CLIENT_DB)):
                stage.add_client(options, key, value)
    stage.keep_recent()
    for mapped in _mapped(snap.triplets, str(dbdir / TRIPLET_DB),
                          _triplet_mapper(options, config, keys, now)):
        stage.add_triplet(mapped)
    if evaluate and stage.pairs:
        addresses = len({ip for _, known in stage.pairs.values() for ip in known})
        out(f"SPF: evaluating {len({d for _, d in stage.pairs})} sender domains for "
            f"{addresses} client addresses postgrey knew ({len(stage.pairs)} network and "
            f"domain pairs of {stage.triplets} passed triplets), at most "
            f"{limits.POSTGREY_SPF_CONCURRENCY} at a time and {max_seconds:g}s in all "
            "(--no-spf skips this)")
    stage.run(config)
    return stage


# ---------------------------------------------------------------------------
# reading a consistent copy of postgrey's database


def _tool(names: tuple[str, ...]) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise PostgreyImportError(f"{names[0]} not found: install Debian's db5.3-util "
                              "(./dev deps does)")


def _run_db_tool(argv: list[str], stdout: BinaryIO | None = None) -> None:
    try:
        done = subprocess.run(argv, stdout=stdout if stdout is not None else subprocess.DEVNULL,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              timeout=limits.POSTGREY_TOOL_TIMEOUT_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise PostgreyImportError(f"{os.path.basename(argv[0])}: no result within "
                                  f"{limits.POSTGREY_TOOL_TIMEOUT_SECONDS}s") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise PostgreyImportError(f"{' '.join(argv)}: {lines[-1] if lines else 'failed'}")


@dataclass(frozen=True)
class Snapshot:
    """Dumps of a recovered copy of postgrey's database."""

    triplets: Path
    clients: Path | None  # None: no auto-whitelist database
    running: bool  # postgrey held its lock: a hot copy was read


@contextlib.contextmanager
def snapshot(dbdir: Path) -> Iterator[Snapshot]:
    """Copy, recover and dump postgrey's database in a private directory,
    removed afterwards.  PostgreyImportError when it cannot."""
    dump, recover = _tool(DUMP_TOOLS), _tool(RECOVER_TOOLS)
    if not (dbdir / TRIPLET_DB).is_file():
        raise PostgreyImportError(f"{dbdir}: no {TRIPLET_DB} (postgrey's --dbdir, by "
                                  "default /var/lib/postgrey)")
    with tempfile.TemporaryDirectory(prefix="policyd-import-postgrey-") as tmp:
        work = Path(tmp)
        copy = work / "db"
        copy.mkdir()
        try:
            with _postgrey_lock(dbdir) as running:
                databases = [n for n in (TRIPLET_DB, CLIENT_DB) if (dbdir / n).is_file()]
                # Databases first, then the logs: the log then covers every
                # change made while the databases were copied.
                for name in databases:
                    shutil.copyfile(dbdir / name, copy / name)
                for log in sorted(dbdir.glob("log.*")):
                    shutil.copyfile(log, copy / log.name)
        except OSError as exc:
            raise PostgreyImportError(f"{dbdir}: cannot copy postgrey's database: "
                                      f"{exc.strerror or exc}") from None
        if any(copy.glob("log.*")):
            _run_db_tool([recover, "-c", "-h", str(copy)])
        dumps: dict[str, Path] = {}
        for name in databases:
            out = work / f"{name}.dump"
            with open(out, "wb") as stream:
                _run_db_tool([dump, "-p", str(copy / name)], stdout=stream)
            dumps[name] = out
        yield Snapshot(dumps[TRIPLET_DB], dumps.get(CLIENT_DB), running)


@contextlib.contextmanager
def _postgrey_lock(dbdir: Path) -> Iterator[bool]:
    """Hold postgrey's lock (shared) when it is free, so that postgrey does
    not start during the copy; yields True when postgrey holds it (runs)."""
    try:
        fd = os.open(dbdir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield False  # never started (or not from this directory)
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise
            yield True
            return
        yield False
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------
# the import


@dataclass
class Counts:
    read: int = 0
    passed: int = 0
    pending: int = 0
    clients: int = 0  # auto-whitelist entries carried over
    expired: int = 0
    hashed: int = 0
    malformed: int = 0
    not_carried: int = 0
    host_bits: int = 0
    written: int = 0
    kept: int = 0  # policyd's record as new or newer
    networks: dict[str, int] = field(default_factory=dict)  # client key: highest count
    spf: dict[str, int] = field(default_factory=dict)  # passed triplets by SPF outcome

    def add(self, mapped: Mapped) -> None:
        self.read += 1
        if mapped.outcome == "client":
            self.clients += 1
            assert isinstance(mapped.record, ClientRecord)
            self.networks[mapped.key] = max(self.networks.get(mapped.key, 0),
                                            mapped.record.passed)
            return
        attr = mapped.outcome.replace("-", "_")
        setattr(self, attr, getattr(self, attr) + 1)
        self.host_bits += mapped.host_bits
        if mapped.spf:
            self.spf[mapped.spf] = self.spf.get(mapped.spf, 0) + 1

    @property
    def skipped(self) -> int:
        return self.hashed + self.malformed + self.not_carried


class _Writer(Generic[R]):
    """Batches of records merged with what the table holds, then written
    (unless dry_run: then remembered, so that later batches see them)."""

    def __init__(self, table: Table | None, config: PolicydConfig, now: int, counts: Counts,
                 merge: Callable[[R | None, R], R | None], parse: Callable[[str], R], *,
                 dry_run: bool) -> None:
        self.table, self.config, self.now, self.counts = table, config, now, counts
        self.merge: Callable[[R | None, R], R | None] = merge
        self.parse: Callable[[str], R] = parse
        self.dry_run = dry_run
        self.batch: dict[str, R] = {}
        self.shadow: dict[str, str] = {}  # dry run: what would have been written

    def add(self, key: str, record: R) -> None:
        held = self.batch.get(key)
        merged = self.merge(held, record) if held is not None else record
        if merged is not None:
            self.batch[key] = merged
        if len(self.batch) >= limits.POSTGREY_BATCH_KEYS:
            self.flush()

    def flush(self) -> None:
        if not self.batch:
            return
        batch, self.batch = self.batch, {}
        stored = self._lookup(list(batch))
        items: list[tuple[str, str, int | None]] = []
        for key, record in batch.items():
            old = self._load(stored.get(key))
            merged = self.merge(old, record)
            if merged is None:
                self.counts.kept += 1
                continue
            items.append((key, merged.serialise(), _ttl(merged, self.now, self.config)))
        self.counts.written += len(items)
        if self.dry_run or self.table is None:
            self.shadow.update((key, value) for key, value, _ in items)
            return
        try:
            for error in self.table.update_many(items):
                if error is not None:
                    raise error
        except (MemtableError, OSError) as exc:
            raise PostgreyImportError(f"{self.table.spec}: {exc}") from None

    def _load(self, value: str | None) -> R | None:
        """A stored record policyd would still use, or None."""
        if value is None:
            return None
        try:
            record = self.parse(value)
        except ValueError:
            return None  # malformed: policyd ignores it too
        if isinstance(record, TripletRecord):
            expired = record.expired(self.now, self.config.retry_window, self.config.max_age)
        else:
            expired = record.expired(self.now, self.config.max_age)
        return None if expired else record

    def _lookup(self, keys: list[str]) -> dict[str, str | None]:
        """The stored values, as policyd would read them.  A dry run reads
        memcached and the backup apart: a memcache table's lookup writes a
        backup entry back to memcached."""
        found: dict[str, str | None] = {key: self.shadow.get(key) for key in keys}
        if self.table is None:
            return found
        tables: list[Table] = [self.table]
        if self.dry_run:
            front = memcache_front(self.table)
            if front is not None:
                backup = getattr(self.table, "backup", None)
                tables = [front] if backup is None else [front, backup]
        for n, table in enumerate(tables):
            missing = [key for key, value in found.items() if value is None]
            if not missing:
                break
            try:
                found.update(table.lookup_many(missing))
            except (MemtableError, OSError) as exc:
                if n + 1 < len(tables):
                    continue  # memcached down: the backup answers, as in lookup()
                raise PostgreyImportError(f"{self.table.spec}: {exc}") from None
        return found


@dataclass
class Result:
    triplets: Counts
    clients: Counts
    running: bool
    notes: list[str] = field(default_factory=list)  # said after the writes
    spf: SpfStage | None = None  # client_key = spf


def _mapped(path: Path, name: str, mapper: Callable[[bytes, bytes], Mapped]) -> Iterator[Mapped]:
    with open(path, "rb") as stream:
        for key, value in parse_dump(stream, name):
            yield mapper(key, value)


def survey(snap: Snapshot, dbdir: Path, options: PostgreyOptions, config: PolicydConfig,
           now: int, spf_result: SpfStage | None = None) -> Result:
    """Read both dumps and count what each record becomes (nothing written)."""
    keys = KeyMaker.from_config(config)
    result = Result(Counts(), Counts(), snap.running, spf=spf_result)
    for mapped in _mapped(snap.triplets, str(dbdir / TRIPLET_DB), _triplet_mapper(
            options, config, keys, now, spf_result)):
        result.triplets.add(mapped)
    if snap.clients is not None:
        for mapped in _mapped(snap.clients, str(dbdir / CLIENT_DB),
                              _client_mapper(config, keys, now)):
            result.clients.add(mapped)
    return result


def _triplet_mapper(options: PostgreyOptions, config: PolicydConfig, keys: KeyMaker,
                    now: int, spf_result: SpfStage | None = None
                    ) -> Callable[[bytes, bytes], Mapped]:
    return lambda k, v: map_triplet(k, v, options=options, config=config, keys=keys, now=now,
                                    spf=spf_result)


def _client_mapper(config: PolicydConfig, keys: KeyMaker,
                   now: int) -> Callable[[bytes, bytes], Mapped]:
    return lambda k, v: map_client(k, v, config=config, keys=keys, now=now)


def write(snap: Snapshot, dbdir: Path, options: PostgreyOptions, config: PolicydConfig,
          now: int, result: Result, *, dry_run: bool) -> None:
    """Write (or, dry_run, count) the records into policyd's tables;
    result's written/kept counts are filled in."""
    keys = KeyMaker.from_config(config)
    _write_table(config.triplet_table, snap.triplets, str(dbdir / TRIPLET_DB),
                 _triplet_mapper(options, config, keys, now, result.spf), TripletRecord,
                 merge_triplet,
                 config, now, result.triplets, result.notes, dry_run=dry_run)
    if snap.clients is not None:
        _write_table(config.client_table, snap.clients, str(dbdir / CLIENT_DB),
                     _client_mapper(config, keys, now), ClientRecord, merge_client,
                     config, now, result.clients, result.notes,
                     dry_run=dry_run)


def _write_table(spec: str, path: Path, name: str, mapper: Callable[[bytes, bytes], Mapped],
                 kind: type[R], merge: Callable[[R | None, R], R | None],
                 config: PolicydConfig, now: int, counts: Counts, notes: list[str], *,
                 dry_run: bool) -> None:
    table: Table | None = None
    # Run as root, new lmdb files get their directory's owner (memtable's
    # lmdb table does it); the report names who that is.
    created = [] if dry_run or os.geteuid() != 0 else [
        file for file in lmdb_files(spec) if not os.path.lexists(file)]
    try:
        # Checked before it is written: a damaged lmdb file would abort.
        table = open_checked(spec, read_write=not dry_run)
    except (MemtableError, OSError) as exc:
        if not dry_run:
            raise PostgreyImportError(str(exc)) from None
        # Read-only, a store policyd has not created yet cannot be opened.
        notes.append(f"dry run: cannot read {spec} ({exc}): counted as empty")
    try:
        for file in created:
            notes.append(_owner_note(file))
        writer = _Writer(table, config, now, counts, merge, kind.parse, dry_run=dry_run)
        for mapped in _mapped(path, name, mapper):
            if isinstance(mapped.record, kind):
                writer.add(mapped.key, mapped.record)
                if mapped.spf_key:
                    writer.add(mapped.spf_key, mapped.record)
        writer.flush()
    finally:
        if table is not None:
            table.close()


def lmdb_files(spec: str, depth: int = 0) -> list[str]:
    """The lmdb files table ``spec`` writes: its own, or its memcache
    table's backup's ([] when the .cf cannot be read: opening says why)."""
    try:
        type_, name = split_spec(spec)
        if type_ == "lmdb":
            return [name + ".lmdb"]
        if type_ == "memcache" and depth <= MAX_TABLE_NESTING:
            backup = MemcacheConfig.from_file(name).backup
            return lmdb_files(backup, depth + 1) if backup else []
    except MemtableError:
        pass
    return []


def _owner_note(path: str) -> str:
    """What the report says of ``path``, just created by root: its owner,
    its directory's (see memtable.backends.lmdb_table)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except OSError as exc:
        return f"created {path} ({exc.strerror or exc})"
    owner = f"{_user(st.st_uid)}:{_group(st.st_gid)}"
    if st.st_uid == 0:
        return (f"created {path} owned by {owner}, as its directory: if policyd runs as "
                "another user, chown the file to that user before starting policyd")
    return f"created {path} owned by {owner}, as its directory"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# ---------------------------------------------------------------------------
# the report


def _kind_setting(config: PolicydConfig) -> str:
    if config.client_key == "spf":
        return f"spf_fallback_client_key = {config.spf_fallback_client_key}"
    return f"client_key = {config.client_key}"


def spf_notes(config: PolicydConfig, result: Result) -> list[str]:
    """client_key = spf: what carries over for senders whose SPF passes."""
    stage, counts = result.spf, result.triplets.spf
    notes = [
        "carries over in part: client_key = spf: policyd keys a sender whose SPF passes for "
        "the client as spf:DOMAIN, which postgrey did not record; every record is imported "
        f"under {_kind_setting(config)}, which serves senders whose SPF does not pass"]
    if stage is None or not stage.evaluate:
        notes.append(
            "does not carry over: SPF not evaluated (--no-spf): triplets and the auto-"
            "whitelist of senders whose SPF passes: they are greylisted once more under "
            "spf:DOMAIN and count their passes again")
        return notes
    n = {category: counts.get(category, 0) for category in (
        SPF_POOLED, SPF_NOT_POOLED, SPF_DNS_FAILED, SPF_NO_DOMAIN, SPF_NO_ADDRESS,
        SPF_NOT_EVALUATED)}
    notes.append(
        f"SPF of the senders of {sum(n.values())} passed triplets: {n[SPF_POOLED]} pass for "
        "a client address postgrey knew in their network: imported under spf:DOMAIN as well; "
        f"{n[SPF_NOT_POOLED]} do not pass (or too broadly); {n[SPF_DNS_FAILED]} DNS failed; "
        f"not evaluated: {n[SPF_NO_DOMAIN]} null sender (policyd checks the HELO name, which "
        f"postgrey did not record), {n[SPF_NO_ADDRESS]} no client address known (postgrey's "
        f"auto-whitelist holds them), {n[SPF_NOT_EVALUATED]} past the "
        f"{stage.max_seconds:g}s bound")
    notes.append(
        "does not carry over for senders whose SPF passes: pending triplets, passed ones "
        "not imported under spf:DOMAIN, and the auto-whitelist (policyd counts a domain's "
        "passes under spf:DOMAIN): such a sender is greylisted once more for a new triplet")
    return notes


def _prefix_text(prefix: int, version: int) -> str:
    return "addresses" if prefix == (32 if version == 4 else 128) else f"/{prefix} networks"


def carry_notes(options: PostgreyOptions, config: PolicydConfig, result: Result) -> list[str]:
    """What carries over and what does not, under these options and config."""
    notes = []
    for version in (4, 6):
        theirs, ours = options.prefix(version), policyd_prefix(config, version)
        what = (f"triplets of IPv{version} clients: postgrey keyed them by "
                f"{_prefix_text(theirs, version)}, policyd by {_prefix_text(ours, version)}"
                + (" when the sender's SPF does not pass" if config.client_key == "spf"
                   else ""))
        if ours > theirs:
            notes.append(f"does not carry over: {what}; a network cannot be split into "
                         "smaller ones: they are greylisted once more")
        elif ours < theirs:
            notes.append(f"carries over: {what}; several postgrey triplets become one")
        else:
            notes.append(f"carries over: {what}")
    if config.client_key == "spf":
        notes += spf_notes(config, result)
    if address_key_kind(config) == "smart":
        notes.append(
            f"carries over in part: {_kind_setting(config)}: policyd keys a client whose name "
            "verifies by its registrable domain, which postgrey did not record; what is "
            "imported (by network) serves clients without a verified name only, the others "
            "are greylisted once more and count their passes again")
    per = ("address" if policyd_prefix(config, 4) == 32 else
           f"/{config.ipv4_prefix} and /{config.ipv6_prefix} networks")
    notes.append(
        f"auto-whitelist: postgrey counts passes per address, policyd per client ({per}); "
        "the addresses of one network make one client record with the highest count among "
        "them (passes of two addresses in one hour are one pass for policyd)")
    if result.triplets.hashed or result.clients.hashed:
        notes.append(
            f"does not carry over: {result.triplets.hashed} triplets and "
            f"{result.clients.hashed} auto-whitelist entries are SHA1 hashes (postgrey "
            "--privacy): they cannot be turned into policyd keys")
    if result.triplets.host_bits:
        notes.append(
            f"warning: {result.triplets.host_bits} triplets name a client that is not a "
            f"network address of {options.render()}: did postgrey run with other options? "
            "Give import-postgrey the options postgrey runs with")
    if options.delay != config.greylist_delay:
        notes.append(
            f"postgrey's --delay={options.delay} decides which triplets passed; pending ones "
            f"wait greylist_delay = {config.greylist_delay}s from their first sight")
    return notes


def render_survey(options: PostgreyOptions, config: PolicydConfig, result: Result) -> list[str]:
    t, c = result.triplets, result.clients
    lines = carry_notes(options, config, result)
    lines.append(
        f"triplets: {t.read} read: {t.passed} passed, {t.pending} pending, {t.expired} expired, "
        f"{t.skipped} skipped ({t.hashed} hashed, {t.not_carried} not carried over, "
        f"{t.malformed} malformed)")
    threshold = config.auto_whitelist_clients
    whitelisted = sum(1 for n in c.networks.values() if threshold and n >= threshold)
    lines.append(
        f"clients: {c.read} read: {c.clients} addresses in {len(c.networks)} client records "
        f"({whitelisted} auto-whitelisted with auto_whitelist_clients = {threshold}), "
        f"{c.expired} expired, {c.skipped} skipped ({c.hashed} hashed, {c.malformed} malformed)")
    return lines


def render_written(config: PolicydConfig, result: Result, *, dry_run: bool) -> list[str]:
    verb = "would write" if dry_run else "wrote"
    line = (f"{verb} {result.triplets.written} triplets to {config.triplet_table} and "
            f"{result.clients.written} client records to {config.client_table}; kept "
            f"{result.triplets.kept + result.clients.kept} records where policyd's is as new "
            "or newer")
    return [*result.notes, line + ("; dry run: nothing written" if dry_run else "")]


def import_postgrey(dbdir: Path, options: PostgreyOptions, config: PolicydConfig, *,
                    dry_run: bool, out: Callable[[str], None],
                    ignored: Sequence[str] = (), evaluate_spf: bool = True,
                    spf_max_seconds: float = limits.POSTGREY_SPF_MAX_SECONDS) -> Result:
    """The whole import; ``out`` gets each line of the report, the survey
    (what carries over, counts) before anything is written.  ``ignored``:
    postgrey options given that do not shape its database (POSTGREY_OPTS
    pasted whole).  With client_key = spf, the passed triplets' SPF is
    evaluated first (unless not ``evaluate_spf``: --no-spf), for at most
    ``spf_max_seconds``."""
    now = int(clock.now())
    with snapshot(dbdir) as snap:
        how = ("postgrey is running: read a copy" if snap.running
               else "postgrey is not running: read a copy under its lock")
        out(f"{dbdir}: {how}, recovered from its log; assuming postgrey {options.render()}")
        if ignored:
            out(f"not used: {' '.join(ignored)}: they do not decide what postgrey's records "
                'mean; policyd.cf\'s parameters apply (docs/policyd.md, "Moving from postgrey")')
        stage = None
        if config.client_key == "spf":
            stage = spf_stage(snap, dbdir, options, config, now, evaluate=evaluate_spf,
                              max_seconds=spf_max_seconds, out=out)
        result = survey(snap, dbdir, options, config, now, stage)
        for line in render_survey(options, config, result):
            out(line)
        write(snap, dbdir, options, config, now, result, dry_run=dry_run)
    for line in render_written(config, result, dry_run=dry_run):
        out(line)
    return result


def command(config: PolicydConfig, args: argparse.Namespace) -> int:
    try:
        dbdir = _dbdir(args.dbdir, args.dbdir_option)
        options = PostgreyOptions(delay=_delay(args.delay), lookup_by_host=args.lookup_by_host,
                                  ipv4cidr=args.ipv4cidr, ipv6cidr=args.ipv6cidr)
        import_postgrey(dbdir, options, config, dry_run=args.dry_run,
                        out=lambda line: print(f"policyd import-postgrey: {line}", flush=True),
                        ignored=args.postgrey_ignored, evaluate_spf=not args.no_spf,
                        spf_max_seconds=args.spf_max_time or limits.POSTGREY_SPF_MAX_SECONDS)
    except PostgreyImportError as exc:
        print(error_line(f"policyd: import-postgrey: {exc}"), file=sys.stderr)
        return 1
    return 0


def _dbdir(positional: str | None, option: str | None) -> Path:
    """DBDIR, or postgrey's --dbdir when POSTGREY_OPTS names it."""
    if positional is not None and option is not None and Path(positional) != Path(option):
        raise PostgreyImportError(f"--dbdir={option} and DBDIR {positional} differ: "
                                  "give one of them")
    chosen = positional if positional is not None else option
    if chosen is None:
        raise PostgreyImportError("no DBDIR: give postgrey's --dbdir (Debian: "
                                  "/var/lib/postgrey)")
    return Path(chosen)


def _delay(text: str) -> int:
    """postgrey's --delay: whole seconds (its Getopt type is an integer)."""
    value = decimal(text)
    if value is None or not 0 < value <= CF_INT_MAX:
        raise PostgreyImportError(
            f"--delay={text}: postgrey's --delay is a positive whole number of seconds "
            "(--delay=300), without a unit")
    return value
