"""DKIM signing cost per message: Postgate's own signer against dkimpy (with Postgate's speed-ups).

Run: ``.venv/bin/python -m bench.dkim_sign_bench`` (no network, no root; a few seconds). Prints µs per
message for 2 KB, 100 KB and 1 MB messages signed twice (RSA-2048 and Ed25519), the median of several
rounds, for: the signature fields alone with the ``Received:`` field as prefix (what pre-queue does), and
``Signer.sign`` (fields plus the message). The CPU time is the process's (``time.process_time``).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from postgate.outbound import dkim

HEADER = (b"From: Alice <alice@own.test>\r\nTo: Bob <bob@example.test>\r\nSubject: a message of some size\r\n"
          b"Date: Tue, 24 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1234567890@own.test>\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n")
RECEIVED = (b"Received: from client.example ([192.0.2.1])\r\n\tby mail.own.test (Postgate) with ESMTPS "
            b"(TLSv1.3:TLS_AES_256_GCM_SHA384) id 4Xy7Gh2Kp9Z;\r\n\tTue, 24 Nov 2026 10:00:01 +0000\r\n")


def message(size: int) -> bytes:
    line = b"The quick brown fox jumps over the lazy dog, again and again, line after line.\r\n"
    return HEADER + line * max(1, (size - len(HEADER)) // len(line))


def per_message(fn: object, data: bytes, rounds: int = 7) -> float:
    n = max(5, min(400, 4_000_000 // len(data)))
    out = []
    for _ in range(rounds):
        t = time.process_time()
        for _ in range(n):
            fn(data)  # type: ignore[operator]
        out.append((time.process_time() - t) / n * 1e6)
    return statistics.median(out)


def main() -> None:
    keydir = Path(tempfile.mkdtemp())
    dkim.generate(keydir, "own.test", "rsa1", "rsa")
    dkim.generate(keydir, "own.test", "ed1", "ed25519")
    s = dkim.Signer(keydir, "own.test")
    keys = sorted(s.keys["own.test"], key=lambda k: k.algorithm != "rsa")

    def dkimpy_fields(m: bytes) -> bytes:  # the path before: dkimpy with Postgate's speed-ups
        full = RECEIVED + m
        return s._dkimpy_fields(full, keys, dkim.header_list(full), None)

    import hashlib

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, utils
    digest = hashlib.sha256(b"x").digest()
    rsa_key, ed_key = dkim._rsa_key(keys[0].private), dkim._ed25519_signing_key(keys[1].private, True)
    crypto = per_message(lambda d: (rsa_key.sign(d, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())),
                                    ed_key.sign(d)), digest)
    print(f"the two signature operations alone (OpenSSL): {crypto:,.0f} µs per message")
    print("| size | dkimpy (before), µs | own signer, µs | Signer.sign, µs |")
    print("|---|---:|---:|---:|")
    for label, size in (("2 KB", 2048), ("100 KB", 100_000), ("1 MB", 1_000_000)):
        m = message(size)
        assert s.signature_fields(m, RECEIVED, now=1e9) == s._dkimpy_fields(RECEIVED + m, keys,
                                                                            dkim.header_list(RECEIVED + m), 1e9)
        before = per_message(dkimpy_fields, m)
        after = per_message(lambda x: s.signature_fields(x, RECEIVED), m)
        whole = per_message(s.sign, m)
        print(f"| {label} | {before:,.0f} | {after:,.0f} | {whole:,.0f} |")


if __name__ == "__main__":
    main()
