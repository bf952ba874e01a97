"""``postgate sieve-check`` / ``sieve-test`` (exit codes per sysexits(3)) and the ``[sieve]`` settings."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest
from postgate.inbound.filters import Action
from postgate.inbound.sieve_filter import load

from postgate import config as configmod
from postgate.cli import main

SCRIPT = """require ["vnd.postgate", "envelope", "reject", "editheader", "spamtest", "relational",
         "comparator-i;ascii-numeric"];
# per-destination TLS policy
if envelope :domain :is "to" "bank.example" { tls_policy :recipients "bank.example" "dane-only"; }
if spamtest :value "ge" :comparator "i;ascii-numeric" "8" { reject "Spam score too high"; }
addheader "X-Checked" "yes";
"""


def cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[str]:
    """Run ``postgate ARGS`` in this process (the command line's own main), capturing its output."""
    out, err = io.StringIO(), io.StringIO()
    fake_in = io.TextIOWrapper(io.BytesIO(stdin))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            unittest.mock.patch.object(sys, "stdin", fake_in):
        rc = main(list(args))
    return subprocess.CompletedProcess(list(args), rc, out.getvalue(), err.getvalue())


def test_sieve_check_ok_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.sieve"
    good.write_text(SCRIPT)
    bad = tmp_path / "bad.sieve"
    bad.write_text('require "fileinto";\nif header :contains "subject" "x" {\n  fileinto :bogus "y";\n}\n')
    r = cli("sieve-check", str(good))
    assert r.returncode == 0 and r.stdout.strip() == f"{good}: ok"
    r = cli("sieve-check", str(good), str(bad))
    assert r.returncode == 65                                        # EX_DATAERR
    assert f"{bad}:3:12: unknown tagged argument :bogus for command fileinto" in r.stderr
    r = cli("sieve-check", str(tmp_path / "missing.sieve"))
    assert r.returncode == 66                                        # EX_NOINPUT


@pytest.mark.parametrize(("text", "where"), [
    ('if true { keep; ', "1:17: missing '}' for the block opened at line 1 column 9"),
    ('keep', "1:5: expected ';'"),
    ('require "nosuch";', "1:9: unsupported capability"),
    ('fileinto "x";', "1:1: command fileinto needs require \"fileinto\""),
    ('if header :is :contains "a" "b" { keep; }', "1:15: :contains conflicts with :is"),
    ('keep; require "fileinto";', "1:7: require is allowed only at the start"),
    ('if header "a" { keep; }', "1:4: test header takes 2 positional"),
    ('redirect "a" "b";', "1:1: command redirect takes 1 positional"),
    ('"text', "1:1: unterminated string"),
    ('elsif true { keep; }', "1:1: elsif without a preceding if"),
    ('require "relational"; if header :value "xx" "a" "b" { keep; }', "1:26: relational operator"),
    ('require "vnd.postgate";\nroute "smtp:[relay.example";', "2:1: route: bad relay"),
    ('require "vnd.postgate";\ntls_policy "dane-maybe";', "2:1: unknown TLS level 'dane-maybe'"),
])
def test_compile_errors_have_positions(tmp_path: Path, text: str, where: str) -> None:
    f = tmp_path / "s.sieve"
    f.write_text(text)
    r = cli("sieve-check", str(f))
    assert r.returncode == 65 and f"{f}:{where}" in r.stderr, r.stderr


def test_sieve_test_prints_actions_and_verdict(tmp_path: Path) -> None:
    f = tmp_path / "p.sieve"
    f.write_text(SCRIPT)
    spam = b"From: a@b.example\nSubject: x\nX-Spam-Score: 14\n\nhi\n"
    r = cli("sieve-test", str(f), "--stage", "data", "--from", "a@b.example", "--to", "x@bank.example",
            "--to", "y@other.example", stdin=spam)
    assert r.returncode == 0, r.stderr
    assert "reject Spam score too high" in r.stdout
    assert "verdict: reject 550 5.7.1 Spam score too high" in r.stdout
    ham = spam.replace(b"14", b"1")
    r = cli("sieve-test", str(f), "--from", "a@b.example", "--to", "x@bank.example", "--to", "y@other.example",
            stdin=ham)
    assert "verdict: continue" in r.stdout
    assert "route x@bank.example: tls_level=dane-only" in r.stdout
    assert "header insert X-Checked: yes" in r.stdout
    r = cli("sieve-test", str(f), "--stage", "rcpt", "--from", "a@b.example", "--to", "x@bank.example")
    assert "route x@bank.example: tls_level=dane-only" in r.stdout and "verdict: continue" in r.stdout


def write_config(tmp_path: Path, sieve_block: str) -> Path:
    (tmp_path / "global.sieve").write_text('require "reject";\nif size :over 10M { reject "too big"; }\n')
    (tmp_path / "mx.sieve").write_text("keep;\n")
    (tmp_path / "vip").write_text("example.com OK\n")
    p = tmp_path / "postgate.toml"
    p.write_text('[server]\nhostname = "mx.postgate.example"\n\n[[listener]]\nname = "mx"\n'
                 'address = "127.0.0.1:25"\ntls = "none"\n\n[sieve]\n' + sieve_block)
    return p


def test_config_builds_the_holder(tmp_path: Path) -> None:
    p = write_config(tmp_path, 'script = "global.sieve"\nlistener_scripts = ["mx=mx.sieve"]\n'
                     'lists = ["vip=vip"]\ndefault_action = "reject"\nmax_instructions = 5000\n')
    cfg = configmod.load(p)
    holder = load(configmod.sieve_settings(cfg))
    assert holder is not None
    assert [path for path, _ in holder.for_listener("mx")] == [str(tmp_path / "global.sieve"),
                                                               str(tmp_path / "mx.sieve")]
    assert holder.settings.default_action is Action.REJECT
    assert holder.settings.limits.max_instructions == 5000
    assert holder.lists is not None and holder.lists.contains("vip", "someone@example.com")
    assert load(configmod.sieve_settings(configmod.load(None))) is None


@pytest.mark.parametrize(("block", "message"), [
    ('script = "nosuch.sieve"\n', "[sieve] script:"),
    ('listener_scripts = ["submission=mx.sieve"]\n', "no [[listener]] named 'submission'"),
    ('listener_scripts = ["mx"]\n', "is not NAME=PATH"),
    ('default_action = "bounce"\n', "default_action: 'bounce' is not one of"),
    ('stages = ["data", "quit"]\n', "unknown stage 'quit'"),
    ('max_seconds = 0\n', "max_seconds"),
])
def test_config_errors_have_file_and_line(tmp_path: Path, block: str, message: str) -> None:
    p = write_config(tmp_path, block)
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(p)
    assert str(e.value).startswith(f"{p}:10:") and message in str(e.value)


def test_config_reports_script_compile_error(tmp_path: Path) -> None:
    p = write_config(tmp_path, 'script = "global.sieve"\n')
    (tmp_path / "global.sieve").write_text("keep;\nfileinto \"x\";\n")
    with pytest.raises(configmod.ConfigError) as e:
        configmod.load(p)
    assert f"{p}:10: [sieve] script: {tmp_path / 'global.sieve'}:2:1: command fileinto needs" in str(e.value)


def test_documented_examples_compile() -> None:
    """Every ```sieve block of docs/sieve.md compiles (the reference must not lie)."""
    import re
    doc = (Path(__file__).parent.parent / "docs" / "sieve.md").read_text()
    blocks = re.findall(r"```sieve\n(.*?)```", doc, re.S)
    assert len(blocks) >= 5
    from postgate.policy.sieve import compile_script
    for i, b in enumerate(blocks):
        compile_script(b, f"docs/sieve.md block {i + 1}")
