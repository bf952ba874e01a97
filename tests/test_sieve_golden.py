"""Golden file: every script × session × stage → the verdict the smtpd acts on.

``tests/sieve_golden/stages.ref`` has one line per combination; a reviewer reads the table, not the code,
to see what the scripts do at each stage (three-valued tests: a rule on data a stage does not have yet is
undecided there). Regenerate after a deliberate change with ``POSTGATE_UPDATE_GOLDEN=1`` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from postgate.inbound.filters import Stage, StageContext, Verdict
from postgate.inbound.sieve_filter import SieveScripts, SieveSettings, evaluate

GOLDEN = Path(__file__).parent / "sieve_golden" / "stages.ref"

SCRIPTS = {
    "tls-by-destination": """require ["envelope", "vnd.postgate"];
        if envelope :domain :is "to" "bank.example" { tls_policy "dane-only"; }""",
    "spam": """require ["spamtest", "relational", "comparator-i;ascii-numeric", "reject", "vnd.postgate"];
        if spamtest :value "ge" :comparator "i;ascii-numeric" "8" { reject "spam"; }
        elsif spamtest :value "ge" :comparator "i;ascii-numeric" "4" { hold "maybe spam"; }""",
    "new-senders": """require ["envelope", "extlists", "vnd.postgate"];
        if not envelope :list "from" "known" { hold "new sender"; }""",
    "no-date": """require "reject"; if not exists "Date" { reject "no Date field (RFC 5322 §3.6)"; }""",
    "submission-auth": """require ["environment", "reject", "vnd.postgate"];
        if environment "vnd.postgate.stage" "mail" {
          if not environment :matches "vnd.postgate.auth" "?*" { reject "authenticate first"; }
          else { dkim_sign :selector "s1" "known.example"; queue_priority 7; }
        }""",
    "helo": """require ["environment", "reject"];
        if environment :matches "vnd.postgate.helo" "*.invalid" { reject "bad HELO"; }""",
    "size": """require "reject"; if size :over 100K { reject "too big for this listener"; }""",
}

MSG_OK = (b"From: alice@known.example\r\nTo: bob@bank.example\r\nDate: Tue, 01 Dec 2026 23:15:42 +0100\r\n"
          b"Subject: hello\r\nX-Spam-Score: 3.1\r\n\r\nhello\r\n")
MSG_SPAM = b"From: win@unknown.example\r\nSubject: WIN\r\nX-Spam-Score: 13\r\n\r\n" + b"x" * 200_000 + b"\r\n"

SESSIONS: dict[str, dict[str, Any]] = {
    "mx-known": dict(client_address="198.51.100.7", client_name="mail.known.example", helo="mail.known.example",
                     sender="alice@known.example", rcpts=["bob@bank.example", "carol@other.example"],
                     message=MSG_OK, mail_params={"SIZE": "300"}),
    "mx-spammy": dict(client_address="203.0.113.66", helo="x.invalid", sender="win@unknown.example",
                      rcpts=["bob@bank.example"], message=MSG_SPAM, mail_params={}),
    "submission": dict(client_address="192.0.2.10", helo="laptop", tls_version="TLSv1.3", auth_user="alice",
                       auth_method="PLAIN", sender="alice@known.example", rcpts=["dave@other.example"],
                       message=MSG_OK, mail_params={"SIZE": "300000"}),
}

STAGES = [Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA]


def context(stage: Stage, s: dict[str, Any]) -> StageContext:
    i = STAGES.index(stage)
    ctx = StageContext(stage, "mx", s["client_address"], client_name=s.get("client_name", "unknown"),
                       hostname="mx.postgate.example", tls_version=s.get("tls_version"),
                       auth_user=s.get("auth_user"), auth_method=s.get("auth_method"))
    if i >= 1:
        ctx.helo, ctx.esmtp = s["helo"], True
    if i >= 2:
        ctx.sender, ctx.mail_params = s["sender"], dict(s["mail_params"])
    if stage is Stage.RCPT:
        ctx.recipient = s["rcpts"][0]
    if stage is Stage.DATA:
        ctx.recipients, ctx.message, ctx.size = list(s["rcpts"]), s["message"], len(s["message"])
    return ctx


def show(v: Verdict) -> str:
    out = v.action.value
    if v.reply is not None:
        out += f" {v.reply}"
    if v.quarantine_reason:
        out += f" ({v.quarantine_reason})"
    for r in v.routes:
        fields = [f"{k}={getattr(r, k)}" for k in ("tls_level", "transport", "dkim_domain", "dkim_selector",
                                                    "priority", "lifetime") if getattr(r, k) is not None]
        out += f" route[{','.join(r.recipients) or '*'}]:{' '.join(fields)}"
    return out


def render(tmp: Path) -> str:
    known = tmp / "known"
    known.write_text("known.example OK\n")
    lines = ["# script | session | stage | verdict"]
    for name, text in SCRIPTS.items():
        f = tmp / f"{name}.sieve"
        f.write_text(text)
        holder = SieveScripts(SieveSettings(script=str(f), lists={"known": str(known)},
                                            hostname="mx.postgate.example"))
        for sname, s in SESSIONS.items():
            for stage in STAGES:
                v = evaluate(holder, context(stage, s))
                lines.append(f"{name} | {sname} | {stage.value} | {show(v)}")
    return "\n".join(lines) + "\n"


def test_stage_matrix_matches_golden_file(tmp_path: Path) -> None:
    got = render(tmp_path)
    if os.environ.get("POSTGATE_UPDATE_GOLDEN"):
        GOLDEN.write_text(got)
    assert got == GOLDEN.read_text()
