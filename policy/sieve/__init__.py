"""Sieve (RFC 5228), the mail filtering language, as Postgate's policy language at every SMTP stage.

A Sieve script is a small, loop-free program of ``if`` tests and *actions*: ``keep`` the message, ``discard``
it, ``redirect`` it, ``fileinto`` a mailbox, ``reject`` it (RFC 5429). Tests look at the header (``header``,
``address``, ``exists``), the SMTP envelope (``envelope``, RFC 5228 §5.4), the size, the body (RFC 5173),
dates (RFC 5260), the session (``environment``, RFC 5183), spam and virus scores (RFC 5235) and external
lists (RFC 6134). Extensions must be named with ``require`` before use. If no action cancels it, the
*implicit keep* delivers the message as usual (RFC 5228 §2.10.2).

Postgate adds a ``vnd.postgate`` extension with the decisions of an MTA (TLS level for a destination,
transport, hold, defer, DKIM signing, queue priority and lifetime) — see docs/sieve.md.

This package is pure: :func:`compile_script` parses and checks a script (errors as ``file:line:col``),
:func:`~postgate.policy.sieve.interp.run` evaluates it against an :class:`Input` under :class:`Limits`.
The adapter to the smtpd's stage hooks is ``postgate.inbound.sieve_filter``.
"""

from __future__ import annotations

from pathlib import Path

from postgate.policy.sieve.grammar import SieveError, parse
from postgate.policy.sieve.interp import Input, Kind, Limits, ListLookup, Result, SieveAction, run
from postgate.policy.sieve.validate import CAPABILITIES, Script, check


def compile_script(text: str, source: str = "<script>") -> Script:
    """Parse and check a script; raises :class:`SieveError` (``file:line:col: reason``)."""
    return check(parse(text, source), source)


def compile_file(path: str | Path) -> Script:
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise SieveError(str(p), 0, 0, f"cannot read script: {e.strerror}") from e
    except UnicodeDecodeError as e:
        # RFC 5228 §2.1: scripts are UTF-8
        line = p.read_bytes()[: e.start].count(b"\n") + 1
        raise SieveError(str(p), line, 1, "script is not valid UTF-8 (RFC 5228 §2.1)") from e
    return compile_script(text, str(p))


__all__ = ["CAPABILITIES", "Input", "Kind", "Limits", "ListLookup", "Result", "Script", "SieveAction",
           "SieveError", "compile_file", "compile_script", "run"]
