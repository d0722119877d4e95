"""Every bound policyd enforces, named in one place."""

from __future__ import annotations

# --- SMTPD policy protocol (policyd.protocol) ------------------------------
# Postfix's attribute values are short (addresses, names, a few numbers); the
# largest legitimate request is a few KB.  Anything beyond is hostile.
MAX_LINE_BYTES = 4096
MAX_ATTRIBUTES = 100
MAX_REQUEST_BYTES = 32 * 1024

# --- server (policyd.server, policyd.listeners) -----------------------------
MAX_LISTENERS = 16
MAX_CONNECTIONS_CEILING = 100_000
MAX_TIMEOUT_SECONDS = 24 * 3600
# Bytes read from a connection at once, and the most it may have sent
# ahead, unread, before reading from it pauses.
READ_CHUNK_BYTES = 64 * 1024
# Replies are ~50 bytes; a peer that lets this much pile up unread is not
# Postfix (which waits for each reply) and is disconnected.
MAX_WRITE_BUFFER_BYTES = 256 * 1024
# "too many connections" is logged at most once per this many seconds.
REFUSAL_LOG_INTERVAL_SECONDS = 10.0
# listen(2) backlog of every listening socket (the kernel caps it at somaxconn).
LISTEN_BACKLOG = 1024
# systemd socket activation: LISTEN_FDS above this is refused as nonsense.
MAX_INHERITED_FDS = MAX_LISTENERS
# Probe of an existing UNIX socket file (is another server still there?).
UNIX_PROBE_TIMEOUT_SECONDS = 1.0
# How long telling systemd a state change (sd_notify) may wait for room.
SD_NOTIFY_TIMEOUT_SECONDS = 2.0

# --- metrics endpoint (policyd.metrics) -------------------------------------
# Scrapes served at once (one thread each; more are closed at once), how
# long one connection may last in all, and how long a stop waits for its
# serving thread.
METRICS_MAX_CONNECTIONS = 8
METRICS_CONNECTION_SECONDS = 10.0
METRICS_CLOSE_WAIT_SECONDS = 2.0
# How often the metrics server's loop looks for a stop (a stop may wait one).
METRICS_POLL_SECONDS = 0.5

# --- stores (policyd.store) -------------------------------------------------
# Operations a store holds asked and not yet answered (waiting for the next
# batch or in flight; Store's max_pending); beyond this, callers get a
# StoreError at once instead of an unbounded queue behind a slow memcached.
# It also bounds a batch: one lookup_many and one update_many carry at most
# this many operations.
STORE_MAX_PENDING = 10_000

# --- stopping (policyd.server) ------------------------------------------------
# After shutdown_grace, how long cancelled connections get to finish.
SHUTDOWN_CANCEL_WAIT_SECONDS = 2.0
# Then how long each store gets to finish what was asked and close its table
# before it is abandoned (Store's close_wait; a table's thread is a daemon,
# an lmdb commit cut short by the exit is rolled back by LMDB).  The stores
# close together.
STORE_CLOSE_WAIT_SECONDS = 5.0


def longest_stop_seconds(shutdown_grace: float) -> float:
    """The longest a stop (SIGTERM) takes: requests in flight get
    shutdown_grace, cancelled ones and a reload in progress each
    SHUTDOWN_CANCEL_WAIT_SECONDS, then the stores and the metrics endpoint
    close (STOPPING=1 to systemd never waits).  The units' TimeoutStopSec
    must exceed it."""
    return (shutdown_grace + 2 * SHUTDOWN_CANCEL_WAIT_SECONDS + STORE_CLOSE_WAIT_SECONDS
            + METRICS_POLL_SECONDS + METRICS_CLOSE_WAIT_SECONDS)


# --- whitelists (policyd.whitelist) ----------------------------------------
WHITELIST_FILE_MAX_BYTES = 4 * 1024 * 1024
WHITELIST_MAX_ENTRIES = 100_000
# Whitelist regular expressions (one line each) are bounded in length.
WHITELIST_MAX_LINE_CHARS = 1000

# --- greylisting keys and records (policyd.triplet, policyd.reputation) ----
# memcached refuses keys over 250 bytes; a table's key_format may add a
# prefix, so triplet and client keys longer than this are replaced by their
# sha256 (64 hex characters).
STORE_KEY_MAX_BYTES = 200
# A stored record (triplet or client) is a few numbers; longer is garbage.
RECORD_MAX_CHARS = 200
# postscreen cache values: five numbers of at most 20 digits and separators.
POSTSCREEN_VALUE_MAX_CHARS = 200

# --- decision lines (policyd.logsetup) ---------------------------------------
# Distinct actions whose logfmt text is remembered (a greylist action varies
# only with the wait and the recipient domain).
DECISION_ACTION_CACHE = 256

# --- DNS (policyd.dns) --------------------------------------------------------
# dns_timeout's default: one query, all servers and retries included.
DNS_TIMEOUT_DEFAULT_SECONDS = 2.0
# asyncio's own bound on a query, beyond the resolver's lifetime (which
# dnspython checks between its steps, not inside them).
DNS_TIMEOUT_SLACK_SECONDS = 0.5
# Answers kept in the cache (each for its DNS TTL; least recently used out).
DNS_CACHE_MAX_ENTRIES = 50_000
# dnspython's own cache, beside policyd's: it keeps each whole response
# (~4 KiB; 50,000 of them were ~200 MiB per process) and policyd reads it
# only right after a query (a "no such name"'s negative TTL).
DNS_LIBRARY_CACHE_ENTRIES = 256
# dns_timeout's upper bound, and how many dns_servers may be named.
DNS_TIMEOUT_MAX_SECONDS = 60
DNS_MAX_SERVERS = 8
# Records of one answer that policyd looks at; more is not a real zone.
DNS_MAX_RECORDS = 100
# A failed query (timeout, SERVFAIL, REFUSED) is remembered this long, so a
# DNS outage costs each distinct name one dns_timeout per interval, not one
# per request (every recipient of a message).  RFC 2308 section 7 allows up
# to 5 minutes; short, so a recovered DNS is used again soon.
DNS_FAILURE_CACHE_SECONDS = 30.0
# A DNS failure is logged at most once per this many seconds for each DNS
# list, and once in all for SPF (sender domains are countless).
DNS_WARN_INTERVAL_SECONDS = 60.0

# --- report and cleanup (policyd.report, policyd.cleanup, policyd.storewalk) -
# Entries `policyd report` reads per table: memory stays bounded (one int per
# passed triplet, a heap of the top clients); beyond this the report says so.
REPORT_MAX_ENTRIES = 1_000_000
# `policyd report --top N`: most clients listed by passes.
REPORT_MAX_TOP_CLIENTS = 1000
# Entries one `policyd cleanup` run examines per table (the next run starts
# over, and finds what this one left).
CLEANUP_MAX_ENTRIES = 10_000_000
# Expired keys collected before they are deleted: the walk's memory stays
# bounded and deletes interleave with policyd's own writes.
CLEANUP_BATCH_KEYS = 1000

# --- checks before start (policyd.preflight) ----------------------------------
# Postfix's default smtpd_policy_service_timeout, used when postconf cannot
# tell (no Postfix configuration on this host): decision_timeout must be below.
POSTFIX_POLICY_TIMEOUT_DEFAULT_SECONDS = 100
# `hostname` empty and no Postfix configuration: how long policyd waits (once,
# at start) for the resolver to qualify the system's host name (policyd.config).
HOSTNAME_LOOKUP_TIMEOUT_SECONDS = 5.0

# --- import-postgrey (policyd.postgrey) ---------------------------------------
# A line of `db_dump -p` output: postgrey cuts each request attribute at 512
# characters, so a triplet key is under 1600 bytes, at most 3 characters each
# in the dump (\xx); longer is not postgrey's.
POSTGREY_DUMP_LINE_MAX_BYTES = 8192
# Records read from each of postgrey's two databases; beyond, the import
# stops before writing anything and says so.
POSTGREY_MAX_ENTRIES = 10_000_000
# How long replaying the log of postgrey's copied database (db_recover) or
# dumping it (db_dump) may take, each.
POSTGREY_TOOL_TIMEOUT_SECONDS = 600
# Records looked up and written per batch (one memcached round trip, one
# lmdb transaction each way).
POSTGREY_BATCH_KEYS = 1000
# client_key = spf: SPF evaluations of the passed triplets' senders running at
# once, how long they may take in all (--spf-max-time; past it the rest are
# imported under the fallback key only), and the addresses of a client network
# tried (those postgrey's auto-whitelist saw last).
POSTGREY_SPF_CONCURRENCY = 16
POSTGREY_SPF_MAX_SECONDS = 900
POSTGREY_SPF_ADDRESSES = 4

# --- SPF (policyd.spf) ---------------------------------------------------------
# RFC 7208 4.6.4: terms that query DNS (include, a, mx, ptr, exists,
# redirect) per check_host(), void lookups, MX names per mx (more is a
# permerror) and PTR names per ptr or %{p} (more are ignored).
SPF_MAX_DNS_TERMS = 10
SPF_MAX_VOID_LOOKUPS = 2
SPF_MAX_MX_NAMES = 10
SPF_MAX_PTR_NAMES = 10
# One SPF evaluation asks its queries one after the other (each depends on
# the last): the whole of it is bounded by dns_timeout times this.  RFC 7208
# 4.6.4 suggests allowing 20 s; a policy server answering at RCPT time
# cannot, and a timeout only means "no SPF pooling" (temperror).
SPF_CHECK_TIMEOUT_FACTOR = 3
# A pass pools the client under the sender domain only when the matching
# mechanism names at most a /16 of IPv4 or a /48 of IPv6 (wider: anyone's
# addresses, which a spammer's own domain can publish).
SPF_POOL_MIN_IPV4_PREFIX = 16
SPF_POOL_MIN_IPV6_PREFIX = 48
# Parsed SPF records remembered (by their text; least recently used out),
# those up to SPF_PARSED_RECORD_MAX_CHARS long (real ones are a few hundred
# characters; a hostile one of 64 KB is parsed again each time instead).
SPF_PARSED_RECORDS = 4096
SPF_PARSED_RECORD_MAX_CHARS = 1024

# --- DNSBL/DNSWL scores (policyd.dnsbl) -------------------------------------
# Items of dnsbl_sites (each distinct domain is one query per request), and
# the largest weight factor (postscreen takes any C int).
DNSBL_MAX_SITES = 32
DNSBL_MAX_WEIGHT = 1_000_000
# dnsbl_allowlist_threshold and dnsbl_greylist_threshold lie within +-this.
DNSBL_THRESHOLD_MAX = 1_000_000
