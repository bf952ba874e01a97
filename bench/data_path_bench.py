"""CPU time per message of the smtpd's DATA path and pre-queue's content assembly, in process.

Run: ``.venv/bin/python -m bench.data_path_bench [size] [count] [text]`` (loopback only, no root). An
in-process SMTPServer (tests/smtpd_harness.py) receives ``count`` messages of ``size`` octets (default 1 MB,
binary-ish lines with dots and tabs) over one connection from a client in another process; its handler
does what pre-queue does before the delivery: the Received field, two DKIM signatures (RSA-2048 and
Ed25519), the content, and the outbound DATA encoding (outbound/smtp_data.py). Prints the server
process's CPU time per message (``time.process_time``: the client's CPU is not in it). For a profile:
``py-spy record -o out.svg -- .venv/bin/python -m bench.data_path_bench``.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys
import tempfile
import time
from pathlib import Path

from postgate.inbound.smtpd import Limits, Session
from postgate.outbound import dkim, smtp_data
from postgate.policy.vocab import Reply

from tests.smtpd_harness import HOST, Recorder, serve
from tests.test_relay_bulk import binaryish

RECEIVED = (b"Received: from client.example ([192.0.2.1])\r\n\tby mail.own.test (Postgate) with ESMTPS "
            b"(TLSv1.3:TLS_AES_256_GCM_SHA384) id 4Xy7Gh2Kp9Z;\r\n\tTue, 24 Nov 2026 10:00:01 +0000\r\n")


class PreQueueLike(Recorder):
    def __init__(self, signer: dkim.Signer) -> None:
        super().__init__()
        self.signer = signer
        self.count = 0

    async def message(self, s: Session, data: bytes) -> Reply:
        if hasattr(self.signer, "signature_fields"):
            fields = self.signer.signature_fields(data, RECEIVED, crlf_only=not s.edits)
            content = b"".join((fields, RECEIVED, data))   # inbound/prequeue.py: one copy
            if not s.edits and hasattr(smtp_data, "Canonical"):   # checked by the smtpd (prequeue.py)
                content = smtp_data.Canonical(content)
        else:  # the code before issue 20's last round, for the "before" numbers
            content = self.signer.sign(RECEIVED + data, "")
        smtp_data.encode(content)
        self.count += 1
        return Reply(250, "2.0.0", "Ok")


def client(port: int, message: bytes, count: int) -> None:
    sock = socket.create_connection((HOST, port))
    f = sock.makefile("rb")

    def reply() -> bytes:
        while True:
            line = f.readline()
            if line[3:4] != b"-":
                return line
    reply()
    sock.sendall(b"EHLO c.test\r\n")
    reply()
    wire = smtp_data.encode(message)
    for _ in range(count):
        sock.sendall(b"MAIL FROM:<a@own.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        reply(), reply(), reply()
        sock.sendall(wire)
        assert reply().startswith(b"250")
    sock.sendall(b"QUIT\r\n")
    sock.close()


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    keydir = Path(tempfile.mkdtemp())
    dkim.generate(keydir, "own.test", "rsa1", "rsa")
    dkim.generate(keydir, "own.test", "ed1", "ed25519")
    handler = PreQueueLike(dkim.Signer(keydir, "own.test"))
    text = len(sys.argv) > 3 and sys.argv[3] == "text"   # plain text lines instead of binary-ish ones
    line = b"The quick brown fox jumps over the lazy dog, again and again, line after line.\r\n"
    message = (b"From: a@own.test\r\nTo: b@x.test\r\nSubject: bench\r\nMessage-ID: <1@own.test>\r\n\r\n"
               + (line * (size // len(line)) if text else binaryish(size, 20)))
    with serve(Limits(max_message_size=size * 2), handler=handler) as srv:
        warm = multiprocessing.Process(target=client, args=(srv.port, message, 2))
        warm.start()
        warm.join()
        t0, w0 = time.process_time(), time.monotonic()
        p = multiprocessing.Process(target=client, args=(srv.port, message, count))
        p.start()
        p.join()
        cpu, wall = time.process_time() - t0, time.monotonic() - w0
    assert handler.count == count + 2
    kind = " text" if text else ""
    print(f"{size:,} octets{kind} x {count}: {cpu / count * 1e3:.2f} ms CPU per message (server process), "
          f"{wall / count * 1e3:.2f} ms wall")


if __name__ == "__main__":
    main()
