"""Issue 13 standing check: the SMTP session and the configuration loader, fuzzed (hypothesis).

- The session over a real socket (in-process server, tests/smtpd_harness.py): every command line, valid
  or hostile (non-ASCII verbs, NUL, overlong lines, bare CR/LF, odd parameters, AUTH exchanges, DATA with
  random content), gets a reply, or the session ends right after a reply that says so (221, 421, 500, 554);
  the server log holds no traceback and no internal error.
- The configuration loader: any TOML built from the real sections and keys with hostile values either
  loads or is refused with a ``file:line:`` ConfigError, never another exception.

Bounded for the suite (a few seconds); ``POSTGATE_FUZZ_EXAMPLES`` raises the count (scripts/soak-smtp).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postgate.inbound.smtpd import Limits

from postgate import config as configmod
from tests.smtpd_harness import Client, Running, serve, tls_context

EXAMPLES = int(os.environ.get("POSTGATE_FUZZ_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize="POSTGATE_FUZZ_EXAMPLES" not in os.environ,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

VERBS = ["HELO", "EHLO", "MAIL FROM:", "RCPT TO:", "DATA", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "STARTTLS",
         "AUTH PLAIN", "AUTH LOGIN", "AUTH CRAM-MD5", "ſTARTTLS", "QUıT", "mail from:", "XCLIENT", "BDAT 10"]
PARAMS = ["SIZE=100", "SIZE=²", "SIZE=٣", "SIZE=99999999999999999999999", "BODY=8BITMIME", "SMTPUTF8",
          "RET=HDRS", "ENVID=x+0D+0AX", "ENVID=ok+2B", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY",
          "ORCPT=rfc822;a+0D+0A", "ORCPT=rfc822;b@x.test", "REQUIRETLS", "AUTH=<>", "=", "X=Y=Z", "é=1"]
ADDRESSES = ["<a@client.test>", "<>", "<é@client.test>", "<a\x00b@x.test>", "<postmaster>", "a@x", "<@r:a@x.test>",
             "<" + "l" * 300 + "@x.test>", "<unknown@x.test>", "<b@x.test>"]

_raw = st.binary(max_size=600).map(lambda b: b.replace(b"\r\n", b""))
_word = st.one_of(st.sampled_from(PARAMS), st.text(max_size=20))
_command = st.one_of(
    st.builds(lambda v, a, ps: f"{v}{a} {' '.join(ps)}".strip().encode("utf-8", "surrogatepass"),
              st.sampled_from(VERBS), st.sampled_from([*ADDRESSES, "", " client.test"]), st.lists(_word, max_size=3)),
    _raw,
    st.sampled_from([b"A" * 9000, b"x" * 513, b"NOOP\x00", b"\xff\xfe", b"*", b"AGFsaWNlAHdvbmRlcmxhbmQ=",
                     b"NOOP\nRSET", b"NOOP\rRSET"]),
)
_data = st.binary(max_size=3000).map(lambda b: b.replace(b"\r\n.\r\n", b"\r\n..\r\n"))

CLOSING = (b"221", b"421", b"500", b"554")


def _closing(reply: bytes) -> bool:
    """A reply after which the server may end the session (STARTTLS's 220: plaintext then fails TLS)."""
    return reply[:3] in CLOSING or reply.startswith(b"220 2.0.0 Ready to start TLS")


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])   # issue 20: both event loops
def server(request: pytest.FixtureRequest) -> Iterator[Running]:
    with tempfile.TemporaryDirectory() as d:
        lim = Limits(command_timeout=5, data_timeout=5, auth_delay=0, max_errors=50)
        with serve(lim, tls=tls_context(Path(d)), auth=True, event_loop=request.param) as srv:
            yield srv


def _exchange(port: int, commands: list[bytes], data: list[bytes]) -> None:
    with Client(port, timeout=15) as c:
        last = c.reply()
        assert last[:3] == b"220", last
        for line in commands:
            try:
                c.sock.sendall(line + b"\r\n")
            except OSError:
                assert _closing(last), last
                return
            reply = c.reply()
            if not reply:                                # the server ended the session: after a reply saying so
                assert _closing(last), (line, last)
                return
            assert reply[:3].isdigit() and reply[3:4] in (b" ", b"-"), (line, reply)
            last = reply
            if reply.startswith(b"354"):
                c.sock.sendall((data.pop() if data else b"Subject: x\r\n\r\nhi\r\n") + b"\r\n.\r\n")
                last = c.reply()
                assert last[:3].isdigit(), last
            if last[:3] in (b"221", b"421"):
                assert c.reply() == b""
                return
        c.sock.sendall(b"QUIT\r\n")
        end = c.reply()
        assert end[:3] in (b"221", b"421", b"500", b"503", b"354") or end == b"", end


@SETTINGS
@given(commands=st.lists(_command, min_size=1, max_size=12), data=st.lists(_data, max_size=3))
def test_every_command_gets_a_reply_and_no_traceback(server: Running, commands: list[bytes],
                                                     data: list[bytes]) -> None:
    _exchange(server.port, commands, data)
    text = server.log.text()
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]


def test_a_session_that_follows_the_protocol_is_accepted(server: Running) -> None:
    _exchange(server.port, [b"EHLO client.test", b"MAIL FROM:<a@client.test>", b"RCPT TO:<b@x.test>", b"DATA"],
              [b"Subject: fuzz baseline\r\n\r\nbody"])
    assert any(b"fuzz baseline" in m[2] for m in server.handler.messages)


def test_half_sent_lines_and_resets_leave_no_traceback(server: Running) -> None:
    for payload in (b"MAIL FROM:<a@x.test>", b"EHLO x\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\nhalf",
                    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.recv(100)
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(4096):
                pass
    assert "Traceback" not in server.log.text()


# --- the configuration loader ----------------------------------------------------------------------------------
_SECTION_KEYS = {name: [f.name for f in fields(cls)] for name, cls in configmod.SECTIONS.items()}
_value = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3),
                   st.sampled_from(["inf", "-inf", "nan", "0", "-1", "1e309", '"5²87"', '"smtp:[relay]:5²87"',
                                    '"127.0.0.1:25"', '"none"', '"queue-first"', "[]", '["::1/128"]']))


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == float("-inf") else repr(v))
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if (isinstance(v, str) and v in ("inf", "-inf", "nan", "0", "-1", "1e309", "[]")) or \
            (isinstance(v, str) and v[:1] in ('"', "[")):
        return v
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


_entries = st.lists(st.tuples(st.sampled_from(sorted(_SECTION_KEYS)), st.data()), min_size=1, max_size=6)


@SETTINGS
@given(choice=st.lists(st.tuples(st.sampled_from(sorted(_SECTION_KEYS)), st.integers(0, 50), _value),
                       min_size=1, max_size=8),
       listener=st.lists(st.tuples(st.sampled_from(["name", "address", "tls", "auth", "auth_required"]), _value),
                         max_size=3))
def test_config_loader_gives_a_config_or_a_file_line_error(choice: list[tuple[str, int, object]],
                                                           listener: list[tuple[str, object]]) -> None:
    sections: dict[str, dict[str, object]] = {}
    for section, i, value in choice:
        keys = _SECTION_KEYS[section]
        sections.setdefault(section, {})[keys[i % len(keys)]] = value
    text = "".join(f"[{s}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in kv.items()) + "\n"
                   for s, kv in sections.items())
    if listener:
        text += "[[listener]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in dict(listener).items())
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "postgate.toml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            configmod.load(p)
        except configmod.ConfigError as e:
            assert str(e).startswith(f"{p}:"), str(e)
            assert str(e).split(":", 2)[1].isdigit(), str(e)
