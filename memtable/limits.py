"""Every bound memtable enforces, named in one place.

Postfix's own table parameters (data_size_limit, line_size_limit, ...) have
their defaults and lower bounds in memtable.config; the numbers here are the
bounds memtable adds so that no input, file or server can make it allocate,
wait or loop without limit.
"""

from __future__ import annotations

# memcached refuses keys longer than this (KEY_MAX_LENGTH in memcached.h).
MEMCACHED_MAX_KEY_BYTES = 250

# memcached reads an expiration above 30 days as an absolute UNIX time.
MEMCACHED_RELATIVE_TTL_MAX = 30 * 24 * 3600  # 2592000 s

# An item's flags and an expiration time are 32-bit unsigned numbers in the
# text protocol; a cas unique is a 64-bit one.
MEMCACHED_FLAGS_MAX = 2**32 - 1
MEMCACHED_CAS_MAX = 2**64 - 1

# Postfix stores int parameters in a C int.
CF_INT_MAX = 2**31 - 1
# A number in configuration with more significant digits than this is out
# of range for any setting (2**64 has 20), refused as "bad numerical
# configuration" before Python's int() sees it (it raises over 4300 digits).
CF_NUMBER_MAX_DIGITS = 20

# A .cf file (table or policyd configuration) is read whole; refuse monsters.
CF_MAX_FILE_BYTES = 1024 * 1024
CF_MAX_LOGICAL_LINE_BYTES = 64 * 1024

# Bytes asked of the socket per recv() while reading a memcache reply.
RECV_CHUNK_BYTES = 4096

# Pattern files named in `domain = /file/name` and texthash: tables.
LOOKUP_FILE_MAX_BYTES = 16 * 1024 * 1024

# lmdb: Postfix's default lmdb_map_size, and how far memtable lets a file grow.
LMDB_INITIAL_MAP_BYTES = 16 * 1024 * 1024
LMDB_MAX_MAP_BYTES = 64 * 1024 * 1024 * 1024
# Longest wait for Postfix's fcntl/flock lock on an lmdb file before giving up
# with a temporary error (Postfix itself waits forever).
LMDB_LOCK_WAIT_SECONDS = 10.0
LMDB_LOCK_POLL_SECONDS = 0.005
# The first pause while another process holds the lock; it doubles up to
# LMDB_LOCK_POLL_SECONDS (a writer holds it about a millisecond per commit).
LMDB_LOCK_FIRST_POLL_SECONDS = 0.0002
# LmdbTable.verify() walks every page of a file (about 0.7 s for a file of
# 1,000,000 triplets, 270 MB); a file larger than this is not checked.
LMDB_VERIFY_MAX_BYTES = 4 * 1024 * 1024 * 1024

# ThreadedTable (memtable.committer): jobs waiting for the table's thread
# before callers are refused at once, items one transaction may carry, and
# how long close() waits for the thread to finish.
COMMIT_MAX_WAITING_JOBS = 10_000
COMMIT_MAX_GROUP_ITEMS = 4_096
COMMIT_CLOSE_WAIT_SECONDS = 10.0

# `memtable -q -` and `memtable -i`: longest input line accepted.
CLI_MAX_INPUT_LINE_BYTES = 64 * 1024

# Nesting of tables (a backup naming a table naming a table ...).
MAX_TABLE_NESTING = 4

# `domain = /file/name` lists: how deep pattern files may name other pattern
# files, and how many bytes all files of one list may hold together (each
# file is also bounded by LOOKUP_FILE_MAX_BYTES).
DOMAIN_LIST_MAX_FILE_DEPTH = 8
DOMAIN_LIST_MAX_TOTAL_BYTES = 64 * 1024 * 1024

# memcache wire (memtable.mcproto, the core; memtable.wire and memtable.awire,
# its drivers).
# Longest `get k1 k2 ...` line get_many sends; longer key lists become
# several commands (memcached accepts long multigets, proxies may not).
MEMCACHE_GET_LINE_MAX_BYTES = 2048
# Most `set` commands set_many pipelines in one write: their replies
# (STORED\r\n each) then fit in any socket buffer, so the write never
# deadlocks against unread replies.
MEMCACHE_PIPELINE_MAX_COMMANDS = 256
# timeout = 0 means "no time limit" to Postfix; memtable still bounds each
# attempt (connect + command + reply) at this many seconds.
MEMCACHE_UNLIMITED_TIMEOUT_SECONDS = 60.0
# A blocking socket call may outlive its attempt's deadline by at most this
# much (saves a settimeout() system call per read on the fast path).
MEMCACHE_DEADLINE_SLACK_SECONDS = 0.001

# lmdb: recoveries (map grown by another process, map full -> double) per
# operation before giving up with BackupError (Postfix's dict_lmdb allows 1).
LMDB_RETRY_LIMIT = 8
# lmdb: sequence() reads this many entries (or bytes) per shared lock, then
# lets go so that writers are never starved by a long walk.
LMDB_SEQUENCE_CHUNK_ITEMS = 1000
LMDB_SEQUENCE_CHUNK_BYTES = 1024 * 1024
# texthash: a file changed this recently is re-read (Postfix's "hot file"
# check); at most this many times, pausing between reads.
TEXTHASH_HOT_RETRIES = 10
TEXTHASH_HOT_PAUSE_SECONDS = 0.3

# How long to wait for postconf (memtable.postconf: `memtable ttl`, policyd's
# checks and its myhostname default).
POSTCONF_TIMEOUT_SECONDS = 10.0
# Where Postfix reads main.cf when MAIL_CONFIG is not set (Debian's build).
POSTFIX_CONFIG_DIRECTORY = "/etc/postfix"
# How much of a text from outside (a key, another program's message) one
# log line or error message quotes: a 64 KiB key is not a 64 KiB line.
MESSAGE_QUOTE_MAX_CHARS = 300

# A memcached that timed out on every attempt, or whose host name could not
# be looked up, is not asked again for this long (calls fail at once; tables
# with a backup answer from it).
MEMCACHE_DOWN_HOLD_SECONDS = 5.0
# While a memcached stays unavailable (or refuses writes), memtable logs at
# most one line per this many seconds about it, with counts
# (memtable.outage), besides one line when the trouble starts and one when
# it ends.
MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS = 60.0
# Troubles of one kind with one memcached announced (start and end line) per
# MEMCACHE_TROUBLE_LOG_INTERVAL_SECONDS; the troubles of a server that
# flaps more often are summed up in one line when the interval allows:
# at most 2 x this + 2 lines per interval, whatever the server does.
MEMCACHE_TROUBLE_LOG_STARTS_PER_INTERVAL = 5
# Keys a memcache table with a backup wrote to the backup only (memcached
# failed or refused the write, so it may hold an older value): remembered,
# at most this many (the oldest are forgotten first, with a warning), so
# that memcached's stale copy is never served and is rewritten from the
# backup once memcached takes writes again.  About 350 bytes each (policyd's
# keys), 35 MB at the bound.
MEMCACHE_STALE_KEYS_MAX = 100_000
# Stale keys rewritten per table operation (one pipelined round trip).
MEMCACHE_STALE_REPAIR_BATCH = 256
