"""The inbound smtpd as a real process (``postgate serve``) on the test network."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.pgserve import ADDRESS, TRUSTED, UNTRUSTED, PostgateServer
from fixtures.testnet import TestNet


@pytest.fixture(scope="module")
def pg(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    srv = PostgateServer(testnet, tmp_path_factory.mktemp("pg"))
    with srv:
        yield srv


OWN = "127.0.2.2"  # address of the servers a test starts for itself (the module's server has ADDRESS)


def client(port: int = 25, source: str = TRUSTED, implicit: bool = False, address: str = ADDRESS) -> smtplib.SMTP:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if implicit:
        return smtplib.SMTP_SSL(address, port, timeout=30, source_address=(source, 0), context=ctx)
    return smtplib.SMTP(address, port, timeout=30, source_address=(source, 0))


def tls(s: smtplib.SMTP) -> smtplib.SMTP:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    s.ehlo("client.test")
    s.starttls(context=ctx)
    s.ehlo("client.test")
    return s


def msg(token: str) -> bytes:
    return (f"From: a@client.test\r\nSubject: {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\n"
            f"hi {token}\r\n").encode()


def stored(net: TestNet, host: str, token: str) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in net.received(host) if token in m["data"]]


def data_reply(s: smtplib.SMTP, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str, float]:
    s.mail(sender)
    for r in rcpts:
        s.rcpt(r)
    code, text = s.data(data)
    return code, text.decode(), time.time()


def test_prequeue_answer_comes_after_the_receiver_stored_it(pg: PostgateServer, testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    with tls(client()) as s:
        code, text, when = data_reply(s, "a@client.test", ["bob@dane-ok.test"], msg(token))
    assert code == 250 and "delivered as" in text
    [m] = stored(testnet, "mx.dane-ok.test", token)
    assert m["time"] <= when
    assert m["tls"]["version"] == "TLSv1.3"
    assert m["data"].startswith("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=own.test;")
    assert "DKIM-Signature: v=1; a=ed25519-sha256;" in m["data"]
    head = m["data"].replace("\r\n", "\n")
    assert "Received: from client.test ([127.0.5.1])\n\tby mail.own.test (Postgate) with ESMTPS (TLSv1.3:" in head
    qid = text.split()[-1]
    assert f"{qid}: outcome=delivered (pre-queue)" in pg.log()
    assert f"{qid}: to=<bob@dane-ok.test>" in pg.log() and "tls=dane-verified" in pg.log()


def test_remote_550_reaches_the_client_and_no_bounce(pg: PostgateServer, testnet: TestNet) -> None:
    with client() as s:
        s.ehlo("client.test")
        code, text, _ = data_reply(s, "a@client.test", ["reject-me@dane-ok.test"], msg(secrets.token_hex(8)))
    assert code == 550 and text.startswith("5.1.1") and "recipient rejected" in text
    out = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "list", "--json"],
                         capture_output=True, text=True).stdout
    assert not [m for m in json.loads(out) if m.get("sender") == "" or "reject-me" in json.dumps(m)]


def test_tlsa_mismatch_is_queued_as_suspected_attack(pg: PostgateServer, testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    with client() as s:
        s.ehlo("client.test")
        code, text, _ = data_reply(s, "a@client.test", ["bob@agility.test"], msg(token))
    assert code == 250 and "queued as" in text
    qid = text.split()[-1]
    show = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "show", qid,
                           "--json"], capture_output=True, text=True)
    env = json.loads(show.stdout)
    assert env["state"] in ("deferred", "incoming", "active")
    assert "suspected attack" in env["recipients"][0]["reason"] and env["recipients"][0]["status"] == "deferred"
    assert f"{qid}: outcome=queued (temporary failure) suspected_attack=yes" in pg.log()
    assert stored(testnet, "mx.agility.test", token) == []


@pytest.mark.parametrize(("port", "implicit"), [(25, False), (587, False), (465, True)])
def test_no_open_relay_on_any_port(pg: PostgateServer, port: int, implicit: bool) -> None:
    with client(port, source=UNTRUSTED, implicit=implicit) as s:
        if not implicit:
            tls(s)
        else:
            s.ehlo("client.test")
        code, text = s.mail("a@client.test")
        if port == 25:
            assert code == 250
            code, text = s.rcpt("bob@dane-ok.test")
            assert code == 554 and b"5.7.1" in text and b"Relay access denied" in text
        else:
            assert code == 530  # submission: authentication required first
    assert ("NOQUEUE: reject: RCPT from unknown[127.0.6.1]: 554 5.7.1 <bob@dane-ok.test>: Relay access denied; "
            "from=<a@client.test> to=<bob@dane-ok.test>" in pg.log()) or port != 25


def test_auth_only_after_starttls_and_then_relay(pg: PostgateServer, testnet: TestNet) -> None:
    with client(587, source=UNTRUSTED) as s:
        s.ehlo("client.test")
        assert not s.has_extn("auth")
        code, _ = s.docmd("AUTH", "PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")
        assert code == 538
        tls(s)
        assert "PLAIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.login("alice", "wrong")
        s.login("alice", "wonderland")
        token = secrets.token_hex(8)
        code, _text, _ = data_reply(s, "alice@client.test", ["bob@dane-ok.test"], msg(token))
        assert code == 250
    assert stored(testnet, "mx.dane-ok.test", token)
    with client(465, source=UNTRUSTED, implicit=True) as s:
        s.ehlo("client.test")
        s.login("alice", "wonderland")
        token = secrets.token_hex(8)
        code, _, _ = data_reply(s, "alice@client.test", ["bob@dane-ok.test"], msg(token))
        assert code == 250
    assert stored(testnet, "mx.dane-ok.test", token)


@contextlib.contextmanager
def raw_session(source: str = TRUSTED) -> Iterator[tuple[socket.socket, Any]]:
    """A plain socket to the module's server, greeted and past EHLO, for byte-exact tests."""
    with socket.create_connection((ADDRESS, 25), timeout=30, source_address=(source, 0)) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\r\n")
        while f.readline()[3:4] == b"-":
            pass
        yield sock, f


SMUGGLING = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\n.\r"]


@pytest.mark.parametrize("end", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_never_produces_a_second_message(pg: PostgateServer, testnet: TestNet, end: bytes) -> None:
    token = secrets.token_hex(8)
    payload = (f"Subject: outer {token}\r\n\r\nfirst\r\n".encode() + end +
               f"MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<bob@dane-ok.test>\r\nDATA\r\n"
               f"Subject: SMUGGLED {token}\r\n\r\nevil\r\n".encode() + b"\r\n.\r\n")
    with raw_session() as (sock, f):
        sock.sendall(b"MAIL FROM:<a@client.test>\r\n")
        assert f.readline().startswith(b"250")
        sock.sendall(b"RCPT TO:<bob@dane-ok.test>\r\n")
        assert f.readline().startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert f.readline().startswith(b"354")
        sock.sendall(payload)
        reply = f.readline()
        assert reply.startswith(b"554 5.5.2"), reply
        sock.sendall(b"QUIT\r\n")
    time.sleep(0.2)
    assert [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]] == []


def test_bare_lf_in_a_command_ends_the_session(pg: PostgateServer) -> None:
    with socket.create_connection((ADDRESS, 25), timeout=30, source_address=(TRUSTED, 0)) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\nMAIL FROM:<a@b.test>\r\n")
        assert f.readline().startswith(b"500 5.5.2")
        assert f.readline() == b""


def _serve(testnet: TestNet, d: Path, **kw: dict) -> PostgateServer:  # type: ignore[type-arg]
    return PostgateServer(testnet, d, address=OWN, **kw).start()


def test_sigkill_during_prequeue_delivery_loses_nothing_acknowledged(testnet: TestNet, tmp_path: Path) -> None:
    # 1. killed while the delivery runs and before any reply: the client got no 250, nothing to keep
    pg = _serve(testnet, tmp_path, delivery={"tls_timeout": 20.0, "command_timeout": 20.0})
    s = client(address=OWN)
    s.ehlo("client.test")
    s.mail("a@client.test")
    s.rcpt("bob@hang.bad.test")
    s.putcmd("data")
    assert s.getreply()[0] == 354
    s.send(msg(secrets.token_hex(8)) + b".\r\n")
    time.sleep(1.0)
    pg.stop(signal.SIGKILL)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.getreply()
    # 2. budget spent: 250 "queued", then SIGKILL: the message is in the queue after restart
    pg2 = _serve(testnet, tmp_path, delivery={"tls_timeout": 20.0, "command_timeout": 20.0},
                 prequeue={"budget": 1.0, "grace": 60.0})
    with client(address=OWN) as c:
        c.ehlo("client.test")
        code, text, _ = data_reply(c, "a@client.test", ["bob@hang.bad.test"], msg(secrets.token_hex(8)))
    assert code == 250 and "queued as" in text
    qid = text.split()[-1]
    pg2.stop(signal.SIGKILL)
    pg3 = _serve(testnet, tmp_path)
    try:
        out = json.loads(subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool",
                                         str(pg3.spool), "list", "--json"], capture_output=True, text=True).stdout)
        assert qid in [m["id"] for m in out]
    finally:
        assert pg3.stop() == 0


def test_sigterm_is_clean(testnet: TestNet, tmp_path: Path) -> None:
    pg = _serve(testnet, tmp_path)
    with client(address=OWN) as s:
        s.ehlo("client.test")
        assert data_reply(s, "a@client.test", ["bob@dane-ok.test"], msg(secrets.token_hex(8)))[0] == 250
    assert pg.stop() == 0
    assert "stopped" in pg.log()


def test_local_delivery_maildir_and_lmtp(testnet: TestNet, tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    pg = _serve(testnet, tmp_path / "a", relay={"local_domains": ["local.test"]},
                local={"maildir": str(maildir), "recipients": ["alice@local.test"]})
    try:
        with client(source=UNTRUSTED, address=OWN) as s:  # mail for us is accepted from anyone
            s.ehlo("client.test")
            token = secrets.token_hex(8)
            assert data_reply(s, "x@client.test", ["alice+tag@local.test"], msg(token))[0] == 250
            s.mail("x@client.test")
            assert s.rcpt("nobody@local.test")[0] == 550
        [f] = list((maildir / "local.test" / "alice" / "new").iterdir())
        assert token in f.read_text()
        # final delivery (RFC 5321 §4.4): the envelope sender in Return-Path, the recipient in Delivered-To
        assert f.read_bytes().startswith(b"Return-Path: <x@client.test>\r\nDelivered-To: alice+tag@local.test\r\n")
    finally:
        pg.stop()
    from aiosmtpd.controller import Controller
    from aiosmtpd.lmtp import LMTP

    got: list[bytes] = []

    class H:
        async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
            got.append(envelope.original_content)
            return "250 2.0.0 stored"

    class LmtpController(Controller):
        def factory(self):  # type: ignore[no-untyped-def]
            return LMTP(self.handler)

    ctl = LmtpController(H(), hostname="127.0.7.1", port=24)
    ctl.start()
    try:
        pg = _serve(testnet, tmp_path / "b", relay={"local_domains": ["local.test"]}, local={"lmtp": "127.0.7.1:24"})
        with client(source=UNTRUSTED, address=OWN) as s:
            s.ehlo("client.test")
            token = secrets.token_hex(8)
            code, text, _ = data_reply(s, "x@client.test", ["bob@local.test"], msg(token))
            assert code == 250 and "delivered" in text
        assert token.encode() in got[0]
        pg.stop()
    finally:
        ctl.stop()


def test_requiretls_travels_into_the_queue(testnet: TestNet, tmp_path: Path) -> None:
    pg = _serve(testnet, tmp_path)
    try:
        with tls(client(address=OWN)) as s:
            s.mail("a@client.test", ["REQUIRETLS"])
            s.rcpt("bob@dane-ok.test")  # its MX does not offer REQUIRETLS: RFC 8689 says do not deliver
            code, text = s.data(msg(secrets.token_hex(8)))
            assert code == 250 and b"queued" in text
            qid = text.split()[-1].decode()
            token = secrets.token_hex(8)
            s.mail("a@client.test", ["REQUIRETLS"])
            s.rcpt("bob@honest.caps.test")  # offers REQUIRETLS after STARTTLS, DANE-verified
            code, text = s.data(msg(token))
            assert code == 250 and b"delivered" in text, text
        with client(address=OWN) as s:
            s.ehlo("client.test")
            assert s.mail("a@client.test", ["REQUIRETLS"])[0] == 530  # only over TLS (RFC 8689 §4.1)
        env = json.loads(subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool),
                                         "show", qid, "--json"], capture_output=True, text=True).stdout)
        assert env["requiretls"] is True and "REQUIRETLS" in env["recipients"][0]["reason"]
        [m] = stored(testnet, "mx.honest.caps.test", token)
        assert "REQUIRETLS" in " ".join(m["mail_options"])
    finally:
        pg.stop()


def test_bad_configuration_is_refused_with_file_key_reason(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[server]\nhostname = "x.test"\n\n[[listener]]\nname = "mx"\naddress = "127.0.2.9:25"\n'
                   'tls = "starttls"\n')
    res = subprocess.run([sys.executable, "-m", "postgate.cli", "serve", "--config", str(cfg)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 78
    assert f"{cfg}:7: [[listener]] #1 tls: needs [server] tls_cert_file" in res.stderr


def test_swaks_delivers_through_postgate(pg: PostgateServer, testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    res = subprocess.run(["swaks", "--server", f"{ADDRESS}:587", "--tls", "--auth", "PLAIN", "--auth-user", "alice",
                          "--auth-password", "wonderland", "--from", "alice@client.test", "--to", "bob@dane-ok.test",
                          "--header", f"Subject: swaks {token}", "--body", f"hello {token}", "--local-interface",
                          UNTRUSTED], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "250 2.0.0 Ok: delivered as" in res.stdout
    assert stored(testnet, "mx.dane-ok.test", token)


def test_postfix_relays_through_postgate(pg: PostgateServer, testnet: TestNet) -> None:
    """Postfix (Debian's) with Postgate as its relayhost: mail submitted to Postfix reaches the MX receiver
    through Postgate, DANE-verified on Postgate's side."""
    from fixtures.postfix import Postfix

    token = secrets.token_hex(8)
    with Postfix("127.0.4.1", relayhost=f"[{ADDRESS}]:25", smtp_bind_address="127.0.5.2",
                 smtp_tls_security_level="may") as pf:
        with smtplib.SMTP("127.0.4.1", 25, timeout=30) as s:
            s.sendmail("alice@client.test", ["bob@dane-ok.test"], msg(token))
        deadline = time.time() + 30
        while time.time() < deadline and not stored(testnet, "mx.dane-ok.test", token):
            time.sleep(0.2)
        [m] = stored(testnet, "mx.dane-ok.test", token)
        assert f"relay={ADDRESS}[{ADDRESS}]:25" in pf.log() and "status=sent (250 2.0.0 Ok: delivered as" in pf.log()
    pf.cleanup()
    assert m["tls"]["version"] == "TLSv1.3"
    assert "Received: from postfix.test ([127.0.5.2])" in m["data"]


def test_limits_size_recipients_lines_sessions(pg: PostgateServer) -> None:
    with client() as s:
        s.ehlo("client.test")
        assert int(s.esmtp_features["size"]) == 52428800
        assert s.mail("a@client.test", ["SIZE=99999999999"])[0] == 552           # RFC 1870 §6.1
        assert s.mail("a@client.test")[0] == 250
        codes = [s.rcpt(f"u{i}@dane-ok.test")[0] for i in range(101)]
        assert codes[:100] == [250] * 100 and codes[100] == 452                    # max_recipients
        s.rset()
        s.mail("a@client.test")
        s.rcpt("bob@dane-ok.test")
        code, text = s.data(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n")
        assert code == 554 and b"998" in text                                      # RFC 5322 §2.1.1
        code, _ = s.docmd("X" * 3000)
        assert code == 500
    # one client address may hold max_sessions_per_client (50) sessions, not more
    socks = [socket.create_connection((ADDRESS, 25), timeout=10, source_address=("127.0.8.1", 0)) for _ in range(50)]
    try:
        for so in socks:
            assert so.recv(100).startswith(b"220")
        with socket.create_connection((ADDRESS, 25), timeout=10, source_address=("127.0.8.1", 0)) as extra:
            assert extra.recv(100).startswith(b"421 4.7.0")
        with socket.create_connection((ADDRESS, 25), timeout=10, source_address=("127.0.8.2", 0)) as other:
            assert other.recv(100).startswith(b"220")
    finally:
        for so in socks:
            so.close()


def test_sighup_reloads_policy_map(testnet: TestNet, tmp_path: Path) -> None:
    pm = tmp_path / "tls_policy"
    pm.write_text("nostarttls.test  dane\n")
    pg = _serve(testnet, tmp_path / "pg", delivery={"policy_map": str(pm)})
    try:
        with client(address=OWN) as s:
            s.ehlo("client.test")
            code, text, _ = data_reply(s, "a@client.test", ["b@nostarttls.test"], msg("x"))
            assert code == 250 and "queued" in text  # 'dane' with TLSA and no STARTTLS: deferred
        pm.write_text("nostarttls.test  may\n")
        os.utime(pm, (time.time() + 5, time.time() + 5))
        assert pg.proc is not None
        pg.proc.send_signal(signal.SIGHUP)
        deadline = time.time() + 10
        while f"reloaded {pg.config}" not in pg.log() and time.time() < deadline:
            time.sleep(0.1)
        assert f"reloaded {pg.config}" in pg.log()
        token = secrets.token_hex(8)
        with client(address=OWN) as s:
            s.ehlo("client.test")
            code, text, _ = data_reply(s, "a@client.test", ["b@nostarttls.test"], msg(token))
        assert code == 250 and "delivered" in text  # 'may': delivered in cleartext, no restart needed
        assert stored(testnet, "mx.nostarttls.test", token)
    finally:
        pg.stop()


def test_dsn_parameters_and_auth_login_travel_into_the_queue(pg: PostgateServer) -> None:
    with client(587, source=UNTRUSTED) as s:
        tls(s)
        s.user, s.password = "alice", "wonderland"
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=False)  # RFC 4954 with LOGIN, two challenges
        assert code == 235
        assert s.mail("alice@client.test", ["RET=HDRS", "ENVID=QQ+2Bx1"])[0] == 250
        assert s.rcpt("bob@agility.test", ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;bob+2Bx@agility.test"])[0] == 250
        code, text = s.data(msg(secrets.token_hex(8)))
        assert code == 250 and b"queued" in text
        qid = text.split()[-1].decode()
        assert s.mail("alice@client.test", ["RET=SOMETIMES"])[0] == 501
        assert s.mail("alice@client.test", ["FROBNICATE=1"])[0] == 555
        s.rset()
        s.mail("alice@client.test")
        assert s.rcpt("x@agility.test", ["NOTIFY=NEVER,SUCCESS"])[0] == 501
    env = json.loads(subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "show",
                                     qid, "--json"], capture_output=True, text=True).stdout)
    assert env["ret"] == "HDRS" and env["envid"] == "QQ+x1"          # xtext decoded (RFC 3461 §4)
    r = env["recipients"][0]
    assert r["notify"] == ["FAILURE", "DELAY"] and r["orcpt"] == "rfc822;bob+x@agility.test"


def test_workers_share_the_ports_and_the_queue(testnet: TestNet, tmp_path: Path) -> None:
    """[server] workers = 2: a second listener process on the same ports (the inherited socket); both deliver,
    and what either queues is run by the main process's queue."""
    pg = _serve(testnet, tmp_path, server={"workers": 2})
    try:
        assert "worker 1 started" in pg.log()
        tokens = [secrets.token_hex(8) for _ in range(30)]
        for t in tokens:
            with client(address=OWN) as s:
                s.ehlo("client.test")
                assert data_reply(s, "a@client.test", ["bob@dane-ok.test"], msg(t))[0] == 250
        assert all(stored(testnet, "mx.dane-ok.test", t) for t in tokens)
        # the main process and the worker each took some: two PIDs in the smtpd's lines
        pids = {m.group(1) for m in re.finditer(r"postgate/smtpd\[(\d+)\]: \w+: outcome=delivered", pg.log())}
        assert len(pids) == 2
    finally:
        assert pg.stop() == 0
    assert "worker 1 exited with 0" in pg.log()


def test_pipelining_and_no_command_injection_after_starttls(pg: PostgateServer, testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    with socket.create_connection((ADDRESS, 25), timeout=30, source_address=(TRUSTED, 0)) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"EHLO client.test\r\n")
        ehlo = []
        while (line := f.readline())[3:4] == b"-":
            ehlo.append(line)
        assert b"250-PIPELINING\r\n" in ehlo
        # RFC 2920: MAIL, RCPT, DATA in one go; then the message and the next commands in one go too
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@dane-ok.test>\r\nRCPT TO:<reject-x@dane-ok.test>\r\nDATA\r\n")
        replies = [f.readline()[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"250", b"354"]
        sock.sendall(f"Subject: {token}\r\n\r\n..leading dot\r\n".encode() + b".\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        final = f.readline()
        assert final.startswith(b"250"), final
        assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"221"]
    [m] = stored(testnet, "mx.dane-ok.test", token)
    assert "\n.leading dot" in m["data"].replace("\r\n", "\n")   # dot-stuffing undone, redone outbound
    # CVE-2011-0411: commands sent with STARTTLS must not be executed inside the TLS session
    with raw_session() as (sock, f):
        sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert f.readline().startswith(b"554 5.5.1")


def test_postmaster_without_domain_is_accepted(testnet: TestNet, tmp_path: Path) -> None:
    """RFC 5321 §4.5.1: RCPT TO:<Postmaster> is always accepted, for the server's own domain."""
    pg = _serve(testnet, tmp_path, relay={"local_domains": ["mail.own.test"]}, local={"maildir": str(tmp_path / "mail")})
    try:
        with client(source=UNTRUSTED, address=OWN) as s:
            s.ehlo("client.test")
            s.mail("x@client.test")
            assert s.rcpt("Postmaster")[0] == 250
            code, _ = s.data(msg(secrets.token_hex(8)))
            assert code == 250
        assert list((tmp_path / "mail" / "mail.own.test" / "postmaster" / "new").iterdir())
    finally:
        pg.stop()


def test_dsn_parameters_passed_on_and_relayed_notice(pg: PostgateServer, testnet: TestNet) -> None:
    """RFC 3461 §5.2: a next hop offering DSN gets RET/ENVID/NOTIFY/ORCPT; one that does not, and a
    NOTIFY=SUCCESS recipient, make Postgate send a 'relayed' notice itself."""
    token = secrets.token_hex(8)
    sender = f"dsn-{token}@dane-ok.test"
    with tls(client()) as s:
        s.mail(sender, ["RET=HDRS", "ENVID=E+2B1"])
        assert s.rcpt("bob@honest.caps.test", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@honest.caps.test"])[0] == 250
        assert s.rcpt("carol@dane-ok.test", ["NOTIFY=SUCCESS"])[0] == 250
        code, text = s.data(msg(token))
        assert code == 250 and b"delivered" in text
    [m] = stored(testnet, "mx.honest.caps.test", token)
    assert {"RET=HDRS", "ENVID=E+2B1"} <= set(m["mail_options"])
    assert m["rcpt_options"] == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@honest.caps.test"]
    deadline = time.time() + 20
    notices: list[dict] = []  # type: ignore[type-arg]
    while time.time() < deadline and not notices:
        notices = [n for n in testnet.received("mx.dane-ok.test") if n["rcpt_tos"] == [sender]]
        time.sleep(0.2)
    [notice] = notices  # one notice: carol's next hop has no DSN; bob's was passed on, not reported
    import email as _email
    import email.policy as _policy
    report = _email.message_from_string(notice["data"], policy=_policy.default)
    blocks = list(report.iter_parts())[1].get_payload()
    assert blocks[0]["Original-Envelope-Id"] == "E+1"
    assert [(b["Final-Recipient"], b["Action"]) for b in blocks[1:]] == [("rfc822; carol@dane-ok.test", "relayed")]
    assert notice["mail_from"] in ("", "<>") and "DKIM-Signature" in notice["data"]


@pytest.mark.parametrize("body", [b"no header at all, just text\r\n",
                                  b"Subject: x\r\nthis line has no colon\r\n\r\nbody\r\n"])
def test_malformed_header_gets_a_reply_never_a_dropped_connection(pg: PostgateServer, testnet: TestNet,
                                                                  body: bytes) -> None:
    """Issue 13 item 5: dkimpy's MessageFormatError used to end the session after DATA without a reply.
    The header is repaired as Postfix's cleanup does (the line without a colon starts the body), then signed."""
    token = secrets.token_hex(8)
    with raw_session() as (sock, f):
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@dane-ok.test>\r\nDATA\r\n")
        assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(body.replace(b"body", token.encode()).replace(b"text", token.encode()) + b".\r\n")
        reply = f.readline()
        assert reply.startswith(b"250 2.0.0 Ok: delivered"), reply
    [m] = stored(testnet, "mx.dane-ok.test", token)
    assert "DKIM-Signature:" in m["data"]
    assert "Traceback" not in pg.log()


def test_local_domain_is_delivered_locally_in_queue_first_mode(testnet: TestNet, tmp_path: Path) -> None:
    """Issue 13 item 3: queue-first used to queue mail for our own domain, whose MX is us: a loop."""
    maildir = tmp_path / "mail"
    pg = _serve(testnet, tmp_path / "pg", prequeue={"mode": "queue-first"},
                relay={"local_domains": ["local.test"]}, local={"maildir": str(maildir)})
    try:
        token = secrets.token_hex(8)
        with client(source=UNTRUSTED, address=OWN) as s:
            s.ehlo("client.test")
            code, text, _ = data_reply(s, "x@client.test", ["alice@local.test"], msg(token))
        assert code == 250 and "delivered as" in text
        [f] = list((maildir / "local.test" / "alice" / "new").iterdir())
        assert token in f.read_text()
    finally:
        pg.stop()


def test_notify_success_is_not_honoured_for_an_unverified_sender(testnet: TestNet, tmp_path: Path) -> None:
    """Issue 13 item 4: no success report to a sender an unauthenticated, untrusted client named (maybe
    forged); from a trusted client the report is sent."""
    maildir = tmp_path / "mail"
    pg = _serve(testnet, tmp_path / "pg", relay={"local_domains": ["local.test"]}, local={"maildir": str(maildir)})
    try:
        qids = []
        for source in (UNTRUSTED, TRUSTED):
            with client(source=source, address=OWN) as s:
                s.ehlo("client.test")
                s.mail(f"victim-{source}@client.test", ["ENVID=abc"])
                assert s.rcpt("alice@local.test", ["NOTIFY=SUCCESS"])[0] == 250
                code, text = s.data(msg(secrets.token_hex(8)))
                assert code == 250 and b"delivered as" in text
                qids.append(text.split()[-1].decode())
        untrusted, trusted = qids
        assert f"{trusted}: sender " in pg.log() and "notification" in pg.log()     # the success report
        assert f"{untrusted}: sender " not in pg.log()
        assert "NOTIFY=SUCCESS for <alice@local.test> not honoured" in pg.log()
    finally:
        pg.stop()


HOSTILE = [  # (what the client sends, the reply code the real daemon must give) — issue 13 items 4 and 6
    ("ſTARTTLS".encode(), b"500"),                                       # RFC 5321 §4.1.1: ASCII verbs
    ("QUıT".encode(), b"500"),
    ("MAIL FROM:<a@client.test> SIZE=²".encode(), b"501"),               # RFC 1870 §3: ASCII digits
    ("MAIL FROM:<a@client.test> SIZE=٣".encode(), b"501"),
    (b"NOOP " + b"x" * 506, b"500"),                                     # RFC 5321 §4.5.3.1.4: 513 octets
    (b"MAIL FROM:<a@client.test> ENVID=x+0D+0AX-Injected:+20yes", b"501"),  # RFC 3461 §4
    (b"MAIL FROM:<a\x00b@client.test>", b"501"),
]


def test_hostile_commands_against_the_daemon(pg: PostgateServer) -> None:
    with raw_session() as (sock, f):
        for line, want in HOSTILE:
            sock.sendall(line + b"\r\n")
            reply = f.readline()
            assert reply[:3] == want, (line, reply)
        sock.sendall(b"MAIL FROM:<a@client.test>\r\nRCPT TO:<bob@dane-ok.test> ORCPT=rfc822;a+0D+0A+0D+0A<h1>\r\n")
        assert [f.readline()[:3] for _ in range(2)] == [b"250", b"501"]
        sock.sendall(b"RCPT TO:<bob@dane-ok.test>\r\nDATA\r\n")
        assert [f.readline()[:3] for _ in range(2)] == [b"250", b"354"]
        sock.sendall(b"Subject: nul\r\n\r\n\x00.\r\n.\r\n")                 # NUL in DATA: refused, not passed on
        assert f.readline()[:3] == b"554"
        sock.sendall(b"QUIT\r\n")
        assert f.readline()[:3] == b"221"
    assert "Traceback" not in pg.log()
