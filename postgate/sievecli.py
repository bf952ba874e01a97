"""``postgate sieve-check`` and ``postgate sieve-test``: compile a Sieve script, or show what it would do.

``sieve-check FILE…`` compiles each script and prints ``FILE: ok`` or the error as ``file:line:col:
reason`` on stderr; exit 0, 65 (EX_DATAERR: a script does not compile) or 66 (EX_NOINPUT: cannot read it).

``sieve-test FILE --stage data --from A --to B < message`` evaluates the script for one SMTP stage as the
smtpd would (like Pigeonhole's ``sieve-test``) and prints the script's actions, then the stage verdict the
smtpd would act on. Nothing is sent or changed. Exit 0; 65 if the script does not compile.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from postgate.inbound.filters import Action, Stage, StageContext
from postgate.inbound.sieve_filter import STAGE_NAMES, SieveSettings, combine, make_input, to_verdict
from postgate.policy.sieve import Limits, SieveError, compile_file, run
from postgate.policy.sieve.lists import MapLists

EX_OK, EX_USAGE, EX_DATAERR, EX_NOINPUT = 0, 64, 65, 66
STAGES = {v: k for k, v in STAGE_NAMES.items()} | {"helo": Stage.HELO}


def cmd_sieve_check(args: argparse.Namespace) -> int:
    rc = EX_OK
    for f in args.files:
        if not Path(f).is_file():
            print(f"{f}: cannot read script", file=sys.stderr)
            rc = max(rc, EX_NOINPUT)
            continue
        try:
            compile_file(f)
        except SieveError as e:
            print(str(e), file=sys.stderr)
            rc = max(rc, EX_DATAERR) if rc != EX_NOINPUT else rc
            continue
        print(f"{f}: ok")
    return rc


def cmd_sieve_test(args: argparse.Namespace) -> int:
    try:
        script = compile_file(args.file)
    except SieveError as e:
        print(str(e), file=sys.stderr)
        return EX_NOINPUT if e.line == 0 else EX_DATAERR
    stage = STAGES[args.stage]
    message: bytes | None = None
    if stage is Stage.DATA:
        raw = sys.stdin.buffer.read()
        # RFC 5322 §2.1: CRLF line ends, whatever the file had
        message = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    env: dict[str, str] = {}
    for item in args.env or []:
        k, eq, v = item.partition("=")
        if not eq:
            print(f"postgate: --env {item!r} is not NAME=VALUE", file=sys.stderr)
            return EX_USAGE
        env[k.lower()] = v
    recipients = list(args.to or [])
    ctx = StageContext(stage=stage, listener=args.listener, client_address=args.client_ip,
                       client_name=args.client_name or "unknown", helo=args.helo, esmtp=True,
                       hostname=args.hostname, tls_version=args.tls, auth_user=args.auth,
                       sender=args.sender if stage in (Stage.MAIL, Stage.RCPT, Stage.DATA) else None,
                       recipients=recipients[:-1] if stage is Stage.RCPT else recipients,
                       recipient=recipients[-1] if stage is Stage.RCPT and recipients else None,
                       message=message, size=len(message or b""))
    lists = {}
    for item in args.list or []:
        k, _, v = item.partition("=")
        lists[k] = v
    settings = SieveSettings(script=args.file, hostname=args.hostname, spam_max=args.spam_max,
                             default_action=Action(args.default_action), limits=Limits())
    inp = make_input(ctx, settings, MapLists(lists) if lists else None)
    inp.environment.update(env)
    if args.spam_score is not None:
        inp.spam_score = args.spam_score
    inp.now = datetime.now(UTC)
    if stage is Stage.DATA and recipients:
        # as the smtpd does: one evaluation per recipient (RFC 5228 §5.4), combined into one verdict
        results = []
        for rcpt in recipients:
            r = run(script, replace(inp, recipients=[rcpt]), settings.limits)
            results.append((rcpt, r))
            print(f"actions for <{rcpt}>:")
            for line in r.describe() or ["(none)"]:
                print(f"  {line}")
        v = combine(results, ctx, settings.default_action, args.file)
    else:
        result = run(script, inp, settings.limits)
        print("actions:")
        for line in result.describe() or ["(none)"]:
            print(f"  {line}")
        v = to_verdict(result, ctx, settings.default_action, args.file)
    print(f"verdict: {v.action.value}" + (f" {v.reply}" if v.reply else ""))
    for h in v.headers:
        print(f"  header {h.op.value} {h.name}" + (f": {h.value}" if h.value else "") +
              (f" #{h.index}" if h.op.value in ("delete", "change") else ""))
    for addr in v.add_recipients:
        print(f"  add recipient {addr}")
    for addr in v.remove_recipients:
        print(f"  remove recipient {addr}")
    for rt in v.routes:
        fields = {k: getattr(rt, k) for k in ("tls_level", "transport", "dkim_domain", "dkim_selector",
                                              "priority", "lifetime") if getattr(rt, k) is not None}
        who = ", ".join(rt.recipients) or "all recipients"
        print(f"  route {who}: " + " ".join(f"{k}={v}" for k, v in fields.items()))
    if v.quarantine_reason:
        print(f"  hold: {v.quarantine_reason}")
    return EX_OK


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sieve-check", help="compile Sieve scripts and report errors as file:line:col",
                       description="Compile each Sieve script (docs/sieve.md). Exit 0: all compile; "
                       "65: a script has an error (printed as file:line:col: reason); 66: cannot read one.")
    p.add_argument("files", nargs="+", metavar="FILE", help="a Sieve script to compile (one or more)")
    p.set_defaults(func=cmd_sieve_check)
    p = sub.add_parser("sieve-test", help="show what a Sieve script would do at one SMTP stage",
                       description="Evaluate FILE for one SMTP stage as the smtpd would and print its "
                       "actions and the resulting verdict (at --stage data the message is read from standard "
                       "input). Nothing is sent.")
    p.add_argument("file", metavar="FILE", help="the Sieve script to evaluate")
    p.add_argument("--stage", choices=["connect", "ehlo", "helo", "mail", "rcpt", "data"], default="data",
                   help="the SMTP stage the script is run at (default: data)")
    p.add_argument("--from", dest="sender", default="", metavar="ADDRESS", help="envelope sender ('' = <>)")
    p.add_argument("--to", action="append", metavar="ADDRESS",
                   help="recipient (repeatable; at --stage rcpt the last one is being judged)")
    p.add_argument("--listener", default="mx", metavar="NAME",
                   help="the [[listener]] the mail came in on (environment \"vnd.postgate.listener\"; default: mx)")
    p.add_argument("--client-ip", default="192.0.2.1", metavar="ADDRESS",
                   help="the client's IP address (default: 192.0.2.1)")
    p.add_argument("--client-name", default="", metavar="NAME",
                   help="the client's forward-confirmed host name (default: unknown, as after a failed lookup)")
    p.add_argument("--helo", default="client.example", metavar="NAME",
                   help="the name the client gave in EHLO/HELO (default: client.example)")
    p.add_argument("--hostname", default="mx.example.org", help="our host name (environment \"host\")")
    p.add_argument("--tls", metavar="VERSION", help="the session used TLS (e.g. TLSv1.3)")
    p.add_argument("--auth", metavar="USER", help="the client authenticated as USER")
    p.add_argument("--env", action="append", metavar="NAME=VALUE", help="set an environment item")
    p.add_argument("--spam-score", type=float, help="spamtest score (default: from the X-Spam-Score field)")
    p.add_argument("--spam-max", type=float, default=15.0, metavar="SCORE",
                   help="the score that counts as spamtest 10 ([sieve] spam_max; default: 15.0)")
    p.add_argument("--list", action="append", metavar="NAME=PATH", help="an RFC 6134 list (Postfix table)")
    p.add_argument("--default-action", choices=["tempfail", "reject", "accept"], default="tempfail",
                   help="the verdict on a run-time error or exceeded limit ([sieve] default_action; "
                   "default: tempfail)")
    p.set_defaults(func=cmd_sieve_test)
