"""``postgate check``: does this server's own setup deserve the trust Postgate demands of others?

One line per check, PASS / WARN / FAIL, and for each problem the exact fix: the record to publish
(computed from the certificate or key) or the file to correct. ``postgate serve`` runs the same checks
before it listens and refuses to start on a FAIL, unless the operator downgraded that check by name in
``[check] downgrade``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import dns.name
import dns.rdatatype
import dns.reversename
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postgate import config as configmod
from postgate.outbound import dane, dkim
from postgate.outbound.dnssec import rtype_text
from postgate.outbound.nexthop import caps_owner, tlsa_owner
from postgate.outbound.resolver import ResolverProtocol
from postgate.policy import caps as capsmod
from postgate.policy.vocab import Security, Tlsa

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@dataclass
class Result:
    check: str
    status: str
    message: str
    fix: str = ""

    def line(self) -> str:
        return f"{self.status} {self.check}: {self.message}" + (f"\n     fix: {self.fix}" if self.fix else "")


def _load_chain(path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(Path(path).read_bytes())


def _domain_of_host(host: str) -> str:
    return host.split(".", 1)[1] if host.count(".") >= 2 else host


async def run_checks(cfg: configmod.Config, resolver: ResolverProtocol, caps_offered: capsmod.Caps,
                     now: dt.datetime | None = None) -> list[Result]:
    now = now or dt.datetime.now(dt.UTC)
    host = (cfg.server.hostname or "").rstrip(".").lower()
    out: list[Result] = []

    # --- resolver and trust anchors
    root = await resolver.resolve(".", "DNSKEY")
    if root.security is Security.SECURE:
        out.append(Result("resolver", PASS, "trust anchors load and the resolver answers a validated query"))
    else:
        out.append(Result("resolver", FAIL, f"the root DNSKEY is {root.security}: {root.reason}",
                          "check [resolver] servers and trust_anchor_file"))
    if not host:
        out.append(Result("host-dnssec", FAIL, "no host name configured", "set [server] hostname"))
        return out

    # --- certificate
    chain: list[x509.Certificate] = []
    s = cfg.server
    if not s.tls_cert_file:
        out.append(Result("tls-certificate", FAIL, "no TLS certificate: STARTTLS and DANE are impossible",
                          "set [server] tls_cert_file and tls_key_file"))
    else:
        try:
            chain = _load_chain(s.tls_cert_file)
            key = serialization.load_pem_private_key(Path(s.tls_key_file).read_bytes(), password=None)
            leaf = chain[0]
            problems = []
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if key.public_key().public_bytes(serialization.Encoding.DER, spki) != \
                    leaf.public_key().public_bytes(serialization.Encoding.DER, spki):
                problems.append(f"the key in {s.tls_key_file} does not belong to the certificate")
            if leaf.not_valid_after_utc < now:
                problems.append(f"the certificate expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
            elif leaf.not_valid_before_utc > now:
                problems.append("the certificate is not valid yet")
            names = dane.cert_names(leaf)
            if not any(dane.name_matches(n, host) for n in names):
                problems.append(f"the certificate names {', '.join(names)}, not {host}")
            if problems:
                out.append(Result("tls-certificate", FAIL, "; ".join(problems),
                                  f"install a valid certificate for {host} in {s.tls_cert_file} and its key in "
                                  f"{s.tls_key_file}"))
            elif (leaf.not_valid_after_utc - now).days < 14:
                out.append(Result("tls-certificate", WARN, f"the certificate expires on "
                                  f"{leaf.not_valid_after_utc:%Y-%m-%d}", "renew it (and publish its TLSA first)"))
            else:
                out.append(Result("tls-certificate", PASS, f"certificate for {host} valid until "
                                  f"{leaf.not_valid_after_utc:%Y-%m-%d}"))
        except (OSError, ValueError, IndexError, TypeError) as e:
            out.append(Result("tls-certificate", FAIL, f"cannot load the certificate or key: {e}",
                              f"fix {s.tls_cert_file} / {s.tls_key_file}"))
            chain = []

    # --- DNSSEC of the host's address records and its TLSA
    a, aaaa = await asyncio.gather(resolver.resolve(host, "A"), resolver.resolve(host, "AAAA"))
    addr_sec = [x for x in (a, aaaa) if x.records() or x.security is not Security.SECURE]
    if not a.records() and not aaaa.records():
        out.append(Result("host-dnssec", FAIL, f"{host} has no address records ({a.security})",
                          f"publish A/AAAA records for {host} in a DNSSEC-signed zone"))
    elif all(x.security is Security.SECURE for x in addr_sec):
        out.append(Result("host-dnssec", PASS, f"{host} address records are DNSSEC-secure"))
    else:
        bad = next(x for x in addr_sec if x.security is not Security.SECURE)
        out.append(Result("host-dnssec", FAIL, f"{host} {rtype_text(bad.rdtype)} records are "
                          f"{bad.security} ({bad.reason})", f"sign the zone of {host} with DNSSEC and publish its "
                          "DS in the parent zone"))
    owner = tlsa_owner(dns.name.from_text(host)).to_text()
    tl = await resolver.resolve(owner, "TLSA")
    if chain:
        want = dane.tlsa_for(chain[0], 3, 1, 1)
        publish = f"{owner} IN TLSA {want.text()}"
        records = [Tlsa.from_rdata(rd) for rd in tl.records()]
        if tl.security is not Security.SECURE:
            out.append(Result("tlsa", FAIL, f"the TLSA lookup for {owner} is {tl.security} ({tl.reason})",
                              f"publish in a signed zone: {publish}"))
        elif not records:
            out.append(Result("tlsa", FAIL, f"no TLSA record at {owner}", f"publish: {publish}"))
        elif dane.verify(records, chain, [host], now).status is not dane.DaneStatus.VERIFIED:
            out.append(Result("tlsa", FAIL, f"no TLSA record at {owner} matches the certificate",
                              f"publish: {publish}"))
        else:
            nxt = cfg.server.tls_next_key_file
            if nxt:
                try:
                    nkey = serialization.load_pem_private_key(Path(nxt).read_bytes(), password=None)
                    nspki = nkey.public_key().public_bytes(serialization.Encoding.DER,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                    nrec = Tlsa(3, 1, 1, dane.association(nspki, 1))
                    if not any(r.data == nrec.data and (r.usage, r.selector, r.mtype) == (3, 1, 1) for r in records):
                        out.append(Result("tlsa", WARN, "no TLSA record matches the next key: a rollover would "
                                          "break delivery", f"publish now: {owner} IN TLSA {nrec.text()}"))
                    else:
                        out.append(Result("tlsa", PASS, "TLSA matches the certificate and the next key"))
                except (OSError, ValueError, TypeError) as e:
                    out.append(Result("tlsa", WARN, f"cannot read the next key {nxt}: {e}", f"fix {nxt}"))
            else:
                out.append(Result("tlsa", PASS, f"a secure TLSA record at {owner} matches the certificate"))

    # --- DKIM
    keydir = Path(cfg.dkim.key_directory)
    try:
        keys = dkim.load_keys(keydir)
    except dkim.DkimError as e:
        keys = {}
        out.append(Result("dkim", FAIL, str(e), f"postgate dkim keygen {cfg.dkim.default_domain or host}"))
    if not keys and cfg.dkim.required and not any(r.check == "dkim" for r in out):
        out.append(Result("dkim", FAIL, f"no DKIM key in {keydir}: outgoing mail would be unsigned",
                          f"postgate dkim keygen {cfg.dkim.default_domain or _domain_of_host(host)}"))
    for domain_keys in keys.values():
        for k in domain_keys:
            ans = await resolver.resolve(k.owner(), "TXT")
            txts = [b"".join(rd.strings).decode("ascii", "replace") for rd in ans.records()]
            published = [t for t in txts if f"p={k.public_b64}" in t.replace(" ", "")]
            publish = f'{k.owner()} IN TXT "{k.txt()}"'
            if ans.security is not Security.SECURE:
                out.append(Result("dkim", FAIL, f"{k.owner()} TXT is {ans.security}", f"publish in a signed zone: "
                                  f"{publish}"))
            elif not published:
                what = "another key" if txts else "nothing"
                out.append(Result("dkim", FAIL, f"{k.owner()} publishes {what}, not the key in "
                                  f"{keydir}/{k.domain}/{k.selector}.private", f"publish: {publish}"))
            else:
                out.append(Result("dkim", PASS, f"{k.owner()} ({k.algorithm}) is secure and matches the key"))

    # --- MTA-capability record
    cans = await resolver.resolve(caps_owner(dns.name.from_text(host)), "TXT")
    sel = capsmod.select(b"".join(rd.strings).decode("ascii", "replace") for rd in cans.records())
    publish = f'{caps_owner(dns.name.from_text(host))} IN TXT "{caps_offered.text()}"'
    if sel.caps is None:
        if sel.problem:
            out.append(Result("caps", FAIL, f"the MTA-capability record is unusable: {sel.problem}",
                              f"publish: {publish}"))
        else:
            out.append(Result("caps", PASS, "no MTA-capability record published (optional)", f"to publish: {publish}"))
    else:
        offered = capsmod.Observed(caps_offered.starttls, "TLSv1.3" if caps_offered.tls_min == "1.3" else
                                   ("TLSv1.2" if caps_offered.starttls else None), caps_offered.dane,
                                   frozenset(k for k, on in (("REQUIRETLS", caps_offered.requiretls),
                                                             ("SMTPUTF8", caps_offered.smtputf8),
                                                             ("8BITMIME", caps_offered.eightbitmime),
                                                             ("PIPELINING", caps_offered.pipelining),
                                                             ("CHUNKING", caps_offered.chunking),
                                                             ("SIZE", caps_offered.size is not None)) if on),
                                   caps_offered.size)
        over = capsmod.broken(sel.caps, offered)
        if over:
            out.append(Result("caps", FAIL, f"the published record promises {', '.join(over)}, which this "
                              "configuration does not offer: senders would defer mail to us", f"publish: {publish}"))
        elif cans.security is not Security.SECURE:
            out.append(Result("caps", WARN, "the MTA-capability record is not DNSSEC-secure: senders ignore it",
                              "sign the zone"))
        else:
            out.append(Result("caps", PASS, "the MTA-capability record matches what this configuration offers"))

    # --- RFC 6186 SRV records for submission
    ports = {ls.name: int(ls.address.rpartition(":")[2]) for ls in cfg.listener}
    domains = cfg.relay.local_domains or [_domain_of_host(host)]
    for service, lname, _port in (("_submission._tcp", "submission", 587), ("_submissions._tcp", "submissions", 465)):
        if lname not in ports:
            continue
        for d in domains:
            name = f"{service}.{d}."
            ans = await resolver.resolve(name, "SRV")
            recs = ans.records()
            publish = f"{name} IN SRV 0 1 {ports[lname]} {host}."
            if not recs:
                out.append(Result("submission-srv", WARN, f"no {name} SRV record (RFC 6186)", f"publish: {publish}"))
            elif any(r.target.to_text(omit_final_dot=True).lower() == host and r.port == ports[lname] for r in recs):
                out.append(Result("submission-srv", PASS, f"{name} points at {host}:{ports[lname]}"))
            else:
                got = ", ".join(f"{r.target}:{r.port}" for r in recs)
                out.append(Result("submission-srv", FAIL, f"{name} points at {got}, not this server",
                                  f"publish: {publish}"))

    # --- reverse DNS of the listening addresses
    for ls in cfg.listener or []:
        addr = ls.address.rpartition(":")[0].strip("[]")
        ip = ipaddress.ip_address(addr)
        if ip.is_unspecified:
            out.append(Result("reverse-dns", WARN, f"listener {ls.name} listens on {addr}: cannot check its PTR",
                              "configure the public address"))
            continue
        ptr = await resolver.resolve(dns.reversename.from_address(addr), "PTR")
        names = [r.target.to_text(omit_final_dot=True).lower() for r in ptr.records()]
        if host in names:
            out.append(Result("reverse-dns", PASS, f"{addr} resolves back to {host}"))
        else:
            out.append(Result("reverse-dns", WARN, f"{addr} has PTR {', '.join(names) or 'none'}, not {host}",
                              f"ask the address owner for: {dns.reversename.from_address(addr)} IN PTR {host}."))

    # --- milters and policy services (issue 16): reachable? An unreachable one gets its default action
    out.extend(await check_filters(cfg))
    out.extend(await check_queue(cfg))
    out.extend(check_lease_time(cfg))
    return out


def check_lease_time(cfg: configmod.Config) -> list[Result]:
    """The shared queue renews the leases of its attempts under way every third of ``lease_time``; each
    renewal may take up to ``commit_timeout`` (a slow synchronous standby). With ``lease_time`` under three
    times ``commit_timeout`` a renewal slowed that much can come after the lease ran out, and another node
    take over a message still being delivered (a duplicate)."""
    q = cfg.queue
    if q.backend != "postgresql" or q.lease_time >= 3 * q.commit_timeout:
        return []
    return [Result("queue", WARN, f"[queue] lease_time = {q.lease_time:g} s is under three times commit_timeout "
                   f"({q.commit_timeout:g} s): a renewal slowed by the database may come after the lease ran out, "
                   "and another node deliver the message again",
                   f"raise lease_time to at least {3 * q.commit_timeout:g} s, or lower commit_timeout")]


async def check_queue(cfg: configmod.Config) -> list[Result]:
    """The shared queue (``[queue] backend = "postgresql"``): PostgreSQL reachable, a writable primary,
    the schema version this Postgate needs, the object store writable. The directory spool is checked by
    serve's own validation (it must exist or be creatable, and be writable)."""
    q = cfg.queue
    if q.backend != "postgresql":
        return []
    from postgate.outbound.queue.pgspool import PgSettings, PostgresSpool
    from postgate.outbound.queue.protocol import SpoolUnavailable
    sp = PostgresSpool(PgSettings.from_config(q))
    try:
        await sp.check(create=False)
    except SpoolUnavailable as e:
        if "no Postgate queue schema" in str(e):   # a new database: serve creates the schema at its start
            return [Result("queue", WARN, str(e), "nothing to do: the first postgate serve creates it")]
        if "serve upgrades it" in str(e):          # an older schema: serve upgrades it at its start
            return [Result("queue", WARN, str(e), "upgrade every node; the first postgate serve of this "
                           "version upgrades the schema (nodes of the old version then refuse to start)")]
        return [Result("queue", FAIL, str(e), "start PostgreSQL (and the object store), or correct [queue] dsn; "
                       "a new database gets its schema from the first postgate serve")]
    finally:
        await sp.close()
    return [Result("queue", PASS, f"shared queue reachable: {sp.found}")]


async def check_filters(cfg: configmod.Config) -> list[Result]:
    from postgate import filtering
    out = []
    for kind, name, default, error in await filtering.probe(cfg):
        if error is None:
            out.append(Result("filters", PASS, f"{kind} {name} answers"))
            continue
        # A WARN, never a FAIL: `serve` runs these checks before it listens, and a milter that starts after
        # Postgate (boot order) must not keep the MTA down; until it answers, its default action applies.
        unfiltered = default in ("accept", "DUNNO", "OK")
        out.append(Result("filters", WARN,
                          f"{kind} {name} is unreachable ({error}): "
                          + ("mail passes unfiltered" if unfiltered else f"every message gets {default!r}"),
                          f"start {name} or correct its address in the [[{kind.replace(' ', '_')}]] table"))
    return out


def apply_downgrades(results: Sequence[Result], downgrade: Sequence[str]) -> list[Result]:
    out = []
    for r in results:
        if r.status == FAIL and (r.check in downgrade or "*" in downgrade):
            out.append(Result(r.check, WARN, r.message + " (downgraded by [check] downgrade)", r.fix))
        else:
            out.append(r)
    return out


def to_json(results: Sequence[Result]) -> list[dict[str, str]]:
    return [asdict(r) for r in results]
