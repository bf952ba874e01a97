"""The DATA command's content on the wire, encoded in bulk (RFC 5321 §4.1.1.4, §4.5.2, §2.3.8).

What the client sends after ``354`` is the message with three transformations:

- every line ends in CRLF: RFC 5321 §2.3.8 allows CR and LF only together; a lone CR or LF in what we
  were given is sent as CRLF (what aiosmtplib, Postfix and sendmail do with local input);
- transparency (§4.5.2): a line that starts with ``.`` gets one more ``.`` in front, so no line of the
  content can be taken for the end of data;
- the end of data is ``CRLF.CRLF`` (§4.1.1.4): the content ends in CRLF (one is added when missing), then
  ``.`` CRLF follows.

aiosmtplib does the same with two regular-expression substitutions over the whole body, each a C-level
pass that still builds a new body. Here the common case costs almost nothing: a body whose line ends are
already all CRLF (``count`` in C, no copy) and in which no line starts with a dot is sent as it is, and
dot-stuffing where needed is one ``bytes.replace``. Then the whole content goes out in one write, as one
run of TLS records (``smtp_wire.transaction``; see bench/README.md, issue 20).
"""

from __future__ import annotations

import re

# RFC 5321 §2.3.8: a CR not followed by LF, or an LF not preceded by CR
_LINE_END = re.compile(rb"\r\n|\n|\r(?!\n)")
# a line that starts with "." (after the first): the regular-expression engine's literal-prefix scan, about
# twice as fast as ``in`` for this short pattern (25 against 57 µs per 100 KB here)
_DOT_LINE = re.compile(rb"\r\n\.")
END_OF_DATA = b".\r\n"  # after the content's final CRLF (RFC 5321 §4.1.1.4)


class Canonical(bytes):
    """Content already known to have only CRLF line ends and to end in CRLF (the smtpd refused every bare
    CR and LF of what it received, and nothing edited it since): :func:`canonical` need not count the line
    ends of every message again (three passes over the content: ~0.15 ms per 100 KB, 1.5 ms per MB)."""

    __slots__ = ()


def crlf_only(content: bytes) -> bool:
    """True when every CR and every LF in ``content`` is part of a CRLF pair (RFC 5321 §2.3.8)."""
    if isinstance(content, Canonical):
        return True
    crlf = content.count(b"\r\n")
    return content.count(b"\n") == crlf and content.count(b"\r") == crlf


def canonical(content: bytes) -> bytes:
    """``content`` with CRLF line ends, ending in CRLF: what BDAT carries (RFC 3030 §2: no transparency, no
    end-of-data line; the message the server stores is the same as after DATA)."""
    if isinstance(content, Canonical):
        return content
    if not crlf_only(content):
        content = _LINE_END.sub(b"\r\n", content)  # RFC 5321 §2.3.8: only CRLF ends a line
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content


def encode(content: bytes) -> bytes:
    """``content`` as the octets sent after the 354 reply, end-of-data line included."""
    content = canonical(content)
    # RFC 5321 §4.5.2: transparency, a leading "." doubled on every line
    if content.find(b".") >= 0 and _DOT_LINE.search(content):   # memchr first: base64 has no "."
        content = content.replace(b"\r\n.", b"\r\n..")
    if content.startswith(b"."):
        content = b"." + content
    return content + END_OF_DATA
