"""Realistic Postfix 3.7 RCPT-stage policy requests, and the request mixes.

Postfix 3.7 sends every attribute listed in SMTPD_POLICY_README up to
version 3.2 (client_port 3.0, policy_context 3.1, server_address/port 3.2);
compatibility_level and mail_version only arrive with 3.8, tls_sni with
3.12, so they are absent here.  At the first RCPT the queue file is not
open yet (smtpd_delay_open_until_valid_rcpt = yes), so queue_id is empty.

A mix decides which triplet each request carries:

- ``new``: every request a triplet (and usually a client /24) never seen.
- ``hot``: repeats drawn from a hot set of HOT_SET triplets.
- ``mixed``: half new, half from a larger warm set: a spam run (new
  triplets) on top of legitimate retries.
- ``pool``: every request a new triplet, from one of POOL_CLIENTS client
  addresses (a busy MX sees the same senders again with new mail): with
  dnsbl_sites every request asks DNS, and after the first requests of each
  address the answers come from the resolver's cache.

Generators are deterministic per (mix, worker, seed) and never repeat a
"new" triplet across workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

MIXES = ("new", "hot", "mixed", "pool")
HOT_SET = 1_000
WARM_SET = 10_000
MIXED_NEW_SHARE = 0.5
POOL_CLIENTS = 1_000


def pool_address(i: int) -> str:
    """Client address number ``i`` of the ``pool`` mix (10.200.0.1 on)."""
    return f"10.200.{i // 250}.{i % 250 + 1}"


_POOL = [pool_address(i).encode() for i in range(POOL_CLIENTS)]

# One bytes %-format: rendering a new request must cost the generator far
# less than a server spends on it (str.format and an encode cost 4x more).
_TEMPLATE = (
    b"request=smtpd_access_policy\n"
    b"protocol_state=RCPT\n"
    b"protocol_name=ESMTP\n"
    b"helo_name=mx%(helo_host)d.sender%(domain)d.example.org\n"
    b"queue_id=\n"
    b"sender=bounce-%(salt)d-%(n)d@sender%(domain)d.example.org\n"
    b"recipient=user%(user)d@example.com\n"
    b"recipient_count=0\n"
    b"client_address=%(addr)b\n"
    b"client_name=%(name)b\n"
    b"reverse_client_name=%(name)b\n"
    b"instance=%(instance)x.%(salt)x.%(n_low)x.0\n"
    b"sasl_method=\n"
    b"sasl_username=\n"
    b"sasl_sender=\n"
    b"size=%(size)d\n"
    b"ccert_subject=\n"
    b"ccert_issuer=\n"
    b"ccert_fingerprint=\n"
    b"ccert_pubkey_fingerprint=\n"
    b"encryption_protocol=TLSv1.3\n"
    b"encryption_cipher=TLS_AES_256_GCM_SHA384\n"
    b"encryption_keysize=256\n"
    b"etrn_domain=\n"
    b"stress=\n"
    b"client_port=%(port)d\n"
    b"policy_context=\n"
    b"server_address=192.0.2.25\n"
    b"server_port=25\n"
    b"\n"
)


def render(n: int, salt: int, instance: int, size: int, port: int,
           addr: bytes | None = None) -> bytes:
    """The request for triplet number ``n`` of namespace ``salt`` (from
    client ``addr`` when given)."""
    # Client addresses spread triplets over many /24s (greylisting keys on
    # the subnet); they are only strings here, nothing connects to them.
    a, b, c = 10 + (salt % 100), (n >> 8) & 0xFF, n & 0xFF
    return _TEMPLATE % {
        b"helo_host": n % 50,
        b"domain": n % 997,
        b"salt": salt,
        b"n": n,
        b"user": n % 5000,
        b"addr": addr or b"%d.%d.%d.%d" % (a, b, c, (n * 7 + salt) % 250 + 1),
        b"name": (b"mail-%d-%d-%d.mx%d.example.net" % (a, b, c, salt % 97)
                 if n % 3 else b"unknown"),
        b"instance": instance,
        b"n_low": n & 0xFFFFF,
        b"size": size,
        b"port": port,
    }


def make_source(mix: str, worker: int, seed: int = 0) -> Callable[[], bytes]:
    """A function returning the next request of ``mix`` for one worker."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r}; expected one of {', '.join(MIXES)}")
    rng = random.Random(seed * 1_000_003 + worker)
    counter = 0
    # New triplets: namespace by worker and seed so no two workers (or two
    # runs in one server's life) produce the same one.
    new_salt = 1000 + seed * 64 + worker
    shared_salt = 7  # hot/warm sets are shared by every worker

    def new() -> bytes:
        nonlocal counter
        counter += 1
        return render(counter, new_salt, counter, rng.randrange(1000, 200_000),
                      rng.randrange(1024, 65536))

    # Known triplets are rendered once per worker (the per-request fields
    # then stay fixed, which no server looks at): the generator's own cost
    # per request must stay far below a server's.
    known: list[bytes] = []

    def pick(size: int) -> bytes:
        if not known:
            known.extend(render(n, shared_salt, n, 1000 + n * 37 % 199_000, 1024 + n % 64_000)
                         for n in range(size))
        return known[rng.randrange(size)]

    if mix == "new":
        return new
    if mix == "pool":
        def pooled() -> bytes:
            nonlocal counter
            counter += 1
            return render(counter, new_salt, counter, rng.randrange(1000, 200_000),
                          rng.randrange(1024, 65536), _POOL[rng.randrange(POOL_CLIENTS)])
        return pooled
    if mix == "hot":
        return lambda: pick(HOT_SET)

    def mixed() -> bytes:
        return new() if rng.random() < MIXED_NEW_SHARE else pick(WARM_SET)

    return mixed
