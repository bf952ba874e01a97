"""The ``postgate`` command line.

Exit codes follow sysexits(3): 0 success, 64 usage error, 69 permanent failure (EX_UNAVAILABLE),
75 temporary failure (EX_TEMPFAIL), 78 configuration error (EX_CONFIG). Data goes to stdout, diagnostics
to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from outbound.nexthop import Failure, NextHop, resolve_nexthop
from outbound.resolver import Resolver, ResolverConfigError, load_anchors, parse_server
from postgate import config as configmod

EX_OK, EX_USAGE, EX_UNAVAILABLE, EX_TEMPFAIL, EX_CONFIG = 0, 64, 69, 75, 78


def add_resolver_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--resolver", action="append", metavar="ADDR[:PORT]",
                   help="recursive resolver to ask (repeatable); overrides [resolver] servers")
    p.add_argument("--trust-anchor", type=Path, metavar="FILE",
                   help="trust anchors (DS/DNSKEY lines); overrides [resolver] trust_anchor_file")
    p.add_argument("--mode", choices=["validate", "trust-ad"], help="overrides [resolver] mode")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_resolver(args: argparse.Namespace) -> tuple[configmod.Config, Resolver]:
    cfg = configmod.load(args.config)
    r = cfg.resolver
    servers = args.resolver or r.servers or configmod.system_resolvers()
    anchor_path = args.trust_anchor or (Path(r.trust_anchor_file) if r.trust_anchor_file else None)
    resolver = Resolver(
        servers=[parse_server(s) for s in servers],
        anchors=load_anchors(anchor_path),
        mode=args.mode or r.mode,
        timeout=r.timeout,
        skew=r.clock_skew,
        cache_size=r.cache_size,
        allow_remote_trust_ad=r.allow_remote_trust_ad,
    )
    return cfg, resolver


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
    _, resolver = build_resolver(args)
    nh = asyncio.run(resolve_nexthop(resolver, args.domain))
    if args.json:
        json.dump(nh.to_json(), sys.stdout, indent=2)
        print()
    else:
        _print_nexthop(nh)
    if nh.failure is Failure.TEMPORARY:
        return EX_TEMPFAIL
    if nh.failure is Failure.PERMANENT:
        return EX_UNAVAILABLE
    return EX_OK


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="postgate", description="Postgate: a mail transfer agent whose "
                                 "outbound delivery cannot be silently downgraded.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("resolve", help="show the DNSSEC-validated next-hop resolution of a domain",
                       description="Resolve DOMAIN as delivery would (RFC 7672 §2.2): MX hosts in order, "
                       "their addresses and TLSA records, and the DNSSEC verdict of every answer.")
    p.add_argument("domain")
    add_resolver_options(p)
    p.set_defaults(func=cmd_resolve)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
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
