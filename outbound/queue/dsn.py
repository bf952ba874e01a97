"""Delivery status notifications (RFC 3464) for failed, expired and delayed messages.

A DSN is a ``multipart/report; report-type=delivery-status`` message (RFC 6522) with three parts: a
human-readable explanation, a ``message/delivery-status`` part with one block per recipient, and the
original message (``message/rfc822``, RET=FULL) or only its headers (``text/rfc822-headers``, RET=HDRS or
when the message is large; always for delay and success reports). It is sent from the null reverse-path, so
it can never cause another bounce, and none is ever sent to a null sender (RFC 5321 §6.1, RFC 3461 §6.2).

Every line is at most 998 octets (RFC 5322 §2.1.1; Postgate's own smtpd refuses longer ones, and a lost DSN
is silent): the delivery-status fields are folded (RFC 3464 §2.1), the explanation wrapped at 78 columns.
The report is 7-bit: the explanation is UTF-8 in quoted-printable when it holds non-ASCII text; the
delivery-status part is US-ASCII (RFC 3464 §2.1), a non-ASCII address written as RFC 6533 §3's
utf-8-addr-xtext and non-ASCII diagnostic text as "?" (the explanation keeps the server's words).
"""

from __future__ import annotations

import email.quoprimime
import email.utils
import re
import secrets
import textwrap
import time
from collections.abc import Sequence

from postgate.outbound.delivery import Dsn
from postgate.outbound.queue.envelope import Envelope, Recipient

FULL_LIMIT = 50_000  # octets of original message returned in full (Postfix's bounce_size_limit)
WIDTH = 78        # RFC 5322 §2.1.1: lines SHOULD be at most 78 characters
TEXT_WIDTH = 78   # the explanation (Postfix wraps its bounce text at 79 columns)
MAX_LINE = 998    # RFC 5322 §2.1.1: lines MUST be at most 998 characters


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


def _utf8_addr_xtext(addr: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: QCHAR (printable US-ASCII but SP, "\\", "+", "=") as is, anything else as
    EmbeddedUnicodeChar ``\\x{HEXPOINT}``: upper-case hex without leading zeros, but two digits for the
    ASCII specials (\\x{20}, \\x{2B}, \\x{3D}, \\x{5C}, \\x{7F}) and the non-ASCII code points below 0x100."""
    return "".join(c if "!" <= c <= "~" and c not in "\\+=" else f"\\x{{{ord(c):02X}}}"
                   for c in _line(addr).encode("utf-8", "surrogateescape").decode("utf-8", "replace"))


def _address(addr: str) -> str:
    """RFC 3464 §2.3.2 Final-Recipient ``address-type; address`` for an envelope address: an ASCII address
    (a quoted local part with a space too) is type rfc822 and written as it is; a non-ASCII one is RFC 6533
    §3's type utf-8 in the 7-bit utf-8-addr-xtext form, as a message/delivery-status part needs. Control
    characters never pass (a space in their place)."""
    addr = _line(addr).strip()
    if addr.isascii():
        return f"rfc822; {addr}"
    return f"utf-8; {_utf8_addr_xtext(addr)}"


def _original_recipient(orcpt: str) -> str:
    """RFC 3464 §2.3.1 Original-Recipient from the stored ORCPT (RFC 3461 §4.2, ``type;address`` with the
    address xtext-decoded): printable US-ASCII as given; a non-ASCII address as RFC 6533 §3's utf-8 type
    with utf-8-addr-xtext; anything with control characters (only an old queue file can hold them) as
    xtext, so the field is always one line."""
    kind, _, a = orcpt.partition(";")
    if all(" " <= c <= "~" for c in a) or not all(c >= " " and c != "\x7f" for c in a):
        return f"{_line(kind)};{_text(a)}"
    return f"utf-8;{_utf8_addr_xtext(a)}"


def _line(text: str) -> str:
    """One line of header or report text: CR, LF and other control characters become spaces."""
    return "".join(c if c >= " " and c != "\x7f" else " " for c in text)


def _ascii(text: str) -> str:
    """RFC 3464 §2.1: the delivery-status fields are US-ASCII; a non-ASCII character (a UTF-8 server reply,
    RFC 6531 §3.7.4) becomes "?" here, as Postfix prints it (the explanation part keeps the text)."""
    return "".join(c if " " <= c <= "~" else "?" for c in _line(text))


def _hard_split(line: str, first: int, rest: int, lead: str) -> list[str]:
    """A line longer than ``first`` cut into pieces (the next ones led by ``lead``), never longer than
    MAX_LINE: the last resort for a word with no white space to fold at."""
    out = [line[:first]]
    line = line[first:]
    while line:
        out.append(lead + line[:rest])
        line = line[rest:]
    return out


def _fold(field: str) -> str:
    """A delivery-status field folded as a header field is (RFC 3464 §2.1, RFC 5322 §2.2.3): CRLF before white
    space, so unfolding gives the field back; lines of at most WIDTH characters where the words allow, and
    never more than MAX_LINE (RFC 5322 §2.1.1), a longer word being cut."""
    pieces = re.findall(r" *[^ ]+", field.rstrip(" "))
    lines: list[str] = []
    cur = ""
    for p in pieces:
        # a word too long for any line stays where it is (folding before it would shorten nothing)
        if cur and len(cur) + len(p) > WIDTH and not (len(p) > WIDTH and len(cur) + len(p) <= MAX_LINE):
            lines.append(cur)
            cur = p
        else:
            cur += p
    if cur:
        lines.append(cur)
    out: list[str] = []
    for ln in lines:
        out.extend(_hard_split(ln, MAX_LINE, MAX_LINE - 1, " ") if len(ln) > MAX_LINE else [ln])
    return "\r\n".join(out)


def _wrap(text: str, indent: str = "") -> list[str]:
    """One paragraph of the explanation wrapped at TEXT_WIDTH columns (continuation lines indented, as
    Postfix does; RFC 5322 §2.1.1); a word longer than MAX_LINE octets is cut (RFC 5322 §2.1.1)."""
    lines = textwrap.wrap(_line(text), TEXT_WIDTH, subsequent_indent=indent, break_long_words=False,
                          break_on_hyphens=False) or [""]
    limit = MAX_LINE // 4   # characters: a UTF-8 character is at most 4 octets
    out: list[str] = []
    for ln in lines:
        out.extend(_hard_split(ln, limit, limit - len(indent), indent)
                   if len(ln.encode("utf-8", "surrogateescape")) > MAX_LINE else [ln])
    return out


def _date(t: float) -> str:
    return email.utils.formatdate(t, localtime=False)


def params(env: Envelope) -> Dsn:
    """The RFC 3461 parameters of a queued message, to pass on to the next hop."""
    return Dsn(ret=env.ret, envid=env.envid,
               notify={r.address: tuple(r.notify) for r in env.recipients if r.notify},
               orcpt={r.address: r.orcpt for r in env.recipients if r.orcpt})


def build(env: Envelope, content: bytes, recipients: Sequence[Recipient], *, action: str, reporting_mta: str,
          now: float | None = None, retry_until: float | None = None) -> bytes | None:
    """The DSN for ``recipients`` of ``env`` (``action`` "failed", "delayed", "relayed" or "delivered"), or None
    when none is due: null sender, or no recipient asked for it (RFC 3461 §4.1 NOTIFY)."""
    if not env.sender or env.is_bounce:
        return None
    kind = {"failed": "FAILURE", "delayed": "DELAY"}.get(action, "SUCCESS")  # relayed, delivered
    wanted = [r for r in recipients if r.wants(kind)]
    if not wanted:
        return None
    t = time.time() if now is None else now
    # RFC 5322 §3.6.4 (Message-ID unique) and RFC 2046 §5.1.1 (boundary at most 70 characters, not in the
    # content): two reports written in the same second (failed and delayed, relayed and failed) differ
    tag = secrets.token_hex(6)
    boundary = f"{env.id}.{int(t)}.{tag}/{reporting_mta}"[:70]
    if action in ("relayed", "delivered"):
        subject = "Successful Mail Delivery Report"
        intro = ["Your message was successfully " + (
            "delivered to the destination(s) below." if action == "delivered" else
            "relayed to the destination(s) below, whose mail system does not offer delivery "
            "notifications (RFC 3461 section 5.2.2).")]
    elif action == "failed":
        subject = "Undelivered Mail Returned to Sender"
        intro = ["I'm sorry to have to inform you that your message could not be delivered to one or more "
                 "recipients. It's attached below."]
    else:
        subject = "Delayed Mail (still being retried)"
        intro = ["###### THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. ######",
                 "Your message could not be delivered yet; it will be retried until "
                 + (_date(retry_until) if retry_until else "it expires") + "."]
    paragraphs = [_wrap(p) for p in [f"This is the mail system at host {reporting_mta}.", *intro]]
    paragraphs += [_wrap(f"<{r.address}>: {r.reason or r.dsn}", "    ") for r in wanted]
    human = "\r\n\r\n".join("\r\n".join(p) for p in paragraphs) + "\r\n"
    if human.isascii():
        human_head = "Content-Type: text/plain; charset=us-ascii\r\n"
    else:
        # RFC 6532/RFC 2045 §6.7: UTF-8 text (a server's UTF-8 reply, RFC 6531 §3.7.4; a non-ASCII address)
        # goes in quoted-printable, so the report stays 7-bit
        human_head = "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        human = email.quoprimime.body_encode(human.encode("utf-8", "replace").decode("latin-1"), 76, "\r\n")
    # RFC 3464 §2.2: per-message fields
    status = [f"Reporting-MTA: dns; {_ascii(reporting_mta)}", f"X-Postgate-Queue-ID: {env.id}"]
    if env.envid:
        status.append(f"Original-Envelope-Id: {_text(env.envid)}")
    status.append(f"Arrival-Date: {_date(env.arrival)}")
    blocks = ["\r\n".join(_fold(f) for f in status)]
    for r in wanted:  # RFC 3464 §2.3: per-recipient fields
        f = []
        if r.orcpt:
            f.append(f"Original-Recipient: {_original_recipient(r.orcpt)}")   # RFC 3461 §4.2: the ORCPT
        f.append(f"Final-Recipient: {_address(r.address)}")
        f.append(f"Action: {action}")
        f.append(f"Status: {r.dsn or {'failed': '5.0.0', 'delayed': '4.0.0'}.get(action, '2.0.0')}")
        if r.remote:
            f.append(f"Remote-MTA: dns; {_ascii(r.remote)}")
        if r.reason:
            diag = _ascii(r.reason)
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
        blocks.append("\r\n".join(_fold(x) for x in f))   # RFC 3464 §2.1: folded like header fields
    delivery_status = "\r\n\r\n".join(blocks) + "\r\n"
    # RFC 3461 §4.3: RET applies to failed reports; a delay or success report returns only the headers
    # (text/rfc822-headers), as Postfix does: the message is not lost, nothing to return in full
    full = action == "failed" and env.ret != "HDRS" and len(content) <= FULL_LIMIT
    original_type = "message/rfc822" if full else "text/rfc822-headers"
    original = content if full else _headers(content)
    if not original.endswith(b"\n"):
        original += b"\r\n"
    description = ("Undelivered Message" if action == "failed" else "Message") + ("" if full else " Headers")
    head = (f"From: MAILER-DAEMON@{reporting_mta} (Mail Delivery System)\r\n"
            f"To: <{_line(env.sender)}>\r\n"
            f"Subject: {subject}\r\n"
            f"Date: {_date(t)}\r\n"
            f"Message-ID: <{env.id}.{int(t)}.{tag}.dsn@{reporting_mta}>\r\n"
            "Auto-Submitted: auto-replied\r\n"
            "MIME-Version: 1.0\r\n"
            f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"\r\n'
            "\r\nThis is a MIME-encapsulated message.\r\n\r\n")
    parts = [
        f"--{boundary}\r\nContent-Description: Notification\r\n{human_head}\r\n" + human,
        f"--{boundary}\r\nContent-Description: Delivery report\r\nContent-Type: message/delivery-status\r\n\r\n"
        + delivery_status,
    ]
    body = head.encode() + "\r\n".join(parts).encode() + (
        f"\r\n--{boundary}\r\nContent-Description: {description}\r\nContent-Type: {original_type}\r\n\r\n"
    ).encode() + original + f"\r\n--{boundary}--\r\n".encode()
    return body
