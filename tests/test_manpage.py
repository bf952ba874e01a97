"""The manual pages: made from the parser and the settings reference, so they list exactly what exists."""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import sys
from pathlib import Path

from postgate import manpage, settings
from postgate.cli import make_parser


def _groff(page: str) -> str:
    """groff's warnings for the page (all of them, except a line it cannot justify)."""
    r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-Wbreak", "-z"], input=page.encode(),
                       capture_output=True, timeout=60)
    assert r.returncode == 0
    return r.stderr.decode()


def _render(page: str) -> str:
    r = subprocess.run(["groff", "-man", "-Tutf8", "-P-cbou"], input=page.encode(), capture_output=True,
                       timeout=60, check=True)
    return " ".join(r.stdout.decode().split())


def _walk(p: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.ArgumentParser]]:
    out = [(path, p)]
    for name, _help, sp in manpage._subcommands(p):
        out += _walk(sp, f"{path} {name}")
    return out


def test_postgate_8_lists_every_command_and_option() -> None:
    page = manpage.page8()
    assert _groff(page) == ""
    text = _render(page)
    commands = _walk(make_parser(), "postgate")
    assert len(commands) > 20   # queue and dkim have sub-commands of their own
    for path, p in commands[1:]:
        assert path in text, path
        for a in p._actions:
            if a.help == argparse.SUPPRESS:   # internal (e.g. serve --worker): not for operators
                assert not any(o in text.split() for o in a.option_strings)
                continue
            for opt in a.option_strings:
                if opt not in ("-h", "--help"):
                    assert opt in text, (path, opt)
    assert "EX_CONFIG" in text and "78" in text


def test_postgate_toml_5_lists_every_setting() -> None:
    page = manpage.page5()
    assert _groff(page) == ""
    text = _render(page)
    known = settings.load()
    assert len(known) > 50
    for s in known.values():
        assert f"[{s.section}]" in text and f"{s.key} =" in text, s.name
    assert "§" in text   # other than ASCII survives (as groff's escapes)


def test_no_help_text_can_inject_a_request() -> None:
    assert manpage.esc(".so /etc/passwd") == "\\&.so /etc/passwd"
    assert manpage.esc("a\n'br\nb\\c") == "a\n\\&'br\nb\\ec"
    assert manpage.esc("--json") == "\\-\\-json"


def test_the_install_ships_both_pages() -> None:
    """scripts/test stages the install (DESTDIR=build/install-root); the pages must be there and render."""
    venv = os.environ.get("POSTGATE_WHEEL_VENV")
    if not venv:   # a bare pytest run: render through the module's entry point instead
        r = subprocess.run([sys.executable, "-m", "postgate.manpage", "8"], capture_output=True, timeout=60)
        assert r.returncode == 0 and b".SH COMMANDS" in r.stdout
        return
    root = Path(venv).parent.parent
    for rel in ("usr/share/man/man8/postgate.8.gz", "usr/share/man/man5/postgate.toml.5.gz"):
        page = gzip.decompress((root / rel).read_bytes()).decode()
        assert page.startswith(".TH POSTGATE") and _groff(page) == "", rel
