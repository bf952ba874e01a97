"""The ``postgate`` command line.

Exit codes follow sysexits(3): 0 success, 64 usage error, 69 permanent failure (EX_UNAVAILABLE),
75 temporary failure (EX_TEMPFAIL), 78 configuration error (EX_CONFIG). Data goes to stdout, diagnostics
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from postgate import (
    assemble,
    queuecli,
    sievecli,  # sieve-check, sieve-test (issue 17)
)
from postgate import config as configmod
from postgate.config import LEVELS
from postgate.outbound import dkim
from postgate.outbound.delivery import Deliverer, DeliveryConfig, RecipientResult
from postgate.outbound.nexthop import Failure, NextHop, parse_domain, resolve_nexthop
from postgate.outbound.resolver import Resolver, ResolverConfigError
from postgate.outbound.tlscheck import tls_check
from postgate.policy.tls import Level
from postgate.policy.vocab import Outcome

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 69, 75, 78
PASS_ = "PASS"


def add_resolver_options(p: argparse.ArgumentParser, json_output: bool = True) -> None:
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--resolver", action="append", metavar="ADDR[:PORT]",
                   help="recursive resolver to ask (repeatable); overrides [resolver] servers")
    p.add_argument("--trust-anchor", type=Path, metavar="FILE",
                   help="trust anchors (DS/DNSKEY lines); overrides [resolver] trust_anchor_file")
    p.add_argument("--mode", choices=["validate", "trust-ad"], help="overrides [resolver] mode")
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output (JSON on standard output)")


def build_resolver(args: argparse.Namespace) -> tuple[configmod.Config, Resolver]:
    cfg = configmod.load(args.config)
    return cfg, assemble.build_resolver(cfg, assemble.ResolverOverrides(
        tuple(args.resolver or ()), args.trust_anchor, args.mode))


def build_deliverer(args: argparse.Namespace, cfg: configmod.Config, resolver: Resolver) -> Deliverer:
    dc = assemble.delivery_config(cfg)
    assemble.wire_tls_reporting(cfg, resolver, dc)
    return Deliverer(resolver, dc)


async def _sts_and_memory(cfg: configmod.Config, resolver: Resolver, domain: str) -> tuple[str, str]:
    """Issue 18: the MTA-STS policy in force and the downgrade memory of ``domain``, for ``resolve``."""
    dc = DeliveryConfig()
    assemble.wire_tls_reporting(cfg, resolver, dc)
    sts = (await dc.sts.lookup(domain)).describe() if dc.sts is not None else "MTA-STS disabled"
    m = dc.downgrade.get(domain) if dc.downgrade is not None else None
    return sts, m.describe() if m is not None else ""


def _exit_for(results: list[RecipientResult]) -> int:
    if any(r.status is Outcome.DEFERRED for r in results):
        return EX_TEMPFAIL
    if any(r.status is Outcome.BOUNCED for r in results):
        return EX_UNAVAILABLE
    return EX_OK


def cmd_deliver(args: argparse.Namespace) -> int:
    cfg, resolver = build_resolver(args)
    deliverer = build_deliverer(args, cfg, resolver)
    data = sys.stdin.buffer.read()
    if not data:
        print("postgate deliver: empty message on standard input", file=sys.stderr)
        return EX_USAGE
    level = Level(args.level) if args.level else None
    # a message from a file usually has LF line ends: SMTP needs CRLF (RFC 5321 §2.3.8), and DKIM signs
    # what is sent
    data = re.sub(rb"\r?\n", b"\r\n", data)
    signer = build_signer(cfg)
    if signer is not None and signer.keys_for(data):
        data = signer.sign(data, args.sender)
    elif cfg.dkim.required:
        # the README's promise: every message Postgate sends is DKIM-signed
        print(f"postgate deliver: no DKIM key for this message's From domain nor for "
              f"{cfg.dkim.default_domain or cfg.server.hostname or '(no [dkim] default_domain)'} in "
              f"{cfg.dkim.key_directory}: refusing to send it unsigned (create one with 'postgate dkim keygen "
              "DOMAIN', or set [dkim] required = false)", file=sys.stderr)
        return EX_CONFIG
    else:
        print("postgate deliver: warning: sending unsigned ([dkim] required = false and no key for this "
              "message)", file=sys.stderr)

    async def run() -> list[RecipientResult]:
        try:
            return await deliverer.deliver(args.sender, args.to, data, level=level)
        finally:
            await deliverer.close()

    results = asyncio.run(run())
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        print()
    else:
        for r in results:
            where = f" via {r.mx}[{r.address}]" if r.mx else ""
            sec = f" {r.security}" if r.security else ""
            tlsa = f" tlsa=\"{r.tlsa_matched}\"" if r.tlsa_matched else ""
            attack = " SUSPECTED ATTACK" if r.suspected_attack else ""
            print(f"{r.recipient}: {r.status} {r.dsn}{where}{sec}{tlsa}{attack}: {r.text}")
    return _exit_for(results)


def _bad_domain(args: argparse.Namespace, command: str) -> bool:
    """Report an argument that is no domain name (the caller exits with EX_USAGE)."""
    try:
        parse_domain(args.domain)
    except ValueError as e:
        print(f"postgate {command}: {e}", file=sys.stderr)
        return True
    return False


def cmd_tls_check(args: argparse.Namespace) -> int:
    if _bad_domain(args, "tls-check"):
        return EX_USAGE
    cfg, resolver = build_resolver(args)
    deliverer = build_deliverer(args, cfg, resolver)
    level = Level(args.level) if args.level else None
    reports = asyncio.run(tls_check(deliverer, args.domain, level))
    sts = deliverer.config.sts
    if sts is not None and not args.json:  # the policy tls_check just looked up, from the in-memory cache
        e = sts.cache.get(args.domain.lower().rstrip("."))
        print(f"MTA-STS: mode={e.policy.mode.value} mx={','.join(e.policy.mx)} id={e.id}" if e else "MTA-STS: none")
    if args.json:
        json.dump(reports, sys.stdout, indent=2)
        print()
    else:
        for rep in reports:
            print(_tls_report_text(rep))
    if any(r["status"] == "bounced" for r in reports):
        return EX_UNAVAILABLE  # as delivery and `resolve`: the destination does not take mail (5.1.2, 5.1.10)
    if not reports or any(r["status"] != "ok" for r in reports):
        return EX_TEMPFAIL
    return EX_OK


own_caps = assemble.own_caps


def _tls_report_text(rep: dict[str, object]) -> str:
    """One tls-check report for a terminal: only what is known, never a ``None``."""
    where = f"{rep['mx']}[{rep['address']}]" if rep["address"] else str(rep["mx"])
    if rep["status"] == "ok":
        head = f"{where}: ok {rep['security']}"
        head += "".join(f" {v}" for v in (rep["tls_version"], rep["cipher"]) if v)
        if rep["tlsa_matched"]:
            head += f' tlsa="{rep["tlsa_matched"]}"'
    else:
        head = f"{where}: {rep['status']}" + "".join(f" {rep[k]}" for k in ("dsn", "tls_result") if rep[k])
    if rep["suspected_attack"]:
        head += " SUSPECTED ATTACK"
    lines = [head]
    if rep["reason"]:
        lines.append(f"  {rep['reason']}")
    chain = rep["chain"]
    assert isinstance(chain, list)
    if chain and rep["status"] != "ok":
        lines.append("  the server presented:")
    lines += [f"  cert {i}: {subj}" for i, subj in enumerate(chain)]
    if rep["needed_tlsa"]:
        lines.append(f"  a TLSA record matching it would be: {rep['needed_tlsa']}")
    if rep["requirement"]:
        lines.append(f"  requirement: {rep['requirement']}")
    return "\n".join(lines)


def cmd_caps_record(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    host = (args.hostname or cfg.server.hostname or socket.getfqdn()).rstrip(".")
    c = own_caps(cfg)
    owner = f"_mta-caps.{host}."
    if args.json:
        json.dump({"owner": owner, "type": "TXT", "value": c.text()}, sys.stdout, indent=2)
        print()
    else:
        print(f'{owner} IN TXT "{c.text()}"')
    return EX_OK


build_signer = assemble.build_signer


def cmd_serve(args: argparse.Namespace) -> int:
    cfg, resolver = build_resolver(args)
    deliverer = build_deliverer(args, cfg, resolver)
    from postgate.daemon import serve
    return serve(cfg, resolver, deliverer, signer=build_signer(cfg), caps=own_caps(cfg), worker=args.worker)


def cmd_settings(args: argparse.Namespace) -> int:
    from postgate import settings
    table = settings.load()
    if not args.names:
        for s in table.values():
            print(f"{s.name} = {s.default.replace('`', '').replace(chr(92) + '|', '|')}")
        return EX_OK
    status = EX_OK
    for name in args.names:
        found = [s for s in table.values() if s.name == name or s.section == name]
        if not found:
            print(f"postgate settings: unknown setting {name!r} (try 'postgate settings' for the list)",
                  file=sys.stderr)
            status = EX_USAGE
        for s in found:
            print(s.text())
    return status


def cmd_reload(args: argparse.Namespace) -> int:
    from postgate.daemon import send_reload
    cfg = configmod.load(args.config)
    code, text = send_reload(cfg)
    print(f"postgate reload: {text}", file=sys.stderr)
    return code


def cmd_check(args: argparse.Namespace) -> int:
    from postgate.check import FAIL, WARN, Result, apply_downgrades, run_checks, to_json
    cfg, resolver = build_resolver(args)
    # exactly serve's validation first: what serve refuses is a FAIL here (never downgraded)
    results = [Result("config", FAIL, p) for p in assemble.validate(cfg)]
    if not results:
        results.append(Result("config", PASS_, f"{cfg.path or 'defaults'}: maps, credentials and keys load"))
    if cfg.server.user and results[0].status != FAIL:
        bad = assemble.unreadable_by(cfg.server.user, cfg)
        if bad:
            results.append(Result("user", WARN, f"{cfg.server.user} cannot read {', '.join(bad)}: a reload after "
                                  "the switch to that user would keep the old settings",
                                  f"chown {cfg.server.user} (or chgrp and chmod g+r) those files and their folders"))
    if os.getuid() == 0 and not cfg.server.user:
        results.append(Result("user", WARN, "running as root with no [server] user: the daemon would keep root "
                              "privileges after binding its ports", "set [server] user = \"postgate\" (see "
                              "scripts/install)"))
    results += apply_downgrades(asyncio.run(run_checks(cfg, resolver, own_caps(cfg))), cfg.check.downgrade)
    if args.json:
        json.dump(to_json(results), sys.stdout, indent=2)
        print()
    else:
        for r in results:
            print(r.line())
    return 1 if any(r.status == FAIL for r in results) else EX_OK


def cmd_dkim_keygen(args: argparse.Namespace) -> int:
    cfg = configmod.load(args.config)
    keydir = Path(args.key_directory or cfg.dkim.key_directory)
    try:
        key = dkim.generate(keydir, args.domain, args.selector, args.algorithm)
    except FileExistsError:
        print(f"postgate dkim keygen: {keydir}/{args.domain}/{args.selector}.private exists; choose another "
              "selector (keys are never overwritten)", file=sys.stderr)
        return 73  # EX_CANTCREAT
    except dkim.DkimError as e:
        print(f"postgate dkim keygen: {e}", file=sys.stderr)
        return EX_USAGE
    print(f"# wrote {keydir}/{key.domain}/{key.selector}.private; publish:", file=sys.stderr)
    print(f'{key.owner()} IN TXT "{key.txt()}"')
    return EX_OK


def cmd_passwd(args: argparse.Namespace) -> int:
    from postgate.inbound.credentials import hash_password
    password = sys.stdin.readline().rstrip("\n") if not sys.stdin.isatty() else __import__("getpass").getpass()
    if not password:
        print("postgate passwd: empty password", file=sys.stderr)
        return EX_USAGE
    print(f"{args.user}:{hash_password(password)}")
    return EX_OK


def _print_nexthop(nh: NextHop) -> None:
    d = nh.domain.to_text(omit_final_dot=True)
    line = f"{d}: MX {nh.mx_security}"
    if nh.mx_reason and str(nh.mx_security) != "secure":
        line += f" ({nh.mx_reason})"
    print(line)
    for h in nh.hosts:
        tag = "implicit MX (no MX records)" if h.implicit else f"MX {h.preference}"
        print(f"  {tag} {h.name.to_text(omit_final_dot=True)}")
        if h.cname_chain:
            print("    CNAME -> " + " -> ".join(n.to_text(omit_final_dot=True) for n in h.cname_chain))
        addrs = ", ".join(h.addresses) or "none"
        why = f" ({h.address_reason})" if h.address_reason else ""
        print(f"    addresses {h.address_security}{why}: {addrs}")
        if h.tlsa_security is None:
            print("    TLSA not looked up: address records are not secure (RFC 7672 §2.2)")
        else:
            base = h.tlsa_base.to_text(omit_final_dot=True) if h.tlsa_base else "?"
            why = f" ({h.tlsa_reason})" if h.tlsa_reason else ""
            print(f"    TLSA base domain {base}: {h.tlsa_security}{why}")
            for rd in h.tlsa:
                print(f"      TLSA {rd.to_text()}")
            if not h.tlsa and h.tlsa_security is not None and not h.unusable:
                print("      (no TLSA records)")
        print(f"    DANE: {'applies' if h.dane else 'does not apply'}")
        if h.unusable:
            print(f"    UNUSABLE: {h.unusable}")
    if nh.failure is not Failure.NONE:
        print(f"  {nh.failure.value} failure {nh.status}: {nh.reason}")


def cmd_resolve(args: argparse.Namespace) -> int:
    if _bad_domain(args, "resolve"):
        return EX_USAGE
    cfg, resolver = build_resolver(args)
    async def both() -> tuple[NextHop, tuple[str, str]]:
        return await resolve_nexthop(resolver, args.domain), await _sts_and_memory(cfg, resolver, args.domain)
    nh, (sts_line, memory) = asyncio.run(both())
    if args.json:
        json.dump({**nh.to_json(), "mta_sts": sts_line, "downgrade_memory": memory}, sys.stdout, indent=2)
        print()
    else:
        _print_nexthop(nh)
        print(f"  {sts_line}")
        print(f"  downgrade memory: {memory or 'nothing remembered'}")
    if nh.failure is Failure.TEMPORARY:
        return EX_TEMPFAIL
    if nh.failure is Failure.PERMANENT:
        return EX_UNAVAILABLE
    return EX_OK


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="postgate", description="Postgate: a mail transfer agent whose "
                                 "outbound delivery cannot be silently downgraded.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("resolve", help="show the DNSSEC-validated next-hop resolution of a domain",
                       description="Resolve DOMAIN as delivery would (RFC 7672 §2.2): MX hosts in order, "
                       "their addresses and TLSA records, and the DNSSEC verdict of every answer.")
    p.add_argument("domain", help="the destination domain, as in an address after the @")
    add_resolver_options(p)
    p.set_defaults(func=cmd_resolve)
    p = sub.add_parser("deliver", help="deliver one message from standard input now",
                       description="Deliver the message on standard input to each --to recipient as the "
                       "delivery agent would, and print the outcome per recipient. Exit 0: all delivered; "
                       "75: some deferred; 69: some bounced (none deferred).")
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS", help="envelope sender")
    p.add_argument("--to", action="append", required=True, metavar="ADDRESS", help="recipient (repeatable)")
    p.add_argument("--level", choices=LEVELS, help="TLS security level for this delivery")
    add_resolver_options(p)
    p.set_defaults(func=cmd_deliver)
    p = sub.add_parser("tls-check", help="connect to each MX as delivery would, without sending mail",
                       description="Like Postfix's posttls-finger: resolve DOMAIN, connect to every address "
                       "of every MX host with the policy's TLS requirement, and report what was seen.")
    p.add_argument("domain", help="the destination domain whose MX hosts to check")
    p.add_argument("--level", choices=LEVELS, help="TLS security level to check against")
    add_resolver_options(p)
    p.set_defaults(func=cmd_tls_check)
    p = sub.add_parser("caps-record", help="print the MTA-capability record this configuration honours",
                       description="Print the _mta-caps TXT record (docs/mta-caps.md) for this server, "
                       "promising exactly what its configuration offers, ready for a zone file.")
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--hostname", help="host name (default: [server] hostname)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_caps_record)
    queuecli.add_parser(sub)
    sievecli.add_parser(sub)  # sieve-check, sieve-test (issue 17)
    p = sub.add_parser("serve", help="run the SMTP listeners and the queue runner",
                       description="Run Postgate: the listeners of the configuration, pre-queue delivery "
                       "and the queue runner. SIGTERM stops it cleanly, SIGHUP reloads maps and credentials.")
    add_resolver_options(p, json_output=False)  # serve prints no data: --json is refused as unknown
    p.add_argument("--worker", metavar="SOCKETS", help=argparse.SUPPRESS)  # started by serve itself: name=fd,…
    p.set_defaults(func=cmd_serve)
    p = sub.add_parser("reload", help="make the running daemon re-read its configuration (SIGHUP)",
                       description="Send SIGHUP to the 'postgate serve' that owns the spool of this "
                       "configuration (its pid is in <spool>/master.pid): it re-reads the TOML file, the maps, "
                       "the credentials and the DKIM keys, in every worker. A bad new configuration is logged "
                       "and the old one stays. Exit 0: signal sent; 69: no daemon runs.")
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.set_defaults(func=cmd_reload)
    p = sub.add_parser("settings", help="describe configuration settings (like postconf -d and postconf(5))",
                       description="Without arguments: every setting with its default, one per line. With "
                       "SECTION or SECTION.KEY: type, default and meaning, from docs/configuration.md.")
    p.add_argument("names", nargs="*", metavar="SECTION[.KEY]", help="e.g. server.user, or dkim")
    p.set_defaults(func=cmd_settings)
    p = sub.add_parser("check", help="check this server's own setup (certificate, TLSA, DNSSEC, DKIM, ...)",
                       description="One line per check: PASS, WARN or FAIL with the fix. Exit 1 on any FAIL. "
                       "'postgate serve' runs the same checks and refuses to start on a FAIL.")
    add_resolver_options(p)
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("dkim", help="DKIM key management")
    dsub = p.add_subparsers(dest="dkim_action", metavar="ACTION", required=True)
    k = dsub.add_parser("keygen", help="create a DKIM key and print the TXT record to publish")
    k.add_argument("domain", help="the signing domain (d=)")
    k.add_argument("--selector", default=time.strftime("pg%Y%m"),
                   help="the selector (s=); default pgYYYYMM, so a yearly rollover gets a new name")
    k.add_argument("--algorithm", choices=["rsa", "ed25519"], default="rsa",
                   help="rsa (2048 bits, read by every verifier) or ed25519 (RFC 8463); default rsa")
    k.add_argument("--key-directory", help="overrides [dkim] key_directory")
    k.add_argument("--config", type=Path, help="configuration file (TOML)")
    k.set_defaults(func=cmd_dkim_keygen)
    p = sub.add_parser("passwd", help="print a credentials line for USER (password on standard input)",
                       description="Read a password from standard input and print 'USER:<salted scrypt hash>' "
                       "for the [relay] credentials_file.")
    p.add_argument("user", help="the SMTP AUTH user name")
    p.set_defaults(func=cmd_passwd)
    return ap


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("postgate")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="postgate: %(message)s", stream=sys.stderr)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        ap.print_help(sys.stderr)
        return EX_USAGE
    try:
        return func(args)
    except configmod.ConfigError as e:
        print(f"postgate: {e}", file=sys.stderr)
        return EX_CONFIG
    except ResolverConfigError as e:
        print(f"postgate: {e}", file=sys.stderr)
        return EX_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

