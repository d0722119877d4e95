"""policyd behind real Postfix (private instance), with real memcached and
real postscreen: what an operator sees at the SMTP level."""

from __future__ import annotations

import time
from pathlib import Path

from tests import postfixlab
from tests.conftest import Memcached
from tests.policyd_proc import PolicydProcess
from tests.postfixlab import PostfixFactory, smtp_rcpt, smtp_send, smtp_session

DELAY = 2
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

    time.sleep(DELAY + 0.5)
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


@postfixlab.requires_postfix
def test_client_that_passed_postscreen_is_not_greylisted(
        tmp_path: Path, memcached: Memcached, postfix_instance: PostfixFactory,
        policyd_factory: type[PolicydProcess]) -> None:
    ps_cf = f"memcache = {memcached.spec}\nkey_format = postscreen:%s\nttl = 86400\n"
    skip = policyd_factory(tmp_path / "skip", memcached.spec)
    pf = postfix_instance(
        ["postscreen_cache_map = memcache:$config_directory/ps.cf",
         *policy_restrictions(skip.port)],
        postscreen=True, files={"ps.cf": ps_cf})
    assert pf.postscreen_port is not None
    # policyd reads the very table file postscreen writes through.
    skip.config.write_text(skip.config.read_text()
                           + f"postscreen_cache = memcache:{pf.dir / 'ps.cf'}\n"
                           + "postscreen_skip = yes\n")
    skip.start()

    # Through postscreen: the client waits for the greeting, passes, and
    # postscreen caches it in memcached before smtpd sees RCPT TO.
    with smtp_session(pf.postscreen_port) as client:
        assert client.mail(SENDER)[0] == 250
        code, text = client.rcpt(RCPT)
    assert code == 250, text
    assert memcached.meta("postscreen:127.0.0.1") is not None
    assert "reason=postscreen" in skip.log_text()

    # The same client with postscreen_skip = no is greylisted.
    skip.stop()
    skip.config.write_text(skip.config.read_text().replace("postscreen_skip = yes",
                                                           "postscreen_skip = no"))
    skip.start()
    with smtp_session(pf.postscreen_port) as client:
        assert client.mail(SENDER)[0] == 250
        code, _ = client.rcpt("other@example.com")
    assert code == 450
