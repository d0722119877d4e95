"""policyd behind real Postfix (private instance), with real memcached and
real postscreen: what an operator sees at the SMTP level."""

from __future__ import annotations

import time
from pathlib import Path

from tests import postfixlab
from tests.conftest import Memcached
from tests.policyd_proc import PolicydProcess
from tests.postfixlab import PostfixFactory, PostfixInstance, smtp_rcpt, smtp_send

# greylist_delay: never waited for, the stored triplets are aged instead
# (PolicydProcess.age_triplets).
DELAY = 60
SENDER = "sender@client.example"
RCPT = "user@example.com"


def policy_restrictions(port: int) -> list[str]:
    return ["smtpd_recipient_restrictions = reject_unauth_destination, "
            f"check_policy_service inet:127.0.0.1:{port}"]


@postfixlab.requires_postfix
def test_greylist_then_pass_with_header(tmp_path: Path, memcached: Memcached,
                                        postfix_instance: PostfixFactory,
                                        policyd_factory: type[PolicydProcess]) -> None:
    policyd = policyd_factory(tmp_path / "policyd", memcached.spec,
                              extra=f"greylist_delay = {DELAY}s\n").start()
    pf = postfix_instance(policy_restrictions(policyd.port))

    first = smtp_rcpt(pf.port, SENDER, RCPT)
    assert first.code == 450, first
    assert "4.2.0" in first.text and "Greylisted, please try again in" in first.text

    early = smtp_rcpt(pf.port, SENDER, RCPT)
    assert early.code == 450, early

    policyd.age_triplets(DELAY)
    sent = smtp_send(pf.port, SENDER, [RCPT], "hello\r\n")
    assert sent.code == 250, sent
    assert sent.queue_id
    pf.wait_queued(sent.queue_id)
    headers = pf.headers(sent.queue_id)
    grey = [h for h in headers if h.startswith("X-Greylist:")]
    assert len(grey) == 1, headers
    assert "by policyd at mx.test.example" in grey[0]
    delay = int(grey[0].split("delayed ")[1].split(" ")[0])
    assert DELAY <= delay <= DELAY + 30

    log = policyd.log_text()
    assert "reason=new" in log and "reason=early-retry" in log and "reason=passed" in log


@postfixlab.requires_postfix
def test_whitelisted_client_passes_at_once(tmp_path: Path, memcached: Memcached,
                                           postfix_instance: PostfixFactory,
                                           policyd_factory: type[PolicydProcess]) -> None:
    whitelist = tmp_path / "whitelist_clients"
    whitelist.write_text("# loopback test client\n127.0.0.1\n")
    policyd = policyd_factory(tmp_path / "policyd", memcached.spec,
                              extra=f"whitelist_clients = {whitelist}\n").start()
    pf = postfix_instance(policy_restrictions(policyd.port))
    reply = smtp_rcpt(pf.port, SENDER, RCPT)
    assert reply.code == 250, reply
    assert 'reason=whitelisted' in policyd.log_text()
    assert 'detail="client whitelist"' in policyd.log_text()


# postscreen as Postfix ships it, except that 127.0.0.1 must not be
# allowlisted (postscreen_access_list, emptied by postfixlab) and the greet
# wait is short (postfixlab: 1s).  Postfix's postscreen_greet_action is ignore.
POSTSCREEN_DEFAULTS = ["postscreen_greet_action = ignore"]
# The after-220 ("deep protocol") tests, each enforced (Postfix's default action).
POSTSCREEN_DEEP_TESTS = [
    "postscreen_pipelining_enable = yes", "postscreen_pipelining_action = enforce",
    "postscreen_non_smtp_command_enable = yes", "postscreen_non_smtp_command_action = enforce",
    "postscreen_bare_newline_enable = yes", "postscreen_bare_newline_action = enforce",
]


def postscreen_with_policyd(tmp_path: Path, memcached: Memcached,
                            postfix_instance: PostfixFactory,
                            policyd_factory: type[PolicydProcess],
                            postscreen_cf: list[str]) -> tuple[PostfixInstance, PolicydProcess]:
    """postscreen in front of smtpd, its cache in memcached, and a started
    policyd (greylist_delay DELAY) that reads the very table file postscreen
    writes through."""
    ps_cf = f"memcache = {memcached.spec}\nkey_format = postscreen:%s\nttl = 2592000\n"
    policyd = policyd_factory(tmp_path / "policyd", memcached.spec,
                              extra=f"greylist_delay = {DELAY}s\n")
    pf = postfix_instance(["postscreen_cache_map = memcache:$config_directory/ps.cf",
                           *postscreen_cf, *policy_restrictions(policyd.port)],
                          postscreen=True, files={"ps.cf": ps_cf})
    with policyd.config.open("a") as cf:
        cf.write(f"postscreen_cache = memcache:{pf.dir / 'ps.cf'}\npostscreen_skip = yes\n")
    return pf, policyd.start()


def postscreen_fields(memcached: Memcached) -> list[str]:
    """postscreen's cache entry for 127.0.0.1, as postscreen wrote it."""
    entry = memcached.meta("postscreen:127.0.0.1")
    assert entry is not None
    return str(entry["value"]).split(";")


@postfixlab.requires_postfix
def test_postscreen_at_its_defaults_leaves_greylisting_on(
        tmp_path: Path, memcached: Memcached, postfix_instance: PostfixFactory,
        policyd_factory: type[PolicydProcess]) -> None:
    """Only the pregreet test runs: a new client passes it on its first
    connection, before its first RCPT reaches policyd, so that entry cannot
    say whether the client retries.  It is greylisted like any other."""
    pf, policyd = postscreen_with_policyd(tmp_path, memcached, postfix_instance,
                                          policyd_factory, POSTSCREEN_DEFAULTS)
    assert pf.postscreen_port is not None

    first = smtp_rcpt(pf.postscreen_port, SENDER, RCPT)
    assert first.code == 450, first
    assert "Greylisted, please try again in" in first.text
    # postscreen's entry was there before the RCPT: pregreet passed, the
    # after-220 tests off.
    fields = postscreen_fields(memcached)
    assert int(fields[0]) > time.time() and fields[2:] == ["1", "1", "1"], fields
    assert "reason=new client=127.0.0.1" in policyd.log_text()

    policyd.age_triplets(DELAY)
    retry = smtp_rcpt(pf.postscreen_port, SENDER, RCPT)
    assert retry.code == 250, retry
    log = policyd.log_text()
    assert "reason=passed client=127.0.0.1" in log
    assert "reason=postscreen" not in log


@postfixlab.requires_postfix
def test_client_that_came_back_after_postscreen_deep_tests_is_not_greylisted(
        tmp_path: Path, memcached: Memcached, postfix_instance: PostfixFactory,
        policyd_factory: type[PolicydProcess]) -> None:
    """With the after-220 tests on, postscreen itself rejects the new
    client's RCPT with 450 and never hands that session to smtpd; the client
    that connects again has proved what greylisting checks."""
    pf, policyd = postscreen_with_policyd(tmp_path, memcached, postfix_instance,
                                          policyd_factory,
                                          [*POSTSCREEN_DEFAULTS, *POSTSCREEN_DEEP_TESTS])
    assert pf.postscreen_port is not None

    first = smtp_rcpt(pf.postscreen_port, SENDER, RCPT)
    assert first.code == 450, first
    assert "4.3.2 Service currently unavailable" in first.text  # postscreen's, not policyd's
    pf.wait_log(r"PASS NEW \[127\.0\.0\.1\]")
    assert "reason=" not in policyd.log_text()  # policyd never saw that session
    fields = postscreen_fields(memcached)
    assert all(int(f) > time.time() + 29 * 86400 for f in fields[2:]), fields

    # The client comes back: postscreen hands it to smtpd, policyd skips it.
    again = smtp_rcpt(pf.postscreen_port, SENDER, RCPT)
    assert again.code == 250, again
    assert "action=DUNNO reason=postscreen client=127.0.0.1" in policyd.log_text()

    # postscreen_skip = no: the same client is greylisted after all.
    policyd.stop()
    policyd.config.write_text(policyd.config.read_text().replace(
        "postscreen_skip = yes", "postscreen_skip = no"))
    policyd.start()
    other = smtp_rcpt(pf.postscreen_port, SENDER, "other@example.com")
    assert other.code == 450 and "Greylisted" in other.text, other

