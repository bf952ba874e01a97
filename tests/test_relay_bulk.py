"""Issue 20: the bulk DATA path (outbound/smtp_data.py) sends exactly what aiosmtplib's line-by-line rules
would (RFC 5321 §2.3.8 line ends, §4.5.2 transparency), and a 1 MB binary-ish body crosses Postgate
pre-queue byte for byte."""

from __future__ import annotations

import random
import secrets
import subprocess

import dkim as dkimpy
import dns.message
import dns.query
import pytest
from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings
from hypothesis import given, settings
from hypothesis import strategies as st
from postgate.outbound import smtp_data

from fixtures.pgserve import PostgateServer
from fixtures.testnet import TestNet

from .test_inbound import client, tls

CASES = [  # (content, wire) — table of the three transformations
    (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
    (b"a\r\nb", b"a\r\nb\r\n.\r\n"),                       # §4.1.1.4: content ends in CRLF
    (b".a\r\n.\r\n..\r\n", b"..a\r\n..\r\n...\r\n.\r\n"),  # §4.5.2: every leading dot doubled
    (b"a\nb\rc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),            # §2.3.8: lone LF and CR sent as CRLF
    (b"x\n.y\r.z", b"x\r\n..y\r\n..z\r\n.\r\n"),
    (b"", b"\r\n.\r\n"),
]


def test_encode_table() -> None:
    for content, wire in CASES:
        assert smtp_data.encode(content) == wire, content


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b" ", b"\r\n.", b"\xff"]), max_size=30))
def test_encode_equals_aiosmtplib(parts: list[bytes]) -> None:
    content = b"".join(parts)
    assert smtp_data.encode(content) == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(content)) + b".\r\n"


def binaryish(size: int, seed: int) -> bytes:
    """Lines of every octet but NUL, CR and LF, up to the 998-octet limit (RFC 5322 §2.1.1) and many of
    exactly 998, with leading dots, lone dots, empty lines, trailing white space and tabs."""
    rnd = random.Random(seed)
    octets = bytes(b for b in range(1, 256) if b not in (10, 13))
    lines: list[bytes] = []
    total = 0
    while total < size:
        kind = rnd.random()
        if kind < 0.05:
            line = b"."
        elif kind < 0.10:
            line = b"." + bytes(rnd.choices(octets, k=rnd.randrange(0, 80)))
        elif kind < 0.13:
            line = b""
        elif kind < 0.16:
            line = b"x \t  "
        elif kind < 0.19:  # the longest legal line (RFC 5322 §2.1.1), not dot-stuffed on the wire
            line = b"y" + bytes(rnd.choices(octets, k=997))
        else:
            line = bytes(rnd.choices(octets, k=rnd.randrange(1, 998)))
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def test_one_megabyte_binaryish_body_is_relayed_byte_for_byte(testnet: TestNet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    token = secrets.token_hex(8)
    message = (f"From: a@own.test\r\nTo: bob@dane-ok.test\r\nSubject: {token}\r\nMessage-ID: <{token}@own.test>\r\n"
               "Date: Tue, 24 Nov 2026 10:00:00 +0000\r\n"
               "MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: 8bit\r\n"
               "\r\n").encode() + binaryish(1_000_000, 20)
    with PostgateServer(testnet, tmp_path / "pg", address="127.0.2.2"):
        with tls(client(address="127.0.2.2")) as s:
            s.mail("a@own.test", ["BODY=8BITMIME"])
            s.rcpt("bob@dane-ok.test")
            code, text = s.data(message)
    assert code == 250, text
    [m] = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    got = m["data"].encode("utf-8", "surrogateescape")
    assert got.endswith(message)
    added = got[:-len(message)]  # only header fields Postgate prepends: trace and signatures
    assert added.startswith(b"DKIM-Signature:") and added.endswith(b"\r\n") and b"\r\nReceived: from " in added
    assert b"\r\n\r\n" not in added

    def txt(name: bytes, timeout: int = 5) -> bytes:
        r = dns.query.udp(dns.message.make_query(name.decode(), "TXT"), testnet.resolver, timeout=5)
        return b"".join(s for rr in r.answer for rd in rr for s in rd.strings)
    d = dkimpy.DKIM(got)
    assert d.verify(idx=0, dnsfunc=txt) and d.verify(idx=1, dnsfunc=txt)
    # and OpenDKIM, an independent implementation (it checks the first signature, RSA)
    res = subprocess.run(["opendkim-testmsg"], input=got, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_one_megabyte_through_postfix_with_a_refused_recipient(testnet: TestNet, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Against Postfix as the next hop: a refused recipient gets its own reply, the accepted one the message,
    whose 1 MB body (dots, tabs) arrives unchanged (Postfix's hold queue keeps it for postcat); a second
    message reuses the connection."""
    import time

    from fixtures.postfix import Postfix

    assert testnet.pki is not None
    chain, key = testnet.pki.paths("mx.bench.test")
    token = secrets.token_hex(8)
    body = b"".join(b"." * (i % 3) + b"line %d of the body, \t with a tab\r\n" % i for i in range(25_000))
    message = (f"From: a@own.test\r\nTo: held@bench.test\r\nSubject: {token}\r\n"
               f"Message-ID: <{token}@own.test>\r\n\r\n").encode() + body
    sink = Postfix("127.0.1.60", myhostname="mx.bench.test", mydestination="bench.test", local_recipient_maps="",
                   smtpd_tls_cert_file=str(chain), smtpd_tls_key_file=str(key), smtpd_tls_security_level="may",
                   message_size_limit=50_000_000, local_transport="discard:",
                   smtpd_recipient_restrictions="check_recipient_access inline:{{held@bench.test=HOLD}, "
                   "{reject-me@bench.test=REJECT no such user}}, permit_mynetworks, reject")
    with sink, PostgateServer(testnet, tmp_path / "pg", address="127.0.2.2"):
        with tls(client(address="127.0.2.2")) as s:
            s.mail("a@own.test")
            s.rcpt("held@bench.test")
            s.rcpt("reject-me@bench.test")
            code, text = s.data(message)
            assert code == 250, text  # pre-queue: delivered to one, the other refused and reported by DSN
            second = s.sendmail("a@own.test", ["other@bench.test"], b"Subject: second\r\n\r\nsecond\r\n")
            assert second == {}
        deadline = time.time() + 30
        while time.time() < deadline and "status=sent" not in sink.log():
            time.sleep(0.2)
        log = sink.log()
        assert "reject-me@bench.test>: Recipient address rejected: no such user" in log
        # the fixture's readiness probe, then Postgate: both messages over one connection
        assert log.count("]: connect from") == 2, log
        held = subprocess.run(["postqueue", "-c", str(sink.dir), "-j"], capture_output=True, text=True).stdout
        [qid] = [ln.split('"queue_id": "')[1].split('"')[0] for ln in held.splitlines() if '"hold"' in ln]
        got = subprocess.run(["postcat", "-c", str(sink.dir), "-b", "-q", qid], capture_output=True).stdout
    sink.cleanup()
    assert got.split(b"*** MESSAGE CONTENTS", 1)[-1].split(b"\n", 1)[1].replace(b"\n", b"\r\n") == body


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_tls_handshakes_never_hang_on_either_loop(testnet: TestNet, tmp_path, event_loop: str) -> None:  # type: ignore[no-untyped-def]
    """Both loops ([server] event_loop; auto is uvloop): the smtpd switches to TLS without letting the loop read
    the ClientHello into the plaintext stream first (STARTTLS on 25: before that fix, about 1 handshake in 6
    hung on uvloop under 20 concurrent clients), and port 465 puts TLS on the accepted socket before reading
    (start_tls in the session hung every early handshake on uvloop)."""
    import concurrent.futures
    import smtplib
    import ssl

    def one(i: int) -> bool:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        try:
            if i % 2:   # RFC 8314 §3.3: implicit TLS on 465
                with smtplib.SMTP_SSL("127.0.2.2", 465, timeout=10, context=ctx) as s:
                    return s.ehlo("client.test")[0] == 250
            with smtplib.SMTP("127.0.2.2", 25, timeout=10) as s:
                s.ehlo("client.test")
                s.starttls(context=ctx)
                return s.ehlo("client.test")[0] == 250
        except (OSError, smtplib.SMTPException):
            return False
    with PostgateServer(testnet, tmp_path / "pg", address="127.0.2.2", server={"event_loop": event_loop}):
        with concurrent.futures.ThreadPoolExecutor(20) as ex:
            ok = list(ex.map(one, range(200)))
    assert all(ok), f"{ok.count(False)} of 200 TLS sessions failed"


def test_event_loop_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """[server] event_loop: auto (uvloop when installed, a dependency), uvloop, asyncio; anything else is a
    file:line error."""
    import asyncio

    import pytest

    from postgate import config, eventloop

    cfg = tmp_path / "postgate.toml"
    cfg.write_text('[server]\nhostname = "mail.own.test"\nevent_loop = "libuv"\n')
    with pytest.raises(config.ConfigError, match=r"postgate.toml:3: \[server\] event_loop: 'libuv' must be"):
        config.load(cfg)
    cfg.write_text('[server]\nhostname = "mail.own.test"\n')
    assert config.load(cfg).server.event_loop == "auto"
    assert eventloop.resolve("auto") == "uvloop"

    async def loop_type() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(loop_type(), "uvloop").startswith("uvloop")
    assert eventloop.run(loop_type(), "asyncio").startswith("asyncio")
