"""Delivery status notifications (RFC 3464) for failed, expired and delayed messages.

A DSN is a ``multipart/report; report-type=delivery-status`` message (RFC 6522) with three parts: a
human-readable explanation, a ``message/delivery-status`` part with one block per recipient, and the
original message (``message/rfc822``, RET=FULL) or only its headers (``text/rfc822-headers``, RET=HDRS or
when the message is large). It is sent from the null reverse-path, so it can never cause another bounce,
and none is ever sent to a null sender (RFC 5321 §6.1, RFC 3461 §6.2).
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Sequence

from postgate.outbound.delivery import Dsn
from postgate.outbound.queue.envelope import Envelope, Recipient

FULL_LIMIT = 50_000  # octets of original message returned in full (Postfix's bounce_size_limit)


def _headers(content: bytes) -> bytes:
    end = content.find(b"\r\n\r\n")
    if end < 0:
        end = content.find(b"\n\n")
    return content if end < 0 else content[: end + 2]


def _xtext(value: str) -> str:
    """RFC 3461 §4 xtext: "+" and "=", and anything outside printable US-ASCII, as +XX (UTF-8 octets).

    Used for the fields RFC 3464 takes from the client's envelope (Original-Envelope-Id §2.2.1,
    Original-Recipient §2.3.1): the smtpd only accepts printable US-ASCII there, and this makes sure that
    nothing read back from an older queue file can put a CR or LF into the report either."""
    out = []
    for ch in value:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        elif ch == " ":
            out.append("+20")
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8", "surrogateescape"))
    return "".join(out)


def _text(value: str) -> str:
    """RFC 3464 §2.2.1/§2.3.1: the ENVID and ORCPT address as the sender gave them (xtext-decoded, as Postfix
    writes them) when they are printable US-ASCII, which the smtpd checks; otherwise xtext (RFC 3461 §4),
    so a field is always one line of text."""
    if all(" " <= c <= "~" for c in value):
        return value
    return _xtext(value)


def _address(kind_address: str) -> str:
    """RFC 3464 §2.3.1/§2.3.2: ``address-type; address``. An rfc822 address is US-ASCII; a non-ASCII one is
    written as RFC 6533 §3's utf-8-addr-xtext (a backslash, x, the code point in braces); control characters
    never pass."""
    t, sep, addr = kind_address.partition(";")
    if not sep:
        t, addr = "rfc822", kind_address
    t, addr = t.strip(), addr.strip()
    if not re.fullmatch(r"[A-Za-z0-9-]+", t):
        t = "rfc822"
    if all(" " < c <= "~" for c in addr):
        return f"{t}; {addr}"
    enc = "".join(c if " " < c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):X}}}" for c in addr)
    return f"utf-8; {enc}"


def _line(text: str) -> str:
    """One line of header or report text: CR, LF and other control characters become spaces."""
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


def _date(t: float) -> str:
    return email.utils.formatdate(t, localtime=False)


def params(env: Envelope) -> Dsn:
    """The RFC 3461 parameters of a queued message, to pass on to the next hop."""
    return Dsn(ret=env.ret, envid=env.envid,
               notify={r.address: tuple(r.notify) for r in env.recipients if r.notify},
               orcpt={r.address: r.orcpt for r in env.recipients if r.orcpt})


def build(env: Envelope, content: bytes, recipients: Sequence[Recipient], *, action: str, reporting_mta: str,
          now: float | None = None, retry_until: float | None = None) -> bytes | None:
    """The DSN for ``recipients`` of ``env`` (``action`` "failed" or "delayed"), or None when none is due:
    null sender, or no recipient asked for it (RFC 3461 §4.1 NOTIFY)."""
    if not env.sender or env.is_bounce:
        return None
    kind = {"failed": "FAILURE", "delayed": "DELAY"}.get(action, "SUCCESS")  # relayed, delivered
    wanted = [r for r in recipients if r.wants(kind)]
    if not wanted:
        return None
    t = time.time() if now is None else now
    boundary = f"{env.id}.{int(t)}/{reporting_mta}"
    if action in ("relayed", "delivered"):
        subject = "Successful Mail Delivery Report"
        intro = ("This is the mail system at host {h}.\r\n\r\nYour message was successfully "
                 + ("delivered to the destination(s) below" if action == "delivered" else
                    "relayed to the destination(s) below, whose mail system does not offer delivery "
                    "notifications (RFC 3461 §5.2.2)") + ".\r\n")
    elif action == "failed":
        subject = "Undelivered Mail Returned to Sender"
        intro = ("This is the mail system at host {h}.\r\n\r\nI'm sorry to have to inform you that your message "
                 "could not be delivered to one or more recipients. It's attached below.\r\n")
    else:
        subject = "Delayed Mail (still being retried)"
        intro = ("This is the mail system at host {h}.\r\n\r\n####### THIS IS A WARNING ONLY.  YOU DO NOT NEED "
                 "TO RESEND YOUR MESSAGE. #######\r\n\r\nYour message could not be delivered yet; it will be "
                 "retried until " + (_date(retry_until) if retry_until else "it expires") + ".\r\n")
    human = intro.format(h=reporting_mta) + "".join(f"\r\n<{_line(r.address)}>: {_line(r.reason or r.dsn)}\r\n"
                                                    for r in wanted)
    # RFC 3464 §2.2: per-message fields
    status = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Postgate-Queue-ID: {env.id}"]
    if env.envid:
        status.append(f"Original-Envelope-Id: {_text(env.envid)}")
    status.append(f"Arrival-Date: {_date(env.arrival)}")
    blocks = ["\r\n".join(status)]
    for r in wanted:  # RFC 3464 §2.3: per-recipient fields
        f = []
        if r.orcpt:
            kind, _, a = r.orcpt.partition(";")
            f.append(f"Original-Recipient: {_line(kind)};{_text(a)}")   # RFC 3461 §4.2: the ORCPT
        f.append(f"Final-Recipient: {_address(r.address)}")
        f.append(f"Action: {action}")
        f.append(f"Status: {r.dsn or {'failed': '5.0.0', 'delayed': '4.0.0'}.get(action, '2.0.0')}")
        if r.remote:
            f.append(f"Remote-MTA: dns; {_line(r.remote)}")
        if r.reason:
            diag = _line(r.reason)
            # RFC 3464 §2.3.6: the type says who wrote the text (recorded with it, not guessed from it);
            # envelopes stored by older versions carry no type: a reply starts with its code there
            kind_ = r.diagnostic_type or ("smtp" if diag[:3].isdigit() else "X-Postgate")
            f.append(f"Diagnostic-Code: {kind_}; {diag}")
        if r.suspected_attack:  # RFC 3464 §3.3 extension field: the deferral was a suspected attack
            f.append("X-Postgate-Suspected-Attack: yes")
        if r.time:
            f.append(f"Last-Attempt-Date: {_date(r.time)}")
        if action == "delayed" and retry_until:
            f.append(f"Will-Retry-Until: {_date(retry_until)}")
        blocks.append("\r\n".join(f))
    delivery_status = "\r\n\r\n".join(blocks) + "\r\n"
    full = env.ret != "HDRS" and len(content) <= FULL_LIMIT
    original_type = "message/rfc822" if full else "text/rfc822-headers"
    original = content if full else _headers(content)
    if not original.endswith(b"\n"):
        original += b"\r\n"
    head = (f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\r\n"
            f"To: <{_line(env.sender)}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {_date(t)}\r\n"
            f"Message-ID: <{env.id}.{int(t)}.dsn@{reporting_mta}>\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
            "\r\nThis is a MIME-encapsulated message.\r\n\r\n")
    parts = [
        f"--{boundary}\r\nContent-Description: Notification\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
        + human,
        f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        + delivery_status,
    ]
    body = head.encode() + "\r\n".join(parts).encode() + (
        f"\r\n--{boundary}\r\nContent-Description: Undelivered Message\r\nContent-Type: {original_type}\r\n\r\n"
    ).encode() + original + f"\r\n--{boundary}--\r\n".encode()
    return body
