"""Manual pages made from the two sources that cannot drift: the argument parser and the settings reference.

``postgate(8)`` lists every command, sub-command and option exactly as ``postgate COMMAND --help`` knows
them (the parser of :mod:`postgate.cli`); ``postgate.toml(5)`` lists every configuration key with its type,
default and meaning from ``docs/configuration.md`` (the same rows ``postgate settings`` prints, like
postconf(5)). ``scripts/install`` writes both to ``/usr/share/man``; run ``python -m postgate.manpage 8``
or ``5`` to see one. The output is man(7) markup: every text is escaped (a backslash, a leading dot or
quote) so no help string can inject a request.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import sys
from collections.abc import Iterator

from postgate import settings
from postgate.cli import _version, make_parser

SYSEXITS = [  # sysexits(3), the codes the commands use
    (0, "success (EX_OK)"),
    (64, "usage error: unknown command or bad arguments (EX_USAGE)"),
    (65, "bad input data, e.g. a message or script that does not parse (EX_DATAERR)"),
    (66, "an input file or the spool does not exist (EX_NOINPUT)"),
    (69, "a recipient bounced, or a service is unavailable (EX_UNAVAILABLE)"),
    (71, "an operating-system error, e.g. a port in use (EX_OSERR)"),
    (73, "an output file cannot be created (EX_CANTCREAT)"),
    (74, "an input/output error (EX_IOERR)"),
    (75, "deferred: try again later (EX_TEMPFAIL)"),
    (78, "configuration error, reported as file:line (EX_CONFIG)"),
]


def esc(text: str) -> str:
    """Text for a man(7) line: backslashes escaped, hyphens as minus signs, other than ASCII as groff's
    Unicode escapes, no line starting a request."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    out = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in out)  # groff(7): \[uXXXX]
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in out.splitlines())


def _md(text: str) -> str:
    """A Markdown table cell as plain text (backquotes and escaped bars)."""
    return re.sub(r"`([^`]*)`", r"\1", text.replace("\\|", "|"))


def _subcommands(p: argparse.ArgumentParser) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sp in action.choices.items():
                yield name, helps.get(name, ""), sp


def _options(p: argparse.ArgumentParser) -> list[str]:
    lines: list[str] = []
    for a in p._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) or a.help == argparse.SUPPRESS:
            continue
        if a.option_strings:
            names = ", ".join(a.option_strings)
            if a.nargs != 0:
                metavar = a.metavar or a.dest.upper()
                names += f" {metavar if isinstance(metavar, str) else ' '.join(metavar)}"
        else:
            mv = a.metavar or a.dest
            names = mv if isinstance(mv, str) else " ".join(mv)
        lines += [".TP", f"\\fB{esc(names)}\\fR", esc(a.help or "")]
    return lines


def _command(path: str, helptext: str, p: argparse.ArgumentParser) -> list[str]:
    usage = " ".join(p.format_usage().split())
    usage = usage.removeprefix("usage: ")
    out = [f'.SS "{esc(path)}"', esc(helptext[:1].upper() + helptext[1:] + ".") if helptext else "",
           ".PP", f"\\fB{esc(usage)}\\fR"]
    desc = (p.description or "").strip()
    if desc and desc != helptext:
        out += [".PP", esc(" ".join(desc.split()))]
    opts = _options(p)
    if opts:
        out += [".PP", "Arguments and options:", ".RS"] + opts + [".RE"]
    for name, sub_help, sp in _subcommands(p):
        out += _command(f"{path} {name}", sub_help, sp)
    return [line for line in out if line != ""]


def _head(name: str, section: int, title: str) -> list[str]:
    date = dt.date.today().isoformat()
    return [f'.TH {name.upper()} {section} "{date}" "Postgate {esc(_version())}" "{title}"',
            ".SH NAME"]


def page8() -> str:
    ap = make_parser()
    lines = _head("postgate", 8, "System Manager's Manual")
    lines += [esc("postgate - a mail transfer agent whose outbound delivery cannot be silently downgraded"),
              ".SH SYNOPSIS", "\\fBpostgate\\fR [\\fB\\-\\-version\\fR] \\fICOMMAND\\fR [\\fIoptions\\fR]",
              ".SH DESCRIPTION",
              esc("Postgate receives mail over SMTP (MX, submission, relay) and delivers it: pre-queue (it "
                  "delivers, then answers the client) or through its queue (a local directory, or a queue "
                  "shared by several nodes on PostgreSQL and object storage). Outbound delivery validates "
                  "DNSSEC itself and enforces DANE (RFC 7672), the MTA-capability record and MTA-STS "
                  "(RFC 8461): a failed TLS or authentication where it is required is a suspected attack, "
                  "deferred and retried, never sent in cleartext."),
              ".PP", esc("Every command has --help. Logs go to standard error in Postfix's format; data "
                         "goes to standard output."),
              ".SH COMMANDS"]
    for name, helptext, sp in _subcommands(ap):
        lines += _command(f"postgate {name}", helptext, sp)
    lines += [".SH EXIT STATUS", esc("The exit codes follow sysexits(3):"), ".RS"]
    for code, text in SYSEXITS:
        lines += [".TP", f"\\fB{code}\\fR", esc(text)]
    lines += [".RE", ".SH FILES", ".TP", "\\fI/etc/postgate/postgate.toml\\fR",
              esc("the configuration, see postgate.toml(5)"), ".TP", "\\fI/etc/postgate/dkim/\\fR",
              esc("DKIM keys, <domain>/<selector>.private"), ".TP", "\\fI/var/spool/postgate/\\fR",
              esc("the local queue"), ".TP", "\\fI/usr/share/doc/postgate/\\fR",
              esc("the documentation: architecture, configuration, queue, maps, Sieve, MTA-STS"),
              ".SH SEE ALSO", "\\fBpostgate.toml\\fR(5), \\fBpostfix\\fR(1), \\fBsysexits\\fR(3)"]
    return "\n".join(lines) + "\n"


def page5() -> str:
    lines = _head("postgate.toml", 5, "File Formats Manual")
    lines += [esc("postgate.toml - Postgate configuration"), ".SH DESCRIPTION",
              esc("The configuration is one TOML file (postgate serve --config FILE). Errors are reported "
                  "as file:line and stop serve, check and reload alike (postgate check runs the same "
                  "validation). Unknown keys are errors. postgate settings [SECTION[.KEY]] prints the same "
                  "reference."),
              ".SH SETTINGS"]
    section = ""
    for s in settings.load().values():
        if s.section != section:
            section = s.section
            lines += [f'.SS "[{esc(section)}]"']
        lines += [".TP", f"\\fB{esc(s.key)}\\fR = {esc(_md(s.default))}  ({esc(_md(s.type))})",
                  esc(_md(s.meaning))]
    lines += [".SH SEE ALSO", "\\fBpostgate\\fR(8)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["5"], ["8"]):
        print("usage: python -m postgate.manpage 5|8", file=sys.stderr)
        return 64
    sys.stdout.write(page5() if args == ["5"] else page8())
    return 0


if __name__ == "__main__":
    sys.exit(main())
