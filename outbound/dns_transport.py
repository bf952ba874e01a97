"""The resolver's transport: questions to the configured recursive resolvers, answers parsed leniently.

RFC 4035 §3.2.2: in ``validate`` mode the question carries DO and CD, so the upstream returns signatures
and does not filter bogus data (Postgate validates); RFC 6840 §5.7: AD is set to ask for the AD bit.
A truncated UDP answer is retried over TCP (RFC 7766 §5). Every exchange has a timeout; a reply whose ID
or question does not match ours is ignored (it may be spoofed) while we wait for the real one.

Lenient RDATA (RFC 7671 §9, RFC 6698 §2.1): dnspython refuses a whole message when one TLSA record's data
does not fit its matching type (e.g. a ``3 1 1`` record whose digest is not 32 octets). The RRSIG covers
the *wire form*, and the DANE rules judge each record on its own, so such a message is parsed again with
the TLSA records kept as raw octets (:class:`RawTLSA`): the signature is verified over exactly what was
served, and the malformed record is later found unusable while the others still count.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import dns.exception
import dns.flags
import dns.immutable
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.RRSIG import RRSIG
from postgate.outbound.dns_types import FAILURE_TTL, LookupFailed, Name, ResolverConfigError

EDNS_PAYLOAD = 1232       # DNS flag day 2020 buffer size
_PRIVATE = 65534          # RFC 6895 §3.1 private-use type: a malformed TLSA's type while parsing


def parse_server(spec: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[v6]:PORT`` or bare v6."""
    spec = spec.strip()
    try:
        if spec.startswith("["):
            host, _, port = spec[1:].partition("]")
            addr = str(ipaddress.ip_address(host))
            return addr, int(port.lstrip(":") or 53)
        if spec.count(":") == 1:
            host, port = spec.split(":")
            return str(ipaddress.ip_address(host)), int(port)
        return str(ipaddress.ip_address(spec)), 53
    except ValueError as e:
        raise ResolverConfigError(f"resolver {spec!r}: expected ADDR[:PORT]") from e


# --- lenient TLSA ---------------------------------------------------------------------------------

@dns.immutable.immutable
class RawTLSA(dns.rdata.GenericRdata):
    """A TLSA record kept as the octets served (RFC 3597 form), with its fields read as far as they go.

    ``problem`` says why it is unusable (RFC 6698 §2.1: one octet each for usage, selector and matching
    type, then the data; §2.1.3: SHA2-256 data is 32 octets, SHA2-512 64). Missing fields read as 255,
    a private-use value no DANE client uses (RFC 7672 §3.1.3).
    """

    __slots__ = ["cert", "mtype", "problem", "selector", "usage"]

    def __init__(self, rdclass: dns.rdataclass.RdataClass, rdtype: dns.rdatatype.RdataType,
                 data: bytes) -> None:
        super().__init__(rdclass, rdtype, data)
        head = data[:3] + b"\xff" * max(0, 3 - len(data))
        self.usage, self.selector, self.mtype = head[0], head[1], head[2]
        self.cert = data[3:]
        self.problem = tlsa_problem(data)


_DIGEST_LENGTH = {1: 32, 2: 64}   # RFC 6698 §2.1.3


def tlsa_problem(data: bytes) -> str:
    """Why TLSA RDATA is malformed (RFC 6698 §2.1), or ``""``."""
    if len(data) < 3:
        return f"TLSA RDATA of {len(data)} octets has no room for usage, selector and matching type"
    want = _DIGEST_LENGTH.get(data[2])
    if want is not None and len(data) - 3 != want:
        return f"matching type {data[2]} needs {want} octets of data, the record has {len(data) - 3}"
    if len(data) == 3:
        return "TLSA record without certificate association data"
    return ""


def _skip_name(wire: bytes, i: int) -> int:
    """Offset after the (possibly compressed) domain name at ``i`` (RFC 1035 §4.1.4)."""
    while True:
        if i >= len(wire):
            raise ValueError("name runs past the message")
        n = wire[i]
        if n & 0xC0 == 0xC0:
            return i + 2
        if n == 0:
            return i + 1
        i += 1 + n


def _retype(wire: bytes, old: int, new: int) -> bytes:
    """The message with the TYPE of every resource record ``old`` changed to ``new`` (questions kept)."""
    out = bytearray(wire)
    qd, an, ns, ar = struct.unpack_from("!4H", wire, 4)
    i = 12
    for _ in range(qd):
        i = _skip_name(wire, i) + 4
    for _ in range(an + ns + ar):
        i = _skip_name(wire, i)
        rtype, _cls, _ttl, rdlen = struct.unpack_from("!HHIH", wire, i)
        if rtype == old:
            struct.pack_into("!H", out, i, new)
        i += 10 + rdlen
    return bytes(out)


def parse_message(wire: bytes) -> dns.message.Message:
    """``dns.message.from_wire``, except that malformed TLSA RDATA is kept as :class:`RawTLSA`."""
    try:
        return dns.message.from_wire(wire, ignore_trailing=False)
    except dns.exception.FormError as first:
        try:
            retyped = _retype(wire, dns.rdatatype.TLSA, _PRIVATE)
        except (struct.error, ValueError):
            raise first from None
        if retyped == wire or _PRIVATE.to_bytes(2, "big") in wire:
            raise
        msg = dns.message.from_wire(retyped, ignore_trailing=False)
    for section in (msg.answer, msg.authority, msg.additional):
        for k, rr in enumerate(section):
            if rr.rdtype != _PRIVATE:
                continue
            fixed = dns.rrset.RRset(rr.name, rr.rdclass, dns.rdatatype.TLSA)
            fixed.update_ttl(rr.ttl)
            for rd in rr:
                data = rd.data
                if tlsa_problem(data):
                    fixed.add(RawTLSA(rr.rdclass, dns.rdatatype.TLSA, data))
                else:
                    fixed.add(dns.rdata.from_wire(rr.rdclass, dns.rdatatype.TLSA, data, 0, len(data)))
            section[k] = fixed
    return msg


# --- the exchange ---------------------------------------------------------------------------------

RESEND_FIRST = 1.0   # seconds before a UDP question without an answer is sent again (then doubling)


@dataclass
class Upstream:
    """The configured recursive resolvers, asked in order until one answers."""

    servers: Sequence[tuple[str, int]]
    mode: str = "validate"
    timeout: float = 5.0
    max_ttl: int = 86400
    clock: Callable[[], float] = time.time
    queries_sent: int = field(default=0)

    async def query(self, qname: Name, rdtype: int) -> tuple[dns.message.Message, int]:
        """The first usable reply for (qname, rdtype) and how long it may be cached; LookupFailed if none."""
        q = dns.message.make_query(qname, dns.rdatatype.RdataType.make(rdtype), want_dnssec=True,
                                   payload=EDNS_PAYLOAD)
        if self.mode == "validate":
            q.flags |= dns.flags.CD  # RFC 4035 §3.2.2: we validate, the upstream must not filter
        q.flags |= dns.flags.AD  # RFC 6840 §5.7: ask for the AD bit
        errors = []
        for addr, port in self.servers:
            self.queries_sent += 1
            try:
                r = await self._udp(q, addr, port)
                if r.flags & dns.flags.TC:  # RFC 7766 §5: retry over TCP
                    r = await self._tcp(q, addr, port)
                    if r.flags & dns.flags.TC:
                        errors.append(f"{addr}: truncated answer over TCP")
                        continue
            except (dns.exception.Timeout, TimeoutError):
                errors.append(f"{addr}: timeout")
                continue
            except (dns.exception.DNSException, OSError, ValueError, EOFError, struct.error) as e:
                errors.append(f"{addr}: {type(e).__name__}: {e}")
                continue
            if r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                if self.mode == "trust-ad" and r.rcode() == dns.rcode.SERVFAIL:
                    return r, FAILURE_TTL
                errors.append(f"{addr}: {dns.rcode.to_text(r.rcode())}")
                continue
            return r, self.message_ttl(r)
        raise LookupFailed("; ".join(errors) or "no resolver answered")

    def message_ttl(self, r: dns.message.Message) -> int:
        ttls = [rr.ttl for rr in (*r.answer, *r.authority)]
        for rr in (*r.answer, *r.authority):
            for rd in rr:
                if isinstance(rd, RRSIG):
                    ttls.append(rd.original_ttl)
                    ttls.append(max(0, int(rd.expiration - self.clock())))
        return max(1, min([self.max_ttl, *ttls]))

    async def _udp(self, q: dns.message.Message, addr: str, port: int) -> dns.message.Message:
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[bytes | Exception] = asyncio.Queue()

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, src: tuple[str | object, ...]) -> None:
                inbox.put_nowait(data)

            def error_received(self, exc: Exception) -> None:
                inbox.put_nowait(exc)

        transport, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(addr, port))
        wire = q.to_wire()
        # RFC 1035 §4.2.1: UDP is unreliable, so the question is sent again while no answer came, at growing
        # intervals (1 s, 2 s, 4 s ... within the timeout), same ID: an answer to any copy will do. A burst
        # of questions that overflowed the resolver's socket buffer costs a second, not the whole timeout.
        resend = RESEND_FIRST
        try:
            transport.sendto(wire)
            async with asyncio.timeout(self.timeout):
                while True:
                    try:
                        async with asyncio.timeout(resend):
                            data = await inbox.get()
                    except TimeoutError:
                        transport.sendto(wire)
                        resend *= 2
                        continue
                    if isinstance(data, Exception):
                        raise data
                    r = parse_message(data)
                    if q.is_response(r):
                        return r
                    # a reply to another question or with another ID: not ours (RFC 5452 §4.3)
        finally:
            transport.close()

    async def _tcp(self, q: dns.message.Message, addr: str, port: int) -> dns.message.Message:
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_connection(addr, port)
            try:
                wire = q.to_wire()
                writer.write(struct.pack("!H", len(wire)) + wire)  # RFC 1035 §4.2.2: length prefix
                await writer.drain()
                n = struct.unpack("!H", await reader.readexactly(2))[0]
                r = parse_message(await reader.readexactly(n))
            finally:
                writer.close()
        if not q.is_response(r):
            raise ValueError("TCP reply does not answer our question")
        return r
