"""TLS security levels with Postfix's names and semantics, as pure decisions.

A *level* says how much security a delivery demands (Postfix ``smtp_tls_security_level``):

=============  ========================================================================================
``none``       no TLS, even if offered
``may``        TLS when offered, unauthenticated; cleartext when the server offers no STARTTLS or the
               handshake fails
``encrypt``    TLS mandatory, unauthenticated
``dane``       opportunistic DANE (the default): DANE-authenticated TLS mandatory where secure usable
               TLSA records exist; TLS mandatory but unauthenticated where the secure TLSA RRset has no
               usable record; otherwise as ``may`` (RFC 7672 §2.2)
``dane-only``  DANE mandatory: a host without usable secure TLSA records is not used
``fingerprint`` TLS mandatory, the certificate or public key digest must be one of ``match=``
``verify``     TLS mandatory, PKIX chain to the system CA store, name among ``match=`` (default: the
               MX host name)
``secure``     as verify, default ``match=nexthop:dot-nexthop`` (the next-hop domain and its subdomains)
``caps-required`` Postgate's own: as ``dane``, and the MX host must publish a secure MTA-capability record
=============  ========================================================================================

:func:`decide` is the one TLS decision for one MX host: from the level (with its policy-map attributes),
what DNSSEC said of the host (address and TLSA verdicts, the TLSA set), its MTA-capability record,
REQUIRETLS (RFC 8689) and the MTA-STS policy in force (RFC 8461, :class:`Sts`), to either a
:class:`Requirement` the SMTP client enforces on the connection, or a :class:`Skip`: do not connect,
with the reason, the reply a deferral carries, whether it is a suspected attack and the RFC 8460 result
type. Delivery, the SMTP client and ``postgate tls-check`` all use it; ``tests/golden/tls_decision.txt``
lists its answer for every combination of inputs. I/O happens elsewhere.

Policy-map attributes (Postfix TLS_README "TLS policy table"), parsed and checked by ``policy/maps.py``:
``protocols`` (which TLS versions; never below TLS 1.2, RFC 8996), ``ciphers`` (a Postfix grade),
``exclude`` (ciphers to leave out), ``servername`` (SNI when DANE does not fix it), ``connection_reuse``,
``tafile`` (trust anchors for verify/secure, used as synthetic DANE-TA records like Postfix's tls_dane.c).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from postgate.policy.caps import Caps
from postgate.policy.vocab import DANE_TA, Reply, Security, Tlsa, TlsOutcome


class Level(enum.Enum):
    NONE = "none"
    MAY = "may"
    ENCRYPT = "encrypt"
    DANE = "dane"
    DANE_ONLY = "dane-only"
    FINGERPRINT = "fingerprint"
    VERIFY = "verify"
    SECURE = "secure"
    CAPS_REQUIRED = "caps-required"


class TLSMode(enum.Enum):
    NONE = "none"           # never STARTTLS
    OPTIONAL = "optional"   # STARTTLS if offered; cleartext otherwise
    REQUIRED = "required"   # no STARTTLS or failed handshake: do not deliver over this connection


class Auth(enum.Enum):
    NONE = "none"
    DANE = "dane"
    PKIX = "pkix"
    FINGERPRINT = "fingerprint"


# RFC 8996: TLS 1.0 and 1.1 are deprecated; Postgate never offers them, whatever a map says
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
ALL_PROTOCOLS = ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3")
# Postfix's cipher grades (postconf(5) smtp_tls_mandatory_ciphers) and their default OpenSSL lists
# (tls_high_cipherlist …). Since OpenSSL 1.1 "export" and "low" give medium's list; TLS 1.3 suites
# are not affected by any of them (as in Postfix).
CIPHER_GRADES = {
    "high": "aNULL:-aNULL:HIGH:@STRENGTH",
    "medium": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
    "low": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
    "export": "aNULL:-aNULL:HIGH:MEDIUM:+RC4:@STRENGTH",
    "null": "eNULL:!aNULL",
}


@dataclass(frozen=True)
class TlsParams:
    """Protocol and cipher constraints of a policy (Postfix ``protocols``, ``ciphers``, ``exclude``)."""

    protocols: tuple[str, ...] = TLS_VERSIONS   # allowed versions, a subset of TLS_VERSIONS
    ciphers: str = ""                           # a grade of CIPHER_GRADES; "" keeps the library default
    exclude: tuple[str, ...] = ()

    def cipherlist(self) -> str:
        """The OpenSSL cipher list for TLS 1.2, or "" for the default."""
        if not self.ciphers and not self.exclude:
            return ""
        base = CIPHER_GRADES[self.ciphers or "medium"]
        return base + "".join(f":!{x}" for x in self.exclude)

    def text(self) -> str:
        out = []
        if self.protocols != TLS_VERSIONS:
            out.append("protocols=" + ":".join(self.protocols))
        if self.ciphers:
            out.append(f"ciphers={self.ciphers}")
        if self.exclude:
            out.append("exclude=" + ":".join(self.exclude))
        return " ".join(out)


@dataclass(frozen=True)
class Policy:
    """A level with its attributes, as written in a policy map or the configuration."""

    level: Level = Level.DANE
    match: tuple[str, ...] = ()
    params: TlsParams = TlsParams()
    servername: str = ""                 # Postfix servername=: "hostname", "nexthop" or a literal name
    connection_reuse: bool | None = None  # None: the global setting
    tafile: tuple[Tlsa, ...] = ()         # trust anchors from tafile=, as DANE-TA(2) records
    source: str = "default"      # where it came from (file:line), for logs

    def text(self) -> str:
        out = self.level.value
        if self.match:
            out += " match=" + ":".join(self.match)
        if self.params.text():
            out += " " + self.params.text()
        return out


@dataclass(frozen=True)
class HostFacts:
    """What DNS said about one MX host: the decision's input (built from outbound's MXHost)."""

    name: str
    address_security: Security = Security.SECURE
    tlsa_security: Security | None = None    # None: not looked up (the addresses are not secure)
    tlsa: tuple[Tlsa, ...] = ()
    unusable: str = ""                       # resolution failed for this host (RFC 7672 §2.1.1)
    reference_names: tuple[str, ...] = ()    # RFC 7672 §3.2.2: TLSA base domain, MX host name
    tlsa_base: str = ""                      # the SNI name under DANE (RFC 7672 §8.1)
    caps: Caps | None = None                 # the MTA-capability record as published
    caps_security: Security | None = None
    caps_owner: str = ""

    @property
    def enforced_caps(self) -> Caps | None:
        """docs/mta-caps.md §6: only a DNSSEC-secure record may cause a deferral."""
        return self.caps if self.caps_security is Security.SECURE else None


class StsMode(enum.Enum):
    """RFC 8461 §5: an MTA-STS policy's mode."""

    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


@dataclass(frozen=True)
class Sts:
    """An MTA-STS policy in force for the next-hop domain (RFC 8461 §3.2): its mode and ``mx`` patterns.
    Fetching and caching it is not this module's job."""

    mode: StsMode
    mx: tuple[str, ...] = ()

    def allows(self, host: str) -> bool:
        """RFC 8461 §4.1: an ``mx`` pattern matches the host name literally, or ``*.`` matches exactly one
        left-most label (``*.example.com``: ``mx1.example.com``, not ``example.com`` nor ``a.b.example.com``);
        case-insensitive, trailing dots ignored."""
        h = host.rstrip(".").lower()
        first, dot, rest = h.partition(".")
        for p in self.mx:
            p = p.rstrip(".").lower()
            if p == h or (p.startswith("*.") and bool(first) and bool(dot) and rest == p[2:]):
                return True
        return False


@dataclass(frozen=True)
class Requirement:
    """What the SMTP client must enforce on one connection."""

    level: Level
    tls: TLSMode
    auth: Auth
    tlsa: tuple[Tlsa, ...] = ()
    names: tuple[str, ...] = ()          # reference identifiers (DANE-TA, verify, secure)
    fingerprints: tuple[str, ...] = ()
    refuse: str = ""                     # non-empty: do not connect to this host at all
    caps_required: bool = False
    notes: tuple[str, ...] = field(default=())
    params: TlsParams = TlsParams()
    sni: str = ""                        # the TLS SNI name ("" sends none)
    caps: Caps | None = None             # a secure capability record whose promises the client checks
    caps_owner: str = ""
    requiretls: bool = False             # RFC 8689 §4.2.1: the server must offer REQUIRETLS
    pkix_names: tuple[str, ...] = ()     # tafile: Postfix match names checked beside the synthetic TLSA
    reuse: bool | None = None            # connection_reuse= of the policy
    sts: bool = False                    # RFC 8461 §4.2: an enforced MTA-STS policy made this PKIX requirement

    def key(self) -> tuple[object, ...]:
        """Connections are reused only under an identical requirement."""
        return (self.level, self.tls, self.auth, tuple(t.text() for t in self.tlsa), self.names,
                self.fingerprints, self.params, self.sni, self.caps.text() if self.caps else "",
                self.requiretls, self.pkix_names)

    def text(self) -> str:
        out = f"tls={self.tls.value} auth={self.auth.value}"
        if self.tlsa:
            out += f" tlsa={len(self.tlsa)}"
        if self.names:
            out += " names=" + ",".join(self.names)
        if self.pkix_names:
            out += " match=" + ",".join(self.pkix_names)
        if self.fingerprints:
            out += f" fingerprints={len(self.fingerprints)}"
        if self.caps is not None:
            out += f" caps=\"{self.caps.text()}\""
        if self.requiretls:
            out += " requiretls"
        if self.sts:
            out += " sts=enforce"
        if self.sni:
            out += f" sni={self.sni}"
        return out


@dataclass(frozen=True)
class Skip:
    """Do not connect to this host: why, the reply a deferral carries (always 4xx: RFC 7672 §2.2 and
    docs/mta-caps.md §5 never bounce on these), whether it is a suspected attack, the RFC 8460 result."""

    reason: str
    reply: Reply
    suspected_attack: bool = False
    tls_result: TlsOutcome | None = None

    def text(self) -> str:
        return (f"skip {self.reply.status}" + (" attack" if self.suspected_attack else "")
                + (f" {self.tls_result}" if self.tls_result else "") + f": {self.reason}")


Decision = Requirement | Skip


def _pkix_names(policy: Policy, mx_host: str, nexthop: str) -> tuple[str, ...]:
    """Expand Postfix ``match=`` keywords: hostname, nexthop, dot-nexthop, literal names."""
    default = ("hostname",) if policy.level is Level.VERIFY else ("nexthop", "dot-nexthop")
    out: list[str] = []
    for m in policy.match or default:
        if m == "hostname":
            out.append(mx_host)
        elif m == "nexthop":
            out.append(nexthop)
        elif m == "dot-nexthop":
            out.append("." + nexthop)
        else:
            out.append(m)
    return tuple(dict.fromkeys(n.rstrip(".").lower() for n in out))


def requirement(policy: Policy, *, mx_host: str, nexthop: str, tlsa: tuple[Tlsa, ...],
                tlsa_security: Security | None, reference_names: tuple[str, ...]) -> Requirement:
    """What the level alone demands of one MX host (RFC 7672 §2.2 for the DANE levels); :func:`decide`
    adds the capability record, REQUIRETLS and MTA-STS.

    ``tlsa_security`` is None when TLSA was not looked up (the host's addresses are not secure).
    """
    lvl = policy.level
    if lvl is Level.NONE:
        return Requirement(lvl, TLSMode.NONE, Auth.NONE)
    if lvl is Level.MAY:
        return Requirement(lvl, TLSMode.OPTIONAL, Auth.NONE)
    if lvl is Level.ENCRYPT:
        return Requirement(lvl, TLSMode.REQUIRED, Auth.NONE)
    if lvl is Level.FINGERPRINT:
        if not policy.match:
            return Requirement(lvl, TLSMode.REQUIRED, Auth.FINGERPRINT,
                               refuse="fingerprint level without match= fingerprints")
        return Requirement(lvl, TLSMode.REQUIRED, Auth.FINGERPRINT, fingerprints=policy.match)
    if lvl in (Level.VERIFY, Level.SECURE):
        names = _pkix_names(policy, mx_host, nexthop)
        if policy.tafile:
            # Postfix tls_dane.c: tafile anchors become DANE-TA records, checked by the one DANE path;
            # the match= names are checked with Postfix's rules beside them
            return Requirement(lvl, TLSMode.REQUIRED, Auth.DANE, tlsa=policy.tafile, pkix_names=names)
        return Requirement(lvl, TLSMode.REQUIRED, Auth.PKIX, names=names)
    # dane, dane-only, caps-required
    caps = lvl is Level.CAPS_REQUIRED
    secure_tlsa = tlsa_security is Security.SECURE and bool(tlsa)
    usable = tuple(t for t in tlsa if t.usable) if secure_tlsa else ()
    if usable:
        return Requirement(lvl, TLSMode.REQUIRED, Auth.DANE, tlsa=usable, names=reference_names,
                           caps_required=caps)
    if secure_tlsa:  # RFC 7672 §2.2: secure TLSA RRset, none usable: TLS mandatory, unauthenticated
        if lvl is Level.DANE_ONLY:
            return Requirement(lvl, TLSMode.REQUIRED, Auth.DANE,
                               refuse=f"dane-only: no usable TLSA records for {mx_host}")
        return Requirement(lvl, TLSMode.REQUIRED, Auth.NONE, caps_required=caps,
                           notes=("TLSA RRset has no usable records",))
    if lvl is Level.DANE_ONLY:
        why = "no secure TLSA records" if tlsa_security is not None else "address records not secure"
        return Requirement(lvl, TLSMode.REQUIRED, Auth.DANE, refuse=f"dane-only: {why} for {mx_host}")
    return Requirement(lvl, TLSMode.OPTIONAL, Auth.NONE, caps_required=caps)


def _defer(reason: str, enhanced: str, attack: bool = False, result: TlsOutcome | None = None) -> Skip:
    if attack:
        reason += " — suspected attack"
    return Skip(reason, Reply(451, enhanced, reason), attack, result)


def decide(policy: Policy, host: HostFacts, *, nexthop: str, requiretls: bool = False,
           sts: Sts | None = None) -> Decision:
    """The one TLS decision for one MX host: a :class:`Requirement` to enforce, or a :class:`Skip`."""
    name = host.name
    bogus = Security.BOGUS in (host.address_security, host.tlsa_security)
    if host.unusable:
        # RFC 7672 §2.1.1: a failed or bogus lookup makes the host unusable; bogus is an attack sign
        return _defer(f"{name}: {host.unusable}", "4.7.5" if bogus else "4.4.3", bogus,
                      TlsOutcome.DNSSEC_INVALID if bogus else None)
    caps = host.enforced_caps
    owner = host.caps_owner or f"_mta-caps.{name}"
    if policy.level is Level.CAPS_REQUIRED and caps is None:
        # docs/mta-caps.md: no connection at all to a host that publishes no secure promise
        return _defer(f"{name}: caps-required: no secure MTA-capability record at {owner}", "4.7.5",
                      False, TlsOutcome.VALIDATION_FAILURE)
    dane_applies = host.tlsa_security is Security.SECURE and any(t.usable for t in host.tlsa)
    if caps is not None and caps.dane and not dane_applies:
        # docs/mta-caps.md §5: a secure promise of DANE without secure usable TLSA: stripped records
        return _defer(f"{name}: MTA-capability dane promised by {owner} but no secure usable TLSA record",
                      "4.7.5", True, TlsOutcome.DANE_REQUIRED)
    req = requirement(policy, mx_host=name, nexthop=nexthop, tlsa=host.tlsa, tlsa_security=host.tlsa_security,
                      reference_names=host.reference_names)
    if req.refuse:
        result = TlsOutcome.DANE_REQUIRED if req.level is Level.DANE_ONLY else TlsOutcome.VALIDATION_FAILURE
        return _defer(f"{name}: {req.refuse}", "4.7.5", False, result)
    if (sts is not None and sts.mode is StsMode.ENFORCE and req.auth is Auth.NONE
            and policy.level is not Level.NONE):
        # RFC 8461 §2: DANE, where it applies (Auth.DANE), takes precedence; an operator's explicit
        # authenticated level (fingerprint, verify, secure) or ``none`` is left alone. Otherwise an enforced
        # policy: §4.1 an MX host that matches no ``mx`` pattern is not used (defer, never cleartext, §5),
        # §4.2 TLS is mandatory with a Web-PKI (PKIX) certificate valid for the MX host name
        if not sts.allows(name):
            return _defer(f"{name}: MTA-STS: matches no mx pattern of the enforced policy of {nexthop} "
                          f"({', '.join(sts.mx)})", "4.7.5", False, TlsOutcome.VALIDATION_FAILURE)
        req = replace(req, tls=TLSMode.REQUIRED, auth=Auth.PKIX, names=(name.rstrip(".").lower(),), sts=True)
    # RFC 8461 §5: a testing policy changes nothing here; delivery reports what enforce would have refused
    if requiretls and req.auth not in (Auth.DANE, Auth.PKIX):
        # RFC 8689 §4.2.1: a verified certificate: DANE, else PKIX for the MX host name
        req = replace(req, tls=TLSMode.REQUIRED, auth=Auth.PKIX, names=(name,), fingerprints=())
    if caps is not None and req.tls is TLSMode.OPTIONAL and caps.needs_tls:
        # docs/mta-caps.md §5: a secure promise of STARTTLS makes TLS mandatory for this host
        req = replace(req, tls=TLSMode.REQUIRED)
    # RFC 7672 §8.1: under DANE the SNI is the TLSA base domain; else Postfix servername= (default: the
    # MX host name)
    if req.auth is Auth.DANE and not req.pkix_names:
        sni = host.tlsa_base or name
    elif policy.servername == "":
        sni = host.tlsa_base or name
    elif policy.servername == "hostname":
        sni = name
    elif policy.servername == "nexthop":
        sni = nexthop
    else:
        sni = policy.servername
    return replace(req, params=policy.params, sni=sni if req.tls is not TLSMode.NONE else "",
                   caps=caps if req.tls is not TLSMode.NONE else None, caps_owner=owner if caps else "",
                   requiretls=requiretls, reuse=policy.connection_reuse)


def tafile_anchor(der: bytes, *, public_key: bool) -> Tlsa:
    """A tafile entry as a synthetic DANE-TA record: full certificate (2 0 0) or full key (2 1 0)."""
    return Tlsa(DANE_TA, 1 if public_key else 0, 0, der)
