"""A programmable upstream DNS server and a hand signer, for hand-built DNSSEC responses.

The test network's NSD+Unbound give realistic answers; this gives the ones no honest server sends: a
validly signed NXDOMAIN with its proof stripped, malformed or truncated packets, answers to another
question, silence. It listens on a loopback address inside the test namespace (UDP and TCP).
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from cryptography.hazmat.primitives.asymmetric import ec

Handler = Callable[[dns.message.Message], "bytes | dns.message.Message | None"]


class Signer:
    """One zone's key (a CSK) and helpers to make signed RRsets."""

    def __init__(self, zone: str) -> None:
        self.zone = dns.name.from_text(zone)
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.dnskey = dns.dnssec.make_dnskey(self.key.public_key(), dns.dnssec.Algorithm.ECDSAP256SHA256,
                                             flags=257)
        self.dnskeys = dns.rrset.from_rdata(self.zone, 3600, self.dnskey)

    def rr(self, name: str, rdtype: str, *rdatas: str, ttl: int = 300) -> dns.rrset.RRset:
        return dns.rrset.from_text(self.n(name), ttl, "IN", rdtype, *rdatas)

    def n(self, name: str) -> dns.name.Name:
        return dns.name.from_text(name) if name.endswith(".") else dns.name.from_text(name, self.zone)

    def sign(self, rrset: dns.rrset.RRset, *, expired: bool = False,
             wildcard_labels: int | None = None) -> dns.rrset.RRset:
        now = int(time.time())
        inception, expiration = (now - 7200, now - 3600) if expired else (now - 3600, now + 86400)
        if wildcard_labels is not None:
            # sign as the wildcard owner, then present the signature under the expanded name
            wc = dns.name.Name((b"*", *rrset.name.labels[-(wildcard_labels + 1):]))
            src = dns.rrset.from_rdata_list(wc, rrset.ttl, list(rrset))
            sig = dns.dnssec.sign(src, self.key, self.zone, self.dnskey, inception=inception,
                                  expiration=expiration)
            return dns.rrset.from_rdata(rrset.name, rrset.ttl, sig)
        sig = dns.dnssec.sign(rrset, self.key, self.zone, self.dnskey, inception=inception,
                              expiration=expiration)
        return dns.rrset.from_rdata(rrset.name, rrset.ttl, sig)

    def signed(self, rrset: dns.rrset.RRset, expired: bool = False,
               wildcard_labels: int | None = None) -> list[dns.rrset.RRset]:
        return [rrset, self.sign(rrset, expired=expired, wildcard_labels=wildcard_labels)]

    def soa(self) -> list[dns.rrset.RRset]:
        return self.signed(self.rr("@", "SOA", f"ns1.{self.zone} h.{self.zone} 1 3600 600 86400 300"))

    def nsec3_hash(self, name: str, iterations: int = 0) -> str:
        return dns.dnssec.nsec3_hash(self.n(name), None, iterations, 1)

    def nsec3(self, name: str, next_name: str, types: str, *, optout: bool = False,
              iterations: int = 0) -> list[dns.rrset.RRset]:
        """A signed NSEC3 RR for ``name`` whose next hashed owner is the hash of ``next_name``
        (or a literal base32hex string prefixed with ``=``)."""
        owner = self.nsec3_hash(name, iterations).lower() + "." + str(self.zone)
        nxt = next_name[1:] if next_name.startswith("=") else self.nsec3_hash(next_name, iterations)
        rd = f"1 {1 if optout else 0} {iterations} - {nxt} {types}".strip()
        return self.signed(dns.rrset.from_text(owner, 300, "IN", "NSEC3", rd))


@dataclass
class Reply:
    rcode: int = dns.rcode.NOERROR
    answer: list[dns.rrset.RRset] = field(default_factory=list)
    authority: list[dns.rrset.RRset] = field(default_factory=list)


class FakeUpstream:
    """Serves ``replies[(qname, qtype)]``; DNSKEY of each registered signer is answered automatically.
    ``handler``, when set, takes over entirely (return bytes to send raw, None to stay silent)."""

    def __init__(self, address: str = "127.0.60.1", port: int = 53) -> None:
        self.address, self.port = address, port
        self.replies: dict[tuple[dns.name.Name, int], Reply] = {}
        self.signers: list[Signer] = []
        self.handler: Handler | None = None
        self.queries: list[tuple[str, str]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def add(self, name: str | dns.name.Name, rdtype: str, reply: Reply) -> None:
        n = dns.name.from_text(name) if isinstance(name, str) else name
        self.replies[(n, dns.rdatatype.from_text(rdtype))] = reply

    def respond(self, q: dns.message.Message) -> bytes | None:
        qq = q.question[0]
        self.queries.append((qq.name.to_text(), dns.rdatatype.to_text(qq.rdtype)))
        if self.handler is not None:
            out = self.handler(q)
            if out is None or isinstance(out, bytes):
                return out
            return out.to_wire(max_size=65535)
        r = dns.message.make_response(q)
        r.flags |= dns.flags.RA
        reply = self.replies.get((qq.name, qq.rdtype))
        if reply is None and qq.rdtype == dns.rdatatype.DNSKEY:
            for s in self.signers:
                if s.zone == qq.name:
                    reply = Reply(answer=s.signed(s.dnskeys))
        if reply is None:
            r.set_rcode(dns.rcode.REFUSED)
        else:
            r.set_rcode(reply.rcode)
            r.answer = list(reply.answer)
            r.authority = list(reply.authority)
        return r.to_wire(max_size=65535)

    # --- server ------------------------------------------------------------------------------------
    def __enter__(self) -> FakeUpstream:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("fake upstream did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        fake = self

        class UDP(asyncio.DatagramProtocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.t = transport

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                try:
                    q = dns.message.from_wire(data)
                except Exception:
                    return
                out = fake.respond(q)
                if out is not None:
                    self.t.sendto(out, addr)  # type: ignore[attr-defined]

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                ln = struct.unpack("!H", await reader.readexactly(2))[0]
                q = dns.message.from_wire(await reader.readexactly(ln))
                out = fake.respond(q)
                if out is not None:
                    writer.write(struct.pack("!H", len(out)) + out)
                    await writer.drain()
                else:
                    await asyncio.sleep(30)
            except Exception:
                pass
            finally:
                writer.close()

        transport, _ = await self._loop.create_datagram_endpoint(UDP, local_addr=(self.address, self.port))
        server = await asyncio.start_server(tcp, self.address, self.port)
        self._ready.set()
        await self._stop.wait()
        transport.close()
        server.close()
