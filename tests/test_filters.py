"""The stage-hook chain (inbound/filters.py): how verdicts compose, and milter-style header edits."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import pytest
from postgate.inbound.clientname import client_names
from postgate.inbound.filters import (
    Action,
    FilterChain,
    HeaderEdit,
    HeaderOp,
    Route,
    Stage,
    StageContext,
    Verdict,
    apply_header_edits,
    split_message,
)
from postgate.inbound.relay import RelayFilter, RelayPolicy
from postgate.policy.vocab import Reply

from fixtures.testnet import TestNet
from tests.smtpd_harness import Client, code, serve, tls_context

MSG = b"From: a@x\r\nSubject: hi\r\n there\r\nX-A: 1\r\nX-A: 2\r\n\r\nbody\r\n"


class Fixed:
    def __init__(self, name: str, verdicts: list[Verdict] | Exception, default: Action = Action.ACCEPT) -> None:
        self.name, self.verdicts, self.default_action = name, verdicts, default
        self.calls = 0
        self.closed = 0

    def session(self) -> Fixed:
        return self

    async def on(self, ctx: StageContext) -> Verdict:
        self.calls += 1
        if isinstance(self.verdicts, Exception):
            raise self.verdicts
        return self.verdicts.pop(0) if self.verdicts else Verdict()

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        self.closed += 1


def ctx(stage: Stage = Stage.RCPT) -> StageContext:
    return StageContext(stage, "mx", "192.0.2.1")


def test_split_keeps_folding_and_body() -> None:
    headers, body = split_message(MSG)
    assert headers == [("From", " a@x"), ("Subject", " hi\r\n there"), ("X-A", " 1"), ("X-A", " 2")]
    assert body == b"body\r\n"


def test_header_edits_like_libmilter() -> None:
    out = apply_header_edits(MSG, [HeaderEdit(HeaderOp.ADD, "X-Spam", "yes"),
                                   HeaderEdit(HeaderOp.INSERT, "Authentication-Results", "mx; dkim=pass", 0),
                                   HeaderEdit(HeaderOp.CHANGE, "X-A", "two", 2),
                                   HeaderEdit(HeaderOp.DELETE, "Subject")])
    assert out == (b"Authentication-Results: mx; dkim=pass\r\nFrom: a@x\r\nX-A: 1\r\nX-A: two\r\n"
                   b"X-Spam: yes\r\n\r\nbody\r\n")
    assert apply_header_edits(MSG, [], b"new\r\n").endswith(b"\r\n\r\nnew\r\n")


def test_reject_stops_the_chain_and_gets_a_default_reply() -> None:
    a, b, c = Fixed("a", [Verdict(Action.ACCEPT)]), Fixed("b", [Verdict(Action.REJECT)]), Fixed("c", [])
    out = asyncio.run(FilterChain([a, b, c]).on(ctx()))
    assert out.verdict.action is Action.REJECT and out.verdict.filter == "b"
    assert out.verdict.reply == Reply(550, "5.7.1", "Command rejected")
    assert c.calls == 0


def test_accept_is_no_excuse_for_the_next_filter() -> None:
    a = Fixed("a", [Verdict(Action.ACCEPT)])
    b = Fixed("b", [Verdict(), Verdict(Action.TEMPFAIL, Reply(450, "4.2.0", "greylisted"))])
    chain = FilterChain([a, b])
    assert asyncio.run(chain.on(ctx())).verdict.action is Action.CONTINUE
    out = asyncio.run(chain.on(ctx()))
    assert out.verdict.reply == Reply(450, "4.2.0", "greylisted")
    assert a.calls == 1   # accepted: not asked again in this transaction


def test_failed_filter_applies_its_default_for_the_rest_of_the_session() -> None:
    broken = Fixed("m", RuntimeError("garbage"), default=Action.TEMPFAIL)
    chain = FilterChain([broken])
    for _ in range(2):
        out = asyncio.run(chain.on(ctx()))
        assert out.verdict.action is Action.TEMPFAIL and out.verdict.reply is not None
        assert out.verdict.reply.code == 451
    assert broken.calls == 1 and broken.closed == 1
    ok = FilterChain([Fixed("m", RuntimeError("down"), default=Action.ACCEPT)])
    assert asyncio.run(ok.on(ctx())).verdict.action is Action.CONTINUE


def test_hold_and_edits_accumulate() -> None:
    a = Fixed("a", [Verdict(Action.HOLD, quarantine_reason="spam?")])
    b = Fixed("b", [Verdict(headers=(HeaderEdit(HeaderOp.ADD, "X-B", "1"),))])
    out = asyncio.run(FilterChain([a, b]).on(ctx(Stage.DATA)))
    assert out.hold is not None and out.hold.filter == "a"
    assert [v.filter for v in out.edits] == ["b"]
    assert out.verdict.action is Action.CONTINUE


# --- the chain in the smtpd (inbound/smtpd.py): every stage asked, every verdict applied ---------------------


class Scripted:
    """A filter answering per stage (and per recipient at RCPT) from a table; it records every context."""

    def __init__(self, name: str, answers: dict[str, Verdict]) -> None:
        self.name, self.answers, self.default_action = name, answers, Action.TEMPFAIL
        self.seen: list[StageContext] = []
        self.resets = 0

    def session(self) -> Scripted:
        return self

    async def on(self, c: StageContext) -> Verdict:
        self.seen.append(c)
        key = f"rcpt:{c.recipient}" if c.stage is Stage.RCPT else c.stage.value
        return self.answers.get(key, Verdict())

    async def reset(self) -> None:
        self.resets += 1

    async def close(self) -> None:
        pass


def _transaction(c: Client, rcpts: list[bytes], body: bytes = b"Subject: t\r\n\r\nbody\r\n") -> list[bytes]:
    out = [c.cmd(b"MAIL FROM:<a@client.test>")]
    out += [c.cmd(b"RCPT TO:<" + r + b">") for r in rcpts]
    if any(code(r) == 250 for r in out[1:]):
        out.append(c.cmd(b"DATA"))
        out.append(c.cmd(body + b"."))
    return out


def _greeted(port: int) -> Client:
    c = Client(port)
    assert code(c.reply()) == 220
    assert code(c.cmd(b"EHLO client.test")) == 250
    return c


def test_rcpt_reject_refuses_only_that_recipient_and_edits_reach_the_handler() -> None:
    f = Scripted("sieve", {
        "rcpt:bad@x.test": Verdict(Action.REJECT, Reply(550, "5.7.1", "no thanks")),
        "rcpt:slow@x.test": Verdict(Action.TEMPFAIL),
        "data": Verdict(headers=(HeaderEdit(HeaderOp.ADD, "X-Filtered", "yes"), HeaderEdit(HeaderOp.DELETE, "Subject")),
                        add_recipients=("added@x.test",), remove_recipients=("good2@x.test",),
                        new_sender="changed@client.test", routes=(Route(tls_level="dane-only"),)),
    })
    with serve(filters=[f]) as srv, _greeted(srv.port) as c:
        replies = _transaction(c, [b"good@x.test", b"bad@x.test", b"slow@x.test", b"good2@x.test"])
        assert [code(r) for r in replies] == [250, 250, 550, 451, 250, 354, 250]
        assert b"5.7.1 no thanks" in replies[2]
    [(sender, rcpts, data, hold)] = srv.handler.messages
    assert sender == "changed@client.test" and rcpts == ["good@x.test", "added@x.test"] and hold is None
    assert data == b"X-Filtered: yes\r\n\r\nbody\r\n"
    assert srv.handler.routes == [(Route(tls_level="dane-only"),)]
    stages = [x.stage for x in f.seen]
    assert stages == [Stage.CONNECT, Stage.HELO, Stage.MAIL] + [Stage.RCPT] * 4 + [Stage.DATA]
    data_ctx = f.seen[-1]
    assert data_ctx.message == b"Subject: t\r\n\r\nbody\r\n" and data_ctx.queue_id and \
        data_ctx.recipients == ["good@x.test", "good2@x.test"] and data_ctx.helo == "client.test"


def test_connect_reject_mail_tempfail_discard_and_hold() -> None:
    with serve(filters=[Scripted("policy", {"connect": Verdict(Action.REJECT, Reply(554, "5.7.1", "go away"))})]) \
            as srv, Client(srv.port) as c:
        assert c.reply().startswith(b"554 5.7.1 go away")
        assert code(c.cmd(b"EHLO client.test")) == 503          # RFC 5321 §3.1: only QUIT after a 554 greeting
        assert code(c.cmd(b"QUIT")) == 221
    with serve(filters=[Scripted("policy", {"mail": Verdict(Action.TEMPFAIL, Reply(450, "4.7.1", "later"))})]) \
            as srv, _greeted(srv.port) as c:
        assert c.cmd(b"MAIL FROM:<a@client.test>").startswith(b"450 4.7.1 later")
    discard = Scripted("milter", {"data": Verdict(Action.DISCARD, reason="virus")})
    with serve(filters=[discard]) as srv, _greeted(srv.port) as c:
        replies = _transaction(c, [b"b@x.test"])
        assert code(replies[-1]) == 250
        qid = replies[-1].split()[-1].decode()
    assert srv.handler.messages == []
    assert f"{qid}: discard: END-OF-MESSAGE from unknown[127.0.0.1]: filter=milter (virus)" in srv.log.text()
    hold = Scripted("milter", {"rcpt:b@x.test": Verdict(Action.HOLD, quarantine_reason="suspicious")})
    with serve(filters=[hold]) as srv, _greeted(srv.port) as c:
        assert code(_transaction(c, [b"b@x.test"])[-1]) == 250
    [(_, _, _, why)] = srv.handler.messages
    assert why == "milter: suspicious"


def test_a_failing_filter_tempfails_by_default_and_resets_per_transaction() -> None:
    broken = Fixed("milter", RuntimeError("socket closed"), default=Action.TEMPFAIL)
    with serve(filters=[broken]) as srv, Client(srv.port) as c:
        assert c.reply().startswith(b"421")                      # CONNECT tempfail: 421 and close
    ok = Scripted("x", {})
    with serve(filters=[ok]) as srv, _greeted(srv.port) as c:
        _transaction(c, [b"b@x.test"])
        assert code(c.cmd(b"RSET")) == 250
    assert ok.resets >= 2 and len(srv.handler.messages) == 1


def test_relay_control_is_a_filter() -> None:
    policy = RelayPolicy.build(["192.0.2.0/24"], ["local.test"])
    f = RelayFilter(policy)

    def at(client: str, rcpt: str, user: str | None = None) -> Action:
        c = StageContext(Stage.RCPT, "mx", client, recipient=rcpt, auth_user=user)
        return asyncio.run(f.on(c)).action

    assert at("198.51.100.1", "x@elsewhere.test") is Action.REJECT
    assert at("198.51.100.1", "x@local.test") is Action.CONTINUE
    assert at("192.0.2.7", "x@elsewhere.test") is Action.CONTINUE
    assert at("198.51.100.1", "x@elsewhere.test", user="alice") is Action.CONTINUE
    v = asyncio.run(f.on(StageContext(Stage.RCPT, "mx", "198.51.100.1", recipient="x@elsewhere.test")))
    assert v.reply == Reply(554, "5.7.1", "<x@elsewhere.test>: Relay access denied")


def test_client_names_have_a_resolver_cache_of_their_own(testnet: TestNet, tmp_path: Path) -> None:
    """Issue 20 (100,000 sessions): the smtpd's FCrDNS lookups go through a resolver with the same servers,
    trust anchors and mode as delivery's but its own cache ([resolver] client_name_cache_size), so client
    addresses neither evict delivery's answers nor add their DNS messages to its cache."""
    from postgate import assemble
    from postgate import config as configmod
    p = tmp_path / "postgate.toml"
    p.write_text(f'[resolver]\nservers = ["{testnet.resolver}"]\ntrust_anchor_file = "{testnet.anchor_file}"\n'
                 'client_name_cache_size = 150\n')
    cfg = configmod.load(p)
    main = assemble.build_resolver(cfg)
    names = assemble.name_resolver(cfg, main)
    assert names is not main and names.cache_size == 150 and main.cache_size == 20000
    assert (names.servers, names.anchors, names.mode) == (main.servers, main.anchors, main.mode)
    before = main.cache_stats()
    assert asyncio.run(client_names(names, "127.0.5.1")) == ("client.own.test", "client.own.test")
    assert main.cache_stats() == before and main.queries_sent == 0
    assert names.queries_sent > 0
    p.write_text('[resolver]\nclient_name_cache_size = 10\n')
    try:
        configmod.load(p)
    except configmod.ConfigError as e:
        assert f"{p}:2: [resolver] client_name_cache_size: must be at least 100" in str(e)
    else:
        raise AssertionError("a cache of 10 was accepted")


def test_context_has_client_name_tls_and_auth(testnet: TestNet, tmp_path: Path) -> None:
    """client_name is the forward-confirmed PTR name, through Postgate's resolver on the test network
    (127.0.2.1 has PTR mail.own.test, whose A is 127.0.2.1); an address without PTR is "unknown"."""
    from postgate.outbound.resolver import Resolver, load_anchors

    resolver = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)

    async def names(ip: str) -> tuple[str, str]:
        return await client_names(resolver, ip)

    f = Scripted("x", {})
    with serve(tls=tls_context(tmp_path), auth=True, filters=[f], client_names=names) as srv:
        with Client(srv.port, source="127.0.2.1") as c:
            assert code(c.reply()) == 220
            assert code(c.cmd(b"EHLO client.test")) == 250
            assert code(c.cmd(b"STARTTLS")) == 220
            c.start_tls()
            assert code(c.cmd(b"EHLO client.test")) == 250
            assert code(c.cmd(b"AUTH PLAIN AGFsaWNlAHdvbmRlcmxhbmQ=")) == 235
            assert code(c.cmd(b"MAIL FROM:<alice@client.test>")) == 250
        with Client(srv.port, source="127.0.5.9") as c:
            assert code(c.reply()) == 220
    first = f.seen[0]
    assert (first.client_name, first.reverse_client_name, first.client_address) == \
        ("mail.own.test", "mail.own.test", "127.0.2.1")
    mail = next(x for x in f.seen if x.stage is Stage.MAIL)
    assert mail.tls_version == "TLSv1.3" and mail.tls_cipher and mail.tls_bits and mail.auth_user == "alice"
    assert mail.auth_method == "PLAIN" and mail.queue_id and mail.sender == "alice@client.test"
    assert ipaddress.ip_address(mail.local_address).is_loopback and mail.local_port == srv.port
    assert f.seen[-1].client_address == "127.0.5.9" and f.seen[-1].client_name == "unknown"


def test_hold_verdict_puts_the_message_on_the_spools_hold_queue(tmp_path: Path) -> None:
    """A filter's HOLD: the pre-queue handler queues the message and moves it to hold/ (spool.hold), where
    it waits for `postgate queue release`; nothing is delivered."""
    from postgate.inbound.prequeue import PreQueue, PreQueueConfig
    from postgate.inbound.smtpd import Listener, Session
    from postgate.outbound.queue.scheduler import Scheduler
    from postgate.outbound.queue.spool import DirectorySpool

    class NoDelivery:
        async def deliver(self, *a: object, **kw: object) -> list[object]:
            raise AssertionError("a held message must not be delivered")

    spool = DirectorySpool(tmp_path / "spool", fsync=False)
    pq = PreQueue(PreQueueConfig(hostname="mx.test"), RelayPolicy.build([], []), NoDelivery(),  # type: ignore[arg-type]
                  spool, Scheduler(spool, NoDelivery()))  # type: ignore[arg-type]
    s = Session(Listener("mx", "127.0.0.1", 25), ("192.0.2.1", 1234), helo="client.test", sender="a@client.test",
                recipients=[("b@remote.test", {})], queue_id="0000000000000AABBCC0", hold="milter: suspicious")
    reply = asyncio.run(pq.message(s, b"Subject: x\r\n\r\nbody\r\n"))
    assert reply.code == 250 and "0000000000000AABBCC0" in reply.text
    assert spool.files.state_of("0000000000000AABBCC0") == "hold"


def test_multiline_filter_reply_repeats_the_enhanced_code() -> None:
    """RFC 2034 §4: each line of a multi-line reply carries the enhanced status code."""
    wire = Reply(550, "5.7.1", "spam\nsee https://example.test/why").line()   # what the smtpd writes
    assert wire == b"550-5.7.1 spam\r\n550 5.7.1 see https://example.test/why\r\n"


def test_prequeue_signs_once_and_only_promises_crlf_for_unedited_messages(tmp_path: Path) -> None:
    """Issue 20: pre-queue builds signatures + Received + data in one piece, and tells the DKIM signer that
    the line ends need no second check only when no filter edited the message (an edit may bring a bare LF
    back, RFC 5321 §2.3.8); both ways the queued message's signatures verify with dkimpy."""
    import dkim as dkimpy
    from postgate.inbound.filters import Verdict
    from postgate.inbound.prequeue import PreQueue, PreQueueConfig
    from postgate.inbound.smtpd import Listener, Session
    from postgate.outbound import dkim
    from postgate.outbound.queue.scheduler import Scheduler
    from postgate.outbound.queue.spool import DirectorySpool

    class NoDelivery:
        async def deliver(self, *a: object, **kw: object) -> list[object]:
            raise AssertionError("a held message must not be delivered")

    dkim.generate(tmp_path / "keys", "own.test", "r1", "rsa")
    dkim.generate(tmp_path / "keys", "own.test", "e1", "ed25519")
    real = dkim.Signer(tmp_path / "keys", "own.test")
    promised: list[bool] = []

    async def signer(data: bytes, prefix: bytes, sender: str, crlf_only: bool, *, domain: str | None = None,
                     selector: str | None = None) -> bytes:
        promised.append(crlf_only)
        return await real.signature_fields_async(data, prefix, crlf_only=crlf_only, domain=domain,
                                                 selector=selector)

    spool = DirectorySpool(tmp_path / "spool", fsync=False)
    pq = PreQueue(PreQueueConfig(hostname="mx.test"), RelayPolicy.build([], []), NoDelivery(),  # type: ignore[arg-type]
                  spool, Scheduler(spool, NoDelivery()), signer=signer)
    keys = {k.selector: k.txt().encode() for k in real.keys["own.test"]}
    for n, (edits, body) in enumerate([((), b"plain\r\n"),
                                       ((Verdict(new_body=b"bare\nLF\r\n"),), b"bare\nLF\r\n")]):
        qid = f"0000000000000AABBC{n}0"
        s = Session(Listener("mx", "127.0.0.1", 25), ("192.0.2.1", 1234), helo="client.test", sender="a@own.test",
                    recipients=[("b@remote.test", {})], queue_id=qid, hold="test")
        s.edits = list(edits)
        data = b"From: a@own.test\r\nSubject: x\r\n\r\n" + body
        assert asyncio.run(pq.message(s, data)).code == 250
        content = asyncio.run(spool.content(qid))
        # the two signatures, then the trace field, then the data unchanged
        assert content.startswith(b"DKIM-Signature: ") and content.endswith(data)
        assert content[:-len(data)].count(b"DKIM-Signature: ") == 2 and b"\r\nReceived: from client.test " in content
        d = dkimpy.DKIM(content)
        assert all(d.verify(idx=i, dnsfunc=lambda name, timeout=5: keys[name.split(b".")[0].decode()])
                   for i in range(2))
    assert promised == [True, False]


def test_prequeue_marks_only_checked_content_canonical(tmp_path: Path) -> None:
    """Issue 20: the content pre-queue hands to delivery is marked as already checked (smtp_data.Canonical:
    only CRLF line ends, ending in CRLF, so the outbound encoding does not count them again) only when no
    filter edited the message; marked or not, it encodes as the unmarked bytes would."""
    from postgate.inbound.filters import Verdict
    from postgate.inbound.prequeue import PreQueue, PreQueueConfig
    from postgate.inbound.smtpd import Listener, Session
    from postgate.outbound import smtp_data
    from postgate.outbound.delivery import RecipientResult
    from postgate.outbound.queue.scheduler import Scheduler
    from postgate.outbound.queue.spool import DirectorySpool
    from postgate.policy.vocab import Outcome

    got: list[bytes] = []

    class Capture:
        async def deliver(self, sender: str, rcpts: list[str], content: bytes, **kw: object) -> list[object]:
            got.append(content)
            return [RecipientResult(r, Outcome.DELIVERED, "2.0.0", "ok", mx="mx.remote.test") for r in rcpts]

    spool = DirectorySpool(tmp_path / "spool", fsync=False)
    pq = PreQueue(PreQueueConfig(hostname="mx.test"), RelayPolicy.build([], []), Capture(),  # type: ignore[arg-type]
                  spool, Scheduler(spool, Capture()))  # type: ignore[arg-type]
    for n, edits in enumerate([(), (Verdict(new_body=b"bare\nLF\r\n"),)]):
        s = Session(Listener("mx", "127.0.0.1", 25), ("192.0.2.1", 1234), helo="client.test", sender="a@own.test",
                    recipients=[("b@remote.test", {})], queue_id=f"0000000000000AABBC{n}1")
        s.edits = list(edits)
        data = b"From: a@own.test\r\nSubject: x\r\n\r\n" + (b"bare\nLF\r\n" if edits else b"plain\r\n.x\r\n")
        reply = asyncio.run(pq.message(s, data))
        assert reply.code == 250 and "delivered" in reply.text, reply
    plain, edited = got
    assert isinstance(plain, smtp_data.Canonical) and not isinstance(edited, smtp_data.Canonical)
    # the promise holds (counted on a plain copy), and the marked content encodes as the plain bytes do
    assert smtp_data.crlf_only(bytes(plain)) and plain.endswith(b"\r\n")
    assert smtp_data.encode(plain) == smtp_data.encode(bytes(plain)) and b"\r\n..x\r\n" in smtp_data.encode(plain)
    assert smtp_data.encode(edited).count(b"\n") == smtp_data.encode(edited).count(b"\r\n")


def _received(helo: str, peer: str, *, esmtp: bool = True, tls: bool = False, user: str | None = None,
              smtputf8: bool = False) -> str:
    """The Received: field pre-queue writes for a session (inbound/prequeue.PreQueue._received)."""
    from postgate.inbound.prequeue import PreQueue, PreQueueConfig
    from postgate.inbound.smtpd import Listener, Session

    pq = PreQueue(PreQueueConfig(hostname="mx.test"), RelayPolicy.build([], []), None, None, None)  # type: ignore[arg-type]
    s = Session(Listener("mx", "::", 25), (peer, 1234), helo=helo, esmtp=esmtp, sender="a@client.test",
                recipients=[("b@remote.test", {})], user=user, mail_params={"SMTPUTF8": ""} if smtputf8 else {})
    if tls:
        s.tls_version, s.tls_cipher = "TLSv1.3", "TLS_AES_256_GCM_SHA384"
    return pq._received(s, "0000000000000AABBCC0", 1700000000.0).decode()


def test_received_from_clause_cannot_be_forged_by_the_helo_name() -> None:
    """RFC 5321 §4.4: the "from" clause is an Extended-Domain; the HELO name is neutered as Postfix does
    (printable ASCII, each of space < > ( ) \\ " ; @ as '?'), so it cannot add by/with/id/for clauses."""
    got = _received("trusted.example by mx.example with ESMTPSA id FAKE for <ceo@victim.example>", "192.0.2.1")
    assert got.startswith("Received: from trusted.example?by?mx.example?with?ESMTPSA?id?FAKE?for??ceo?victim.example? "
                          "([192.0.2.1])\r\n\tby mx.test (Postgate) with ESMTP id 0000000000000AABBCC0\r\n\tfor "
                          "<b@remote.test>;"), got
    assert _received('x;y"z\\é', "192.0.2.1").startswith("Received: from x?y?z?? ([192.0.2.1])")


def test_received_writes_ipv6_address_literals() -> None:
    """RFC 5321 §4.1.3: an IPv6 address literal is "[IPv6:...]"; an IPv4 one stays "[192.0.2.1]"."""
    assert _received("c.test", "2001:db8::1").startswith("Received: from c.test ([IPv6:2001:db8::1])\r\n")
    assert _received("c.test", "192.0.2.1").startswith("Received: from c.test ([192.0.2.1])\r\n")


def test_received_protocol_suffixes_are_for_esmtp_only() -> None:
    """RFC 3848 §1-§2 (and RFC 6531 §3.7.3): S and A are ESMTP's suffixes; a HELO session is "with SMTP"
    whatever its TLS and AUTH."""
    assert " with SMTP (TLSv1.3:TLS_AES_256_GCM_SHA384) id " in _received("c.test", "192.0.2.1", esmtp=False,
                                                                          tls=True, user="alice", smtputf8=True)
    assert " with SMTP id " in _received("c.test", "192.0.2.1", esmtp=False, user="alice")
    assert " with ESMTPSA (TLSv1.3:" in _received("c.test", "192.0.2.1", tls=True, user="alice")
    assert " with UTF8SMTPSA (TLSv1.3:" in _received("c.test", "192.0.2.1", tls=True, user="alice", smtputf8=True)
    assert " with ESMTPA id " in _received("c.test", "192.0.2.1", user="alice")


@pytest.mark.parametrize("stage", ["mail", "rcpt:b@x.test", "data"])
def test_a_filter_s_421_ends_the_session(stage: str) -> None:
    """RFC 5321 §3.8, §4.2.3: 421 means the server is closing the transmission channel. A filter that
    answers 421 (a milter's or policy service's "service not available") ends the session after that reply,
    with the server's name first, as Postfix does; nothing is accepted."""
    busy = Scripted("policy", {stage: Verdict(Action.TEMPFAIL, Reply(421, "4.7.0", "too busy"))})
    with serve(filters=[busy]) as srv, _greeted(srv.port) as c:
        replies = _transaction(c, [b"b@x.test"]) if stage != "mail" else [c.cmd(b"MAIL FROM:<a@client.test>")]
        assert replies[-1].startswith(b"421 4.7.0 ") and b"too busy" in replies[-1], replies
        c.sock.settimeout(5)
        assert c.sock.recv(100) == b""          # closed by the server
    assert srv.handler.messages == []
