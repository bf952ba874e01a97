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
