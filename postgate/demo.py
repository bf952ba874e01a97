"""The README's demo: Postgate delivering mail on the embedded private test network.

It starts the test network (NSD serving a signed private root, Unbound, TLS MX receivers), starts
``postgate serve`` on it, submits four messages as a client would, and shows what happened to each:
delivered with DANE, deferred as a suspected attack (TLSA mismatch, bogus DNSSEC), or delivered over
opportunistic TLS to an unsigned domain.
"""

from __future__ import annotations

import json
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet, TestNetError

CASES = [
    ("bob@dane-ok.test", "signed zone, TLSA matches the MX certificate"),
    ("bob@badtlsa.test", "signed zone, TLSA does NOT match the MX certificate"),
    ("bob@bogus-sig.test", "the MX address record has a bogus DNSSEC signature"),
    ("bob@unsigned.test", "unsigned zone: no DNSSEC, no DANE"),
]


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="postgate-demo-"))
    net = TestNet(state / "net")
    pg: PostgateServer | None = None
    try:
        print("Starting the private test network (NSD + Unbound + TLS MX receivers) ...")
        net.start()
        pg = PostgateServer(net, state / "postgate", prequeue={"budget": 10.0, "grace": 60.0}).start()
        print(f"Started 'postgate serve --config {pg.config}' on 127.0.2.1:25\n")
        for rcpt, what in CASES:
            with smtplib.SMTP("127.0.2.1", 25, timeout=60, source_address=(TRUSTED, 0)) as s:
                s.ehlo("demo.client")
                s.mail("alice@demo.client")
                s.rcpt(rcpt)
                code, text = s.data(f"Subject: demo to {rcpt}\r\n\r\nHello from the Postgate demo.\r\n".encode())
            print(f"{rcpt:22} ({what})")
            print(f"    SMTP reply to the client: {code} {text.decode()}")
            qid = text.decode().split()[-1]
            for line in pg.log().splitlines():
                if f"]: {qid}: to=" in line:  # postgate/smtp[pid]: QUEUEID: to=<…>, relay=…, … (Postfix's format)
                    print("    log: relay=" + line.split(", relay=", 1)[1][:220])
            print()
        time.sleep(0.5)
        cmd = [sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "list", "--json"]
        out = subprocess.run(cmd, capture_output=True, text=True).stdout
        queued = json.loads(out)
        print(f"Queue: {len(queued)} message(s) deferred, to be retried later (never bounced, never sent in clear):")
        for m in queued:
            for r in m.get("recipients", []):
                print(f"    {m['id']} <{r['address']}> {r['status']}: {r['reason'][:150]}")
        print("\nWhat the MX receivers stored:")
        for host in ("mx.dane-ok.test", "mx.unsigned.test"):
            for m in net.received(host):
                print(f"    {host}: from <{m['mail_from']}> over {m['tls']['version']} ({m['tls']['cipher']})")
        return 0
    except (TestNetError, RuntimeError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    finally:
        if pg is not None:
            pg.stop()
        net.stop()
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
