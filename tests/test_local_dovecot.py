"""Local delivery over LMTP to a real Dovecot (Debian's dovecot-lmtpd, fixtures/dovecot.py): one reply per
recipient after DATA (RFC 2033 §4.2), each mapped to that recipient's own outcome."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgate.inbound.local import LMTPClient

from fixtures.dovecot import Dovecot
from fixtures.pgserve import PostgateServer
from fixtures.testnet import TestNet

from .test_inbound import UNTRUSTED, client, msg

HERE = "127.0.2.7"
USERS = {"bob@local.test": None, "carol@local.test": None, "full@local.test": "1k"}


@pytest.fixture()
def dovecot() -> Iterator[Dovecot]:
    with Dovecot(users=USERS) as d:
        yield d


@pytest.mark.parametrize("where", ["inet", "unix"])
def test_lmtp_client_gets_one_reply_per_recipient(dovecot: Dovecot, where: str) -> None:
    target = dovecot.lmtp_inet if where == "inet" else dovecot.lmtp_unix
    token = secrets.token_hex(8)
    body = msg(token) + (b"x" * 70 + b"\r\n") * 60 + b".starts with a dot\r\n"
    results = asyncio.run(LMTPClient(target, lhlo="mail.own.test").deliver(
        "a@client.test", ["bob@local.test", "full@local.test", "nosuch@local.test", "carol@local.test"], body,
        queue_id="0005F2A9C1B7E3A1B2C3"))
    got = {r.recipient: (r.code, r.status, r.dsn) for r in results}
    assert got["bob@local.test"] == (250, "sent", "2.0.0")
    assert got["carol@local.test"] == (250, "sent", "2.0.0")
    assert got["full@local.test"] == (552, "bounced", "5.2.2")        # over quota: after DATA, this one only
    assert got["nosuch@local.test"] == (550, "bounced", "5.1.1")      # refused at RCPT
    assert [r.recipient for r in results] == ["bob@local.test", "full@local.test", "nosuch@local.test",
                                              "carol@local.test"]
    for who in ("bob@local.test", "carol@local.test"):
        [m] = dovecot.messages(who)
        assert token in m and "\n.starts with a dot" in m          # dot-stuffing undone by Dovecot
    assert dovecot.messages("full@local.test") == []


def test_lmtp_down_is_a_temporary_failure_for_everyone(tmp_path: Path) -> None:
    results = asyncio.run(LMTPClient(f"unix:{tmp_path}/nothing", timeout=5).deliver(
        "a@client.test", ["bob@local.test", "carol@local.test"], msg("x")))
    assert [(r.code, r.status) for r in results] == [(451, "deferred")] * 2


def test_prequeue_delivery_into_dovecot(dovecot: Dovecot, testnet: TestNet, tmp_path: Path) -> None:
    pg = PostgateServer(testnet, tmp_path, address=HERE, relay={"local_domains": ["local.test"]},
                        local={"lmtp": dovecot.lmtp_unix}).start()
    try:
        token = secrets.token_hex(8)
        with client(source=UNTRUSTED, address=HERE) as s:
            s.ehlo("client.test")
            s.mail("x@client.test")
            assert s.rcpt("bob@local.test")[0] == 250
            assert s.rcpt("carol@local.test")[0] == 250
            code, text = s.data(msg(token))
            assert code == 250 and b"delivered as" in text, (text, pg.log()[-3000:])  # delivered, then answered
            qid = text.split()[-1].decode()
            s.mail("x@client.test")
            s.rcpt("bob@local.test")
            s.rcpt("full@local.test")
            code, text = s.data(msg(secrets.token_hex(8)) + (b"y" * 70 + b"\r\n") * 60)  # 4 KB: over full's quota
            mixed = text.split()[-1].decode()
            assert code == 250 and b"queued as" in text          # mixed: bob delivered, full bounced (DSN)
        for who in ("bob@local.test", "carol@local.test"):
            assert any(token in m for m in dovecot.messages(who))
        assert len(dovecot.messages("bob@local.test")) == 2 and dovecot.messages("full@local.test") == []
        log = pg.log()
        lmtp = f"lmtp\\[{re.escape(dovecot.lmtp_unix[5:])}\\]"
        assert re.search(rf"postgate/lmtp\[\d+\]: {qid}: to=<bob@local.test>, relay={lmtp}, delay=[\d.]+, "
                         r"delays=[\d./]+, dsn=2\.0\.0, status=sent \(250 2\.0\.0 <bob@local.test> \S+ Saved\)", log)
        assert re.search(rf"{mixed}: to=<full@local.test>, relay={lmtp}, .*dsn=5\.2\.2, "
                         r"status=bounced \(552 5\.2\.2 <full@local.test> Quota exceeded", log)
        assert re.search(rf"{mixed}: to=<bob@local.test>, .*status=sent", log)
        assert "saved mail to INBOX" in dovecot.log
    finally:
        assert pg.stop() == 0
