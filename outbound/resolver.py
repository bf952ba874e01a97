"""An async DNS resolver whose every answer carries its DNSSEC verdict, validated by Postgate itself.

Mode ``validate`` (the default) asks any recursive resolver with the DO and CD bits set (RFC 4035 §3.2.2),
so the upstream returns signatures and does not filter bogus data, and then builds the chain of trust
itself: for the zone that signed an RRset it fetches the DS from the parent, validates that with the
parent's keys, and so on up to a trust anchor (RFC 4035 §5). Unsigned data is secure-or-bogus depending on
whether a signed proof shows the chain ending above it (an insecure delegation, RFC 4035 §5.2). Each link of
a CNAME or DNAME chain gets its own verdict; the answer's verdict is the weakest of them.

Mode ``trust-ad`` trusts the AD bit of the configured resolvers, as Postfix and Exim do. That is only as
safe as the path to the resolver, so it is refused for non-loopback resolvers unless explicitly allowed.

Answers, keys and upstream messages are cached with their TTLs (capped by each RRSIG's original TTL and
expiry), bounded in size; concurrent identical questions share one upstream query.

The work is split by job, and this module puts the pieces together:

- ``outbound.dns_transport``: questions to the upstream, UDP then TCP, lenient TLSA parsing;
- ``outbound.dns_cache``: the TTL-bounded LRU caches;
- ``outbound.chain_of_trust``: the verdict of every RRset, from an anchor down;
- ``outbound.trust_anchors``: anchor files and which anchors apply;
- ``outbound.dnssec``: the pure signature and denial-of-existence rules;
- ``outbound.dns_types``: :class:`Answer` and the message helpers.

Code that only needs answers depends on the :class:`ResolverProtocol` (one method, ``resolve``), so the
RFC 7672 next-hop rules can be exercised with a table of answers instead of a network.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from postgate.outbound import dnssec
from postgate.outbound.chain_of_trust import ChainOfTrust
from postgate.outbound.dns_cache import TTLCache
from postgate.outbound.dns_transport import EDNS_PAYLOAD, RawTLSA, Upstream, parse_server
from postgate.outbound.dns_types import (
    FAILURE_TTL,
    MAX_CHAIN,
    MAX_DEPTH,
    Answer,
    KeyResult,
    LookupFailed,
    Name,
    ResolverConfigError,
    walk,
)
from postgate.outbound.trust_anchors import IANA_ROOT_ANCHORS, TrustAnchors, load_anchors, parse_anchors
from postgate.policy.vocab import Security

__all__ = ["EDNS_PAYLOAD", "FAILURE_TTL", "IANA_ROOT_ANCHORS", "MAX_CHAIN", "MAX_DEPTH", "Answer", "KeyResult",
           "LookupFailed", "RawTLSA", "Resolver", "ResolverConfigError", "ResolverProtocol", "load_anchors",
           "parse_anchors", "parse_server", "shuffle_equal"]


class ResolverProtocol(Protocol):
    """What next-hop resolution, delivery and ``postgate check`` need from a resolver."""

    async def resolve(self, qname: Name | str, rdtype: int | str) -> Answer:
        """The answer to (qname, rdtype) with its DNSSEC verdict; never raises, bounded in time."""
        ...


# a name given as text is parsed once (the relay asks for the same few names for every message; names are
# immutable, so one object serves every caller)
_name = functools.lru_cache(maxsize=4096)(dns.name.from_text)
_keys: dict[int, tuple[Name, tuple[bytes, ...]]] = {}


def _cache_key(name: Name) -> tuple[bytes, ...]:
    """The answer cache's key for ``name``: its labels in lower case (RFC 4343 §3: ASCII case does not
    matter in a DNS name), made once per Name object. dnspython's ``Name.__hash__`` lowercases and hashes
    the name character by character in Python (~4 µs), and a relayed message looks up five or so cached
    answers (issue 20: 4% of the relay's Python time); a tuple of bytes hashes in C."""
    hit = _keys.get(id(name))
    if hit is not None and hit[0] is name:
        return hit[1]
    key = tuple(label.lower() for label in name.labels)
    if len(_keys) >= 4096:
        _keys.clear()
    _keys[id(name)] = (name, key)   # the name is kept, so its id is not reused while the entry lives
    return key


@dataclass
class Resolver:
    """Validating stub resolver. ``servers`` are recursive resolvers as (address, port)."""

    servers: Sequence[tuple[str, int]]
    anchors: dict[Name, list[DS | DNSKEY]] = field(default_factory=lambda: load_anchors(None))
    mode: str = "validate"
    timeout: float = 5.0
    skew: int = dnssec.DEFAULT_SKEW
    cache_size: int = 20000
    max_ttl: int = 86400
    clock: Callable[[], float] = time.time
    allow_remote_trust_ad: bool = False

    def __post_init__(self) -> None:
        if not self.servers:
            raise ResolverConfigError("no resolver configured")
        if self.mode not in ("validate", "trust-ad"):
            raise ResolverConfigError(f"resolver mode {self.mode!r}: expected validate or trust-ad")
        if self.mode == "trust-ad" and not self.allow_remote_trust_ad:
            for addr, _ in self.servers:
                if not ipaddress.ip_address(addr).is_loopback:
                    raise ResolverConfigError(
                        f"mode trust-ad with non-loopback resolver {addr}: the AD bit can be forged on "
                        "the path; set allow_remote_trust_ad = true to accept that risk")
        self.upstream = Upstream(self.servers, self.mode, self.timeout, self.max_ttl, self.clock)
        self._messages = TTLCache(self.cache_size, self.clock)
        self._answers = TTLCache(self.cache_size, self.clock)
        self._keys = TTLCache(max(256, self.cache_size // 10), self.clock)
        self.chain = ChainOfTrust(self._fetch, TrustAnchors(self.anchors), self._keys, self.clock, self.skew)

    @property
    def queries_sent(self) -> int:
        return self.upstream.queries_sent

    # --- public -----------------------------------------------------------------------------------
    async def resolve(self, qname: Name | str, rdtype: int | str) -> Answer:
        """The answer to (qname, rdtype) with its verdict, within ``timeout`` seconds (never raises)."""
        name = _name(qname) if isinstance(qname, str) else qname
        rt = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else dns.rdatatype.RdataType(rdtype)
        key = (_cache_key(name), rt)
        cached = self._answers.peek(key)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.timeout * 3):  # no extra task, unlike wait_for
                return await self._answers.get(key, lambda: self._resolve_stamped(name, rt))
        except TimeoutError:
            return Answer(name, rt, dns.rcode.SERVFAIL, Security.INDETERMINATE, "resolution timed out")

    def cache_stats(self) -> dict[str, int]:
        return {"answer_hits": self._answers.hits, "answer_misses": self._answers.misses,
                "queries_sent": self.queries_sent}

    # --- upstream ---------------------------------------------------------------------------------
    async def _fetch(self, qname: Name, rdtype: int) -> dns.message.Message:
        return await self._messages.get((qname, rdtype), lambda: self.upstream.query(qname, rdtype))

    async def _resolve_stamped(self, qname: Name, rdtype: int) -> tuple[Answer, int]:
        # the answer knows until when the cache serves it (outbound/nexthop.NextHopMemo keeps no result longer)
        ans, ttl = await self._resolve(qname, rdtype)
        return dataclasses.replace(ans, expires=self.clock() + ttl), ttl

    async def _resolve(self, qname: Name, rdtype: int) -> tuple[Answer, int]:
        try:
            msg = await self._fetch(qname, rdtype)
        except LookupFailed as e:
            return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.INDETERMINATE,
                          f"lookup of {qname} {dnssec.rtype_text(rdtype)} failed: {e}"), FAILURE_TTL
        if self.mode == "trust-ad":
            return self._trust_ad(qname, rdtype, msg)
        try:
            ans = await self.chain.validate(qname, rdtype, msg)
        except LookupFailed as e:
            ans = Answer(qname, rdtype, msg.rcode(), Security.INDETERMINATE,
                         f"could not fetch DNSSEC records: {e}")
        except RecursionError:
            ans = Answer(qname, rdtype, msg.rcode(), Security.BOGUS, "chain of trust too deep")
        ttl = ans.ttl if ans.security in (Security.SECURE, Security.INSECURE) else FAILURE_TTL
        return ans, max(1, ttl)

    # --- trust-ad ---------------------------------------------------------------------------------
    def _trust_ad(self, qname: Name, rdtype: int, msg: dns.message.Message) -> tuple[Answer, int]:
        if msg.rcode() == dns.rcode.SERVFAIL:
            return Answer(qname, rdtype, msg.rcode(), Security.INDETERMINATE,
                          "resolver answered SERVFAIL (bogus or unreachable)"), FAILURE_TTL
        sec = Security.SECURE if msg.flags & dns.flags.AD else Security.INSECURE
        chain, data, _ = walk(qname, rdtype, msg)
        ttl = self.upstream.message_ttl(msg)
        reason = "" if sec is Security.SECURE else "resolver did not set AD"
        # one AD bit covers the whole answer: the links cannot be told apart from the target
        return Answer(qname, rdtype, msg.rcode(), sec, reason, data, tuple(chain), ttl, sec), ttl


T = TypeVar("T")


def shuffle_equal(items: list[T], key: Callable[[T], int], rng: random.Random | None = None) -> list[T]:
    """Sort by ``key`` and shuffle runs of equal keys (RFC 5321 §5.1: equal MX preferences)."""
    r = rng or random.Random()
    decorated = [(key(i), r.random(), i) for i in items]
    decorated.sort(key=lambda t: (t[0], t[1]))
    return [i for _, _, i in decorated]
