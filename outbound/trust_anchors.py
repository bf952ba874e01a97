"""Trust anchors: the keys a validator trusts without proof (RFC 4033 §2, RFC 4035 §4.3 and §5).

A trust anchor is a DS or DNSKEY record for a zone; validation of a name starts at the closest anchor
above it. Rules kept here:

- RFC 4035 §4.3: a name under no configured anchor cannot be proven either way: it is *insecure*, so a
  configuration with only a private or island anchor still delivers mail to the rest of the world.
- RFC 4035 §5.2 and RFC 6840 §5.2/§5.4: an anchor whose algorithms (or DS digests) are all unsupported is
  treated as if it were absent; zones under it are then insecure, not bogus. A zone with at least one
  usable anchor keeps only the usable ones.

The file format is Unbound's ``trust-anchor-file``/``auto-trust-anchor-file``: zone-file syntax, DS or
DNSKEY records, ``;`` comments, parenthesised continuation lines (RFC 1035 §5.1).
"""

from __future__ import annotations

from pathlib import Path

import dns.exception
import dns.name
import dns.rrset
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from postgate.outbound.dns_types import ResolverConfigError
from postgate.outbound.dnssec import SUPPORTED_ALGORITHMS, SUPPORTED_DIGESTS

Name = dns.name.Name
Anchors = dict[Name, list[DS | DNSKEY]]

# IANA root zone trust anchors (https://data.iana.org/root-anchors/): KSK-2017 and KSK-2024.
IANA_ROOT_ANCHORS = """
. IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D
. IN DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16
"""


def parse_anchors(text: str, source: str = "<anchors>") -> Anchors:
    """Trust anchors in zone-file syntax (DS or DNSKEY lines), as Unbound's trust-anchor-file."""
    out: Anchors = {}
    for lineno, line in _logical_lines(text):
        try:
            rr = dns.rrset.from_text_list(*_split_anchor(line))
        except (dns.exception.DNSException, ValueError) as e:
            raise ResolverConfigError(f"{source}:{lineno}: not a DS or DNSKEY record: {e}") from e
        for rd in rr:
            if not isinstance(rd, DS | DNSKEY):
                raise ResolverConfigError(f"{source}:{lineno}: trust anchors are DS or DNSKEY records")
            out.setdefault(rr.name, []).append(rd)
    if not out:
        raise ResolverConfigError(f"{source}: no trust anchor found")
    return out


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Zone-file lines without comments, with parenthesised continuations joined (RFC 1035 §5.1), each
    with the number of the line it starts on."""
    out: list[tuple[int, str]] = []
    pending, start, depth = "", 0, 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split(";", 1)[0]
        if not line.strip() and depth == 0:
            continue
        if depth == 0:
            start = lineno
        depth += line.count("(") - line.count(")")
        pending += " " + line.replace("(", " ").replace(")", " ")
        if depth <= 0:
            out.append((start, " ".join(pending.split())))
            pending, depth = "", 0
    if pending.strip():
        out.append((start, " ".join(pending.split())))
    return out


def _split_anchor(line: str) -> tuple[str, int, str, str, list[str]]:
    parts = line.split()
    owner, rest = parts[0], parts[1:]
    ttl = 3600
    if rest and rest[0].isdigit():
        ttl, rest = int(rest[0]), rest[1:]
    if rest and rest[0].upper() == "IN":
        rest = rest[1:]
    if not rest:
        raise ValueError("missing type")
    return owner, ttl, "IN", rest[0], [" ".join(rest[1:])]


def load_anchors(path: Path | None) -> Anchors:
    if path is None:
        return parse_anchors(IANA_ROOT_ANCHORS, "IANA root anchors")
    try:
        text = path.read_text()
    except OSError as e:
        raise ResolverConfigError(f"{path}: cannot read trust anchors: {e.strerror}") from e
    return parse_anchors(text, str(path))


def usable(anchor: DS | DNSKEY) -> bool:
    """RFC 4035 §5.2, RFC 6840 §5.2: an anchor the validator can use (algorithm, and digest for a DS)."""
    if anchor.algorithm not in SUPPORTED_ALGORITHMS:
        return False
    return not isinstance(anchor, DS) or anchor.digest_type in SUPPORTED_DIGESTS


class TrustAnchors:
    """The configured anchors, with the ones a validator cannot use set aside (RFC 6840 §5.4)."""

    def __init__(self, anchors: Anchors) -> None:
        self.configured = anchors
        self.ignored: dict[Name, list[DS | DNSKEY]] = {}
        self.usable: Anchors = {}
        for zone, records in anchors.items():
            good = [a for a in records if usable(a)]
            if good:
                self.usable[zone] = good
            else:  # RFC 6840 §5.4: an anchor with only unsupported algorithms is treated as absent
                self.ignored[zone] = list(records)

    def __contains__(self, zone: Name) -> bool:
        return zone in self.usable

    def __getitem__(self, zone: Name) -> list[DS | DNSKEY]:
        return self.usable[zone]

    def closest(self, name: Name) -> Name | None:
        """The usable anchor zone closest above (or at) ``name``, if any."""
        best: Name | None = None
        for zone in self.usable:
            if name.is_subdomain(zone) and (best is None or len(zone.labels) > len(best.labels)):
                best = zone
        return best

    def why_outside(self, name: Name) -> str:
        """RFC 4035 §4.3: why ``name`` is insecure for want of an anchor."""
        unsup = [z for z in self.ignored if name.is_subdomain(z)]
        if unsup:
            return (f"trust anchor for {unsup[0]} has only unsupported algorithms: treated as absent "
                    "(RFC 6840 §5.4)")
        return f"{name} is under no configured trust anchor (RFC 4035 §4.3)"
