"""The greylisting policy: one RCPT request in, one Decision out.

A triplet (client key, normalised sender, normalised recipient) seen for the
first time is deferred; a retry after ``greylist_delay`` and within
``retry_window`` passes, and the passed triplet is then let through for
``max_age`` after it was last seen.  Clients that passed often enough
(``auto_whitelist_clients``), that came back after postscreen's after-220
tests (``postscreen_skip``), or that the whitelists name skip greylisting.
The stores are reached through policyd.store, so nothing here blocks the
event loop.

Triplet record, stored as ``first_seen,last_seen,passed,passed_at``
(passed 0/1; passed_at the UNIX time of the retry that ended greylisting, 0
while pending, and for passes imported from postgrey, which does not
record it: "delay unknown"): new ones with ttl retry_window, passed ones
with ttl max_age.  passed_at - first_seen is the sender's retry delay,
which ``policyd report`` collects (last_seen moves on, so it cannot tell).
A passed triplet's last_seen (and ttl) is rewritten at most once per
RECORD_REFRESH_INTERVAL (policyd.reputation) to save writes, so it stays
good for at least max_age - RECORD_REFRESH_INTERVAL after it was last seen.  Times are also
checked on read, because a backup table (lmdb) never expires entries.

Store traffic per request: the triplet and client lookups (and
postscreen's cache) are asked together, then the writes together; the
decision is returned only once every write is committed (the write-ahead
guarantee).  Each table has its own Store (policyd.store): a store sends
everything asked while its previous batch was in flight as one lookup_many
and one update_many, and the three stores' batches run at the same time.
Writes: a new triplet costs two (triplet and client record), an early retry
one (the client's deferred count), the pass two; a passed triplet or
auto-whitelisted client at most one per RECORD_REFRESH_INTERVAL.
The early retry's write is kept: the deferred count is the number of
deferrals, and counting them less often would change what it says.

DNS (dnsbl_sites, policyd.dnsbl) is asked last, only for a triplet that is
new or pending: non-RCPT, authenticated and whitelisted requests never get
that far, and the store lookups come first because most traffic is passed
triplets and auto-whitelisted or postscreen-verified clients, whose answer
needs no score.  The sites are asked together, so the lists alone add
at most dns_timeout to a request; with no score (a site did not answer)
the request is greylisted as without DNS.  A DNSWL-allowlisted client
(``dnswl``) or one below dnsbl_greylist_threshold (``unlisted``) gets
DUNNO and leaves no record; a listed one waits greylist_delay_listed.

SPF (``client_key = spf``, ``greylist_delay_spf_pass``): the sender's SPF
result (policyd.spf) is asked for once per request at most, by _SenderSpf:
before the stores when the key needs it, else only when a still greylisted
triplet's delay does; never for requests decided before (whitelists,
non-RCPT, authenticated).  A narrow pass keys the client ``spf:DOMAIN``;
anything else, a DNS failure included, leaves the request as without SPF.
When both apply, a listed client waits greylist_delay_listed (the
longer), and all the DNS of a decision has one bound, config.dns_bound
(SPF's): with greylist_delay_spf_pass the lists and SPF are asked
together; with client_key = spf, SPF comes before the stores and the lists
after them (still only for a new or pending triplet), cut at what is left
of the bound.  Asking the lists together with SPF there would halve the
first wait of a DNS outage, but would send every client (passed triplets
and auto-whitelisted clients too) to the list operators.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from memtable import clock
from memtable.errors import ConfigError, OpenError
from memtable.registry import as_async
from memtable.table import Table
from policyd import limits, spf
from policyd.api import Decision, PolicyFailure
from policyd.config import PolicydConfig
from policyd.dns import Resolver
from policyd.dnsbl import DNSWL, LISTED, UNLISTED, DnsblScorer, DnsScore, DnsVerdict
from policyd.metrics import MetricsSink
from policyd.reputation import (
    ClientRecord,
    load_client_record,
    needs_refresh,
    parse_record,
    postscreen_proves_return,
)
from policyd.store import Store, StoreError, open_checked
from policyd.triplet import (
    IPAddress,
    KeyMaker,
    client_key,
    normalise_recipient,
    normalise_sender,
    parse_client_address,
    recipient_domain,
    spf_key,
)
from policyd.whitelist import Whitelists

log = logging.getLogger(__name__)

DUNNO = "DUNNO"
GREYLIST_DSN = "4.2.0"
T = TypeVar("T")
# Which list matched, in postgrey's words ("reason=client whitelist"), so
# the same grep finds both; the reason stays one word for the metrics.
CLIENT_WHITELISTED = Decision(DUNNO, "whitelisted", detail="client whitelist")
RECIPIENT_WHITELISTED = Decision(DUNNO, "whitelisted", detail="recipient whitelist")
# Message instances remembered so that one message with several recipients
# gets one X-Greylist header (postgrey remembers 20).
HEADER_INSTANCE_MEMORY = 1024
_PERCENT = re.compile(r"%[a-z]")
# first_seen,last_seen,passed,passed_at: ASCII decimal numbers, passed 0 or 1.
_TRIPLET_RECORD = re.compile(r"(\d+),(\d+),([01]),(\d+)", re.ASCII)


@dataclass(frozen=True)
class TripletRecord:
    first_seen: int
    last_seen: int
    passed: bool = False
    passed_at: int = 0  # when the delay ended; 0: pending, or unknown (imported)

    def serialise(self) -> str:
        return f"{self.first_seen},{self.last_seen},{int(self.passed)},{self.passed_at}"

    @classmethod
    def parse(cls, value: str) -> TripletRecord:
        """ValueError unless value is ``first,last,0|1,passed_at``."""
        match = _TRIPLET_RECORD.fullmatch(value) if len(value) <= limits.RECORD_MAX_CHARS else None
        if match is None:
            raise ValueError(f"malformed triplet record {value[:80]!r}")
        first, last, passed, passed_at = match.groups()
        return cls(int(first), int(last), passed == "1", int(passed_at))

    @property
    def delay(self) -> int | None:
        """How long the sender took to retry past greylisting, when known."""
        if not self.passed or self.passed_at < self.first_seen or self.passed_at == 0:
            return None
        return self.passed_at - self.first_seen

    def expired(self, now: int, retry_window: int, max_age: int) -> bool:
        """Past its lifetime: pending and first seen more than retry_window
        ago, or passed and unseen for more than max_age."""
        if self.passed:
            return now - self.last_seen > max_age
        return now - self.first_seen > retry_window


def load_triplet_record(value: str | None, now: int, retry_window: int,
                        max_age: int) -> TripletRecord | None:
    """The stored record, or None when it must count as new: absent,
    malformed (logged), retry window missed, or passed but unseen for
    max_age (as load_client_record for client records)."""
    record = parse_record(value, TripletRecord.parse, "triplet")
    if record is None:
        return None
    if not record.passed and record.first_seen > now:
        # Written by a host whose clock is ahead: start again from now
        # (postgrey corrects it the same way), rather than wait forever.
        return None
    return None if record.expired(now, retry_window, max_age) else record


def expand(template: str, values: Mapping[str, str]) -> str:
    """Replace %x for each x in values, in one pass (a replacement is never
    expanded again); unknown %x are left as they are."""
    return _PERCENT.sub(lambda m: values.get(m[0][1], m[0]), template)


class GreylistPolicy:
    """policyd.api.Policy implementation for greylisting."""

    def __init__(self, config: PolicydConfig, triplets: Store, clients: Store,
                 postscreen: Store | None, whitelist: Whitelists,
                 resolver: Resolver | None = None) -> None:
        self.config = config
        self.triplets = triplets
        self.clients = clients
        self.postscreen = postscreen
        self.whitelist = whitelist
        self.resolver = resolver
        self.dnsbl = None if resolver is None or not config.dnsbl_sites else DnsblScorer(
            config.dnsbl_sites, resolver,
            allowlist_threshold=config.dnsbl_allowlist_threshold,
            greylist_threshold=config.dnsbl_greylist_threshold)
        self.keys = KeyMaker.from_config(config)
        # postconf and the resolver may take a while: once, here, not per request.
        self.hostname = config.effective_hostname
        self._instances: OrderedDict[str, None] = OrderedDict()

    # --- Policy -----------------------------------------------------------

    async def decide(self, request: Mapping[str, str]) -> Decision:
        if request.get("protocol_state", "").upper() != "RCPT":
            return Decision(DUNNO, "not-rcpt")
        if request.get("sasl_username", ""):
            return Decision(DUNNO, "authenticated")
        address = request.get("client_address", "")
        client_name = request.get("client_name", "") or "unknown"
        recipient = request.get("recipient", "")
        try:
            ip = parse_client_address(address)
        except ValueError:
            log.warning("no usable client_address in request: %r", address[:100])
            return Decision(DUNNO, "bad-request")
        if not recipient:
            log.warning("no recipient in RCPT request")
            return Decision(DUNNO, "bad-request")
        if self.whitelist.clients.matches(ip, client_name):
            return CLIENT_WHITELISTED
        if self.whitelist.recipient_whitelisted(recipient):
            return RECIPIENT_WHITELISTED
        client = client_key(self.config, ip, client_name)
        sender_spf = None
        if self.resolver is not None and self.config.uses_spf:
            sender_spf = _SenderSpf(self, request, ip)
        if sender_spf is not None and self.config.client_key == "spf":
            result = await sender_spf.get()
            if result.pooled:
                client = spf_key(result.domain)
        try:
            decision = await self._greylist(request, address, ip, client, recipient,
                                            sender_spf)
        except StoreError as exc:
            # The server answers it, as failure_action says.
            raise PolicyFailure("store-failure", str(exc)) from exc
        if sender_spf is None or sender_spf.result is None:
            return decision
        return _with_spf(decision, sender_spf.result, client)

    def reload(self) -> None:
        self.whitelist.reload()

    async def aclose(self) -> None:
        stores = [self.triplets, self.clients]
        if self.postscreen is not None:
            stores.append(self.postscreen)
        await asyncio.gather(*(s.close() for s in stores))

    # --- greylisting --------------------------------------------------------

    async def _greylist(self, request: Mapping[str, str], address: str, ip: IPAddress,
                        client: str, recipient: str,
                        sender_spf: _SenderSpf | None = None) -> Decision:
        config = self.config
        now = int(clock.now())
        tkey = self.keys.triplet_key(client, normalise_sender(request.get("sender", "")),
                                     normalise_recipient(recipient))
        ckey = self.keys.client_record_key(client)
        # All lookups at once: asked together, they go out together (one
        # batch per store, the stores at the same time).
        postscreen = self._postscreen_lookup(address)
        got = await _wait_all(self.triplets.get(tkey), self.clients.get(ckey))
        came_back = await self._postscreen_proves_return(postscreen, address, now)
        # Every result is in before the first error is raised: none is lost.
        triplet_value, client_value = _value_or_raise(got[0]), _value_or_raise(got[1])
        record = load_client_record(client_value, now, config.max_age) or ClientRecord.new(now)

        if record.auto_whitelisted(config.auto_whitelist_clients):
            if record.needs_refresh(now):
                await self.clients.put(ckey, record.seen(now).serialise(), config.max_age)
            return Decision(DUNNO, "auto-whitelisted")
        if came_back:
            return Decision(DUNNO, "postscreen")

        triplet = load_triplet_record(triplet_value, now, config.retry_window, config.max_age)
        if triplet is not None and triplet.passed:
            # Known good triplet: refresh its lifetime now and then.
            writes: list[asyncio.Future[None]] = []
            if needs_refresh(triplet.last_seen, now):
                writes.append(self.triplets.put(
                    tkey, TripletRecord(triplet.first_seen, now, True,
                                        triplet.passed_at).serialise(),
                    config.max_age))
            if record.needs_refresh(now):
                writes.append(self.clients.put(ckey, record.seen(now).serialise(),
                                               config.max_age))
            await _await_writes(*writes)
            return Decision(DUNNO, "passed")

        # DNS only now: whitelisted, auto-whitelisted, postscreen-verified
        # and passed requests (most of the traffic) never wait for it.
        verdict, greylist_delay = await self._delay(ip, sender_spf)
        dns_score, dns = _dns_fields(verdict)
        if verdict is not None and verdict.outcome in (DNSWL, UNLISTED):
            return Decision(DUNNO, verdict.outcome, dns_score=dns_score, dns=dns)
        first = now if triplet is None else triplet.first_seen
        wait = greylist_delay - (now - first)
        if wait > 0:
            writes = [self.clients.put(ckey, record.defer(now).serialise(), config.max_age)]
            if triplet is None:
                writes.append(self.triplets.put(tkey, TripletRecord(now, now).serialise(),
                                                config.retry_window))
            await _await_writes(*writes)
            text = expand(config.greylist_text,
                          {"s": str(wait), "r": recipient_domain(recipient)})
            if not text[:1].isdigit():
                # As postgrey: DSN 4.2.0 instead of Postfix's 4.7.1, which
                # some Exchange versions treat as a permanent failure.
                text = f"{GREYLIST_DSN} {text}"
            return Decision(f"{config.greylist_action} {text}",
                            "new" if triplet is None else "early-retry",
                            dns_score=dns_score, dns=dns)

        # The delay is over: this retry ends greylisting for the triplet.
        delay = now - first
        await _await_writes(
            self.triplets.put(tkey, TripletRecord(first, now, True, now).serialise(),
                              config.max_age),
            self.clients.put(ckey, record.count_pass(now).serialise(), config.max_age))
        action = DUNNO
        if config.greylist_header and self._first_for_message(request.get("instance")):
            header = expand(config.greylist_header_text, {
                "t": str(delay), "h": self.hostname,
                "d": email.utils.formatdate(now, localtime=True)})
            action = f"PREPEND {header}"
        return Decision(action, "passed", delay=float(delay), dns_score=dns_score, dns=dns)

    async def _delay(self, ip: IPAddress, sender_spf: _SenderSpf | None) \
            -> tuple[DnsVerdict | None, int]:
        """The DNS lists' verdict and the delay that applies to a triplet
        still greylisted: greylist_delay_listed for a listed client,
        greylist_delay_spf_pass when the sender's SPF passes narrowly, else
        greylist_delay.  SPF, when the delay needs it and it was not asked
        before the stores, is asked together with the lists; when it was
        (client_key = spf), the lists get what is left of the decision's
        one DNS bound (config.dns_bound)."""
        config = self.config
        spf_result: spf.SpfResult | None = None
        spf_check = None
        deadline = None
        if sender_spf is not None:
            if sender_spf.result is not None:
                spf_result, deadline = sender_spf.result, sender_spf.deadline
            elif config.greylist_delay_spf_pass is not None:
                spf_check = sender_spf.get()
        lists = None
        if self.dnsbl is not None:
            lists = self.dnsbl.verdict(ip) if deadline is None else self._verdict_by(ip, deadline)
        verdict: DnsVerdict | None = None
        if lists is not None and spf_check is not None:
            verdict, spf_result = await asyncio.gather(lists, spf_check)
        elif lists is not None:
            verdict = await lists
        elif spf_check is not None:
            spf_result = await spf_check
        if (verdict is not None and verdict.outcome == LISTED
                and config.greylist_delay_listed is not None):
            return verdict, config.greylist_delay_listed
        if spf_result is not None and spf_result.pooled \
                and config.greylist_delay_spf_pass is not None:
            return verdict, config.greylist_delay_spf_pass
        return verdict, config.greylist_delay

    async def _verdict_by(self, ip: IPAddress, deadline: float) -> DnsVerdict:
        """The lists' verdict, unknown (dns=timeout) past ``deadline`` (the
        event loop's time); answers in the cache count even then."""
        assert self.dnsbl is not None
        try:
            async with asyncio.timeout_at(deadline):
                return await self.dnsbl.verdict(ip)
        except TimeoutError:
            log.debug("DNS lists for %s not asked or cut short: SPF used the DNS bound", ip)
            return self.dnsbl.judge(DnsScore(None, "timeout"))

    def _postscreen_lookup(self, address: str) -> asyncio.Future[str | None] | None:
        """The lookup in postscreen's cache, when it is consulted at all."""
        if self.postscreen is None or not self.config.postscreen_skip:
            return None
        return self.postscreen.get(address)

    async def _postscreen_proves_return(self, lookup: asyncio.Future[str | None] | None,
                                        address: str, now: int) -> bool:
        """postscreen's cache is advice: a failing cache only means "no
        proof", never a store failure of the request."""
        if lookup is None:
            return False
        try:
            value = await lookup
        except StoreError as exc:
            log.warning("postscreen cache lookup failed: %s", exc)
            return False
        return postscreen_proves_return(value, now, address)

    def _first_for_message(self, instance: str | None) -> bool:
        """One X-Greylist header per message, not one per recipient."""
        if not instance:
            return True
        if instance in self._instances:
            return False
        self._instances[instance] = None
        if len(self._instances) > HEADER_INSTANCE_MEMORY:
            self._instances.popitem(last=False)
        return True


class _SenderSpf:
    """The sender's SPF result for one request: evaluated when first asked
    for, at most once (never for requests decided without it)."""

    __slots__ = ("_ip", "_policy", "_request", "deadline", "result")

    def __init__(self, policy: GreylistPolicy, request: Mapping[str, str],
                 ip: spf.IPAddress) -> None:
        self._policy = policy
        self._request = request
        self._ip = ip
        self.result: spf.SpfResult | None = None
        # When the decision's DNS must end (the event loop's time), from
        # the start of the evaluation: config.dns_bound covers SPF and the
        # DNS lists asked after it.
        self.deadline: float | None = None

    async def get(self) -> spf.SpfResult:
        if self.result is None:
            policy, request = self._policy, self._request
            assert policy.resolver is not None
            self.deadline = asyncio.get_running_loop().time() + policy.config.dns_bound
            self.result = await spf.check(
                policy.resolver, self._ip, request.get("sender", ""),
                request.get("helo_name", ""), timeout=policy.config.spf_timeout)
            result = self.result
            if result.dns:
                # Once a minute in all (the DNS lists' limiter): sender
                # domains are countless, and an outage fails every one.
                policy.resolver.warnings.warn(
                    log, "SPF", "SPF of %s: DNS did not answer (%s): SPF results are "
                    "temperror, senders are keyed and delayed as without SPF",
                    result.domain, result.reason)
            elif result.reason:
                log.debug("SPF %s for %s: %s", result.result, result.domain, result.reason)
        return self.result


def _with_spf(decision: Decision, result: spf.SpfResult, client: str) -> Decision:
    """The decision with what SPF contributed, for its log line and metrics."""
    fields = [("spf", result.result)]
    if result.broad:
        fields.append(("spf_broad", result.broad))
    if client.startswith("spf:"):
        fields.append(("client_key", client))
    if result.dns and decision.dns is None:
        # One dns= per line: the DNS lists' failure, when they failed too,
        # says it already.
        fields.append(("dns", result.dns))
    return dataclasses.replace(decision, fields=decision.fields + tuple(fields))


def _dns_fields(verdict: DnsVerdict | None) -> tuple[int | None, str | None]:
    """(dns_score, dns) of a Decision: the score, or why there is none."""
    if verdict is None:
        return None, None
    return verdict.score.value, verdict.score.failure


async def _wait_all(*futures: asyncio.Future[T]) -> list[T | BaseException]:
    """Each future's result or exception, in order, once all are done.

    The store operations behind the futures are asked already (they go
    out together); awaiting them one by one costs no task per operation,
    as asyncio.gather would.  When the caller is cancelled, the futures still
    waited for are cancelled too.
    """
    results: list[T | BaseException] = []
    try:
        for future in futures:
            try:
                results.append(await future)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                results.append(exc)
    except asyncio.CancelledError:
        for future in futures:
            future.cancel()
        raise
    return results


async def _await_writes(*writes: asyncio.Future[None]) -> None:
    """Wait for every write before raising the first error."""
    for result in await _wait_all(*writes):
        if isinstance(result, BaseException):
            raise result


def _value_or_raise(result: T | BaseException) -> T:
    """The value of a lookup, or the error it ended with, raised."""
    if isinstance(result, BaseException):
        raise result
    return result


def build_policy(config: PolicydConfig,
                 metrics: MetricsSink | None = None) -> GreylistPolicy:
    """Read the whitelists and open the stores of ``config`` (blocking: call
    at start-up).  ConfigError (and memtable's open errors) propagate."""
    try:
        whitelist = Whitelists.load(config.whitelist_clients, config.whitelist_recipients)
    except ConfigError as exc:
        raise config.blame(config.whitelist_parameter(exc.path), exc) from None
    tables: list[Table] = []
    try:
        # Checked before anything writes them (a damaged lmdb file).
        tables.append(_open(config, "triplet_table", read_write=True))
        tables.append(_open(config, "client_table", read_write=True))
        if config.postscreen_cache:
            tables.append(_open(config, "postscreen_cache", read_write=False))
    except BaseException:
        for table in tables:
            table.close()
        raise
    names = ("triplets", "clients", "postscreen")
    # A store per table: each has its own memcached connection and backup
    # thread, so their batches run at the same time.
    stores = [Store(as_async(table), name=name, metrics=metrics)
              for name, table in zip(names, tables, strict=False)]
    postscreen = stores[2] if len(stores) > 2 else None
    resolver = None
    if config.uses_dns:
        resolver = Resolver(config.dns_servers or None, timeout=config.dns_timeout)
    return GreylistPolicy(config, stores[0], stores[1], postscreen, whitelist, resolver)


def _open(config: PolicydConfig, name: str, *, read_write: bool) -> Table:
    """Open the table parameter ``name`` names, its files checked
    (store.open_checked); an error says which setting named the table
    (PolicydConfig.blame)."""
    try:
        return open_checked(getattr(config, name), read_write=read_write)
    except (ConfigError, OpenError) as exc:
        raise config.blame(name, exc) from None
