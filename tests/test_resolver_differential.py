"""Postgate's own DNSSEC validation against Unbound's, on every owner and type of the test network.

Mapping (issue #3): Unbound AD -> secure; Unbound SERVFAIL -> bogus or indeterminate; otherwise insecure.
Both Postgate modes are compared: ``validate`` (Postgate validates, upstream asked with CD) and
``trust-ad`` (Postgate trusts Unbound's AD bit).
"""

from __future__ import annotations

import asyncio

import dns.flags
import dns.rcode
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.policy.vocab import Security

from fixtures.testnet import TestNet


def unbound_verdict(net: TestNet, name: str, rdtype: str) -> str:
    r = net.query(name, rdtype)
    if r.rcode() == dns.rcode.SERVFAIL:
        return "fail"
    return "secure" if r.flags & dns.flags.AD else "insecure"


def ours(sec: Security) -> str:
    return {Security.SECURE: "secure", Security.INSECURE: "insecure"}.get(sec, "fail")


def _compare(net: TestNet, mode: str) -> tuple[int, list[str]]:
    questions = net.questions()
    resolver = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), mode=mode, timeout=3)

    async def run() -> list[tuple[str, str, Security, str]]:
        answers = await asyncio.gather(*(resolver.resolve(n, t) for n, t in questions))
        return [(n, t, a.security, a.reason) for (n, t), a in zip(questions, answers, strict=True)]

    mismatches = []
    for name, rdtype, sec, reason in asyncio.run(run()):
        expected = unbound_verdict(net, name, rdtype)
        if ours(sec) != expected:
            mismatches.append(f"{name} {rdtype}: unbound={expected} postgate={sec} ({reason})")
    return len(questions), mismatches


def test_validate_mode_agrees_with_unbound(testnet: TestNet) -> None:
    n, mismatches = _compare(testnet, "validate")
    assert n > 100
    assert mismatches == []


def test_trust_ad_mode_agrees_with_unbound(testnet: TestNet) -> None:
    n, mismatches = _compare(testnet, "trust-ad")
    assert n > 100
    assert mismatches == []


def test_every_verdict_kind_is_exercised(testnet: TestNet) -> None:
    """The differential is meaningful only if the network yields all three outcomes."""
    seen = {unbound_verdict(testnet, n, t) for n, t in testnet.questions()}
    assert seen == {"secure", "insecure", "fail"}
