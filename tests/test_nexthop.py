"""RFC 7672 §2.2 next-hop resolution on the test network, and ``postgate resolve``."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from postgate.outbound.dns_transport import RawTLSA
from postgate.outbound.dnssec import weakest
from postgate.outbound.nexthop import Failure, MXHost, NextHop, resolve_nexthop
from postgate.outbound.resolver import Answer, Resolver, ResolverConfigError, ResolverProtocol, load_anchors
from postgate.policy.tls import Auth, Level, Policy, Requirement, TLSMode, requirement
from postgate.policy.vocab import Security, Tlsa

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
    ("malformed-tlsa.test", Failure.NONE, "", [("mx.malformed-tlsa.test.", Security.SECURE, True, False)],
     "RFC 7671 §9: a malformed TLSA record is unusable, the RRset still counts"),
    ("only.malformed-tlsa.test", Failure.NONE, "",
     [("mx2.malformed-tlsa.test.", Security.SECURE, True, False)],
     "RFC 7671 §9: only malformed TLSA records: the lookup still succeeds"),
    ("alias.cname.test", Failure.NONE, "", [("dane-alias.cname.test.", Security.INSECURE, True, False)],
     "§2.2.2: secure CNAME to an unsigned zone: TLSA at the original name"),
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


def _requirement(h: MXHost, level: str = "dane") -> Requirement:
    return requirement(Policy(Level(level)), mx_host=h.name.to_text(), nexthop="x",
                       tlsa=tuple(Tlsa.from_rdata(t) for t in h.tlsa), tlsa_security=h.tlsa_security,
                       reference_names=tuple(n.to_text(omit_final_dot=True) for n in h.reference_names))


def test_malformed_tlsa_records_are_skipped_one_by_one(testnet: TestNet) -> None:
    """RFC 7671 §9, RFC 6698 §2.1: NSD serves a ``3 1 1`` record with 31 octets (and one of 2 octets) as
    generic data; the RRSIG over the wire form verifies, each record is judged on its own."""
    h = nexthop(testnet, "malformed-tlsa.test").hosts[0]
    assert h.tlsa_security is Security.SECURE and len(h.tlsa) == 2
    assert len(h.tlsa_problems) == 1 and "needs 32 octets" in h.tlsa_problems[0]
    req = _requirement(h)  # the well-formed record authenticates
    assert req.auth is Auth.DANE and [t.text() for t in req.tlsa] == [Tlsa.from_rdata(t).text() for t in h.tlsa
                                                                      if not isinstance(t, RawTLSA)]
    only = nexthop(testnet, "only.malformed-tlsa.test").hosts[0]
    assert only.tlsa_security is Security.SECURE and len(only.tlsa) == 2 and len(only.tlsa_problems) == 2
    req = _requirement(only)  # none usable: TLS mandatory, unauthenticated (Postfix: "fallback to
    assert (req.tls, req.auth, req.refuse) == (TLSMode.REQUIRED, Auth.NONE, "")  # unauthenticated TLS")
    assert _requirement(only, "dane-only").refuse


def test_secure_cname_to_unsigned_zone_keeps_the_original_tlsa_base(testnet: TestNet) -> None:
    """RFC 7672 §2.2.2, RFC 7671 §7: the alias is secure, its target insecure: the MX host name as published
    is the TLSA base domain and DANE applies; an insecure link makes no name a TLSA base domain."""
    h = nexthop(testnet, "alias.cname.test").hosts[0]
    assert h.address_security is Security.INSECURE
    assert h.tlsa_base is not None and h.tlsa_base.to_text() == "dane-alias.cname.test."
    assert h.tlsa_security is Security.SECURE and h.dane
    assert [n.to_text() for n in h.reference_names] == ["dane-alias.cname.test."]
    assert _requirement(h).auth is Auth.DANE
    insecure_link = nexthop(testnet, "cname.test").hosts[0]   # cname.test -> unsigned.test -> dane-ok.test
    assert insecure_link.tlsa_security is None and not insecure_link.dane


# --- the RFC 7672 rules against a fake resolver: no network, one row per rule ----------------------

# secure, unsigned (insecure), bogus, indeterminate
S, U, B, X = Security.SECURE, Security.INSECURE, Security.BOGUS, Security.INDETERMINATE


@dataclass(frozen=True)
class Rec:
    """One answer of the fake: verdict, records (rdata text), NXDOMAIN, and CNAME links as (owner, target,
    verdict of the link)."""

    security: Security = S
    data: tuple[str, ...] = ()
    nxdomain: bool = False
    links: tuple[tuple[str, str, Security], ...] = ()


class TableResolver:
    """A ``ResolverProtocol`` answering from a table; questions not in it get a secure NODATA."""

    def __init__(self, table: dict[tuple[str, str], Rec]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, qname: dns.name.Name | str, rdtype: int | str) -> Answer:
        name = dns.name.from_text(qname) if isinstance(qname, str) else qname
        rt = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else dns.rdatatype.RdataType(rdtype)
        key = (name.to_text(), dns.rdatatype.to_text(rt))
        self.asked.append(key)
        rec = self.table.get(key, Rec())
        chain = tuple(dns.rrset.from_text(o, 300, "IN", "CNAME", t) for o, t, _ in rec.links)
        owner = dns.name.from_text(rec.links[-1][1]) if rec.links else name
        rrset = dns.rrset.from_text_list(owner, 300, "IN", rt, list(rec.data)) if rec.data else None
        ok = rec.security in (S, U)
        return Answer(name, rt, dns.rcode.NXDOMAIN if rec.nxdomain else (dns.rcode.NOERROR if ok else
                      dns.rcode.SERVFAIL), rec.security, "" if rec.security is S else f"{rec.security} by table",
                      rrset, chain, 300, weakest(*(v for _, _, v in rec.links)))


TLSA_OK = "3 1 1 " + "ab" * 32
# (rule, table, domain, failure, status, [(host, address security, TLSA looked up, DANE applies, unusable)])
TABLE: list[tuple[str, dict[tuple[str, str], Rec], str, Failure, str,
                  list[tuple[str, Security, bool, bool, bool]]]] = [
    ("§2.2: secure MX, A and TLSA: DANE",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(data=("192.0.2.1",)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", S, True, True, False)]),
    ("§2.1.1: bogus MX: defer",
     {("d.test.", "MX"): Rec(B)}, "d.test", Failure.TEMPORARY, "4.4.3", []),
    ("§2.1.1: MX lookup failed: defer",
     {("d.test.", "MX"): Rec(X)}, "d.test", Failure.TEMPORARY, "4.4.3", []),
    ("RFC 5321 §5.1: NXDOMAIN: no such domain",
     {("d.test.", "MX"): Rec(nxdomain=True)}, "d.test", Failure.PERMANENT, "5.1.2", []),
    ("RFC 7505 §3: null MX",
     {("d.test.", "MX"): Rec(data=("0 .",))}, "d.test", Failure.PERMANENT, "5.1.10", []),
    ("RFC 5321 §5.1: no MX: the domain is the implicit MX",
     {("d.test.", "A"): Rec(data=("192.0.2.1",))}, "d.test", Failure.NONE, "",
     [("d.test.", S, True, False, False)]),
    ("§2.2: insecure A: no TLSA lookup",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(U, ("192.0.2.1",)),
      ("mx.d.test.", "AAAA"): Rec(U), ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", U, False, False, False)]),
    ("§2.1.1: bogus A: host unusable",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(B)},
     "d.test", Failure.TEMPORARY, "4.4.3", [("mx.d.test.", B, False, False, True)]),
    ("§2.1.1: bogus TLSA is not 'no TLSA': host unusable",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(data=("192.0.2.1",)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(B)},
     "d.test", Failure.TEMPORARY, "4.4.3", [("mx.d.test.", S, True, False, True)]),
    ("§2.2.1: insecure MX RRset, secure host: DANE still applies",
     {("d.test.", "MX"): Rec(U, ("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(data=("192.0.2.1",)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", S, True, True, False)]),
    ("§2.2.2: secure CNAME: TLSA at the expanded name",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)),
      ("mx.d.test.", "A"): Rec(data=("192.0.2.1",), links=(("mx.d.test.", "host.p.test.", S),)),
      ("_25._tcp.host.p.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", S, True, True, False)]),
    ("§2.2.2: insecure TLSA at the expanded name: the original name's secure TLSA apply",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)),
      ("mx.d.test.", "A"): Rec(data=("192.0.2.1",), links=(("mx.d.test.", "host.p.test.", S),)),
      ("_25._tcp.host.p.test.", "TLSA"): Rec(U, (TLSA_OK,)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", S, True, True, False)]),
    ("§2.2.2: secure CNAME to an unsigned zone: TLSA at the original name",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)),
      ("mx.d.test.", "A"): Rec(U, ("192.0.2.1",), links=(("mx.d.test.", "host.u.test.", S),)),
      ("mx.d.test.", "AAAA"): Rec(U, links=(("mx.d.test.", "host.u.test.", S),)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,)),
      ("_25._tcp.host.u.test.", "TLSA"): Rec(U, (TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", U, True, True, False)]),
    ("§2.2.2: an insecure link makes no name a TLSA base domain",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)),
      ("mx.d.test.", "A"): Rec(U, ("192.0.2.1",), links=(("mx.d.test.", "a.u.test.", S),
                                                         ("a.u.test.", "host.p.test.", U))),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=(TLSA_OK,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", U, False, False, False)]),
    ("RFC 7671 §9: a secure TLSA RRset of only unusable records still counts (TLS mandatory)",
     {("d.test.", "MX"): Rec(data=("10 mx.d.test.",)), ("mx.d.test.", "A"): Rec(data=("192.0.2.1",)),
      ("_25._tcp.mx.d.test.", "TLSA"): Rec(data=("1 1 1 " + "ab" * 32,))},
     "d.test", Failure.NONE, "", [("mx.d.test.", S, True, True, False)]),
    ("RFC 5321 §5.1: every MX host unusable: defer, naming each",
     {("d.test.", "MX"): Rec(data=("10 a.d.test.", "20 b.d.test.")), ("a.d.test.", "A"): Rec(B),
      ("b.d.test.", "AAAA"): Rec(X)},
     "d.test", Failure.TEMPORARY, "4.4.3", [("a.d.test.", B, False, False, True),
                                             ("b.d.test.", X, False, False, True)]),
]


@pytest.mark.parametrize(("rule", "table", "domain", "failure", "status", "hosts"), TABLE,
                         ids=[row[0] for row in TABLE])
def test_nexthop_rules_against_a_table(rule: str, table: dict[tuple[str, str], Rec], domain: str,
                                       failure: Failure, status: str,
                                       hosts: list[tuple[str, Security, bool, bool, bool]]) -> None:
    resolver: ResolverProtocol = TableResolver(table)
    nh = asyncio.run(resolve_nexthop(resolver, domain))
    assert (nh.failure, nh.status) == (failure, status), nh.reason
    got = [(h.name.to_text(), h.address_security, h.tlsa_security is not None, h.dane, bool(h.unusable))
           for h in nh.hosts]
    assert got == hosts


class DnameResolver(TableResolver):
    """The table, and ``mx.old.test`` reached through ``old.test DNAME new.test`` as the validating resolver
    answers it: the DNAME RRset alone in the chain (RFC 6672 §2.2), the addresses at ``mx.new.test``."""

    async def resolve(self, qname: dns.name.Name | str, rdtype: int | str) -> Answer:
        name = dns.name.from_text(qname) if isinstance(qname, str) else qname
        rt = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else dns.rdatatype.RdataType(rdtype)
        if name.to_text() != "mx.old.test." or rt not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return await super().resolve(name, rt)
        self.asked.append((name.to_text(), dns.rdatatype.to_text(rt)))
        dname = dns.rrset.from_text("old.test.", 300, "IN", "DNAME", "new.test.")
        rrset = dns.rrset.from_text("mx.new.test.", 300, "IN", "A", "192.0.2.1") if rt == dns.rdatatype.A else None
        return Answer(name, rt, dns.rcode.NOERROR, S, "", rrset, (dname,), 300, S)


def test_a_secure_dname_expansion_is_the_tlsa_base_domain() -> None:
    """RFC 7672 §2.2.2 with RFC 6672: an MX host reached through a secure DNAME has the fully expanded name
    (the owner's suffix replaced, ``mx.new.test``) as its TLSA base domain, not the DNAME's target
    (``new.test``): the host's secure TLSA records apply and DANE is mandatory. Before, the TLSA records
    were looked up at ``_25._tcp.new.test`` and the delivery fell back to opportunistic TLS."""
    r = DnameResolver({("d.test.", "MX"): Rec(data=("10 mx.old.test.",)),
                       ("_25._tcp.mx.new.test.", "TLSA"): Rec(data=(TLSA_OK,))})
    [h] = asyncio.run(resolve_nexthop(r, "d.test")).hosts
    assert [n.to_text() for n in h.cname_chain] == ["mx.new.test."]
    assert h.tlsa_base is not None and h.tlsa_base.to_text() == "mx.new.test." and h.dane and len(h.tlsa) == 1
    assert [q for q, t in r.asked if t == "TLSA"] == ["_25._tcp.mx.new.test."]


def test_secure_cname_to_unsigned_zone_asks_the_original_name_only() -> None:
    """RFC 7672 §2.2.2: the expanded name lies in an unsigned zone: its TLSA records (insecure) are never
    asked for, and the TLSA base domain is the original name."""
    rule, table = TABLE[12][0], TABLE[12][1]
    assert "unsigned zone" in rule
    r = TableResolver(table)
    h = asyncio.run(resolve_nexthop(r, "d.test")).hosts[0]
    assert h.tlsa_base is not None and h.tlsa_base.to_text() == "mx.d.test."
    assert ("_25._tcp.host.u.test.", "TLSA") not in r.asked
