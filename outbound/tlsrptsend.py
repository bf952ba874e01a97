"""Sending TLS-RPT reports (RFC 8460 §5): once a day, one gzip'd JSON report per policy domain.

For every (day, policy domain) in the store that is over (UTC) and not yet reported: look up
``_smtp._tls.<domain>`` TXT (§3), build the §4.4 JSON from the stored counts, gzip it (§5.1, file name
``submitter!domain!begin!end.json.gz``) and send it to every ``rua``:

- ``mailto:`` — a ``multipart/report; report-type="tlsrpt"`` message (§5.3) with the headers
  ``TLS-Report-Domain`` and ``TLS-Report-Submitter`` and the subject
  ``Report Domain: … Submitter: … Report-ID: <…>``; a human-readable part, then the report as
  ``application/tlsrpt+gzip``. It is handed to ``submit`` — in the daemon: DKIM-sign and enqueue in
  Postgate's own queue (§5.3: the report SHOULD be DKIM-signed by the submitter's domain);
- ``https:`` — an HTTPS POST of the gzip'd report with ``Content-Type: application/tlsrpt+gzip`` (§5.4),
  with the Web PKI, a time limit and no redirects.

A domain without a TLS-RPT record gets no report; the day is marked done either way so it is not
looked up again and again.
"""

from __future__ import annotations

import asyncio
import email.policy
import email.utils
import gzip
import json
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import urlsplit

import dns.rdatatype
from postgate.outbound.resolver import ResolverProtocol
from postgate.outbound.tlsrptdb import TlsRptStore
from postgate.policy import tlsrpt

log = logging.getLogger("postgate.tlsrpt")

Submit = Callable[[str, list[str], bytes], Awaitable[None]]


@dataclass(frozen=True)
class ReportSettings:
    organization: str = "Postgate"
    submitter: str = "localhost"          # RFC 8460 §5.3 TLS-Report-Submitter: our domain
    contact: str = "postmaster@localhost"  # contact-info
    sender: str = "noreply-tlsrpt@localhost"
    ca_file: str | None = None             # Web PKI for https: rua
    post_timeout: float = 30.0
    max_report_size: int = 10 * 1024 * 1024


def build(day: str, domain: str, counts: list[tlsrpt.PolicyCounts], settings: ReportSettings,
          report_id: str | None = None) -> tuple[dict[str, object], bytes, str]:
    """(report JSON, gzip'd report, file name) for one domain and day."""
    # RFC 8460 §5.3: the Subject's Report-ID is an RFC 5322 msg-id, "<" id-left "@" id-right ">", id-left a
    # dot-atom-text: no ":" (so the day, not a time of day), no "_" trouble (atext allows it)
    rid = report_id or f"{day}_{domain}_{uuid.uuid4().hex[:12]}@{settings.submitter}"
    report = tlsrpt.report(day, counts, organization=settings.organization, contact=settings.contact,
                           report_id=rid)
    raw = json.dumps(report, indent=1).encode()
    # mtime=0: the same report compresses to the same bytes
    return report, gzip.compress(raw, mtime=0), tlsrpt.filename(settings.submitter, domain, day)


def message(report: dict[str, object], gz: bytes, fname: str, domain: str, rcpt: str,
            settings: ReportSettings, now: float | None = None) -> bytes:
    """The RFC 8460 §5.3 report mail, CRLF line ends."""
    rid = str(report["report-id"])
    m = EmailMessage(policy=email.policy.SMTP)
    m["From"] = settings.sender
    m["To"] = rcpt
    m["Subject"] = tlsrpt.subject(domain, settings.submitter, rid)
    m["Date"] = email.utils.formatdate(now if now is not None else time.time(), usegmt=True)
    m["Message-ID"] = email.utils.make_msgid(domain=settings.submitter)
    m["TLS-Report-Domain"] = domain          # RFC 8460 §5.3
    m["TLS-Report-Submitter"] = settings.submitter
    m["Auto-Submitted"] = "auto-generated"   # RFC 3834
    dr = report["date-range"]
    assert isinstance(dr, dict)
    m.set_content(f"This is an aggregate TLS report (RFC 8460) from {settings.organization} for {domain},\n"
                  f"covering {dr['start-datetime']} to {dr['end-datetime']}.\n")
    m.add_attachment(gz, maintype="application", subtype="tlsrpt+gzip", filename=fname)
    # RFC 8460 §5.3: multipart/report with report-type "tlsrpt"; a boundary of our own (RFC 2046 §5.1.1: at
    # most 70 characters; the email package sets one only when the message is written, too late here)
    m.set_boundary(f"tlsrpt-{uuid.uuid4().hex}")
    m.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"; boundary="'
                     + str(m.get_boundary()) + '"')
    return m.as_bytes()


async def post(url: str, gz: bytes, settings: ReportSettings) -> None:
    """RFC 8460 §5.4: POST the gzip'd report; 2xx is success, anything else (redirects too) fails."""
    u = urlsplit(url)
    if u.scheme != "https" or not u.hostname:
        raise ValueError(f"{url}: not an https URL")
    ctx = ssl.create_default_context(cafile=settings.ca_file) if settings.ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    async with asyncio.timeout(settings.post_timeout):
        reader, writer = await asyncio.open_connection(u.hostname, u.port or 443, ssl=ctx,
                                                       server_hostname=u.hostname)
        try:
            writer.write(f"POST {path} HTTP/1.1\r\nHost: {u.netloc}\r\nContent-Type: {tlsrpt.MEDIA_TYPE_GZIP}\r\n"
                         f"Content-Length: {len(gz)}\r\nConnection: close\r\nUser-Agent: Postgate\r\n\r\n".encode()
                         + gz)
            await writer.drain()
            status = (await reader.readline()).decode("latin-1").split()
        finally:
            writer.close()
    if len(status) < 2 or not status[1].startswith("2"):
        raise OSError(f"POST {url}: {' '.join(status[1:]) or 'no HTTP response'}")


async def rua_of(resolver: ResolverProtocol, domain: str) -> tlsrpt.Record | None:
    ans = await resolver.resolve(f"_smtp._tls.{domain}", dns.rdatatype.TXT)
    if not ans.ok:
        return None
    return tlsrpt.select_record([b"".join(r.strings).decode("utf-8", "replace") for r in ans.records()])


async def send_due(store: TlsRptStore, resolver: ResolverProtocol, settings: ReportSettings, submit: Submit, *,
                   now: float | None = None) -> list[tuple[str, str, str]]:
    """Send every report whose day is over. Returns (day, domain, rua) for each report sent."""
    t = time.time() if now is None else now
    today = tlsrpt.day_of(t)
    sent: list[tuple[str, str, str]] = []
    for day, domain in await asyncio.to_thread(store.unsent, today):
        rec = await rua_of(resolver, domain)
        if rec is None:
            log.info("TLS-RPT %s %s: no _smtp._tls record, no report", day, domain)
            await asyncio.to_thread(store.mark_sent, day, domain)
            continue
        counts = await asyncio.to_thread(store.counts, day, domain)
        report, gz, fname = build(day, domain, counts, settings)
        if len(gz) > settings.max_report_size:
            log.warning("TLS-RPT %s %s: report of %d bytes exceeds the limit, not sent", day, domain, len(gz))
            await asyncio.to_thread(store.mark_sent, day, domain)
            continue
        for rcpt in rec.mailto:
            await submit(settings.sender, [rcpt], message(report, gz, fname, domain, rcpt, settings, t))
            log.info("TLS-RPT %s %s: report %s mailed to %s", day, domain, report["report-id"], rcpt)
            sent.append((day, domain, f"mailto:{rcpt}"))
        for url in rec.https:
            try:
                await post(url, gz, settings)
            except (OSError, ssl.SSLError, TimeoutError, ValueError) as e:
                log.warning("TLS-RPT %s %s: POST to %s failed: %s", day, domain, url, e)
                continue
            sent.append((day, domain, url))
        await asyncio.to_thread(store.mark_sent, day, domain)
    return sent
