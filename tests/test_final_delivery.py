"""Final delivery into a Maildir (RFC 5321 §4.4): the envelope sender in a Return-Path line first, the
recipient in Delivered-To (RFC 9228), and no Return-Path field the client wrote itself."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from postgate.inbound.local import Maildir, final_delivery_fields

MESSAGE = (b"Return-Path: <forged@evil.test>\r\nFrom: a@client.test\r\nreturn-path:\r\n <also@evil.test>\r\n"
           b"Subject: s\r\n\r\nReturn-Path: <in the body, untouched>\r\n")


def test_return_path_and_delivered_to_first_and_the_client_s_return_path_fields_removed() -> None:
    got = final_delivery_fields("a@client.test", "alice@local.test", MESSAGE)
    assert got == (b"Return-Path: <a@client.test>\r\nDelivered-To: alice@local.test\r\n"
                   b"From: a@client.test\r\nSubject: s\r\n\r\nReturn-Path: <in the body, untouched>\r\n")


@pytest.mark.parametrize(("sender", "data", "want"), [
    ("", b"Subject: s\r\n\r\nbody\r\n", b"Return-Path: <>\r\nDelivered-To: r@l.test\r\nSubject: s\r\n\r\nbody\r\n"),
    ("a@b.test", b"\r\nno header\r\n", b"Return-Path: <a@b.test>\r\nDelivered-To: r@l.test\r\n\r\nno header\r\n"),
    ("a@b.test", b"Subject: only a header\r\nReturn-Path: <x@evil.test>\r\n",
     b"Return-Path: <a@b.test>\r\nDelivered-To: r@l.test\r\nSubject: only a header\r\n"),
])
def test_null_sender_and_messages_without_a_header_or_body(sender: str, data: bytes, want: bytes) -> None:
    """The null reverse-path is ``<>`` (RFC 5321 §4.1.1.2); a message without a header section or without a
    body keeps its shape."""
    assert final_delivery_fields(sender, "r@l.test", data) == want


def test_maildir_delivery_writes_the_final_delivery_fields_for_each_recipient(tmp_path: Path) -> None:
    md = Maildir(tmp_path)
    results = asyncio.run(md.deliver("a@client.test", ["alice@local.test", "bob+x@local.test"], MESSAGE))
    assert [r.code for r in results] == [250, 250]
    for user, rcpt in (("alice", "alice@local.test"), ("bob", "bob+x@local.test")):
        [f] = list((tmp_path / "local.test" / user / "new").iterdir())
        data = f.read_bytes()
        assert data.startswith(b"Return-Path: <a@client.test>\r\nDelivered-To: " + rcpt.encode() + b"\r\n")
        assert b"evil.test" not in data
        assert list((tmp_path / "local.test" / user / "tmp").iterdir()) == []


@pytest.mark.parametrize(("replies", "want"), [
    # (RCPT reply, DATA reply, final reply) -> the recipient's code
    ((b"250 2.1.5 ok", b"250 2.0.0 ok whatever", None), 451),    # 250 to DATA: nothing was sent
    ((b"251 2.1.5 will forward", b"354 go", b"250 2.0.0 stored"), 250),   # 251 accepts the recipient
    ((b"252 2.1.5 cannot verify", None, None), 451),            # neither accepted nor refused: not delivered
    ((b"550 5.1.1 no such user", None, None), 550),
])
def test_lmtp_only_the_reply_after_the_content_delivers(tmp_path: Path, replies: tuple[bytes, bytes | None,
                                                                                     bytes | None], want: int) -> None:
    """RFC 2033 §4.2, RFC 5321 §4.1.1.3-§4.1.1.4: a recipient is accepted by 250 or 251 to RCPT, the content
    goes only after 354, and only the reply after the content delivers. Any other 2xx/3xx where a refusal or
    those was due is a protocol error, deferred (451 4.5.0): a 250 to DATA was taken for a delivery of a
    message never sent."""
    from postgate.inbound.local import LMTPClient
    rcpt, data, final = replies
    got: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"220 lmtp ready\r\n")
        while line := await asyncio.wait_for(r.readline(), 10):
            got.append(line)
            verb = line[:4].upper()
            if verb == b"RCPT":
                w.write(rcpt + b"\r\n")
            elif verb == b"DATA":
                assert data is not None
                w.write(data + b"\r\n")
                if data.startswith(b"354"):
                    await r.readuntil(b"\r\n.\r\n")
                    assert final is not None
                    w.write(final + b"\r\n")
            elif verb == b"QUIT":
                w.write(b"221 bye\r\n")
                break
            else:
                w.write(b"250 ok\r\n")
            await w.drain()
        w.close()

    async def go() -> list[int]:
        server = await asyncio.start_unix_server(handler, str(tmp_path / "lmtp"))
        async with server:
            results = await LMTPClient(f"unix:{tmp_path}/lmtp", timeout=10).deliver(
                "a@client.test", ["bob@local.test"], b"Subject: s\r\n\r\nhi\r\n")
            return [r.code for r in results]
    assert asyncio.run(go()) == [want]
