"""The one TLS decision (policy.tls.decide) as a golden table, like Postfix's src/smtp/tls_policy.in/.ref.

Every combination of inputs — level × what DNSSEC said of the host × MTA-capability record × REQUIRETLS ×
MTA-STS — is one row of ``tests/golden/tls_decision.txt``, with the decision: the requirement the SMTP
client enforces, or the skip (deferral reply, suspected attack, RFC 8460 result type). A reviewer reads the
table, not the code. The test recomputes the table and diffs it against the checked-in file.

Regenerate after an intended change, then review the diff:

    .venv/bin/python -m tests.test_tls_decision > tests/golden/tls_decision.txt
"""

from __future__ import annotations

import difflib
import itertools
from pathlib import Path

from postgate.policy.caps import parse
from postgate.policy.tls import HostFacts, Level, Policy, Requirement, Sts, StsMode, decide
from postgate.policy.vocab import Security, Tlsa

GOLDEN = Path(__file__).parent / "golden" / "tls_decision.txt"
EE = Tlsa(3, 1, 1, b"\x01" * 32)
PKIX_EE = Tlsa(1, 1, 1, b"\x02" * 32)   # RFC 7672 §3.1.3: unusable for SMTP
S, INS, BOGUS, IND = Security.SECURE, Security.INSECURE, Security.BOGUS, Security.INDETERMINATE
MX = "mx.example.net"

# what DNS said of the MX host (RFC 7672 §2.1.1, §2.2)
HOSTS = {
    "addr-bogus": dict(address_security=BOGUS, unusable="address records bogus"),
    "tlsa-bogus": dict(tlsa_security=BOGUS, unusable="TLSA records bogus"),
    "tlsa-servfail": dict(tlsa_security=IND, unusable="TLSA lookup failed"),
    "addr-insecure": dict(address_security=INS),
    "tlsa-insecure": dict(tlsa_security=INS),
    "tlsa-none": dict(tlsa_security=S),
    "tlsa-usable": dict(tlsa_security=S, tlsa=(EE,)),
    "tlsa-unusable": dict(tlsa_security=S, tlsa=(PKIX_EE,)),
}
# the host's MTA-capability record (docs/mta-caps.md): only a secure one is enforced
CAPS = {
    "none": (None, None),
    "insecure-starttls": ("v=MTACAPS1; starttls", INS),
    "secure-plain": ("v=MTACAPS1; smtputf8", S),
    "secure-starttls": ("v=MTACAPS1; starttls", S),
    "secure-dane": ("v=MTACAPS1; starttls; dane", S),
}
# the MTA-STS policy of the next-hop domain (RFC 8461): enforce with the MX listed (one-label wildcard,
# §4.1) or not, testing (report only, §5), and mode none (§8.3)
STS = {"none": None, "enforce": Sts(StsMode.ENFORCE, ("*.example.net",)),
       "enforce-other-mx": Sts(StsMode.ENFORCE, ("mx.elsewhere.example",)),
       "testing-other-mx": Sts(StsMode.TESTING, ("mx.elsewhere.example",)),
       "mode-none": Sts(StsMode.NONE)}
FP = "ab" * 32


def policy(level: Level) -> Policy:
    return Policy(level, (FP,) if level is Level.FINGERPRINT else ())


def rows() -> list[str]:
    out = ["# level host caps requiretls sts | decision  (regenerate: python -m tests.test_tls_decision)"]
    for level, host, caps, rtls, sts in itertools.product(Level, HOSTS, CAPS, (False, True), STS):
        text, sec = CAPS[caps]
        facts = HostFacts(MX, **{"address_security": S, "reference_names": (MX,), "tlsa_base": MX,  # type: ignore[arg-type]
                                 "caps": parse(text) if text else None, "caps_security": sec, **HOSTS[host]})
        d = decide(policy(level), facts, nexthop="example.net", requiretls=rtls, sts=STS[sts])
        got = ("require " + d.text()) if isinstance(d, Requirement) else d.text()
        out.append(f"{level.value:13} {host:13} {caps:17} {'requiretls' if rtls else '-':10} {sts:16} | {got}")
    return out


def test_tls_decision_golden() -> None:
    want = GOLDEN.read_text().splitlines()
    got = rows()
    diff = "\n".join(difflib.unified_diff(want, got, str(GOLDEN), "decide()", lineterm="", n=0))
    assert not diff, "the TLS decision changed; review, then regenerate (see the module docstring):\n" + diff


def test_golden_covers_every_combination() -> None:
    assert len(rows()) == 1 + len(Level) * len(HOSTS) * len(CAPS) * 2 * len(STS)


if __name__ == "__main__":
    print("\n".join(rows()))
