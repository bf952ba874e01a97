"""The milter client (inbound/milter.py) against real milters started in the namespace: rspamd, OpenDKIM,
clamav-milter, a libmilter milter scripted by the test (python3-milter) and milters that misbehave.

Each test drives a :class:`FilterChain` through the stages of one SMTP session the way the smtpd does
(connect, HELO, MAIL, RCPT…, end of data) and looks at the combined verdict and the edited message.
"""

from __future__ import annotations

import asyncio
import email
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim as dkimpy
import dns.message
import dns.query
import pytest
from postgate.inbound.filters import (
    Action,
    Filter,
    FilterChain,
    HeaderEdit,
    HeaderOp,
    Outcome,
    Stage,
    StageContext,
    apply_header_edits,
)
from postgate.inbound.milter import MilterFilter, MilterSettings, parse_address, parse_replycode
from postgate.inbound.policyd import PolicyService
from postgate.policy.vocab import Reply

from fixtures.filterd import VIRUS_MARKER, BadMilter, ClamavMilter, OpenDKIM, PyMilter, Rspamd
from fixtures.testnet import TestNet
from postgate import config
from postgate.check import check_filters
from postgate.filtering import build_filters

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body: str, subject: str = "Hello", sender: str = "alice@own.test") -> bytes:
    return (f"From: Alice <{sender}>\r\nTo: Bob <bob@dane-ok.test>\r\nSubject: {subject}\r\n"
            f"Date: Wed, 02 Dec 2026 00:00:00 +0000\r\nMessage-ID: <{abs(hash(body))}@own.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n{body}\r\n").encode()


@dataclass
class Session:
    """What the chain answered at each stage, and the message as it would be queued."""

    outcomes: dict[str, Outcome] = field(default_factory=dict)
    rcpt: list[Outcome] = field(default_factory=list)
    message: bytes = b""
    sender: str = ""
    recipients: list[str] = field(default_factory=list)

    @property
    def final(self) -> Outcome:
        return self.outcomes[list(self.outcomes)[-1]]


async def drive(filters: Sequence[Filter], msg: bytes, sender: str = "alice@own.test",
                rcpts: Sequence[str] = ("bob@dane-ok.test",), client: str = "192.0.2.10",
                auth_user: str | None = None, chain: FilterChain | None = None) -> Session:
    """One SMTP session through the chain, as the smtpd drives it; stops at the first refused stage."""
    chain = chain or FilterChain(filters)
    ctx = StageContext(Stage.CONNECT, "mx", client, client_port=40000, hostname="mx.own.test",
                       local_address="127.0.2.1", local_port=25, tls_version="TLSv1.3",
                       tls_cipher="TLS_AES_256_GCM_SHA384", tls_bits=256, auth_user=auth_user,
                       auth_method="PLAIN" if auth_user else None)
    s = Session(sender=sender)
    try:
        for stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL):
            ctx.stage = stage
            if stage is Stage.HELO:
                ctx.helo, ctx.esmtp = "client.example", True
            if stage is Stage.MAIL:
                ctx.sender, ctx.queue_id, ctx.mail_params = sender, "4F1A2B3C4D", {"BODY": "8BITMIME"}
            out = await chain.on(ctx)
            s.outcomes[stage.value] = out
            if out.verdict.final:
                return s
        ctx.stage = Stage.RCPT
        for r in rcpts:
            ctx.recipient = r
            out = await chain.on(ctx)
            s.rcpt.append(out)
            s.outcomes["rcpt"] = out
            if not out.verdict.final:
                ctx.recipients.append(r)
        ctx.recipient = None
        if not ctx.recipients:
            return s
        ctx.stage, ctx.message, ctx.size = Stage.DATA, msg, len(msg)
        out = await chain.on(ctx)
        s.outcomes["data"] = out
        edits = [h for v in out.edits for h in v.headers]
        body = next((v.new_body for v in reversed(out.edits) if v.new_body is not None), None)
        s.message = apply_header_edits(msg, edits, body)
        s.recipients = list(ctx.recipients)
        for v in out.edits:
            s.sender = v.new_sender if v.new_sender is not None else s.sender
            s.recipients = [r for r in s.recipients if r not in v.remove_recipients] + list(v.add_recipients)
        return s
    finally:
        await chain.reset()
        await chain.close()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def milter(d: object, name: str = "m", default: Action = Action.TEMPFAIL, timeout: float = 20.0) -> MilterFilter:
    return MilterFilter(MilterSettings(name, d.address, connect_timeout=timeout,  # type: ignore[attr-defined]
                                       command_timeout=timeout, content_timeout=timeout, default_action=default))


# --- real milters ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rspamd(testnet: TestNet) -> Iterator[Rspamd]:
    d = Rspamd().start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def opendkim(testnet: TestNet) -> Iterator[OpenDKIM]:
    d = OpenDKIM(testnet.dkim_dir / "own.test" / "s1.private", "own.test", "s1").start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def clamav(testnet: TestNet) -> Iterator[ClamavMilter]:
    d = ClamavMilter().start()
    yield d
    d.stop()


def test_rspamd_rejects_gtube_in_the_session(rspamd: Rspamd) -> None:
    s = run(drive([milter(rspamd, "rspamd")], message(GTUBE, "spam")))
    v = s.outcomes["data"].verdict
    assert v.action is Action.REJECT and v.reply is not None and v.reply.code // 100 == 5, v
    assert v.filter == "rspamd"


def test_rspamd_accepts_clean_mail_with_its_headers(rspamd: Rspamd) -> None:
    s = run(drive([milter(rspamd, "rspamd")], message("Hi Bob,\r\n\r\nlunch at noon?\r\n\r\nAlice")))
    v = s.outcomes["data"].verdict
    assert not v.final, v
    headers = email.message_from_bytes(s.message)
    assert headers["X-Spamd-Result"] and "default:" in headers["X-Spamd-Result"], s.message[:600]
    assert headers["X-Rspamd-Queue-Id"] == "4F1A2B3C4D"      # the i macro reached rspamd
    assert s.message.endswith(b"lunch at noon?\r\n\r\nAlice\r\n")


def _dnsfunc(net: TestNet):  # type: ignore[no-untyped-def]
    def f(name: bytes, timeout: int = 5) -> bytes:
        r = dns.query.udp(dns.message.make_query(name.decode(), "TXT"), net.resolver, timeout=5)
        return b"".join(s for rr in r.answer for rd in rr for s in rd.strings)
    return f


def _verifies(msg: bytes, net: TestNet) -> bool:
    try:
        return bool(dkimpy.DKIM(msg).verify(dnsfunc=_dnsfunc(net)))
    except dkimpy.DKIMException:
        return False


def test_opendkim_signs_and_the_signature_verifies(opendkim: OpenDKIM, testnet: TestNet) -> None:
    msg = message("A signed message.\r\nSecond line.\r\n", "Signed\r\n folded subject")
    s = run(drive([milter(opendkim, "opendkim")], msg))
    assert not s.outcomes["data"].verdict.final
    edits = [h for v in s.outcomes["data"].edits for h in v.headers]
    assert [e.name for e in edits] == ["DKIM-Signature"], edits
    assert s.message.startswith(b"DKIM-Signature:")
    assert "d=own.test" in edits[0].value and "s=s1" in edits[0].value
    assert _verifies(s.message, testnet)
    # the signature covers what was sent: a changed body fails
    assert not _verifies(s.message.replace(b"Second line", b"Second lime"), testnet)


def test_clamav_milter_rejects_a_matching_attachment(clamav: ClamavMilter) -> None:
    import base64
    att = base64.encodebytes(b"header " + VIRUS_MARKER + b" trailer").decode().replace("\n", "\r\n")
    body = ("--b1\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--b1\r\n"
            "Content-Type: application/octet-stream; name=x.bin\r\nContent-Transfer-Encoding: base64\r\n"
            f"Content-Disposition: attachment; filename=x.bin\r\n\r\n{att}--b1--\r\n")
    msg = message(body).replace(b"Content-Type: text/plain\r\n\r\n", b'Content-Type: multipart/mixed; boundary="b1"'
                                b"\r\n\r\n", 1)
    s = run(drive([milter(clamav, "clamav")], msg))
    v = s.outcomes["data"].verdict
    assert v.action is Action.REJECT and v.reply is not None and v.reply.code // 100 == 5, v
    assert "Postgate.Test.Marker" in v.reply.text
    clean = run(drive([milter(clamav, "clamav")], message("nothing to see")))
    assert not clean.outcomes["data"].verdict.final
    assert b"X-Virus-Status: Clean" in clean.message


def test_chain_of_real_milters_rspamd_then_opendkim(rspamd: Rspamd, opendkim: OpenDKIM, testnet: TestNet) -> None:
    """Several milters in a chain: both see the message, both edits land, in the chain's order."""
    s = run(drive([milter(rspamd, "rspamd"), milter(opendkim, "opendkim")], message("chained")))
    assert [v.filter for v in s.outcomes["data"].edits] == ["rspamd", "opendkim"]
    assert b"X-Spamd-Result" in s.message and b"DKIM-Signature" in s.message
    spam = run(drive([milter(rspamd, "rspamd"), milter(opendkim, "opendkim")], message(GTUBE)))
    assert spam.outcomes["data"].verdict.filter == "rspamd"      # the chain stops at the reject


# --- every reply and modification, against libmilter (python3-milter) ------------------------------
def scripted(script: dict[str, object]) -> Iterator[PyMilter]:
    d = PyMilter().start(script)
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def pymilter(request: pytest.FixtureRequest, testnet: TestNet) -> Iterator[PyMilter]:
    yield from scripted(request.param)


MODS = {"eom": {"action": "continue", "mods": [
    ["progress"],
    ["addheader", "X-Added", "yes"],
    ["insheader", "X-First", "top", 0],
    ["chgheader", "Subject", 1, "Changed"],
    ["chgheader", "X-Remove", 1, ""],
    ["chgfrom", "<new@own.test>"],
    ["addrcpt", "<carol@dane-ok.test>"],
    ["delrcpt", "<bob@dane-ok.test>"],
    ["replbody", "new body\r\n"],
]}}

# (script, expected stage, action, reply or None, libmilter call)
REPLIES = [
    ({"envfrom": "reject"}, "mail", Action.REJECT, Reply(550, "5.7.1", "Command rejected"), "SMFIR_REJECT"),
    ({"envrcpt": "tempfail"}, "rcpt", Action.TEMPFAIL, Reply(451, "4.7.1", "Service unavailable - try again later"),
     "SMFIR_TEMPFAIL"),
    ({"eom": {"action": "reject", "reply": ["554", "5.7.0", "first line", "second line"]}}, "data", Action.REJECT,
     Reply(554, "5.7.0", "first line\nsecond line"), "smfi_setmlreply"),
    ({"envrcpt": {"action": "tempfail", "reply": ["452", "4.2.2", "mailbox full"]}}, "rcpt", Action.TEMPFAIL,
     Reply(452, "4.2.2", "mailbox full"), "smfi_setreply 4xx"),
    ({"eom": "discard"}, "data", Action.DISCARD, None, "SMFIR_DISCARD"),
    ({"header": "accept"}, "data", Action.CONTINUE, None, "SMFIR_ACCEPT during the header"),
    ({"eom": {"action": "accept", "mods": [["quarantine", "looks odd"]]}}, "data", Action.CONTINUE, None,
     "smfi_quarantine → HOLD"),
    ({"helo": "reject"}, "helo", Action.REJECT, Reply(550, "5.7.1", "Command rejected"), "reject at HELO"),
]


@pytest.mark.parametrize("script,stage,action,reply,what", REPLIES, ids=[r[4] for r in REPLIES])
def test_replies_from_libmilter(testnet: TestNet, script: dict[str, object], stage: str, action: Action,
                                reply: Reply | None, what: str) -> None:
    for d in scripted(script):
        s = run(drive([milter(d)], message("hello")))
        v = s.final.verdict
        assert list(s.outcomes)[-1] == stage, (what, s.outcomes.keys())
        assert v.action is action, (what, v)     # the chain's answer: ACCEPT and HOLD are not final
        if reply is not None:
            assert v.reply == reply, (what, v.reply)
        stages = [e["stage"] for e in d.seen()]
        if "accept" in what.lower():
            assert "eom" not in stages and "body" not in stages     # accepted: nothing more is sent
        if "quarantine" in what:
            hold = s.outcomes["data"].hold
            assert hold is not None and hold.action is Action.HOLD and hold.quarantine_reason == "looks odd"


@pytest.mark.parametrize("pymilter", [MODS], indirect=True)
def test_modifications_from_libmilter(pymilter: PyMilter) -> None:
    msg = message("old body").replace(b"Subject: Hello\r\n", b"Subject: Hello\r\nX-Remove: me\r\n")
    s = run(drive([milter(pymilter)], msg, rcpts=("bob@dane-ok.test", "dave@dane-ok.test")))
    assert not s.outcomes["data"].verdict.final
    m = email.message_from_bytes(s.message)
    assert next(iter(m.keys())) == "X-First" and m["X-First"] == "top"
    assert m["X-Added"] == "yes" and m["Subject"] == "Changed" and "X-Remove" not in m
    assert s.message.endswith(b"\r\n\r\nnew body\r\n")
    assert s.sender == "new@own.test"
    assert s.recipients == ["dave@dane-ok.test", "carol@dane-ok.test"]


@pytest.mark.parametrize("pymilter", [{"body": "skip"}], indirect=True)
def test_macros_and_arguments_as_postfix_sends_them(pymilter: PyMilter) -> None:
    big = "x" * 200 + "\r\n"
    body = big * 700                                 # 141 KB: three body chunks of at most 65535 octets
    s = run(drive([milter(pymilter)], message(body), auth_user="alice"))
    assert not s.outcomes["data"].verdict.final
    seen = pymilter.seen()
    stages = [e["stage"] for e in seen]
    assert stages[:3] == ["helo", "envfrom", "envrcpt"] or stages[:3] == ["connect", "helo", "envfrom"]
    by = {e["stage"]: e for e in seen}
    assert by["envfrom"]["args"][0] == "<alice@own.test>" and "BODY=8BITMIME" in by["envfrom"]["args"]
    macros = {k: v for e in seen for k, v in e["macros"].items()}   # type: ignore[union-attr]
    assert macros["j"] == "mx.own.test" and macros["{daemon_name}"] == "mx"
    assert macros["{client_addr}"] == "192.0.2.10" and macros["{client_name}"] == "[192.0.2.10]"
    assert macros["i"] == "4F1A2B3C4D" and macros["{auth_authen}"] == "alice"
    assert macros["{tls_version}"] == "TLSv1.3" and macros["{cipher}"] == "TLS_AES_256_GCM_SHA384"
    assert macros["{mail_addr}"] == "alice@own.test" and macros["{rcpt_addr}"] == "bob@dane-ok.test"
    bodies = [e for e in seen if e["stage"] == "body"]
    assert len(bodies) == 1 and int(bodies[0]["args"][0]) <= 65535   # SMFIR_SKIP: no more chunks sent
    assert stages[-1] == "eom"


# --- milters that fail: the default action, a log line, the session goes on ------------------------
FAILURES = [("hang", "O"), ("hang", "M"), ("hang", "E"), ("crash", "O"), ("crash", "R"), ("crash", "E"),
            ("garbage", "O"), ("garbage", "H"), ("garbage", "L")]
STAGE_OF = {"O": "connect", "M": "mail", "E": "data", "R": "rcpt", "H": "helo", "L": "data"}


@pytest.mark.parametrize("mode,at", FAILURES, ids=[f"{m}-at-{a}" for m, a in FAILURES])
def test_broken_milter_gets_the_default_action(testnet: TestNet, caplog: pytest.LogCaptureFixture,
                                               mode: str, at: str) -> None:
    bad = BadMilter(mode, at).start()
    try:
        caplog.set_level(logging.WARNING, "postgate.filters")
        # tempfail (Postfix's default): this and every later stage of the session get a 4xx
        s = run(drive([milter(bad, "bad", Action.TEMPFAIL, timeout=0.5)], message("hi")))
        v = s.final.verdict
        assert list(s.outcomes)[-1] == STAGE_OF[at] and v.action is Action.TEMPFAIL, (s.outcomes.keys(), v)
        assert v.reply is not None and v.reply.code // 100 == 4
        assert any(f"filter bad failed at {STAGE_OF[at]}" in r.getMessage() and "default action tempfail"
                   in r.getMessage() for r in caplog.records), caplog.text
        # accept: the session goes on as if the milter were not there; the message is accepted
        s = run(drive([milter(bad, "bad", Action.ACCEPT, timeout=0.5)], message("hi")))
        assert "data" in s.outcomes and not s.outcomes["data"].verdict.final
        assert s.message == message("hi")
        # reject
        s = run(drive([milter(bad, "bad", Action.REJECT, timeout=0.5)], message("hi")))
        assert s.final.verdict.action is Action.REJECT and s.final.verdict.reply.code // 100 == 5  # type: ignore
    finally:
        bad.stop()


def test_unreachable_milter_default_accept_and_the_next_filter_still_judges(rspamd: Rspamd) -> None:
    gone = MilterFilter(MilterSettings("gone", "inet:127.0.0.1:1", connect_timeout=1,
                                       default_action=Action.ACCEPT))
    s = run(drive([gone, milter(rspamd, "rspamd")], message(GTUBE)))
    assert s.outcomes["data"].verdict.action is Action.REJECT and s.outcomes["data"].verdict.filter == "rspamd"


def test_unix_socket_milter(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> None:
    d = PyMilter()
    path = d.dir / "milter.sock"
    import json
    (d.dir / "scripted_milter.py").write_text(__import__("fixtures.filterd", fromlist=["x"]).PYMILTER_SCRIPT)
    (d.dir / "script.json").write_text(json.dumps({"eom": {"action": "reject", "reply": ["550", "5.7.1", "no"]}}))
    d.seen_file = d.dir / "seen.jsonl"
    d.spawn(["/usr/bin/python3", str(d.dir / "scripted_milter.py"), f"unix:{path}", str(d.dir / "script.json"),
             str(d.seen_file)])
    try:
        import time
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        f = MilterFilter(MilterSettings("unix", f"unix:{path}"))
        s = run(drive([f], message("x")))
        assert s.outcomes["data"].verdict.reply == Reply(550, "5.7.1", "no")
    finally:
        d.stop()


# --- pure parts -------------------------------------------------------------------------------------
@pytest.mark.parametrize("address,parsed", [
    ("inet:127.0.0.1:11332", ("inet", "127.0.0.1", 11332)),
    ("inet:11332@127.0.0.1", ("inet", "127.0.0.1", 11332)),
    ("inet:[::1]:8891", ("inet", "::1", 8891)),
    ("inet6:8891@::1", ("inet", "::1", 8891)),
    ("unix:/run/milter.sock", ("unix", "/run/milter.sock", 0)),
    ("local:/run/milter.sock", ("unix", "/run/milter.sock", 0)),
])
def test_addresses(address: str, parsed: tuple[str, str, int]) -> None:
    assert parse_address(address) == parsed


@pytest.mark.parametrize("bad", ["127.0.0.1:25", "inet:host", "inet:host:0", "unix:relative", "tcp:h:1"])
def test_bad_addresses(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_address(bad)


def test_replycode_multiline() -> None:
    assert parse_replycode("550-5.7.1 one\r\n550 5.7.1 two") == Reply(550, "5.7.1", "one\ntwo")
    assert parse_replycode("451 try later") == Reply(451, "", "try later")


def test_header_edit_values_get_crlf_folding() -> None:
    out = apply_header_edits(b"A: 1\r\n\r\nb\r\n", [HeaderEdit(HeaderOp.ADD, "X", "a\r\n\tb")])
    assert out == b"A: 1\r\nX: a\r\n\tb\r\n\r\nb\r\n"


# --- configuration, build_filters, postgate check ---------------------------------------------------
CONFIG = """\
[[listener]]
name = "mx"
address = "127.0.0.1:2525"
tls = "none"

[[listener]]
name = "submission"
address = "127.0.0.1:2587"
tls = "none"

[[milter]]
name = "rspamd"
address = "inet:127.0.0.1:11332"
default_action = "accept"

[[milter]]
name = "opendkim"
address = "unix:/run/opendkim/opendkim.sock"
listeners = ["submission"]
content_timeout = 60

[[policy_service]]
name = "postgrey"
address = "inet:127.0.0.1:10023"
listeners = ["mx"]
stages = ["rcpt"]
timeout = 10
"""


def test_config_and_filters_per_listener(tmp_path: Path) -> None:
    p = tmp_path / "postgate.toml"
    p.write_text(CONFIG)
    cfg = config.load(p)
    assert [m.name for m in cfg.milter] == ["rspamd", "opendkim"]
    assert cfg.milter[1].content_timeout == 60.0 and cfg.policy_service[0].stages == ["rcpt"]
    # Postfix's order: policy services (smtpd restrictions) first, then the milters
    assert [f.name for f in build_filters(cfg, "mx")] == ["postgrey", "rspamd"]
    assert [f.name for f in build_filters(cfg, "submission")] == ["rspamd", "opendkim"]
    mx = build_filters(cfg, "mx")
    assert mx[1].default_action is Action.ACCEPT
    assert isinstance(mx[0], PolicyService) and mx[0].settings.stages == (Stage.RCPT,)


CONFIG_ERRORS = [
    ('address = "inet:127.0.0.1:11332"', 'address = "127.0.0.1:11332"', 13, "[[milter]] #1 address"),
    ('default_action = "accept"', 'default_action = "continue"', 14, "default_action: 'continue'"),
    ('listeners = ["submission"]', 'listeners = ["relay"]', 19, "no listener named 'relay'"),
    ('stages = ["rcpt"]', 'stages = ["rcpt", "eom"]', 26, "'eom' is not one of"),
    ("timeout = 10", "timeout = 0", 27, "[[policy_service]] #1 timeout"),
    ("content_timeout = 60", "content_timout = 60", 20, "unknown key 'content_timout'"),
    ('stages = ["rcpt"]', 'stages = ["rcpt"]\ndefault_action = "MAYBE"', 27, "not an access(5) action"),
]


@pytest.mark.parametrize("old,new,line,msg", CONFIG_ERRORS, ids=[e[3] for e in CONFIG_ERRORS])
def test_config_errors_name_file_and_line(tmp_path: Path, old: str, new: str, line: int, msg: str) -> None:
    p = tmp_path / "postgate.toml"
    p.write_text(CONFIG.replace(old, new))
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert str(e.value).startswith(f"{p}:{line}: "), str(e.value)
    assert msg in str(e.value)


def test_check_reports_unreachable_filters(testnet: TestNet, tmp_path: Path) -> None:
    good = BadMilter("hang", at="X").start()           # never reaches "X": a well-behaved milter
    try:
        p = tmp_path / "postgate.toml"
        p.write_text(f"""
[[milter]]
name = "good"
address = "{good.address}"

[[milter]]
name = "down"
address = "inet:127.0.0.1:1"

[[policy_service]]
name = "optional"
address = "unix:{tmp_path}/nothing.sock"
default_action = "DUNNO"
""")
        results = asyncio.run(check_filters(config.load(p)))
        by = {r.message.split(" ")[1]: r for r in results}
        assert by["good"].status == "PASS"
        assert by["down"].status == "WARN" and "tempfail" in by["down"].message and by["down"].fix
        assert results[2].status == "WARN" and "passes unfiltered" in results[2].message
    finally:
        good.stop()
