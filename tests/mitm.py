"""A man in the middle on loopback, between Postgate and an MX receiver, for capability-record tests.

Modes:

``plain``      relays bytes untouched (and counts connections)
``strip``      relays the cleartext session, removing keywords (e.g. STARTTLS) from EHLO replies
``terminate``  answers STARTTLS itself with its own certificate (optionally capped at a TLS version),
               opens its own TLS session to the receiver, and relays commands and replies line by
               line, removing keywords from the EHLO replies it passes on
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import tempfile
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _self_signed(directory: Path) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mitm.invalid")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256()))
    c, k = directory / "mitm.crt", directory / "mitm.key"
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return str(c), str(k)


async def _read_reply(r: asyncio.StreamReader) -> list[bytes]:
    lines = []
    while True:
        line = await r.readline()
        if not line:
            return lines
        lines.append(line)
        if len(line) < 4 or line[3:4] != b"-":
            return lines


def _filter(lines: list[bytes], strip: tuple[str, ...]) -> bytes:
    kept = [ln for i, ln in enumerate(lines)
            if i == 0 or ln[4:].strip().split(b" ")[0].upper().decode() not in strip]
    out = [ln[:3] + b"-" + ln[4:] for ln in kept[:-1]] + [kept[-1][:3] + b" " + kept[-1][4:]]
    return b"".join(out)


class Mitm:
    def __init__(self, address: str, backend: tuple[str, int], mode: str, strip: tuple[str, ...] = (),
                 tls_max: ssl.TLSVersion | None = None) -> None:
        self.address, self.backend, self.mode = address, backend, mode
        self.strip = tuple(s.upper() for s in strip)
        self.tls_max = tls_max
        self.connections = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="mitm-"))

    def __enter__(self) -> Mitm:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(5):
            raise RuntimeError("mitm did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.address, 25)
        self._ready.set()
        await self._stop.wait()
        server.close()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            br, bw = await asyncio.open_connection(*self.backend)
            if self.mode == "plain":
                await asyncio.gather(_pipe(cr, bw), _pipe(br, cw))
            elif self.mode == "strip":
                await self._strip(cr, cw, br, bw)
            else:
                await self._terminate(cr, cw, br, bw)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            cw.close()

    async def _strip(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter, br: asyncio.StreamReader,
                     bw: asyncio.StreamWriter) -> None:
        cw.write(b"".join(await _read_reply(br)))
        await self._relay(cr, cw, br, bw)

    async def _relay(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter, br: asyncio.StreamReader,
                     bw: asyncio.StreamWriter) -> None:
        """Pass commands and replies line by line, filtering EHLO replies; DATA bodies pass whole."""
        while True:
            line = await cr.readline()
            if not line:
                return
            bw.write(line)
            reply = await _read_reply(br)
            if not reply:
                return
            cmd = line.strip().upper()
            cw.write(_filter(reply, self.strip) if cmd.startswith(b"EHLO") else b"".join(reply))
            await cw.drain()
            if cmd == b"DATA" and reply[0].startswith(b"354"):
                while True:
                    body = await cr.readline()
                    bw.write(body)
                    if body in (b".\r\n", b""):
                        break
                cw.write(b"".join(await _read_reply(br)))
                await cw.drain()

    async def _terminate(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter, br: asyncio.StreamReader,
                         bw: asyncio.StreamWriter) -> None:
        greeting = await _read_reply(br)
        cw.write(b"".join(greeting))
        # backend: EHLO, STARTTLS, TLS
        bw.write(b"EHLO mitm.invalid\r\n")
        await _read_reply(br)
        bw.write(b"STARTTLS\r\n")
        await _read_reply(br)
        cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
        await bw.start_tls(cctx)
        # client side: offer STARTTLS with our own certificate
        cert, key = _self_signed(self._dir)
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(cert, key)
        if self.tls_max is not None:
            sctx.maximum_version = self.tls_max
        while True:
            line = await cr.readline()
            if not line:
                return
            cmd = line.strip().upper()
            if cmd.startswith(b"EHLO"):
                cw.write(b"250-mitm.invalid\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            elif cmd == b"STARTTLS":
                cw.write(b"220 2.0.0 go ahead\r\n")
                await cw.drain()
                await cw.start_tls(sctx)
                break
            else:
                cw.write(b"530 5.7.0 STARTTLS first\r\n")
            await cw.drain()
        await self._relay(cr, cw, br, bw)  # the protected session, line by line


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await r.read(65536)
            if not data:
                break
            w.write(data)
            await w.drain()
    finally:
        w.close()
