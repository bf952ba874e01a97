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

:func:`requirement` turns a level, its attributes and what DNS said about a host into what the SMTP
client must enforce. I/O happens elsewhere.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from postgate.policy.vocab import Security, Tlsa


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


@dataclass(frozen=True)
class Policy:
    """A level with its attributes, as written in a policy map or the configuration."""

    level: Level = Level.DANE
    match: tuple[str, ...] = ()
    protocols: str = ""
    ciphers: str = ""
    source: str = "default"      # where it came from (file:line), for logs

    def text(self) -> str:
        out = self.level.value
        if self.match:
            out += " match=" + ":".join(self.match)
        return out


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
    """Decide what a connection to one MX host must provide (RFC 7672 §2.2 for the DANE levels).

    ``tlsa_security`` is None when TLSA was not looked up (the host's addresses are not secure).
    A TLSA lookup that failed never reaches here: the host is unusable (RFC 7672 §2.1.1).
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
        return Requirement(lvl, TLSMode.REQUIRED, Auth.PKIX, names=_pkix_names(policy, mx_host, nexthop))
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
