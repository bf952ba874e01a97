"""``postgate tls-check`` and delivery agree on every scenario of the test network, at every level.

Both consume the same walk over the next hop's hosts (Deliverer.attempts, applying policy.tls.decide), so
what tls-check reports is what delivery does: delivery delivers through the first host and address that
tls-check reports ok, with the same TLS security; it defers exactly when tls-check reports none ok, with
the same suspected-attack verdict; it bounces exactly when tls-check reports a permanent failure.

Both run with MTA-STS enabled (policies fetched from the test network's nginx policy hosts, trusted through
the test CA), so the sts.test scenarios — enforce, an MX the policy does not list, a certificate the Web PKI
does not accept, testing mode, DANE beside STS — are walked the same way too.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import pytest
from postgate.outbound.delivery import Deliverer, RecipientResult
from postgate.outbound.mtasts import StsResolver, StsSettings
from postgate.outbound.tlscheck import tls_check
from postgate.policy.tls import Level, Policy
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet
from tests.test_delivery import ROWS, deliverer, message

EXTRA = ["honest.caps.test", "nodane.caps.test", "twice.caps.test", "strip.caps.test", "capsless.test",
         "no-such-domain.test"]
# RFC 8461 scenarios: policies at mta-sts.<name> (fixtures/scenarios.toml, zone sts.test)
STS = [f"{n}.sts.test" for n in ("enforce", "mismatch", "badcert", "testing", "danests", "badweb", "redirect",
                                 "tls10")]


def domains(net: TestNet) -> list[str]:
    names = [z.name.rstrip(".") for z in net.scenarios.zones if z.name.count(".") >= 2]
    return sorted(set(names) | {r[0] for r in ROWS} | set(EXTRA) | set(STS))


def with_sts(net: TestNet, policy: Policy) -> Deliverer:
    d = deliverer(net, policy)
    d.config.sts = StsResolver(d.resolver, StsSettings(ca_file=str(net.state / "pki" / "root.crt"), fetch_timeout=5))
    return d


@pytest.mark.parametrize("level", list(Level), ids=[lv.value for lv in Level])
def test_tls_check_agrees_with_delivery(testnet: TestNet, level: Level) -> None:
    names = domains(testnet)
    token = secrets.token_hex(8)

    async def one(domain: str) -> tuple[RecipientResult, list[dict[str, Any]]]:
        d, c = with_sts(testnet, Policy(level)), with_sts(testnet, Policy(level))
        try:
            [res], reports = await asyncio.gather(
                d.deliver("alice@client.test", [f"bob@{domain}"], message(token)), tls_check(c, domain))
        finally:
            await d.close()
            await c.close()
        return res, reports

    async def everything() -> list[tuple[RecipientResult, list[dict[str, Any]]]]:
        return await asyncio.gather(*(one(n) for n in names))

    checked = 0
    for domain, (res, reports) in zip(names, asyncio.run(everything()), strict=True):
        what = f"{domain} at {level.value}: delivery {res.status} {res.mx} {res.security} ({res.text}); " \
               f"tls-check {[(r['mx'], r['address'], r['status'], r['security']) for r in reports]}"
        ok = [r for r in reports if r["status"] == "ok"]
        for r in reports:
            assert "None" not in str(r["reason"]), what
        if res.status is Outcome.DELIVERED:
            assert ok, what
            first = ok[0]
            assert (first["mx"], first["address"], first["security"]) == (res.mx, res.address, res.security), what
            checked += 1
        elif res.status is Outcome.DEFERRED:
            assert res.suspected_attack == any(r["suspected_attack"] for r in reports), what
            # TLS was fine where tls-check says ok: delivery failed there only after it, in the mail
            # transaction (a server that drops the connection in DATA), which tls-check does not reach
            for r in ok:
                assert res.tls_result is None and r["mx"] in res.reason, what
        elif res.mx is not None:  # bounced by the server's own 5xx, after TLS as tls-check saw it
            assert ok and (ok[0]["mx"], ok[0]["address"]) == (res.mx, res.address), what
        else:  # the destination does not exist or takes no mail
            assert [r["status"] for r in reports] == ["bounced"] and reports[0]["dsn"] == res.dsn, what
        if domain == "mismatch.sts.test" and level in (Level.MAY, Level.ENCRYPT, Level.DANE):
            # RFC 8461 §4.1: the enforced policy lists another MX: both skip it, never cleartext
            assert res.status is Outcome.DEFERRED and not ok and "MTA-STS" in reports[0]["reason"], what
        if domain == "enforce.sts.test" and level in (Level.MAY, Level.ENCRYPT, Level.DANE):
            # RFC 8461 §4.2: TLS with a Web-PKI certificate for the MX name, in both
            assert res.security == "verified" and "sts=enforce" in ok[0]["requirement"], what
    assert checked or level is Level.FINGERPRINT  # the walk saw deliveries (fingerprint has no match= here)
