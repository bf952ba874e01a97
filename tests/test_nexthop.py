"""RFC 7672 §2.2 next-hop resolution on the test network, and ``postgate resolve``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from postgate.outbound.nexthop import Failure, NextHop, resolve_nexthop
from postgate.outbound.resolver import Resolver, ResolverConfigError, load_anchors
from postgate.policy.vocab import Security

from fixtures.testnet import TestNet


def nexthop(net: TestNet, domain: str) -> NextHop:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    return asyncio.run(resolve_nexthop(r, domain))


# (domain, failure, status, [(host, address security, DANE applies, unusable)], RFC rule)
CASES = [
    ("dane-ok.test", Failure.NONE, "", [("mx.dane-ok.test.", Security.SECURE, True, False)],
     "§2.2: secure MX, secure A, secure TLSA"),
    ("mismatch.test", Failure.NONE, "", [("mx1.mismatch.test.", Security.SECURE, True, False),
                                         ("mx2.mismatch.test.", Security.SECURE, True, False)],
     "RFC 5321 §5.1: MX order by preference"),
    ("nullmx.test", Failure.PERMANENT, "5.1.10", [], "RFC 7505 §3: null MX"),
    ("nonexistent.test", Failure.PERMANENT, "5.1.2", [], "NXDOMAIN: no such domain"),
    ("nomx.test", Failure.NONE, "", [("nomx.test.", Security.SECURE, True, False)],
     "RFC 5321 §5.1: no MX: the domain is the implicit MX"),
    ("unsigned.test", Failure.NONE, "", [("mx.unsigned.test.", Security.INSECURE, False, False)],
     "§2.2: insecure address records: no TLSA lookup"),
    ("mxsecure.unsigned.test", Failure.NONE, "", [("mx.dane-ok.test.", Security.SECURE, True, False)],
     "§2.2.1: insecure MX RRset, secure host: DANE still applies"),
    ("cname.test", Failure.NONE, "", [("mx.cname.test.", Security.INSECURE, False, False)],
     "§2.2.2: CNAME chain through an unsigned zone"),
    ("bogus-sig.test", Failure.TEMPORARY, "4.4.3", [("mx.bogus-sig.test.", Security.BOGUS, False, True)],
     "§2.1.1: bogus address records: host unusable, defer"),
    ("bogus-tlsa.test", Failure.TEMPORARY, "4.4.3",
     [("mx.bogus-tlsa.test.", Security.SECURE, False, True)], "§2.1.1: bogus TLSA is not 'no TLSA'"),
    ("dead.test", Failure.TEMPORARY, "4.4.3", [], "§2.1.1: MX lookup fails: defer"),
    ("expired.test", Failure.TEMPORARY, "4.4.3", [], "§2.1.1: bogus MX: defer"),
    ("optout.n3", Failure.NONE, "", [("mx.optout.n3.", Security.INSECURE, False, False)],
     "opt-out delegation: insecure"),
    ("nodane.test", Failure.NONE, "", [("mx.nodane.test.", Security.SECURE, False, False)],
     "§2.2: secure host without TLSA"),
]


@pytest.mark.parametrize(("domain", "failure", "status", "hosts", "rule"), CASES, ids=[c[0] for c in CASES])
def test_nexthop(testnet: TestNet, domain: str, failure: Failure, status: str,
                 hosts: list[tuple[str, Security, bool, bool]], rule: str) -> None:
    nh = nexthop(testnet, domain)
    assert nh.failure is failure, nh.reason
    assert nh.status == status
    got = [(h.name.to_text(), h.address_security, h.dane, bool(h.unusable)) for h in nh.hosts]
    assert got == hosts


def test_tlsa_base_domain_and_records(testnet: TestNet) -> None:
    nh = nexthop(testnet, "dane-ok.test")
    h = nh.hosts[0]
    assert h.tlsa_base is not None and h.tlsa_base.to_text() == "mx.dane-ok.test."
    assert [(t.usage, t.selector, t.mtype) for t in h.tlsa] == [(3, 1, 1)]
    assert h.addresses == ("127.0.1.1",)


def test_secure_cname_expansion_uses_expanded_tlsa_base(testnet: TestNet) -> None:
    """RFC 7672 §2.2.2: with a secure CNAME, the TLSA base domain is the expanded name."""
    r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
    import dns.name
    from postgate.outbound.nexthop import resolve_host
    h = asyncio.run(resolve_host(r, dns.name.from_text("secure.cname.test."), 10))
    assert h.address_security is Security.SECURE
    assert h.tlsa_base is not None and h.tlsa_base.to_text() == "mx.dane-ok.test."
    assert h.dane
    assert [n.to_text() for n in h.reference_names] == ["mx.dane-ok.test.", "secure.cname.test."]


def test_trust_ad_refused_for_remote_resolver() -> None:
    with pytest.raises(ResolverConfigError, match="allow_remote_trust_ad"):
        Resolver([("192.0.2.53", 53)], mode="trust-ad")
    Resolver([("192.0.2.53", 53)], mode="trust-ad", allow_remote_trust_ad=True)
    Resolver([("127.0.0.1", 53)], mode="trust-ad")


def postgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postgate.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_resolve_json(testnet: TestNet) -> None:
    res = postgate("resolve", "mismatch.test", "--resolver", testnet.resolver, "--trust-anchor",
                   str(testnet.anchor_file), "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["mx_security"] == "secure"
    assert [h["host"] for h in data["hosts"]] == ["mx1.mismatch.test", "mx2.mismatch.test"]
    h = data["hosts"][0]
    assert h["addresses"] == ["127.0.1.14"] and h["address_security"] == "secure"
    assert h["tlsa_base_domain"] == "mx1.mismatch.test" and h["tlsa_security"] == "secure"
    assert h["tlsa"][0].startswith("3 1 1 ")


def test_cli_resolve_text_and_exit_codes(testnet: TestNet) -> None:
    common = ["--resolver", f"{testnet.resolver}:53", "--trust-anchor", str(testnet.anchor_file)]
    res = postgate("resolve", "bogus-tlsa.test", *common)
    assert res.returncode == 75
    assert "bogus" in res.stdout and "verify failure" in res.stdout
    res = postgate("resolve", "nullmx.test", *common)
    assert res.returncode == 69 and "null MX" in res.stdout
    res = postgate("resolve", "unsigned.test", *common)
    assert res.returncode == 0 and "insecure" in res.stdout and "delegation without DS" in res.stdout
    res = postgate("resolve", "dane-ok.test", *common, "--mode", "trust-ad")
    assert res.returncode == 0 and "DANE: applies" in res.stdout


def test_cli_config_errors_name_file_and_line(tmp_path: Path, testnet: TestNet) -> None:
    cfg = tmp_path / "postgate.toml"
    cfg.write_text('[resolver]\nmode = "validate"\nservers = ["127.0.53.53"]\ntimeout = "soon"\n')
    res = postgate("resolve", "dane-ok.test", "--config", str(cfg))
    assert res.returncode == 78
    assert f"{cfg}:4:" in res.stderr and "timeout" in res.stderr
    cfg.write_text('[resolver]\nmode = "paranoid"\n')
    res = postgate("resolve", "dane-ok.test", "--config", str(cfg))
    assert res.returncode == 78 and f"{cfg}:2:" in res.stderr
    cfg.write_text('[resolver]\nservrs = ["127.0.53.53"]\n')
    res = postgate("resolve", "dane-ok.test", "--config", str(cfg))
    assert res.returncode == 78 and "unknown key 'servrs'" in res.stderr
    cfg.write_text('[resolver\n')
    res = postgate("resolve", "dane-ok.test", "--config", str(cfg))
    assert res.returncode == 78 and "TOML syntax error" in res.stderr
    bad_anchor = tmp_path / "anchor.key"
    bad_anchor.write_text(". IN DS nonsense\n")
    res = postgate("resolve", "dane-ok.test", "--resolver", testnet.resolver, "--trust-anchor",
                   str(bad_anchor))
    assert res.returncode == 78 and f"{bad_anchor}:1:" in res.stderr
    # a good configuration file with the anchor path relative to it
    (tmp_path / "root.key").write_text(testnet.anchor_file.read_text())
    cfg.write_text(f'[resolver]\nservers = ["{testnet.resolver}"]\ntrust_anchor_file = "root.key"\n')
    res = postgate("resolve", "dane-ok.test", "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "DANE: applies" in res.stdout


def test_cli_help_and_usage() -> None:
    res = postgate("--help")
    assert res.returncode == 0 and "resolve" in res.stdout
    res = postgate()
    assert res.returncode == 64
