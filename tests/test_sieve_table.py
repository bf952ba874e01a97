"""Table test: scripts × sessions × stages → stage verdicts, one row per rule with its RFC section.

Each row runs the global script (and, where given, a listener script) through the real adapter
(``inbound/sieve_filter.evaluate``) for one stage of one session, and checks the verdict the smtpd acts on:
action, reply, header edits, recipient changes and routes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from postgate.inbound.filters import Action, HeaderEdit, HeaderOp, Route, Stage, StageContext, Verdict
from postgate.inbound.sieve_filter import SieveScripts, SieveSettings, evaluate
from postgate.policy.sieve import Limits

MESSAGE = (b"From: Alice <alice@example.com>\r\n"
           b"To: bob@bank.example\r\n"
           b"Subject: Invoice 42\r\n"
           b"Date: Tue, 01 Dec 2026 23:15:42 +0100\r\n"
           b"X-Spam-Score: 11.5 / 15\r\n"
           b"X-Virus-Status: Infected (Eicar-Test-Signature)\r\n"
           b"\r\n"
           b"Please pay the attached invoice.\r\n")


def session(stage: Stage, **kw: Any) -> StageContext:
    """One SMTP session, filled up to ``stage`` as the smtpd fills it."""
    base: dict[str, Any] = dict(stage=stage, listener="mx", client_address="203.0.113.5", client_port=40000,
                                client_name="mail.sender.example", hostname="mx.postgate.example")
    order = [Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA]
    if order.index(stage) >= 1:
        base.update(helo="mail.sender.example", esmtp=True)
    if order.index(stage) >= 2:
        base.update(sender="alice@example.com", mail_params={"SIZE": "2048"})
    if stage is Stage.RCPT:
        base.update(recipient="bob@bank.example", recipients=["carol@other.example"])
    if stage is Stage.DATA:
        base.update(recipients=["bob@bank.example", "carol@other.example"], message=MESSAGE, size=len(MESSAGE))
    base.update(kw)
    return StageContext(**base)


@dataclass
class Row:
    rfc: str
    script: str
    stage: Stage
    action: Action
    code: int | None = None
    enhanced: str | None = None
    ctx: dict[str, Any] = field(default_factory=dict)
    headers: tuple[HeaderEdit, ...] | None = None
    add: tuple[str, ...] | None = None
    remove: tuple[str, ...] | None = None
    routes: tuple[Route, ...] | None = None
    listener_script: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    text: str | None = None


ROWS = [
    # --- RFC 5183 environment, at each stage -----------------------------------------------------------
    Row("RFC 5183 §4.1 remote-ip at connect; RFC 5321 §3.1 554 at the greeting",
        'require ["environment","reject"]; if environment :matches "remote-ip" "203.0.113.*" { reject "blocked"; }',
        Stage.CONNECT, Action.REJECT, 554, "5.7.1", text="blocked"),
    Row("RFC 5183 §4.1 remote-host (verified client name)",
        'require ["environment","vnd.postgate"]; if environment :matches "remote-host" "*.sender.example" { defer "slow down"; }',
        Stage.CONNECT, Action.TEMPFAIL, 451, "4.7.1"),
    Row("RFC 5183 §4.1: an unavailable item (remote-host of an unknown client) never matches",
        'require ["environment","reject"]; if environment :matches "remote-host" "*" { reject "x"; }',
        Stage.CONNECT, Action.CONTINUE, ctx={"client_name": "unknown"}),
    Row("RFC 5183 §4.1 phase is pre (before delivery); location MTA",
        'require ["environment","reject"]; if allof (environment "phase" "pre", environment "location" "MTA", '
        'environment "host" "mx.postgate.example", environment "domain" "postgate.example", '
        'environment "name" "Postgate") { reject "env ok"; }',
        Stage.CONNECT, Action.REJECT, 554),
    Row("vnd.postgate.stage gates a rule to EHLO (docs/sieve.md)",
        'require ["environment","reject"]; if allof (environment "vnd.postgate.stage" "ehlo", '
        'environment :contains "vnd.postgate.helo" "sender") { reject "bad helo"; }',
        Stage.HELO, Action.REJECT, 550, "5.7.1"),
    Row("vnd.postgate.stage: the same script at connect has no opinion",
        'require ["environment","reject"]; if environment "vnd.postgate.stage" "ehlo" { reject "bad helo"; }',
        Stage.CONNECT, Action.CONTINUE),
    Row("vnd.postgate.tls: refuse mail over a cleartext session",
        'require ["environment","vnd.postgate"]; if allof (environment "vnd.postgate.stage" "mail", '
        'not environment "vnd.postgate.tls" "yes") { defer :status "4.7.0" "Must issue a STARTTLS first"; }',
        Stage.MAIL, Action.TEMPFAIL, 451, "4.7.0"),
    Row("vnd.postgate.tls.version with TLS: no opinion",
        'require ["environment","vnd.postgate"]; if not environment :matches "vnd.postgate.tls.version" "TLSv1.*"'
        ' { defer "tls"; }',
        Stage.MAIL, Action.CONTINUE, ctx={"tls_version": "TLSv1.3"}),
    Row("vnd.postgate.auth: the AUTH identity (RFC 4954) routes a customer via a smart host",
        'require ["environment","vnd.postgate"]; if environment "vnd.postgate.auth" "customer1" '
        '{ route "smtp:[smarthost.example]:587"; }',
        Stage.DATA, Action.CONTINUE, ctx={"auth_user": "customer1"},
        routes=(Route((), transport="smtp:[smarthost.example]:587"),)),
    # --- RFC 5228 core, envelope -------------------------------------------------------------------------
    Row("RFC 5228 §5.4 envelope from at MAIL",
        'require ["envelope","reject"]; if envelope :domain :is "from" "example.com" { reject "not you"; }',
        Stage.MAIL, Action.REJECT, 550, "5.7.1"),
    Row("RFC 5228 §5.4: the null reverse-path is the empty string",
        'require ["envelope","reject"]; if envelope :all :is "from" "" { reject "no bounces here"; }',
        Stage.MAIL, Action.REJECT, 550, ctx={"sender": ""}),
    Row("RFC 5228 §5.4 envelope to at RCPT is the recipient being judged",
        'require ["envelope","reject"]; if envelope :domain "to" "other.example" { reject "no"; }',
        Stage.RCPT, Action.CONTINUE),
    Row("RFC 5429 §2.1: reject at RCPT refuses that recipient in the session",
        'require ["envelope","reject"]; if envelope :localpart "to" "bob" { reject "no such user"; }',
        Stage.RCPT, Action.REJECT, 550, "5.7.1", text="no such user"),
    Row("RFC 5429 §2.1 ereject at DATA: 5xx before the 250, no bounce",
        'require "ereject"; if header :contains "subject" "invoice" { ereject "no invoices"; }',
        Stage.DATA, Action.REJECT, 550, "5.7.1"),
    Row("RFC 5429 §2.2: multi-line reject text becomes a multi-line reply",
        'require "reject"; reject text:\nline one\nline two\n.\n;',
        Stage.DATA, Action.REJECT, 550, text="line one\nline two"),
    Row("RFC 5228 §2.10.2: no action is the implicit keep — no opinion",
        'if header :contains "subject" "nothing" { discard; }', Stage.DATA, Action.CONTINUE),
    Row("RFC 5228 §4.4 discard: accepted and dropped",
        'if header :contains "subject" "invoice" { discard; }', Stage.DATA, Action.DISCARD),
    Row("RFC 5228 §4.3: keep after discard keeps the message",
        'discard; keep;', Stage.DATA, Action.CONTINUE),
    Row("RFC 5228 §3.3 stop ends the script",
        'require "reject"; stop; reject "never";', Stage.DATA, Action.CONTINUE),
    Row("RFC 5228 §3.1 elsif/else chain",
        'require "reject"; if false { reject "a"; } elsif header :is "subject" "Invoice 42" { reject "b"; } '
        'else { reject "c"; }', Stage.DATA, Action.REJECT, text="b"),
    Row("RFC 5228 §5.9 size at MAIL uses the SIZE parameter (RFC 1870)",
        'require "reject"; if size :over 1K { reject "too big"; }', Stage.MAIL, Action.REJECT, 550),
    Row("RFC 5228 §4.2 redirect at DATA replaces the recipients",
        'redirect "archive@example.net";', Stage.DATA, Action.CONTINUE,
        add=("archive@example.net",), remove=("bob@bank.example", "carol@other.example"),
        headers=(HeaderEdit(HeaderOp.INSERT, "X-Postgate-Redirected", "<archive@example.net>; "
                            "by=mx.postgate.example", 0),)),
    Row("RFC 5228 §4.2 loop control: a message already redirected to that address is not redirected again",
        'redirect "archive@example.net";', Stage.DATA, Action.TEMPFAIL, 451,
        ctx={"message": b"X-Postgate-Redirected: <archive@example.net>; by=mx.other.example\r\n" + MESSAGE}),
    Row("RFC 5293 §7: the redirect mark cannot be deleted by a script",
        'require "editheader"; deleteheader "X-Postgate-Redirected";', Stage.DATA, Action.CONTINUE,
        ctx={"message": b"X-Postgate-Redirected: <a@b.example>; by=x\r\n" + MESSAGE}, headers=()),
    Row("RFC 3894 redirect :copy adds a recipient",
        'require "copy"; redirect :copy "archive@example.net";', Stage.DATA, Action.CONTINUE,
        add=("archive@example.net",), remove=()),
    Row("RFC 5228 §4.2 redirect at RCPT replaces that recipient only",
        'redirect "bob@internal.example";', Stage.RCPT, Action.CONTINUE,
        add=("bob@internal.example",), remove=("bob@bank.example",)),
    Row("redirect loop (target already a recipient) refused → default action tempfail",
        'redirect "carol@other.example";', Stage.DATA, Action.TEMPFAIL, 451, "4.7.1"),
    Row("RFC 5228 §4.2: redirect limit → default action",
        'redirect "a@x.example"; redirect "b@x.example"; redirect "c@x.example";', Stage.DATA, Action.TEMPFAIL,
        451, settings={"limits": Limits(max_redirects=2)}),
    Row("RFC 5429 §2.2: reject with fileinto is a run-time error → default action (tempfail)",
        'require ["reject","fileinto"]; fileinto "X"; reject "no";', Stage.DATA, Action.TEMPFAIL, 451),
    Row("run-time error with default_action reject",
        'require ["reject","fileinto"]; fileinto "X"; reject "no";', Stage.DATA, Action.REJECT, 550,
        settings={"default_action": Action.REJECT}),
    Row("run-time error with default_action accept: no opinion",
        'require ["reject","fileinto"]; fileinto "X"; reject "no";', Stage.DATA, Action.CONTINUE,
        settings={"default_action": Action.ACCEPT}),
    Row("instruction limit exceeded → default action",
        'if anyof (false, false, false, false, false, false, false, false, false, false) { discard; }',
        Stage.DATA, Action.TEMPFAIL, 451, settings={"limits": Limits(max_instructions=5)}),
    Row("fileinto \"hold\" holds the message in the queue",
        'require "fileinto"; fileinto "hold";', Stage.DATA, Action.HOLD),
    Row("fileinto a folder: X-Postgate-Fileinto for local delivery",
        'require "fileinto"; fileinto "Invoices";', Stage.DATA, Action.CONTINUE,
        headers=(HeaderEdit(HeaderOp.ADD, "X-Postgate-Fileinto", "Invoices"),)),
    # --- RFC 5293 editheader ------------------------------------------------------------------------------
    Row("RFC 5293 §4 addheader: at the top; :last at the end",
        'require "editheader"; addheader "X-First" "1"; addheader :last "X-Last" "2";', Stage.DATA,
        Action.CONTINUE, headers=(HeaderEdit(HeaderOp.INSERT, "X-First", "1", 0),
                                  HeaderEdit(HeaderOp.ADD, "X-Last", "2"))),
    Row("RFC 5293 §5 deleteheader by pattern",
        'require "editheader"; deleteheader :matches "x-spam-score" "*/*";', Stage.DATA, Action.CONTINUE,
        headers=(HeaderEdit(HeaderOp.DELETE, "x-spam-score", "", 1),)),
    Row("RFC 5293 §4: no field injection through line breaks; non-ASCII as RFC 2047 encoded words",
        'require ["editheader","variables"]; set "v" "a\r\nBcc: victim@example.net"; addheader "X-A" "${v}"; '
        'addheader :last "X-U" "Grüße";', Stage.DATA, Action.CONTINUE,
        headers=(HeaderEdit(HeaderOp.INSERT, "X-A", "a Bcc: victim@example.net", 0),
                 HeaderEdit(HeaderOp.ADD, "X-U", "=?utf-8?b?R3LDvMOfZQ==?="))),
    Row("RFC 5293 §4: a field name from a variable is checked at run time",
        'require ["editheader","variables"]; set "n" "Bad Name:"; addheader "${n}" "x";', Stage.DATA,
        Action.TEMPFAIL, 451),
    Row("route: a transport from a variable must be transport-map syntax",
        'require ["vnd.postgate","variables"]; set "t" "smtp:[relay"; route "${t}";', Stage.DATA,
        Action.TEMPFAIL, 451),
    Row("RFC 5293 §7: Received stays protected",
        'require "editheader"; deleteheader "Received"; addheader "Received" "forged";', Stage.DATA,
        Action.CONTINUE, headers=()),
    Row("RFC 5293: editheader before DATA has nothing to edit",
        'require "editheader"; addheader "X-A" "1";', Stage.RCPT, Action.CONTINUE, headers=()),
    # --- RFC 5235 spamtest/virustest, RFC 5173 body, RFC 6134 lists -------------------------------------
    Row("RFC 5235 §3.1 spamtest from X-Spam-Score 11.5/15 → 8",
        'require ["spamtest","relational","comparator-i;ascii-numeric","reject"]; '
        'if spamtest :value "ge" :comparator "i;ascii-numeric" "8" { reject "spam"; }',
        Stage.DATA, Action.REJECT, 550),
    Row("RFC 5235 §3.1: the last X-Spam-Score counts (the filter's, appended after a forged copy)",
        'require ["spamtest","relational","comparator-i;ascii-numeric","reject"]; '
        'if spamtest :value "ge" :comparator "i;ascii-numeric" "8" { reject "spam"; }',
        Stage.DATA, Action.REJECT, 550,
        ctx={"message": b"X-Spam-Score: 0\r\nSubject: x\r\nX-Spam-Score: 14\r\n\r\nbody\r\n"}),
    Row("RFC 5235 §3.2 spamtestplus :percent 11.5/15 → 77",
        'require ["spamtestplus","relational","comparator-i;ascii-numeric","vnd.postgate"]; '
        'if spamtest :percent :value "eq" :comparator "i;ascii-numeric" "77" { hold "77%"; }',
        Stage.DATA, Action.HOLD),
    Row("RFC 5235 §3.1: no spam header at DATA is 0, untested",
        'require ["spamtest","reject"]; if spamtest "0" { reject "untested"; }', Stage.DATA, Action.REJECT,
        ctx={"message": b"Subject: x\r\n\r\nbody\r\n"}),
    Row("three-valued tests: before DATA a spamtest is unknown, the chain (else too) is undecided",
        'require ["spamtest","reject"]; if spamtest "0" { reject "a"; } else { reject "b"; }', Stage.RCPT,
        Action.CONTINUE),
    Row("three-valued tests: 'not exists' before DATA is unknown, not true",
        'require "reject"; if not exists "Date" { reject "no date"; }', Stage.CONNECT, Action.CONTINUE),
    Row("three-valued tests: anyof(true, unknown) is true; allof(false, unknown) false",
        'require ["reject","environment"]; if allof (false, exists "x") { reject "a"; } '
        'elsif anyof (environment "vnd.postgate.stage" "mail", header "subject" "x") { reject "b"; }',
        Stage.MAIL, Action.REJECT, 550, text="b"),
    Row("three-valued tests: envelope to before RCPT is unknown; size without SIZE= is unknown",
        'require ["reject","envelope"]; if envelope :all "to" "" { reject "a"; } '
        'if not size :over 0 { reject "b"; }', Stage.MAIL, Action.CONTINUE, ctx={"mail_params": {}}),
    Row("RFC 5235 §3.2 virustest: Infected → 5",
        'require ["virustest","relational","comparator-i;ascii-numeric","reject"]; '
        'if virustest :value "ge" :comparator "i;ascii-numeric" "4" { reject "virus"; }',
        Stage.DATA, Action.REJECT, 550),
    Row("RFC 5173 §5 body :contains at DATA",
        'require ["body","vnd.postgate"]; if body :contains "pay the attached" { hold "invoice fraud?"; }',
        Stage.DATA, Action.HOLD),
    Row("RFC 6134 §2.2 :list lookup in a Postfix-syntax table (domain key)",
        'require ["extlists","envelope","reject"]; if envelope :list "from" "blocked" { reject "listed"; }',
        Stage.MAIL, Action.REJECT, 550, settings={"lists": {"blocked": "LIST"}}),
    Row("RFC 6134 §2.5 valid_ext_list",
        'require ["extlists","reject"]; if not valid_ext_list "nosuchlist" { reject "no list"; }',
        Stage.CONNECT, Action.REJECT, 554, settings={"lists": {"blocked": "LIST"}}),
    # --- vnd.postgate actions ----------------------------------------------------------------------------
    Row("tls_policy for one destination at RCPT",
        'require ["vnd.postgate","envelope"]; if envelope :domain "to" "bank.example" { tls_policy "dane-only"; }',
        Stage.RCPT, Action.CONTINUE, routes=(Route(("bob@bank.example",), tls_level="dane-only"),)),
    Row("tls_policy :recipients at DATA names the recipients of that domain",
        'require "vnd.postgate"; tls_policy :recipients ["bank.example"] "caps-required";',
        Stage.DATA, Action.CONTINUE, routes=(Route(("bob@bank.example",), tls_level="caps-required"),)),
    Row("route :recipients, dkim_sign, queue_priority, queue_lifetime",
        'require "vnd.postgate"; route :recipients ".other.example" "smtp:[relay.example]:25"; '
        'route :recipients "other.example" "smtp:[relay.example]:587"; '
        'dkim_sign :selector "s1" "Example.COM"; queue_priority 9; queue_lifetime 3600;',
        Stage.DATA, Action.CONTINUE,
        routes=(Route((), dkim_domain="example.com", dkim_selector="s1"), Route((), priority=9),
                Route((), lifetime=3600.0),
                Route(("carol@other.example",), transport="smtp:[relay.example]:587"))),
    Row("RFC 5228 §5.4 at DATA: one evaluation per recipient, so a per-destination rule routes only the "
        "recipients it names (and the others flow as configured)",
        'require ["envelope","vnd.postgate"]; if envelope :domain "to" "bank.example" { tls_policy "dane-only"; }',
        Stage.DATA, Action.CONTINUE, routes=(Route(("bob@bank.example",), tls_level="dane-only"),)),
    Row("RFC 5228 §5.4 at DATA: discard for one recipient removes only that recipient",
        'require "envelope"; if envelope :domain "to" "other.example" { discard; }', Stage.DATA,
        Action.CONTINUE, remove=("carol@other.example",)),
    Row("at DATA: a reject for any recipient refuses the message (one reply after DATA)",
        'require ["envelope","reject"]; if envelope :domain "to" "other.example" { reject "not here"; }',
        Stage.DATA, Action.REJECT, 550, text="not here"),
    Row("hold with a reason", 'require "vnd.postgate"; hold "new sender";', Stage.MAIL, Action.HOLD),
    Row("defer with a 4xx text and status", 'require "vnd.postgate"; defer :status "4.2.1" "try later";',
        Stage.RCPT, Action.TEMPFAIL, 451, "4.2.1", text="try later"),
    # --- composition and configuration ------------------------------------------------------------------
    Row("global then listener script: edits add up, the listener's reject wins",
        'require "editheader"; addheader "X-Global" "1";', Stage.DATA, Action.REJECT, 550,
        listener_script='require "reject"; reject "listener says no";', text="listener says no"),
    Row("global script's reject ends the stage: the listener script is not run",
        'require "reject"; reject "global says no";', Stage.DATA, Action.REJECT, 550,
        listener_script='require "vnd.postgate"; defer "never";', text="global says no"),
    Row("[sieve] stages: a stage not listed is not evaluated",
        'require "reject"; reject "x";', Stage.CONNECT, Action.CONTINUE,
        settings={"stages": ("rcpt", "data")}),
]


def build(tmp: Path, row: Row) -> SieveScripts:
    g = tmp / "global.sieve"
    g.write_text(row.script)
    kw = dict(row.settings)
    listener_scripts = {}
    if row.listener_script is not None:
        (tmp / "mx.sieve").write_text(row.listener_script)
        listener_scripts["mx"] = str(tmp / "mx.sieve")
    if "lists" in kw:
        (tmp / "blocked").write_text("# blocked senders\nexample.com  REJECT\nspammer@ OK\n")
        kw["lists"] = {"blocked": str(tmp / "blocked")}
    return SieveScripts(SieveSettings(script=str(g), listener_scripts=listener_scripts,
                                      hostname="mx.postgate.example", **kw))


@pytest.mark.parametrize("row", ROWS, ids=[r.rfc for r in ROWS])
def test_table(tmp_path: Path, row: Row) -> None:
    v: Verdict = evaluate(build(tmp_path, row), session(row.stage, **row.ctx))
    assert v.action is row.action, (row.rfc, v)
    if row.code is not None:
        assert v.reply is not None and v.reply.code == row.code, v
    if row.enhanced is not None:
        assert v.reply is not None and v.reply.enhanced == row.enhanced, v
    if row.text is not None:
        assert v.reply is not None and v.reply.text == row.text, v
    if row.headers is not None:
        expected = row.headers
        if row.listener_script is None:
            assert v.headers == expected, v
    if row.add is not None:
        assert v.add_recipients == row.add, v
    if row.remove is not None:
        assert v.remove_recipients == row.remove, v
    if row.routes is not None:
        assert v.routes == row.routes, v


def test_runtime_error_is_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    row = Row("", 'redirect "carol@other.example";', Stage.DATA, Action.TEMPFAIL)
    with caplog.at_level(logging.WARNING, logger="postgate.sieve"):
        evaluate(build(tmp_path, row), session(Stage.DATA))
    assert "would loop back" in caplog.text and "default action tempfail" in caplog.text


def test_reload_keeps_old_script_on_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17 §3: SIGHUP recompiles; a script that fails to compile keeps the old one and logs why."""
    row = Row("", 'require "reject"; reject "v1";', Stage.DATA, Action.REJECT)
    holder = build(tmp_path, row)
    (tmp_path / "global.sieve").write_text('require "reject";\nreject "v2"\n')   # missing ';'
    with caplog.at_level(logging.ERROR, logger="postgate.sieve"):
        errors = holder.reload()
    assert errors and "global.sieve:3:1:" in errors[0]
    assert "keeping the previous version" in caplog.text
    v = evaluate(holder, session(Stage.DATA))
    assert v.reply is not None and v.reply.text == "v1"
    (tmp_path / "global.sieve").write_text('require "reject";\nreject "v2";\n')
    assert holder.reload() == []
    v = evaluate(holder, session(Stage.DATA))
    assert v.reply is not None and v.reply.text == "v2"
