"""One SMTP client session to one address of an MX host, with the TLS its requirement demands.

The session connects, reads the greeting, sends EHLO, and then per :class:`policy.tls.Requirement` (made by
``policy.tls.decide``; this module enforces it and decides nothing of its own):
STARTTLS with SNI set to the TLSA base domain (RFC 7672 §8.1), and authenticates the server *after* the
handshake and *before* any mail command, from the chain it presented (DANE per RFC 7672 §3, PKIX, or a
fingerprint). Any failure where TLS or authentication is required raises :class:`SessionError` and the
connection is dropped: Postgate never continues in cleartext when TLS was required (RFC 7672 §2.2).
Bytes injected between the 220 to STARTTLS and the handshake are such a failure too (RFC 3207 §4; see
``smtp_wire``), and never lead to a cleartext retry.

A later connection under the same requirement may resume the TLS session (:class:`TlsSessionCache`); a
resumed handshake shows no certificate, so it inherits the verdict of the full handshake that was
authenticated under exactly the same key — and only such a one was kept.

A 5xx reply to EHLO is answered with HELO (RFC 5321 §3.2; Postfix does the same): a server without
extensions, so without STARTTLS — where TLS is required that fails as a missing STARTTLS does.

Every network step has a timeout (RFC 5321 §4.5.3.2 gives the classic values; ours are configurable).
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cryptography import x509
from postgate.outbound import dane
from postgate.outbound.smtp_wire import Connection, InjectionError, WireError
from postgate.policy import caps as capsmod
from postgate.policy.tls import Auth, Requirement, TLSMode
from postgate.policy.vocab import DANE_EE, SHA256, SPKI, Reply, Tlsa, TlsOutcome

# RFC 8996 and the policy's protocols=: ssl's names for the versions Postgate may negotiate
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0
    greeting: float = 300.0     # RFC 5321 §4.5.3.2.1: 5 minutes
    command: float = 300.0      # MAIL, RCPT: 5 minutes
    tls: float = 60.0
    data: float = 600.0         # end of data: 10 minutes (§4.5.3.2.6)


class SessionError(Exception):
    """A session failed. ``temporary``: 4xx-like; ``suspected_attack``: a DANE/TLS downgrade sign;
    ``cleartext_retry``: opportunistic TLS failed and Postfix-style plaintext retry is allowed;
    ``tls_result``: the RFC 8460 result type of a TLS failure; ``chain``: what the server presented."""

    def __init__(self, reason: str, *, temporary: bool = True, suspected_attack: bool = False,
                 code: int = 0, dsn: str = "", cleartext_retry: bool = False,
                 tls_result: TlsOutcome | None = None, chain: Sequence[x509.Certificate] = ()) -> None:
        super().__init__(reason)
        self.reason = reason
        self.temporary = temporary
        self.suspected_attack = suspected_attack
        self.code = code
        self.dsn = dsn or ("4.4.2" if temporary else "5.4.0")
        self.cleartext_retry = cleartext_retry
        self.tls_result = tls_result
        self.chain = list(chain)
        self.local_address = ""   # our address on the connection it failed on, if one was open (TLS-RPT)

    @property
    def reply(self) -> Reply:
        return Reply(self.code or (451 if self.temporary else 554), self.dsn, self.reason)


@dataclass
class TLSState:
    security: TlsOutcome = TlsOutcome.CLEARTEXT
    version: str | None = None
    cipher: str | None = None
    chain: list[x509.Certificate] = field(default_factory=list)
    tlsa_matched: Tlsa | None = None
    detail: str = ""
    resumed: bool = False   # the handshake resumed a cached session (RFC 8446 §2.2): no certificate was sent


@dataclass(frozen=True)
class _Resumable:
    session: ssl.SSLSession
    context: ssl.SSLContext
    tls: TLSState          # the verdict of the full handshake that made the session
    expires: float


class TlsSessionCache:
    """Outbound TLS session resumption (RFC 8446 §2.2 tickets, RFC 5077 for TLS 1.2), like Postfix's
    ``smtp_tls_session_cache``: a resumed handshake presents no certificate, so it may only inherit a verdict
    made under exactly the same rules. A session is kept only after the server was authenticated as its
    requirement demands (and every check of the session passed), and it is offered again only under the same
    key — address, port, SNI and the whole requirement (auth mode, TLSA records, reference names,
    fingerprints, protocols and ciphers, capability record) — and with the same SSLContext; the TLS state of
    the full handshake (security, matched TLSA record, chain) travels with it. Bounded in size and age
    (Postfix's ``smtp_tls_session_cache_timeout``, 3600 s)."""

    def __init__(self, size: int = 1000, lifetime: float = 3600.0) -> None:
        self.size = size
        self.lifetime = lifetime
        self._entries: OrderedDict[tuple[object, ...], _Resumable] = OrderedDict()

    def get(self, key: tuple[object, ...], context: ssl.SSLContext) -> _Resumable | None:
        e = self._entries.get(key)
        if e is None:
            return None
        if e.context is not context or e.expires <= time.time():
            del self._entries[key]
            return None
        return e

    def put(self, key: tuple[object, ...], context: ssl.SSLContext, session: ssl.SSLSession,
            tls: TLSState) -> None:
        life = min(self.lifetime, float(session.timeout or self.lifetime))
        self._entries[key] = _Resumable(session, context, replace(tls, resumed=False), session.time + life)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


SESSIONS = TlsSessionCache()  # one per process, shared by every delivery


def peer_chain(obj: ssl.SSLObject | None) -> list[x509.Certificate]:
    """The certificate chain the server sent, leaf first, unverified (from the connection's SSL object)."""
    if obj is None:
        return []
    inner = getattr(obj, "_sslobj", obj)
    raw: list[bytes] = []
    getter = getattr(inner, "get_unverified_chain", None)
    if getter is not None:
        for c in getter() or []:
            raw.append(c.public_bytes(ssl._ssl.ENCODING_DER) if hasattr(c, "public_bytes")  # type: ignore[attr-defined]
                       else bytes(c))
    else:  # pragma: no cover - only the leaf on Pythons without the chain API
        leaf = obj.getpeercert(binary_form=True)
        raw = [leaf] if leaf else []
    out = []
    for der in raw[: dane.MAX_CHAIN * 2]:
        try:
            out.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue
    return out


def client_context(req: Requirement, ca_file: str | None) -> ssl.SSLContext:
    """The client context for ``req``: one per kind and CA file per process, reused by every session
    (issue 20: loading the system CA store takes ~80 ms, a context without it ~0.4 ms). A changed CA
    file (size or mtime) gets a new one."""
    stamp = (0, 0)
    if req.auth is Auth.PKIX and ca_file:
        try:
            st = os.stat(ca_file)
            stamp = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass  # load_verify_locations reports it
    # the policy's protocols= and ciphers= are part of the key: a context is shared only by equal policies
    return _client_context(req.auth is Auth.PKIX, ca_file if req.auth is Auth.PKIX else None, stamp,
                           tuple(req.params.protocols), req.params.cipherlist())


@functools.lru_cache(maxsize=64)
def _client_context(pkix: bool, ca_file: str | None, _stamp: tuple[int, int], protocols: tuple[str, ...],
                    ciphers: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # RFC 8996: never below TLS 1.2; the policy's protocols= narrows further (policy/maps.py checked it)
    versions = [_VERSIONS[v] for v in protocols if v in _VERSIONS] or [ssl.TLSVersion.TLSv1_2,
                                                                       ssl.TLSVersion.TLSv1_3]
    ctx.minimum_version = min(versions)
    ctx.maximum_version = max(versions)
    if ciphers:
        ctx.set_ciphers(ciphers)  # Postfix grade + exclude=, for TLS 1.2 (TLS 1.3 suites are not affected)
    ctx.check_hostname = False  # names are checked by Postgate per RFC 7672 §3.2.2 / the policy
    if pkix:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            ctx.load_default_certs()
    else:
        ctx.verify_mode = ssl.CERT_NONE  # DANE and fingerprints are verified from the chain afterwards
    return ctx


def pkix_name_ok(chain: Sequence[x509.Certificate], patterns: Sequence[str]) -> bool:
    """Postfix match semantics: ``.example.com`` matches any subdomain, a name matches itself (with
    RFC 6125 wildcards in the certificate)."""
    if not chain:
        return False
    names = dane.cert_names(chain[0])
    for p in patterns:
        if p.startswith("."):
            if any(n.lower().rstrip(".").endswith(p) and not n.startswith("*") for n in names):
                return True
            continue
        if any(dane.name_matches(n, p) for n in names):
            return True
    return False


class Session:
    """An open SMTP session, possibly TLS-protected and authenticated, over one :class:`Connection`."""

    def __init__(self, conn: Connection, address: str, port: int, mx: str, tls: TLSState,
                 timeouts: Timeouts) -> None:
        self.conn = conn
        self.address = address
        self.port = port
        self.mx = mx
        self.tls = tls
        self.timeouts = timeouts
        self.messages = 0

    @property
    def alive(self) -> bool:
        return self.conn.alive

    @property
    def local_address(self) -> str:
        """Our IP address on this session (RFC 8460 §4.4 sending-mta-ip)."""
        return self.conn.local_address

    def supports(self, ext: str) -> bool:
        return self.conn.supports(ext)

    async def close(self) -> None:
        await self.conn.quit(5)  # QUIT with a short wait for the 221, then close


async def open_session(address: str, port: int, mx: str, req: Requirement, *, helo: str,
                       timeouts: Timeouts = Timeouts(), ca_file: str | None = None,
                       auth: tuple[str, str] | None = None, now: dt.datetime | None = None,
                       sessions: TlsSessionCache | None = SESSIONS) -> Session:
    """Connect and establish what ``req`` demands, or raise SessionError.

    ``req.caps`` is a DNSSEC-secure MTA-capability record: every promise it makes is checked, and a broken
    one raises SessionError as a suspected attack (docs/mta-caps.md §5). ``sessions``: where TLS sessions
    are resumed from and kept (None: always a full handshake)."""
    caps, caps_name, sni = req.caps, req.caps_owner, req.sni
    cache_key = (address, port, sni, req.key())  # req.key() holds the auth mode, TLSA, names, params, caps
    ctx: ssl.SSLContext | None = None
    try:
        conn = await Connection.open(address, port, timeouts.connect)
    except (OSError, TimeoutError) as e:
        raise SessionError(f"connect to {mx}[{address}]:{port}: {type(e).__name__}: {e}", dsn="4.4.1") from e
    tls = TLSState()
    try:
        greeting = await conn.read(timeouts.greeting)
        if greeting.code != 220:  # RFC 5321 §3.1: 220 opens the session, 554 refuses it
            # RFC 5321 §5.1: the other MX hosts are tried when one cannot take the mail; a host that refuses
            # to talk at all is skipped as a temporary failure, as Postfix's smtp_skip_5xx_greeting (default
            # yes) does: one broken or overloaded MX never bounces mail its backup would take
            err = _said(f"{mx}[{address}] greeting:", greeting)
            err.temporary = True
            if err.dsn.startswith("5"):
                err.dsn = "4" + err.dsn[1:]
            raise err
        ehlo = await conn.ehlo(helo, timeouts.command, helo_fallback=True)
        if ehlo.code != 250:
            raise _said(f"{mx}[{address}] said", ehlo)
        dane_required = req.auth is Auth.DANE
        if caps is not None and req.tls is not TLSMode.NONE:
            missing = capsmod.broken_before_tls(caps, conn.supports("starttls"))
            if missing:
                raise _caps_error(missing, mx, address, caps_name)
        if req.tls is not TLSMode.NONE:
            if not conn.supports("starttls"):
                if req.tls is TLSMode.REQUIRED:
                    # RFC 7672 §2.2: with usable TLSA, a missing STARTTLS is a downgrade attack sign
                    raise SessionError(
                        f"STARTTLS not offered by {mx}[{address}] where TLS is required"
                        + (" (TLSA records exist) — suspected attack" if dane_required else ""),
                        suspected_attack=dane_required, dsn="4.7.4" if not dane_required else "4.7.5",
                        tls_result=TlsOutcome.STARTTLS_NOT_SUPPORTED)
            else:
                ctx = client_context(req, ca_file)
                cached = sessions.get(cache_key, ctx) if sessions is not None else None
                try:
                    await conn.starttls(ctx, sni or None, timeouts.tls, cached.session if cached else None)
                except (WireError, ssl.SSLError, OSError, TimeoutError) as e:
                    msg = f"TLS handshake with {mx}[{address}] failed: {type(e).__name__}: {e}"
                    # RFC 3207 §4: bytes injected before the handshake are an attack sign, like a failed one
                    if req.tls is TLSMode.OPTIONAL and not isinstance(e, InjectionError):
                        raise SessionError(msg, cleartext_retry=True, tls_result=handshake_result(e)) from e
                    raise SessionError(msg + (" — suspected attack" if dane_required else ""),
                                       suspected_attack=dane_required, dsn="4.7.5",
                                       tls_result=handshake_result(e)) from e
                obj = conn.ssl_object
                tls.version = obj.version() if obj else None
                cipher = obj.cipher() if obj else None
                tls.cipher = cipher[0] if cipher else None
                if cached is not None and obj is not None and obj.session_reused:
                    # the server resumed the session authenticated under this very key: its verdict holds
                    tls.security, tls.tlsa_matched, tls.detail = (cached.tls.security, cached.tls.tlsa_matched,
                                                                  cached.tls.detail)
                    tls.chain, tls.resumed = list(cached.tls.chain), True
                else:
                    tls.chain = peer_chain(obj)
                    _authenticate(tls, req, mx, address, now)
                ehlo = await conn.ehlo(helo, timeouts.command)  # RFC 3207 §4.2: ask again after TLS
                if ehlo.code != 250:
                    raise _said(f"{mx}[{address}] said", ehlo)
                if caps is not None:
                    ext = conn.extensions
                    seen = capsmod.Observed(True, tls.version, tls.security is TlsOutcome.DANE_VERIFIED,
                                            frozenset(k.upper() for k in ext.keywords), ext.size)
                    missing = capsmod.broken(caps, seen)
                    if missing:
                        raise _caps_error(missing, mx, address, caps_name)
        if req.requiretls and not conn.supports("requiretls"):
            # RFC 8689 §4.2.1: the next hop must offer REQUIRETLS
            raise SessionError(f"{mx} does not offer REQUIRETLS, required for this message", dsn="4.7.30")
        if auth is not None:
            if tls.security is TlsOutcome.CLEARTEXT:
                raise SessionError(f"refusing SMTP AUTH to {mx} without TLS", dsn="4.7.0")
            if not {"PLAIN", "LOGIN"} & set(conn.extensions.auth):
                raise SessionError(f"{mx} offers no SMTP AUTH mechanism Postgate uses (PLAIN, LOGIN)",
                                   dsn="4.7.0")
            # RFC 4954 with RFC 4616 PLAIN (one round trip) when offered, else LOGIN
            r = await conn.auth(auth[0], auth[1], timeouts.command)
            if r.code != 235:  # RFC 4954 §6: 235 is success
                raise SessionError(f"SMTP AUTH to {mx} failed: {r.code} {r.enhanced + ' ' if r.enhanced else ''}"
                                   f"{r.text}", code=r.code, dsn="4.7.8")
    except SessionError as e:
        e.local_address = conn.local_address
        conn.abort()
        raise
    except (WireError, OSError, TimeoutError) as e:
        local = conn.local_address
        conn.abort()
        err = SessionError(f"{mx}[{address}]: {type(e).__name__}: {e}")
        err.local_address = local
        raise err from e
    obj = conn.ssl_object
    if sessions is not None and ctx is not None and obj is not None and tls.security is not TlsOutcome.CLEARTEXT:
        # every check passed: keep the session (TLS 1.3: the ticket came with the first records after the
        # handshake, read with the second EHLO's reply) for the next connection under the same key
        session = obj.session
        if session is not None and (session.has_ticket or session.id):
            sessions.put(cache_key, ctx, session, tls)
    return Session(conn, address, port, mx, tls, timeouts)


def _said(what: str, r: Reply) -> SessionError:
    """A refusal reply as the session's failure: permanent for 5xx (RFC 5321 §4.2.1), with the server's own
    enhanced status code (RFC 3463) where it gave one."""
    return SessionError(f"{what} {r}", code=r.code, temporary=r.code < 500, dsn=r.enhanced if r.enhanced and
                        r.enhanced[0] == str(r.code)[0] else "")


def _caps_error(missing: list[str], mx: str, address: str, owner: str) -> SessionError:
    names = ", ".join(missing)
    result = TlsOutcome.STARTTLS_NOT_SUPPORTED if missing == ["starttls"] else TlsOutcome.VALIDATION_FAILURE
    return SessionError(f"MTA-capability {names} promised by {owner or 'a secure record'} but not shown by "
                        f"{mx}[{address}] — suspected attack", suspected_attack=True, dsn="4.7.5",
                        tls_result=result)


def handshake_result(e: BaseException) -> TlsOutcome:
    """RFC 8460 §4.3.1: the result type of a failed TLS handshake (a PKIX verification error says which)."""
    while not isinstance(e, ssl.SSLCertVerificationError) and (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__  # type: ignore[assignment]  # asyncio may wrap the ssl error
    if isinstance(e, ssl.SSLCertVerificationError):
        code = getattr(e, "verify_code", 0)
        if code == 10:   # X509_V_ERR_CERT_HAS_EXPIRED
            return TlsOutcome.CERTIFICATE_EXPIRED
        if code == 62:   # X509_V_ERR_HOSTNAME_MISMATCH
            return TlsOutcome.CERTIFICATE_HOST_MISMATCH
        return TlsOutcome.CERTIFICATE_NOT_TRUSTED
    return TlsOutcome.VALIDATION_FAILURE


def needed_tlsa(chain: Sequence[x509.Certificate]) -> str:
    """The DANE-EE record that would match what the server presented (``3 1 1 …``), for diagnostics."""
    return dane.tlsa_for(chain[0], DANE_EE, SPKI, SHA256).text() if chain else ""


def _authenticate(tls: TLSState, req: Requirement, mx: str, address: str, now: dt.datetime | None) -> None:
    """Decide the session's security from the presented chain, or raise (before any mail command)."""
    if req.auth is Auth.DANE and req.pkix_names:
        # tafile= (verify/secure): the anchors as DANE-TA records, the names by Postfix's match rules
        if not pkix_name_ok(tls.chain, req.pkix_names):
            names = ", ".join(dane.cert_names(tls.chain[0])) if tls.chain else "none"
            raise SessionError(f"certificate of {mx} names {names}, none matching {', '.join(req.pkix_names)}",
                               dsn="4.7.5", tls_result=TlsOutcome.CERTIFICATE_HOST_MISMATCH, chain=tls.chain)
        res = dane.verify(req.tlsa, tls.chain, dane.cert_names(tls.chain[0]), now)
        if res.status is not dane.DaneStatus.VERIFIED:
            raise SessionError(f"certificate of {mx} does not chain to a tafile trust anchor ({res.reason})",
                               dsn="4.7.5", tls_result=TlsOutcome.CERTIFICATE_NOT_TRUSTED, chain=tls.chain)
        tls.security, tls.detail = TlsOutcome.VERIFIED, "tafile trust anchor"
        return
    if req.auth is Auth.DANE:
        res = dane.verify(req.tlsa, tls.chain, req.names, now)
        if res.status is dane.DaneStatus.VERIFIED:
            tls.security, tls.tlsa_matched, tls.detail = TlsOutcome.DANE_VERIFIED, res.matched, res.reason
            return
        if res.status is dane.DaneStatus.NO_USABLE:
            tls.security = TlsOutcome.UNAUTHENTICATED
            return
        # RFC 8460 §4.3.2.1: no record of the TLSA RRset matched
        raise SessionError(f"TLSA record mismatch for {mx} — suspected attack ({res.reason})",
                           suspected_attack=True, dsn="4.7.5", tls_result=TlsOutcome.TLSA_INVALID,
                           chain=tls.chain)
    if req.auth is Auth.PKIX:
        if not pkix_name_ok(tls.chain, req.names):
            names = ", ".join(dane.cert_names(tls.chain[0])) if tls.chain else "none"
            raise SessionError(f"certificate of {mx} names {names}, none matching {', '.join(req.names)}",
                               dsn="4.7.5", tls_result=TlsOutcome.CERTIFICATE_HOST_MISMATCH, chain=tls.chain)
        tls.security = TlsOutcome.VERIFIED
        return
    if req.auth is Auth.FINGERPRINT:
        fp = dane.fingerprint_matches(tls.chain, req.fingerprints)
        if fp is None:
            raise SessionError(f"certificate fingerprint of {mx} matches no configured fingerprint",
                               dsn="4.7.5", tls_result=TlsOutcome.CERTIFICATE_NOT_TRUSTED, chain=tls.chain)
        tls.security, tls.detail = TlsOutcome.VERIFIED, f"fingerprint {fp}"
        return
    tls.security = TlsOutcome.UNAUTHENTICATED
