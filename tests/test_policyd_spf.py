"""client_key = spf end to end: real policyd processes asking a real DNS
server (nsd) on a loopback port, never the network."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.dnslab import Nsd, silent_dns_server
from tests.policyd_helpers import wait_until
from tests.policyd_proc import PolicydProcess
from tests.wait import WAIT

ZONE = """
@ TXT "v=spf1 ip4:192.0.2.10 ip4:198.51.100.20 -all"
"""
# greylist_delay, greylist_delay_spf_pass: never waited for, the stored
# triplets are aged instead (PolicydProcess.age_triplets).
DELAY, SPF_DELAY = 600, 60


def settings(dns: str) -> str:
    return (f"client_key = spf\ndns_servers = {dns}\ndns_timeout = 1s\n"
            f"greylist_delay = {DELAY}s\ngreylist_delay_spf_pass = {SPF_DELAY}s\n"
            "auto_whitelist_clients = 0\n")


def logged(policyd: PolicydProcess, lines: int) -> str:
    """The log once it holds ``lines`` decision lines (each is written just
    after its reply)."""
    wait_until(lambda: policyd.log_text().count(" action=") >= lines)
    return policyd.log_text()


def mail(client: str, sender: str = "alice@example.org") -> dict[str, str]:
    return {"client_address": client, "client_name": "unknown", "sender": sender,
            "recipient": "bob@example.com", "helo_name": "mail.example.org"}


def test_a_pool_authorised_by_spf_passes_from_its_second_address(
        tmp_path: Path, nsd_factory: Callable[[Mapping[str, str]], Nsd],
        policyd_factory: type[PolicydProcess]) -> None:
    nsd = nsd_factory({"example.org": ZONE})
    policyd = policyd_factory(tmp_path / "p", None, extra=settings(nsd.spec)).start()
    first = policyd.ask(**mail("192.0.2.10"))
    assert first == f"DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in {SPF_DELAY} seconds"
    policyd.age_triplets(SPF_DELAY)
    # Another /24: only the SPF key makes it the same client.
    assert policyd.ask(**mail("198.51.100.20")).startswith("PREPEND X-Greylist: delayed")
    log = logged(policyd, 2)
    assert "reason=new client=192.0.2.10" in log
    assert "reason=passed client=198.51.100.20" in log
    assert log.count("spf=pass client_key=spf:example.org") == 2


def test_a_client_whose_spf_does_not_pass_is_keyed_by_subnet(
        tmp_path: Path, nsd_factory: Callable[[Mapping[str, str]], Nsd],
        policyd_factory: type[PolicydProcess]) -> None:
    nsd = nsd_factory({"example.org": ZONE})
    policyd = policyd_factory(tmp_path / "p", None, extra=settings(nsd.spec)).start()
    deferred = f"DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in {DELAY} seconds"
    assert policyd.ask(**mail("203.0.113.5")) == deferred
    # The same /24: the same client (an early retry, not a new triplet).
    assert policyd.ask(**mail("203.0.113.77")).startswith("DEFER_IF_PERMIT")
    log = logged(policyd, 2)
    assert "reason=new client=203.0.113.5" in log
    assert "reason=early-retry client=203.0.113.77" in log
    assert log.count("spf=fail") == 2 and "client_key=" not in log


def test_a_dns_server_that_never_answers_costs_at_most_the_bound(
        tmp_path: Path, policyd_factory: type[PolicydProcess]) -> None:
    with silent_dns_server() as server:
        policyd = policyd_factory(tmp_path / "p", None,
                                  extra=settings(f"{server[0]}:{server[1]}")).start()
        start = time.monotonic()
        reply = policyd.ask(**mail("192.0.2.10"))
        took = time.monotonic() - start
    assert reply == f"DEFER_IF_PERMIT 4.2.0 Greylisted, please try again in {DELAY} seconds"
    assert took < 3 * 1 + 1.5  # dns_timeout times SPF_CHECK_TIMEOUT_FACTOR, and a margin
    log = logged(policyd, 1)
    assert "reason=new client=192.0.2.10" in log
    assert "spf=temperror dns=timeout" in log


def test_check_config_refuses_an_spf_bound_beyond_decision_timeout(tmp_path: Path) -> None:
    cf = tmp_path / "policyd.cf"
    cf.write_text("client_key = spf\ndns_timeout = 10s\ndecision_timeout = 20s\n")
    proc = subprocess.run([sys.executable, "-m", "policyd", "--check-config", "-c", str(cf)],
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 1
    assert proc.stderr == (
        f"policyd: {cf}, line 2: dns_timeout = 10s: DNS may take up to 30s of a decision "
        "(3 x dns_timeout for SPF): it must be shorter than decision_timeout (20s)\n")
