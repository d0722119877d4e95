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

Generators are deterministic per (mix, worker, seed) and never repeat a
"new" triplet across workers.
"""

from __future__ import annotations

import random
from collections.abc import Callable

MIXES = ("new", "hot", "mixed")
HOT_SET = 1_000
WARM_SET = 10_000
MIXED_NEW_SHARE = 0.5

_TEMPLATE = (
    "request=smtpd_access_policy\n"
    "protocol_state=RCPT\n"
    "protocol_name=ESMTP\n"
    "helo_name={helo}\n"
    "queue_id=\n"
    "sender={sender}\n"
    "recipient={recipient}\n"
    "recipient_count=0\n"
    "client_address={addr}\n"
    "client_name={name}\n"
    "reverse_client_name={name}\n"
    "instance={instance}\n"
    "sasl_method=\n"
    "sasl_username=\n"
    "sasl_sender=\n"
    "size={size}\n"
    "ccert_subject=\n"
    "ccert_issuer=\n"
    "ccert_fingerprint=\n"
    "ccert_pubkey_fingerprint=\n"
    "encryption_protocol=TLSv1.3\n"
    "encryption_cipher=TLS_AES_256_GCM_SHA384\n"
    "encryption_keysize=256\n"
    "etrn_domain=\n"
    "stress=\n"
    "client_port={port}\n"
    "policy_context=\n"
    "server_address=192.0.2.25\n"
    "server_port=25\n"
    "\n"
)


def render(n: int, salt: int, instance: int, size: int, port: int) -> bytes:
    """The request for triplet number ``n`` of namespace ``salt``."""
    # Client addresses spread triplets over many /24s (greylisting keys on
    # the subnet); they are only strings here, nothing connects to them.
    a, b, c = 10 + (salt % 100), (n >> 8) & 0xFF, n & 0xFF
    addr = f"{a}.{b}.{c}.{(n * 7 + salt) % 250 + 1}"
    name = f"mail-{a}-{b}-{c}.mx{salt % 97}.example.net" if n % 3 else "unknown"
    return _TEMPLATE.format(
        helo=f"mx{n % 50}.sender{n % 997}.example.org",
        sender=f"bounce-{salt}-{n}@sender{n % 997}.example.org",
        recipient=f"user{n % 5000}@example.com",
        addr=addr,
        name=name,
        instance=f"{instance:x}.{salt:x}.{n & 0xFFFFF:x}.0",
        size=size,
        port=port,
    ).encode()


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
    if mix == "hot":
        return lambda: pick(HOT_SET)

    def mixed() -> bytes:
        return new() if rng.random() < MIXED_NEW_SHARE else pick(WARM_SET)

    return mixed
