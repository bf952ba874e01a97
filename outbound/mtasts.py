"""MTA-STS discovery and fetch (RFC 8461 §3, §5.1): which policy is in force for a domain right now.

For each delivery to a domain: look up ``_mta-sts.<domain>`` TXT through Postgate's own resolver, compare
its ``id`` with the cached policy's, and fetch the policy again when the id changed, none is cached, or
the cached one is old enough to refresh (§5.1). The fetch is one HTTPS GET of
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with the Web PKI (the system CA store, or the
configured CA file), an overall time limit, a size limit, and **no redirects** (§3.3: "HTTP 3xx redirects
MUST NOT be followed"); only a ``200`` with media type ``text/plain`` counts (§3.2).

What a failure means (§5.1, §10.2): a cached, unexpired policy is used whenever the TXT record is
missing, the DNS lookup fails, or the fetch fails — so an attacker cannot strip a policy the sender has
already seen. With nothing cached, a failure means "no policy" (delivery as without MTA-STS), and the
failure is reported through TLS-RPT (``sts-policy-fetch-error``, ``sts-policy-invalid``,
``sts-webpki-invalid``).

The pure rules (parsing, MX matching, the decision per host) are in ``policy/mtasts.py``.

Why not PyPI ``postfix-mta-sts-resolver`` (MIT): its fetcher brings aiohttp and its resolver aiodns, i.e.
the system's non-validating resolver rather than Postgate's; and it is a Postfix socketmap daemon rather
than a library. The HTTPS GET below is about sixty lines of stdlib with the limits RFC 8461 asks for.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import dns.rdatatype
from cryptography import x509
from postgate.outbound import eager
from postgate.outbound.mtastsdb import Entry, PolicyCache
from postgate.outbound.resolver import ResolverProtocol
from postgate.policy import mtasts
from postgate.policy.tlsrpt import ResultType

log = logging.getLogger("postgate.mtasts")


@dataclass(frozen=True)
class StsSettings:
    enabled: bool = True
    ca_file: str | None = None          # Web-PKI trust for the policy host; None: the system store
    cache_file: str | None = None
    fetch_timeout: float = 10.0         # whole fetch: connect, TLS, request, body (RFC 8461 §3.3: SHOULD limit)
    max_size: int = mtasts.MAX_POLICY_BYTES
    refresh_after: float = 86400.0      # §5.1: refetch a cached policy at least this often
    port: int = 443


class FetchError(Exception):
    def __init__(self, reason: str, result: ResultType) -> None:
        super().__init__(reason)
        self.reason = reason
        self.result = result


class Source(enum.Enum):
    NONE = "none"              # no TXT record and nothing cached
    FETCHED = "fetched"        # fetched now
    CACHED = "cached"          # cached copy matches the TXT id
    CACHED_FALLBACK = "cached-fallback"  # TXT gone or fetch failed: the unexpired cached copy is used


@dataclass(frozen=True)
class StsLookup:
    """The policy in force for a domain, and how we got it."""

    domain: str
    policy: mtasts.Policy | None
    source: Source
    id: str = ""
    expires: float = 0.0
    failure: FetchError | None = None    # why a fetch failed (reported via TLS-RPT)
    txt_missing: bool = False            # no usable TXT record although a policy was cached
    notes: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        if self.policy is None:
            return "no MTA-STS policy" + (f" ({self.failure.reason})" if self.failure else "")
        exp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires))
        return (f"MTA-STS mode={self.policy.mode.value} mx={','.join(self.policy.mx)} id={self.id} "
                f"max_age={self.policy.max_age} expires={exp} ({self.source.value})")


async def fetch(domain: str, resolver: ResolverProtocol, settings: StsSettings) -> str:
    """GET the policy of ``domain`` (RFC 8461 §3.3); its text, or FetchError."""
    host = f"mta-sts.{domain}"
    try:
        async with asyncio.timeout(settings.fetch_timeout):
            return await _get(host, resolver, settings)
    except TimeoutError:
        raise FetchError(f"fetching {mtasts.policy_url(domain)}: timed out after {settings.fetch_timeout}s",
                         ResultType.STS_POLICY_FETCH_ERROR) from None


async def _get(host: str, resolver: ResolverProtocol, settings: StsSettings) -> str:
    url = f"https://{host}{mtasts.WELL_KNOWN}"
    addresses: list[str] = []
    for rt in (dns.rdatatype.A, dns.rdatatype.AAAA):
        ans = await resolver.resolve(host, rt)
        if ans.ok:
            addresses += [r.address for r in ans.records()]
    if not addresses:
        raise FetchError(f"fetching {url}: {host} has no address", ResultType.STS_POLICY_FETCH_ERROR)
    ctx = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # RFC 8996
    last: Exception | None = None
    for addr in addresses:
        try:
            reader, writer = await asyncio.open_connection(addr, settings.port, ssl=ctx, server_hostname=host)
        except ssl.SSLCertVerificationError as e:
            # RFC 8461 §3.3: the policy host's certificate must be valid for the Web PKI
            raise FetchError(f"fetching {url}: {e.verify_message}", ResultType.STS_WEBPKI_INVALID) from e
        except (OSError, ssl.SSLError) as e:
            last = e
            continue
        try:
            writer.write(f"GET {mtasts.WELL_KNOWN} HTTP/1.1\r\nHost: {host}\r\nAccept: text/plain\r\n"
                         f"User-Agent: Postgate\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            return await _response(reader, url, settings.max_size)
        finally:
            writer.close()
    raise FetchError(f"fetching {url}: {type(last).__name__}: {last}", ResultType.STS_POLICY_FETCH_ERROR)


async def _response(reader: asyncio.StreamReader, url: str, max_size: int) -> str:
    status = (await reader.readline()).decode("latin-1").split()
    if len(status) < 2 or not status[0].startswith("HTTP/"):
        raise FetchError(f"fetching {url}: not an HTTP response", ResultType.STS_POLICY_FETCH_ERROR)
    headers: dict[str, str] = {}
    while True:
        line = await reader.readline()
        if len(headers) > 100:
            raise FetchError(f"fetching {url}: too many headers", ResultType.STS_POLICY_FETCH_ERROR)
        if line in (b"\r\n", b"\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    code = status[1]
    if code.startswith("3"):  # RFC 8461 §3.3: redirects MUST NOT be followed
        raise FetchError(f"fetching {url}: HTTP {code} redirect (not followed, RFC 8461 §3.3)",
                         ResultType.STS_POLICY_FETCH_ERROR)
    if code != "200":  # RFC 8461 §3.3: only 200 is a policy
        raise FetchError(f"fetching {url}: HTTP {code}", ResultType.STS_POLICY_FETCH_ERROR)
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != mtasts.MEDIA_TYPE:  # RFC 8461 §3.2: media type text/plain
        raise FetchError(f"fetching {url}: media type {ctype or 'none'}, expected text/plain",
                         ResultType.STS_POLICY_INVALID)
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = await _chunked(reader, url, max_size)
    else:
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_size):
            raise FetchError(f"fetching {url}: policy larger than {max_size} bytes",
                             ResultType.STS_POLICY_INVALID)
        if length is not None:
            # RFC 9112 §6.3: the body is Content-Length octets; fewer before the connection ends is a
            # truncated (maybe cut-off) policy, never parsed (a shortened mx list or max_age would apply)
            try:
                body = await reader.readexactly(int(length))
            except asyncio.IncompleteReadError as e:
                raise FetchError(f"fetching {url}: policy truncated ({len(e.partial)} of {length} bytes)",
                                 ResultType.STS_POLICY_FETCH_ERROR) from None
        else:   # RFC 9112 §6.3: without a length, the body ends with the connection (read to its end)
            body = b""
            while chunk := await reader.read(max_size + 1 - len(body)):
                body += chunk
                if len(body) > max_size:
                    break
        if len(body) > max_size:
            raise FetchError(f"fetching {url}: policy larger than {max_size} bytes",
                             ResultType.STS_POLICY_INVALID)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise FetchError(f"fetching {url}: policy is not UTF-8", ResultType.STS_POLICY_INVALID) from None


async def _chunked(reader: asyncio.StreamReader, url: str, max_size: int) -> bytes:
    body = b""
    while True:
        size_line = (await reader.readline()).split(b";")[0].strip()
        try:
            n = int(size_line, 16)
        except ValueError:
            raise FetchError(f"fetching {url}: bad chunk", ResultType.STS_POLICY_FETCH_ERROR) from None
        if n == 0:
            return body
        if len(body) + n > max_size:
            raise FetchError(f"fetching {url}: policy larger than {max_size} bytes", ResultType.STS_POLICY_INVALID)
        body += await reader.readexactly(n)
        await reader.readline()


class StsResolver:
    """The policy in force for a domain, from DNS, the cache and HTTPS (RFC 8461 §5.1)."""

    def __init__(self, resolver: ResolverProtocol, settings: StsSettings | None = None,
                 clock: Callable[[], float] | None = None, cache: PolicyCache | None = None) -> None:
        from pathlib import Path

        self.resolver = resolver
        self.settings = settings or StsSettings()
        self.clock = clock or time.time
        self.cache = cache or PolicyCache(Path(self.settings.cache_file) if self.settings.cache_file else None,
                                          self.clock)
        self.counters: dict[str, int] = {}
        self._inflight: dict[str, asyncio.Future[StsLookup]] = {}

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    async def lookup(self, domain: str) -> StsLookup:
        domain = domain.lower().rstrip(".")
        fut = self._inflight.get(domain)
        if fut is not None:  # one fetch per domain at a time
            return await asyncio.shield(fut)
        # started at once: with the TXT answer cached and nothing to fetch it is done here, without the
        # task's turns of the loop (issue 20: three turns for every pre-queue delivery, outbound/eager.py)
        task = eager.task(self._lookup(domain))
        if task.done():
            return task.result()
        self._inflight[domain] = task
        try:
            return await asyncio.shield(task)
        finally:
            self._inflight.pop(domain, None)

    async def _lookup(self, domain: str) -> StsLookup:
        now = self.clock()
        cached = self.cache.get(domain)
        ans = await self.resolver.resolve(f"_mta-sts.{domain}", dns.rdatatype.TXT)
        record: mtasts.Record | None = None
        if ans.ok:
            record = mtasts.select_record([b"".join(r.strings).decode("utf-8", "replace") for r in ans.records()])
        if record is None:
            if cached is None:
                return StsLookup(domain, None, Source.NONE)
            # RFC 8461 §5.1/§10.2: TXT gone or unresolvable: keep using the unexpired cached policy
            why = "TXT lookup failed" if not ans.ok else "TXT record missing"
            log.warning("MTA-STS %s: %s, using the cached policy (id %s) until it expires", domain, why,
                        cached.id)
            self._count("sts_txt_missing_cached_used")
            return self._from(cached, Source.CACHED_FALLBACK, txt_missing=True, notes=(why,))
        if cached is not None and cached.id == record.id and now - cached.fetched < self.settings.refresh_after:
            return self._from(cached, Source.CACHED)
        # RFC 8461 §5.1: a new id (or no cached policy, or a refresh due): fetch
        try:
            text = await fetch(domain, self.resolver, self.settings)
            policy = mtasts.parse_policy(text)
        except mtasts.StsError as e:
            failure = FetchError(f"policy of {domain} invalid: {e}", ResultType.STS_POLICY_INVALID)
        except FetchError as e:
            failure = e
        else:
            entry = Entry(domain, record.id, text, now, now + policy.max_age)
            self._count("sts_policy_fetched")
            if policy.mode is mtasts.Mode.NONE:
                await self.cache.put(entry)  # §8.3: mode none replaces and so withdraws a cached policy
            else:
                await self.cache.put(entry)
            if cached is not None and cached.id != record.id:
                log.info("MTA-STS %s: policy id %s replaces %s", domain, record.id, cached.id)
            return self._from(entry, Source.FETCHED)
        self._count("sts_fetch_failed")
        log.warning("MTA-STS %s: %s", domain, failure.reason)
        if cached is not None:  # RFC 8461 §5.1: a failed refresh keeps the cached policy
            return self._from(cached, Source.CACHED_FALLBACK, failure=failure)
        return StsLookup(domain, None, Source.NONE, record.id, failure=failure)

    def _from(self, e: Entry, source: Source, *, failure: FetchError | None = None, txt_missing: bool = False,
              notes: tuple[str, ...] = ()) -> StsLookup:
        return StsLookup(e.domain, e.policy, source, e.id, e.expires, failure, txt_missing, notes)

    async def refresh_all(self) -> int:
        """Proactive refresh (RFC 8461 §5.1: "SHOULD ... periodically"): look up every cached domain
        whose policy is due; return how many were checked. The daemon calls this about hourly."""
        n = 0
        for domain in self.cache.domains():
            e = self.cache.get(domain)
            if e is None or self.clock() - e.fetched >= self.settings.refresh_after:
                n += 1
                await self.lookup(domain)
        return n


def _trust_store(ca_file: str | None) -> list[x509.Certificate]:
    path = ca_file or ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt"
    with open(path, "rb") as fh:
        return x509.load_pem_x509_certificates(fh.read())


def pkix_problem(chain: list[x509.Certificate], mx: str, ca_file: str | None,
                 now: float | None = None) -> tuple[ResultType, str] | None:
    """Would this chain pass MTA-STS enforce (RFC 8461 §4.2: Web PKI, valid for the MX host name)?
    None if yes, else the RFC 8460 result type and why. Used to report testing-mode policies."""
    import datetime as dt

    from cryptography.x509 import DNSName
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    if not chain:
        return ResultType.VALIDATION_FAILURE, "no certificate"
    try:
        store = Store(_trust_store(ca_file))
    except (OSError, ValueError) as e:
        return ResultType.VALIDATION_FAILURE, f"trust store: {e}"
    when = dt.datetime.fromtimestamp(now if now is not None else time.time(), dt.UTC)
    builder = PolicyBuilder().store(store).time(when)
    try:
        builder.build_server_verifier(DNSName(mx.rstrip("."))).verify(chain[0], chain[1:])
        return None
    except VerificationError as e:
        text = str(e)
        if "expired" in text or "not yet valid" in text or when > chain[0].not_valid_after_utc:
            return ResultType.CERTIFICATE_EXPIRED, text[:200]
        from postgate.outbound import dane

        if not any(dane.name_matches(n, mx.rstrip(".").lower()) for n in dane.cert_names(chain[0])):
            return ResultType.CERTIFICATE_HOST_MISMATCH, text[:200]
        return ResultType.CERTIFICATE_NOT_TRUSTED, text[:200]
    except ValueError as e:
        return ResultType.VALIDATION_FAILURE, str(e)[:200]
