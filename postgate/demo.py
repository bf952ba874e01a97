"""The README's demo: bring up the private test network and show Postgate resolving on it.

For each scenario domain it prints what ``postgate resolve`` decides: the MX hosts, the DNSSEC verdict of
every answer and whether DANE applies. Later issues grow this into a DANE delivery demo.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

from fixtures.testnet import TestNet, TestNetError
from outbound.nexthop import Failure, resolve_nexthop
from outbound.resolver import Resolver, load_anchors

DOMAINS = [
    ("dane-ok.test", "signed zone, TLSA published"),
    ("unsigned.test", "unsigned zone"),
    ("bogus-tlsa.test", "TLSA record with a corrupted signature"),
    ("expired.test", "signatures expired"),
    ("optout.n3", "unsigned delegation in an NSEC3 opt-out span"),
    ("nullmx.test", "null MX"),
    ("dead.test", "authoritative server does not answer"),
]


async def _run(net: TestNet) -> None:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    for domain, what in DOMAINS:
        nh = await resolve_nexthop(r, domain)
        print(f"\n{domain} — {what}")
        print(f"  MX RRset: {nh.mx_security}")
        for h in nh.hosts:
            dane = "DANE applies" if h.dane else "no DANE"
            extra = f"; UNUSABLE: {h.unusable}" if h.unusable else ""
            print(f"  {h.name.to_text(omit_final_dot=True)}: addresses {h.address_security}, "
                  f"TLSA {h.tlsa_security or 'not looked up'} -> {dane}{extra}")
        if nh.failure is not Failure.NONE:
            verdict = "defer (retry later)" if nh.failure is Failure.TEMPORARY else "bounce"
            print(f"  => {verdict}: {nh.status} {nh.reason}")
        else:
            print("  => deliverable")


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="postgate-demo-"))
    net = TestNet(state)
    try:
        print("Starting the private test network (NSD + Unbound + TLS MX receivers)...")
        net.start()
        print(f"  authoritative {net.authoritative}, validating resolver {net.resolver}, "
              f"{len(net.scenarios.receivers)} MX receivers")
        asyncio.run(_run(net))
    except TestNetError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        net.stop()
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
