"""DKIM signing of every message Postgate sends (RFC 6376, RFC 8463).

A DKIM signature is a header field, DKIM-Signature, whose tags name the signing domain (d=), the key's
selector (s=, the key is published at ``<s>._domainkey.<d>``), the signed header fields (h=), the hash of
the body (bh=) and the signature (b=). Both hashes are over a canonical form, so that harmless rewrites
on the way do not break the signature; Postgate uses "relaxed" for both (RFC 6376 §3.4.2, §3.4.4):
header names in lower case, folded lines unfolded, runs of spaces and tabs as one space; in the body,
white space at line ends removed and empty lines at the end ignored. The header hash covers the listed
fields, each name taking its instances from the bottom up (§5.4.2), then the DKIM-Signature field itself
with b= empty (§3.7); b= is the RSA or Ed25519 signature of that hash.

Postgate computes this itself for messages whose lines all end in CRLF (what its smtpd accepts), and
leaves the rest to dkimpy, the reference its output is tested against byte for byte; dkimpy also
verifies.

Keys live in a directory by domain and selector: ``<keydir>/<domain>/<selector>.private``, written by
``postgate dkim keygen`` with mode 0600. An RSA key (PEM, 2048 bits or more) signs with rsa-sha256; an
Ed25519 key (the base64 32-octet seed, as dkimpy and RFC 8463 use) with ed25519-sha256. When a domain has
both, the message carries both signatures, so verifiers that know only RSA still verify it.

The signing domain is the From header's domain when Postgate holds a key for it, else the server's own
domain (``[dkim] default_domain``). Canonicalization is relaxed/relaxed; the signed headers are RFC 6376
§5.4.1's recommended set, and From, To, Subject, Date and Message-ID are over-signed (listed once more than
they occur, §8.15), so none can be added after signing.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import email.utils
import functools
import hashlib
import logging
import os
import re
import threading
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import nacl.encoding
import nacl.exceptions
import nacl.signing
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils
from dkim.canonicalization import Relaxed, correct_empty_body, strip_trailing_lines
from postgate.policy.vocab import domain_of

log = logging.getLogger("postgate.dkim")


# dkimpy computes RSA signatures with Python integers (about 10 ms for 2048 bits, three quarters of the
# pre-queue relay CPU time in bench/README.md). The same RSASSA-PKCS1-v1_5 signature (RFC 8017 §8.2,
# deterministic, byte-for-byte identical) comes from OpenSSL through cryptography in a tenth of that;
# dkimpy keeps doing everything else (canonicalization, header hashing, the DKIM-Signature field).
# Both speed-ups are swapped into dkimpy only while Signer.sign runs (:func:`_fast_dkim`), never for the
# whole process: anyone else using dkimpy (a verifier, a test) gets dkimpy as shipped.
_openssl_keys: dict[int, rsa.RSAPrivateKey] = {}


def _openssl_rsassa_sign(hash_: Any, private_key: dict[str, int]) -> bytes:
    n = private_key["modulus"]
    key = _openssl_keys.get(n)
    if key is None:
        pub = rsa.RSAPublicNumbers(private_key["publicExponent"], n)
        key = rsa.RSAPrivateNumbers(private_key["prime1"], private_key["prime2"], private_key["privateExponent"],
                                    private_key["exponent1"], private_key["exponent2"], private_key["coefficient"],
                                    pub).private_key()
        _openssl_keys[n] = key
    algo = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}[hash_.name]
    return key.sign(hash_.digest(), padding.PKCS1v15(), utils.Prehashed(algo))



# dkimpy parses the PEM key (``parse_pem_private_key``, ASN.1 in Python) and derives the Ed25519 key pair
# from its seed (``nacl.signing.SigningKey``) on every ``sign`` call: about 0.17 ms per message. The keys
# do not change while the process runs (a reload loads new bytes, hence new cache entries), so both are
# done once per key and process. Ed25519 signatures are deterministic (RFC 8032 §5.1.6): OpenSSL's, through
# cryptography, are the same octets as libsodium's.
_parse_pem = functools.lru_cache(maxsize=64)(dkim.parse_pem_private_key)


class _Ed25519Signature:
    __slots__ = ("signature",)

    def __init__(self, signature: bytes) -> None:
        self.signature = signature


class _Ed25519SigningKey:
    """What dkimpy uses of ``nacl.signing.SigningKey``: ``sign(data).signature``."""

    __slots__ = ("_key",)

    def __init__(self, seed: bytes) -> None:
        self._key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    def sign(self, data: bytes) -> _Ed25519Signature:
        return _Ed25519Signature(self._key.sign(data))


@functools.lru_cache(maxsize=64)
def _ed25519_signing_key(private: bytes, encoder: Any = None) -> _Ed25519SigningKey:
    try:
        seed = base64.b64decode(private, validate=True) if encoder is not None else private
    except binascii.Error as e:
        raise nacl.exceptions.ValueError(f"invalid ed25519 private key: {e}") from e
    if len(seed) != 32:
        raise nacl.exceptions.ValueError("invalid ed25519 seed")
    return _Ed25519SigningKey(seed)


# dkimpy reaches the key constructor as ``nacl.signing.SigningKey`` through its module global ``nacl``:
# while we sign, it sees a view of nacl whose SigningKey is the cached one (verification keeps VerifyKey)
_FAST_NACL = types.SimpleNamespace(
    signing=types.SimpleNamespace(SigningKey=_ed25519_signing_key, VerifyKey=nacl.signing.VerifyKey),
    encoding=nacl.encoding, exceptions=nacl.exceptions)

# Both signatures of a message (RSA and Ed25519, both relaxed, both SHA-256) hash the same canonical body;
# dkimpy canonicalizes it anew for each. A one-entry cache keyed on the body object (one DKIM object signs
# twice in Signer.sign) halves that work for large messages.
_canon_body = dkim.CanonicalizationPolicy.canonicalize_body
_last_body: list[Any] = [None, None, b""]


def relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4 relaxed body canonicalization, dkimpy's result byte for byte, with ``bytes.replace``
    and literal-prefix patterns instead of its ``[\\t ]+`` expressions, which match at every single space:
    25 ms per MB of text, here 1-3 ms. Runs of WSP become one SP (tabs made spaces first, then runs of two
    or more spaces replaced), then the one SP left before a line end goes (the same as removing the whole
    run first), then §3.4.3's empty lines at the end."""
    body = _SPACES.sub(b" ", body.replace(b"\t", b" "))   # a literal-prefix regex: C search, few matches
    body = _SP_CRLF.sub(b"\r\n", body)
    return correct_empty_body(strip_trailing_lines(body))  # type: ignore[no-any-return]


# literal patterns: the regex engine's prefix search beats bytes.find/replace on text full of spaces
_SPACES = re.compile(rb"  +")
_TWO_SPACES = re.compile(rb"  ")
_SP_CRLF = re.compile(rb" \r\n")


def _canonicalize_body_once(self: Any, body: bytes) -> bytes:
    if _last_body[0] is body and _last_body[1] is self.body_algorithm:
        return _last_body[2]  # type: ignore[no-any-return]
    out = relaxed_body(body) if self.body_algorithm is Relaxed else _canon_body(self, body)
    _last_body[:] = [body, self.body_algorithm, out]
    return out


_patch_lock = threading.Lock()


@contextlib.contextmanager
def _fast_dkim(now: float | None = None) -> Iterator[None]:
    """dkimpy with OpenSSL's RSA signing and the one-entry body cache, for the duration of one signing
    (and, when ``now`` is given, that time as its clock, for t=). A lock keeps signers in other threads
    from restoring the originals under each other; the results are byte-for-byte those of plain dkimpy, so
    a concurrent verifier sees no difference either."""
    with _patch_lock:
        policy = dkim.CanonicalizationPolicy
        saved = (dkim.RSASSA_PKCS1_v1_5_sign, policy.canonicalize_body, dkim.parse_pem_private_key, dkim.nacl,
                 dkim.rfc822_parse, dkim.time)
        dkim.RSASSA_PKCS1_v1_5_sign = _openssl_rsassa_sign
        policy.canonicalize_body = _canonicalize_body_once
        dkim.parse_pem_private_key = _parse_pem        # keys parsed once per process
        dkim.nacl = _FAST_NACL
        dkim.rfc822_parse = _rfc822_parse_bulk        # only the header section is split into lines
        if now is not None:
            dkim.time = types.SimpleNamespace(time=lambda: now)
        try:
            yield
        finally:
            (dkim.RSASSA_PKCS1_v1_5_sign, policy.canonicalize_body, dkim.parse_pem_private_key, dkim.nacl,
             dkim.rfc822_parse, dkim.time) = saved
            _last_body[:] = [None, None, b""]  # do not keep the body alive

# dkimpy's rfc822_parse splits the WHOLE message into lines with a regular expression and joins the body
# back together: 13 ms per MB, most of the DKIM cost of large messages. Only the header section needs
# parsing: when every line ends in CRLF (RFC 5321 §2.3.8, what the smtpd accepts), the body is the octets
# after the first empty line, exactly what dkimpy would rebuild (property-tested equal).
_rfc822_parse = dkim.rfc822_parse


def _rfc822_parse_bulk(message: bytes) -> tuple[list[list[bytes]], bytes]:
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        return _rfc822_parse(message)  # type: ignore[no-any-return]  # LF-only input: dkimpy's own way
    if message.startswith(b"\r\n"):
        return [], message[2:]
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return _rfc822_parse(message)  # type: ignore[no-any-return]
    headers, _ = _rfc822_parse(message[:end + 2])
    return headers, message[end + 4:]


# --- The signer in own code (issue 20) -----------------------------------------------------------------
# dkimpy's header handling (its parser, canonicalization of every header field, twice per message, and
# its tag list) cost about 0.3 ms per message. Postgate's case is narrow: relaxed/relaxed, SHA-256, the h=
# list of :func:`header_list`, no l=, i= "@domain". For a message whose every line ends in CRLF (what the
# smtpd accepts, RFC 5321 §2.3.8), the signature is computed here, reading only the header section; the
# result is byte for byte dkimpy's (property-tested against it, tests/test_dkim_check.py), and dkimpy
# stays the reference and the verifier. Anything else (a bare LF, a header dkimpy would refuse) goes to
# dkimpy as before, so its errors stay its own.

# RFC 5322 §3.6.8: field-name = 1*ftext (printable US-ASCII but the colon), as dkimpy's parser reads it
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_WSP_RUN = re.compile(rb"[\t ]+")
_SIG_NAME = b"DKIM-Signature"
_B_PLACEHOLDER = b"0" * 60   # dkimpy folds with 60 characters in b= first, so b= starts its own line


@dataclass(frozen=True)
class _Prepared:
    """What both signatures of one message share: the canonical body's hash (RFC 6376 §3.7, bh=) and the
    hash state after the signed header fields (§3.7 step 2, before the DKIM-Signature field itself)."""
    body_hash: bytes
    headers_hashed: Any   # hashlib sha256 object, copied per signature


def _relaxed_field(name: bytes, value: bytes) -> bytes:
    """RFC 6376 §3.4.2 relaxed header canonicalization of one field: name in lower case, value unfolded,
    runs of WSP as one SP, WSP at both ends removed, then ``:`` between them and CRLF after (dkimpy strips
    with ``bytes.strip``, all ASCII white space; so does this, to stay byte-identical)."""
    return name.lower() + b":" + _WSP_RUN.sub(b" ", value.replace(b"\r\n", b"")).strip() + b"\r\n"


def _body_hash(message: bytes, start: int) -> bytes:
    """SHA-256 of the relaxed canonical body (RFC 6376 §3.4.3-§3.4.4) of ``message[start:]``, CRLF lines,
    hashed in place (a memoryview, no copy of the body)."""
    end = len(message)
    # one-octet finds first (memchr, ~20x the regex scan's speed): a body without a space (base64, most large
    # mail) needs neither pattern search
    if message.find(b"\t", start) >= 0 or (message.find(b" ", start) >= 0 and (
            _TWO_SPACES.search(message, start) or _SP_CRLF.search(message, start))):
        return hashlib.sha256(relaxed_body(message[start:])).digest()  # the white-space rules apply
    # §3.4.3/§3.4.4: empty lines at the end ignored; a non-empty body ends in CRLF; an empty body is empty
    cut = end
    while cut - 2 >= start and message.startswith(b"\r\n", cut - 2):
        cut -= 2
    h = hashlib.sha256()
    if cut > start:
        h.update(memoryview(message)[start:cut])
        h.update(b"\r\n")
    return h.digest()


def _prepare(prefix: bytes, message: bytes, hdrs: list[bytes], crlf_only: bool = False) -> _Prepared | None:
    """Parse the header section of ``prefix + message`` as dkimpy does, select and hash the h= fields;
    None where dkimpy must do it (not all CRLF, no empty line, a line dkimpy refuses). ``crlf_only``: the
    caller knows there is no bare LF in ``message`` (the check costs 1.3 ms per MB)."""
    # dkimpy splits lines at CRLF and at a bare LF (which it rewrites to CRLF in the body): with no bare LF
    # both split alike. A bare CR is no line end for either, and stays in what is hashed (property-tested).
    if not crlf_only and message.count(b"\n") != message.count(b"\r\n"):
        return None
    if prefix and (not prefix.endswith(b"\r\n") or b"\r\n\r\n" in prefix or prefix.startswith(b"\r\n")
                   or prefix.count(b"\n") != prefix.count(b"\r\n")):
        return None
    if message.startswith(b"\r\n"):
        head, body_start = prefix, 2
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            return None
        head, body_start = prefix + message[:end + 2], end + 4
    # RFC 5322 §2.2: a field is "name:value" CRLF, continued by lines that start with WSP (§2.2.3)
    fields: list[list[bytes]] = []
    for line in head[:-2].split(b"\r\n") if head else ():
        if line[:1] in (b" ", b"\t"):
            if not fields:
                return None
            fields[-1][1] += line + b"\r\n"
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            if line.startswith(b"From "):
                continue    # an mbox separator: dkimpy skips it
            return None
        fields.append([line[:m.end() - 1], line[m.end():] + b"\r\n"])
    # RFC 6376 §5.4.2: a name listed n times signs its last n instances, from the bottom up; a name listed
    # more often than it occurs (over-signing, §8.15) contributes nothing for the extra listings
    instances: dict[bytes, list[int]] = {}
    for i, (name, _) in enumerate(fields):
        instances.setdefault(name.lower(), []).append(i)
    h = hashlib.sha256()
    for want in hdrs:
        found = instances.get(want)
        if found:
            name, value = fields[found.pop()]
            h.update(_relaxed_field(name, value))
    return _Prepared(_body_hash(message, body_start), h)


def _fold(value: bytes, name_len: int) -> bytes:
    """dkimpy's folding of a tag list, reproduced exactly (what verifiers have always seen from Postgate):
    lines of at most 72 characters, the field name counted on the first; a break at the last space in the
    window (the space becomes CRLF SP), else in the middle of a token (CRLF SP inserted)."""
    width = 72 - name_len
    if len(value) <= width or (value.endswith(b"\r\n") and len(value) <= width + 2):
        return value
    out = []
    while len(value) > width:
        sp = value.rfind(b" ", 0, width)
        if sp < 0:
            out.append(value[:width])
            value = value[width:]
        else:
            out.append(value[:sp])
            value = value[sp + 1:]
        width = 71
    out.append(value)
    return b"\r\n ".join(out)


@functools.lru_cache(maxsize=64)
def _rsa_key(pem: bytes) -> rsa.RSAPrivateKey:
    k = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(k, rsa.RSAPrivateKey)  # load_key admits only RSA PEM keys
    return k


def _unsigned_field(ready: _Prepared, key: Key, hdrs: list[bytes], stamp: bytes) -> tuple[list[bytes], bytes]:
    """The tags of one DKIM-Signature field, with dkimpy's tags in dkimpy's order, and the SHA-256 digest
    its signature is computed over."""
    domain = key.domain.encode()
    tags = [b"v=1", b"a=" + key.signature_algorithm, b"c=relaxed/relaxed", b"d=" + domain, b"i=@" + domain,
            b"q=dns/txt", b"s=" + key.selector.encode(), b"t=" + stamp, b"h=" + b" : ".join(hdrs),
            b"bh=" + base64.b64encode(ready.body_hash)]
    # RFC 6376 §3.7: the field itself is hashed last, b= empty, relaxed, without its trailing CRLF; the
    # folding it will have is the one hashed (relaxed canonicalization keeps a space where a token broke)
    folded = _fold(b"; ".join([*tags, b"b=" + _B_PLACEHOLDER]), len(_SIG_NAME))
    unsigned = folded.rstrip(b"0\r\n ")   # b= emptied, with the folding white space inside its value
    h = ready.headers_hashed.copy()
    h.update(b"dkim-signature:" + _WSP_RUN.sub(b" ", unsigned.replace(b"\r\n", b"")).strip())
    return tags, h.digest()


def _sign_digest(key: Key, digest: bytes) -> bytes:
    """The signature over ``digest``: OpenSSL's private-key operation (it runs without the GIL)."""
    if key.algorithm == "rsa":   # RFC 8017 §8.2 RSASSA-PKCS1-v1_5 over the SHA-256 digest (RFC 6376 §3.3.1)
        return _rsa_key(key.private).sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    # RFC 8463 §3: Ed25519 signs the SHA-256 digest (PureEdDSA over 32 octets)
    return _ed25519_signing_key(key.private, nacl.encoding.Base64Encoder).sign(digest).signature


def _sign_all(jobs: list[tuple[Key, bytes]]) -> list[bytes | Exception]:
    out: list[bytes | Exception] = []
    for key, digest in jobs:
        try:
            out.append(_sign_digest(key, digest))
        except (ValueError, TypeError) as e:
            out.append(e)
    return out


def _field(tags: list[bytes], sig: bytes) -> bytes:
    return _SIG_NAME + b": " + _fold(b"; ".join([*tags, b"b=" + base64.b64encode(sig)]) + b"\r\n", len(_SIG_NAME))


# The RSA private-key operation is most of a signature's cost, and OpenSSL runs it without holding the GIL,
# so a thread could sign while the event loop serves other sessions (issue 20). But under load the hand-off
# costs more than it saves for the common key size: the worker waits for the GIL to start and to finish (the
# busy loop gives it up only at the switch interval, 5 ms) and the loop then resumes the session a turn later.
# Measured here (2026-12-02, bench/relay_one.py A/B, quiet machine, 2 KB, pre-queue; an RSA-2048 signature
# 0.40 ms, 3072 bits 1.0 ms, 4096 bits 2.2 ms): with 2048-bit keys in the thread 1.30x / 1.49x Postfix (C=10 /
# C=100) and 2.4-2.6 ms CPU per message, inline 1.40x / 1.71x and 2.0-2.2 ms; in queue-first a signature
# waited 9.5 ms (median) for a 1 ms thread run. So keys of 3072 bits and more (a loop stall of 1-2 ms and
# more per message) go to the thread on a machine with a second core; 2048-bit RSA and Ed25519 sign inline.
_OFFLOAD = (os.cpu_count() or 1) > 1
OFFLOAD_BITS = 3072


def _offloaded(key: Key) -> bool:
    """Whether ``key``'s signatures are made in the signing thread (see above)."""
    return key.algorithm == "rsa" and _rsa_key(key.private).key_size >= OFFLOAD_BITS


_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def _signing_pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                                          thread_name_prefix="postgate-dkim")
        return _pool


def _forget_pool() -> None:
    # a forked child has none of the parent's threads: it starts a pool of its own
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


# RFC 6376 §5.4.1
RECOMMENDED = ("from", "reply-to", "subject", "date", "to", "cc", "resent-date", "resent-from", "resent-to",
               "resent-cc", "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe",
               "list-subscribe", "list-post", "list-owner", "list-archive", "mime-version", "content-type",
               "content-transfer-encoding", "message-id")
OVERSIGNED = ("from", "to", "subject", "date", "message-id")
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class DkimError(ValueError):
    pass


@dataclass(frozen=True)
class Key:
    domain: str
    selector: str
    algorithm: str          # "rsa" or "ed25519"
    private: bytes          # as dkimpy takes it
    public_b64: str         # the p= value

    @property
    def signature_algorithm(self) -> bytes:
        return b"rsa-sha256" if self.algorithm == "rsa" else b"ed25519-sha256"

    def txt(self) -> str:
        """The TXT record value to publish at ``<selector>._domainkey.<domain>``."""
        return f"v=DKIM1; k={self.algorithm}; p={self.public_b64}"

    def owner(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}."


def load_key(path: Path, domain: str, selector: str) -> Key:
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        try:
            k = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as e:
            raise DkimError(f"{path}: not a usable PEM private key: {e}") from e
        if not isinstance(k, rsa.RSAPrivateKey):
            raise DkimError(f"{path}: PEM keys must be RSA")
        if k.key_size < 2048:  # RFC 8301 §3.2: at least 1024, Postgate demands 2048
            raise DkimError(f"{path}: RSA key of {k.key_size} bits; DKIM keys must have 2048 or more")
        pub = k.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
        return Key(domain, selector, "rsa", pem, base64.b64encode(pub).decode())
    try:
        seed = base64.b64decode(data.strip(), validate=True)
        if len(seed) != 32:
            raise ValueError("not 32 octets")
        ek = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    except ValueError as e:
        raise DkimError(f"{path}: neither an RSA PEM key nor a base64 Ed25519 seed ({e})") from e
    raw = ek.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return Key(domain, selector, "ed25519", data.strip(), base64.b64encode(raw).decode())  # RFC 8463 §4


def generate(keydir: Path, domain: str, selector: str, algorithm: str = "rsa", bits: int = 2048) -> Key:
    """Create ``<keydir>/<domain>/<selector>.private`` (0600, never overwritten) and return the key."""
    domain = domain.lower().rstrip(".")
    if not _SELECTOR.match(selector):
        raise DkimError(f"bad selector {selector!r}")
    if algorithm == "rsa":
        if bits < 2048:
            raise DkimError("RSA DKIM keys must have 2048 bits or more")
        data = rsa.generate_private_key(65537, bits).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())
    elif algorithm == "ed25519":
        seed = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        data = base64.b64encode(seed) + b"\n"
    else:
        raise DkimError(f"algorithm {algorithm!r}: rsa or ed25519")
    d = keydir / domain
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = d / f"{selector}.private"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return load_key(path, domain, selector)


def load_keys(keydir: Path) -> dict[str, list[Key]]:
    """All keys under ``keydir``, by domain. Refuses keys readable by group or others."""
    out: dict[str, list[Key]] = {}
    if not keydir.is_dir():
        raise DkimError(f"{keydir}: no such directory")
    for ddir in sorted(p for p in keydir.iterdir() if p.is_dir()):
        for f in sorted(ddir.glob("*.private")):
            if f.stat().st_mode & 0o077:
                raise DkimError(f"{f}: readable by group or others; chmod 600 it")
            out.setdefault(ddir.name.lower(), []).append(load_key(f, ddir.name.lower(), f.stem))
    return out


def _head(message: bytes) -> bytes:
    """The header section, without copying the body."""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[:end]


def _from_domain(message: bytes) -> str | None:
    head = _head(message).decode("utf-8", "replace")
    m = re.search(r"(?im)^from:(.*(?:\r\n[ \t].*)*)", head)
    if not m:
        return None
    return _domain_of_from(m.group(1).replace("\r\n", ""))


@functools.lru_cache(maxsize=1024)
def _domain_of_from(value: str) -> str | None:
    """The domain of a From field's address (RFC 5322 §3.6.2); cached, senders repeat (parseaddr: ~30 µs)."""
    _, addr = email.utils.parseaddr(value)
    return domain_of(addr) or None


def header_list(message: bytes) -> list[bytes]:
    """The h= list: recommended headers as often as they occur, over-signed ones once more."""
    head = _head(message).decode("utf-8", "replace")
    names = [ln.split(":", 1)[0].strip().lower() for ln in head.split("\r\n")
             if ln and ln[0] not in " \t" and ":" in ln]
    out = []
    for h in RECOMMENDED:
        n = names.count(h) + (1 if h in OVERSIGNED else 0)
        out += [h.encode()] * n
    return out


class Signer:
    def __init__(self, keydir: Path | str, default_domain: str) -> None:
        self.keydir = Path(keydir)
        self.default_domain = default_domain.lower().rstrip(".")
        self.keys = load_keys(self.keydir)

    def reload(self) -> None:
        self.keys = load_keys(self.keydir)

    def keys_for(self, message: bytes, domain: str | None = None, selector: str | None = None) -> list[Key]:
        """The keys to sign ``message`` with: those of its From: domain, else the default domain's. A filter
        may name the signing domain (and selector) instead (Sieve ``dkim_sign``, docs/sieve.md); when no such
        key is loaded that is logged and the usual choice stands, so the mail still goes out signed."""
        if domain is not None:
            chosen = domain.lower().rstrip(".")
            keys = [k for k in self.keys.get(chosen, []) if selector is None or k.selector == selector]
            if keys:
                return keys
            log.error("dkim_sign: no key for %s%s in %s; signing as usual", chosen,
                      f" selector {selector}" if selector else "", self.keydir)
        d = _from_domain(message)
        if d and d in self.keys:
            return self.keys[d]
        return self.keys.get(self.default_domain, [])

    def sign(self, message: bytes, sender: str = "", *, now: float | None = None) -> bytes:
        """``message`` with DKIM-Signature headers prepended (RSA first, then Ed25519)."""
        return self.signature_fields(message, now=now) + message

    def signature_fields(self, message: bytes, prefix: bytes = b"", *, now: float | None = None,
                         crlf_only: bool = False, domain: str | None = None, selector: str | None = None) -> bytes:
        """The DKIM-Signature header fields (RSA first, then Ed25519) for the message ``prefix + message``,
        without building it: ``prefix`` is header fields the caller puts in front (the ``Received:`` trace
        field), so the body is never copied here. ``now``: the t= time (default: the clock).
        ``crlf_only``: the caller guarantees that every LF in ``message`` ends a CRLF (RFC 5321 §2.3.8, as
        the smtpd enforces), so it is not counted again; a wrong promise gives a signature that fails.
        ``domain``/``selector``: sign with that domain's key(s) instead (see :meth:`keys_for`)."""
        jobs = self._unsigned(message, prefix, now, crlf_only, domain, selector)
        if isinstance(jobs, bytes):
            return jobs
        return self._fields(jobs, _sign_all([(k, digest) for k, _, digest in jobs]))

    async def signature_fields_async(self, message: bytes, prefix: bytes = b"", *, now: float | None = None,
                                     crlf_only: bool = False, domain: str | None = None,
                                     selector: str | None = None) -> bytes:
        """:meth:`signature_fields`, with the RSA private-key operation done in a thread while the event loop
        serves other sessions (on a machine with more than one core; byte for byte the same fields)."""
        jobs = self._unsigned(message, prefix, now, crlf_only, domain, selector)
        if isinstance(jobs, bytes):
            return jobs
        todo = [(k, digest) for k, _, digest in jobs]
        if _OFFLOAD and any(_offloaded(k) for k, _, _ in jobs):
            sigs = await asyncio.get_running_loop().run_in_executor(_signing_pool(), _sign_all, todo)
        else:
            sigs = _sign_all(todo)
        return self._fields(jobs, sigs)

    def _unsigned(self, message: bytes, prefix: bytes, now: float | None, crlf_only: bool, domain: str | None,
                  selector: str | None) -> bytes | list[tuple[Key, list[bytes], bytes]]:
        """Everything before the private-key operations: per key (RSA first) the field's tags and the digest
        to sign; or the finished fields where there is nothing to sign here (b"" without a key, dkimpy's
        fields for a message that is not plain CRLF)."""
        # the header section of prefix + message (RFC 5322 §2.1: up to the first empty line)
        head = prefix[:-2] if prefix and message.startswith(b"\r\n") else prefix + _head(message)
        keys = sorted(self.keys_for(head, domain, selector), key=lambda k: k.algorithm != "rsa")
        if not keys:
            log.warning("no DKIM key for this message's From domain nor for %s: sent unsigned", self.default_domain)
            return b""
        hdrs = header_list(head)
        ready = _prepare(prefix, message, hdrs, crlf_only)
        if ready is None:  # not the plain CRLF case: dkimpy's own way, on the whole message
            return self._dkimpy_fields(prefix + message, keys, hdrs, now)
        stamp = str(int(time.time() if now is None else now)).encode()
        return [(k, *_unsigned_field(ready, k, hdrs, stamp)) for k in keys]

    @staticmethod
    def _fields(jobs: list[tuple[Key, list[bytes], bytes]], sigs: list[bytes | Exception]) -> bytes:
        out = []
        for (k, tags, _), sig in zip(jobs, sigs, strict=True):
            if isinstance(sig, Exception):
                log.error("DKIM signing with %s failed: %s", k.owner(), sig)
            else:
                out.append(_field(tags, sig))
        return b"".join(out)

    def _dkimpy_fields(self, message: bytes, keys: list[Key], hdrs: list[bytes], now: float | None) -> bytes:
        sigs = []
        d = dkim.DKIM(message)
        with _fast_dkim(now):
            for k in keys:
                try:
                    sigs.append(d.sign(k.selector.encode(), k.domain.encode(), k.private,
                                       canonicalize=(b"relaxed", b"relaxed"),
                                       signature_algorithm=k.signature_algorithm, include_headers=hdrs))
                except dkim.DKIMException as e:
                    log.error("DKIM signing with %s failed: %s", k.owner(), e)
        return b"".join(sigs)
