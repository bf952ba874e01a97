"""The downgrade memory and the end of the instant cleartext fallback, on the test network.

- ``may`` and a failed handshake (a TLS 1.0-only server, which RFC 8996 forbids us to speak to): the first
  attempt defers; cleartext only once the message has waited the configured delay; never for a destination
  remembered as TLS-capable; and TLS 1.0 is never negotiated.
- A DANE domain whose DS record the parent withdraws (``test.`` re-signed without it) is flagged as a
  suspected downgrade; with ``downgrade = defer`` its mail waits; restoring the DS resumes delivery.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

from postgate.outbound.delivery import Counters, Deliverer, DeliveryConfig, RecipientResult
from postgate.outbound.downgrade import Action, DowngradeMemory, Protection, Settings
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.tls import Level, Policy
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet

FAST = Timeouts(connect=3, greeting=3, command=3, tls=3, data=5)


def _deliver(net: TestNet, rcpt: str, *, level: Level = Level.DANE, arrival: float | None = None,
             memory: DowngradeMemory | None = None, delay: float = 300,
             counters: Counters | None = None) -> tuple[RecipientResult, list[dict[str, object]]]:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)  # a fresh cache each time
    d = Deliverer(r, DeliveryConfig(helo="client.test", default_policy=Policy(level), timeouts=FAST,
                                    ca_file=str(net.state / "pki" / "root.crt"), downgrade=memory,
                                    cleartext_fallback_delay=delay), counters)
    token = secrets.token_hex(8)
    data = f"From: a@client.test\r\nTo: {rcpt}\r\nSubject: {token}\r\n\r\n{token}\r\n".encode()

    async def go() -> list[RecipientResult]:
        try:
            return await d.deliver("a@client.test", [rcpt], data, arrival=arrival)
        finally:
            await d.close()
    [res] = asyncio.run(go())
    arrived = [m for h in net.scenarios.receivers for m in net.received(h.host) if token in str(m["data"])]
    return res, arrived


def test_may_handshake_failure_defers_first_then_cleartext_after_the_delay(testnet: TestNet) -> None:
    c = Counters()
    res, arrived = _deliver(testnet, "bob@tls10.sts.test", level=Level.MAY, counters=c)
    assert res.status == Outcome.DEFERRED and "cleartext fallback only after 300s" in res.reason, res
    assert arrived == [] and c.values["cleartext_fallback_deferred"] == 1
    res, arrived = _deliver(testnet, "bob@tls10.sts.test", level=Level.MAY, arrival=time.time() - 299, counters=c)
    assert res.status == Outcome.DEFERRED and arrived == []
    res, arrived = _deliver(testnet, "bob@tls10.sts.test", level=Level.MAY, arrival=time.time() - 301, counters=c)
    assert res.status == Outcome.DELIVERED and res.security == "cleartext", res
    # RFC 8996: the TLS 1.0-only server was never used with TLS
    assert [m["tls"]["version"] for m in arrived] == [None]  # type: ignore[index]
    assert c.values["cleartext_fallback"] == 1


def test_no_cleartext_fallback_for_a_destination_that_did_tls(testnet: TestNet, tmp_path: Path) -> None:
    mem = DowngradeMemory(Settings(file=str(tmp_path / "memory.json")))
    asyncio.run(mem.note_tls("tls10.sts.test"))  # as a successful TLS delivery records it
    mem = DowngradeMemory(Settings(file=str(tmp_path / "memory.json")))  # and it survives a restart
    res, arrived = _deliver(testnet, "bob@tls10.sts.test", level=Level.MAY, arrival=time.time() - 86400,
                            memory=mem)
    assert res.status == Outcome.DEFERRED and res.suspected_attack and "did TLS before" in res.reason, res
    assert arrived == []


def test_tls_delivery_is_remembered(testnet: TestNet) -> None:
    mem = DowngradeMemory()
    res, _ = _deliver(testnet, "bob@dane-ok.test", memory=mem)
    assert res.status == Outcome.DELIVERED
    m = mem.get("dane-ok.test")
    assert m is not None and m.tls_seen > 0 and m.best == Protection.DANE and mem.tls_recent("dane-ok.test")


def test_ds_withdrawn_is_a_suspected_downgrade_and_defer_holds_mail(testnet: TestNet, tmp_path: Path) -> None:
    dg = next(z for z in testnet.scenarios.zones if z.name == "dg.test.")
    mem = DowngradeMemory(Settings(action=Action.DEFER, defer_window=3600, file=str(tmp_path / "memory.json")))
    res, arrived = _deliver(testnet, "bob@dg.test", memory=mem)
    assert res.status == Outcome.DELIVERED and res.security == "dane-verified" and len(arrived) == 1
    try:
        dg.ds_withdrawn = True  # the parent drops the DS: dg.test. is now provably insecure
        testnet.resign("test.")
        c = Counters()
        res, arrived = _deliver(testnet, "bob@dg.test", memory=mem, counters=c)
        assert res.status == Outcome.DEFERRED and res.suspected_attack and "suspected downgrade of dg.test" in res.reason
        assert "was dane, now none" in res.reason and arrived == []
        assert c.values["downgrade_suspected"] == 1
        m = mem.get("dg.test")
        assert m is not None and m.flagged > 0
        # log only: delivered (opportunistic TLS, as DNS now says) but still flagged and counted
        logmem = DowngradeMemory(Settings(action=Action.LOG, file=str(tmp_path / "memory.json")))
        res, arrived = _deliver(testnet, "bob@dg.test", memory=logmem, counters=c)
        assert res.status == Outcome.DELIVERED and res.security == "tls-unauthenticated" and len(arrived) == 1
        assert c.values["downgrade_suspected"] == 2
    finally:
        dg.ds_withdrawn = False
        testnet.resign("test.")
    res, arrived = _deliver(testnet, "bob@dg.test", memory=mem)  # DS back: delivery resumes at once
    assert res.status == Outcome.DELIVERED and res.security == "dane-verified" and len(arrived) == 1
    m = mem.get("dg.test")
    assert m is not None and m.flagged == 0 and m.best == Protection.DANE


def test_defer_window_ends(tmp_path: Path) -> None:
    now = [1_000_000.0]
    mem = DowngradeMemory(Settings(action=Action.DEFER, defer_window=3600), clock=lambda: now[0])

    async def go() -> list[tuple[bool, bool]]:
        out = []
        await mem.observe("x.example", Protection.DANE)
        for step in (0, 1800, 1801):
            now[0] += step
            v = await mem.observe("x.example", Protection.NONE)
            out.append((v.suspected, v.defer))
        return out
    assert asyncio.run(go()) == [(True, True), (True, True), (True, False)]
    m = mem.get("x.example")
    assert m is not None and m.best == Protection.NONE and not m.flagged  # the new state is accepted


def test_the_queue_passes_the_arrival_time(testnet: TestNet, tmp_path: Path) -> None:
    from postgate.outbound.queue.envelope import Envelope, Recipient
    from postgate.outbound.queue.scheduler import Scheduler
    from postgate.outbound.queue.spool import DirectorySpool

    spool = DirectorySpool(tmp_path / "spool")
    tokens = {}
    for age in (0, 600):  # one message just arrived, one waited ten minutes
        tokens[age] = secrets.token_hex(8)
        data = f"From: a@client.test\r\nSubject: {tokens[age]}\r\n\r\n{tokens[age]}\r\n".encode()
        env = Envelope.new("a@client.test", [Recipient("bob@tls10.sts.test")], data, now=time.time() - age)
        asyncio.run(spool.enqueue(env, data))
    r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="client.test", default_policy=Policy(Level.MAY), timeouts=FAST))

    async def go() -> None:
        try:
            await Scheduler(spool, d).run_once()
        finally:
            await d.close()
    asyncio.run(go())
    got = [m["data"] for m in testnet.received("mx.tls10.sts.test")]
    assert any(tokens[600] in str(x) for x in got) and not any(tokens[0] in str(x) for x in got)


def test_sts_record_vanishing_before_max_age_is_a_suspected_downgrade(testnet: TestNet, tmp_path: Path) -> None:
    from postgate.outbound.mtasts import Source, StsResolver, StsSettings

    zone = next(z for z in testnet.scenarios.zones if z.name == "sts.test.")
    ca = str(testnet.state / "pki" / "root.crt")

    def deliver(mem: DowngradeMemory) -> tuple[RecipientResult, bool]:
        r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
        sts = StsResolver(r, StsSettings(ca_file=ca, cache_file=str(tmp_path / "sts.json")))
        d = Deliverer(r, DeliveryConfig(helo="client.test", timeouts=FAST, ca_file=ca, sts=sts, downgrade=mem))
        token = secrets.token_hex(8)

        async def go() -> list[RecipientResult]:
            try:
                return await d.deliver("a@client.test", ["bob@cached.sts.test"],
                                       f"Subject: {token}\r\n\r\n{token}\r\n".encode())
            finally:
                await d.close()
        [res] = asyncio.run(go())
        assert asyncio.run(sts.lookup("cached.sts.test")).source in (Source.CACHED, Source.CACHED_FALLBACK)
        return res, any(token in str(m["data"]) for m in testnet.received("mx.enforce.sts.test"))

    mem = DowngradeMemory(Settings(action=Action.DEFER, file=str(tmp_path / "memory.json")))
    res, arrived = deliver(mem)
    assert res.status == Outcome.DELIVERED and res.security == "verified" and arrived
    old = list(zone.records)
    try:  # the attacker strips the TXT record: the cached policy still applies (RFC 8461 §10.2), and it is flagged
        zone.records = [r for r in old if not r.startswith("_mta-sts.cached ")]
        testnet.resign("sts.test.")
        res, arrived = deliver(mem)
        assert res.status == Outcome.DEFERRED and res.suspected_attack and "MTA-STS TXT record gone" in res.reason, res
        assert not arrived
    finally:
        zone.records = old
        testnet.resign("sts.test.")
    res, arrived = deliver(mem)
    assert res.status == Outcome.DELIVERED and arrived


def test_broken_state_files_start_empty_and_are_rewritten_whole(tmp_path: Path) -> None:
    """A memory or MTA-STS cache file that is not JSON, has the wrong shape or holds an unknown field is
    logged and ignored (delivery goes on); the next save replaces it atomically with a readable one."""
    from postgate.outbound.mtastsdb import Entry, PolicyCache
    policy = "version: STSv1\nmode: enforce\nmx: mx.example.net\nmax_age: 86400\n"
    for bad in ("{not json", '{"destinations": {"a": 1}}', '{"destinations": [{"domain": "x", "nope": 1}]}',
                '[1, 2]'):
        f = tmp_path / "memory.json"
        f.write_text(bad)
        mem = DowngradeMemory(Settings(file=str(f)))
        assert mem.get("x") is None
        asyncio.run(mem.note_tls("example.net"))
        assert DowngradeMemory(Settings(file=str(f))).tls_recent("example.net"), bad
        c = tmp_path / "sts.json"
        c.write_text(bad.replace("destinations", "policies"))
        cache = PolicyCache(c)
        assert cache.domains() == []
        asyncio.run(cache.put(Entry("example.net", "id1", policy, time.time(), time.time() + 86400)))
        assert PolicyCache(c).domains() == ["example.net"], bad
        assert not list(tmp_path.glob("*.tmp"))
