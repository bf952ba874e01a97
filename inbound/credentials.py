"""SMTP AUTH users: a file of ``user:$scrypt$N$r$p$salt$hash`` lines (salted scrypt, RFC 7914).

scrypt is slow on purpose (about 50 ms with the defaults), so it runs in a worker thread and never
blocks the event loop; a wrong password costs the same time as a right one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from pathlib import Path

N, R, P = 2**14, 8, 1


class CredentialsError(ValueError):
    pass


def hash_password(password: str, *, n: int = N, r: int = R, p: int = P) -> str:
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    return f"$scrypt${n}${r}${p}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def verify_password(password: str, stored: str) -> bool:
    try:
        _, kind, n, r, p, salt, dk = stored.split("$")
        if kind != "scrypt":
            return False
        want = base64.b64decode(dk)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(want), maxmem=256 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


class Credentials:
    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.users: dict[str, str] = {}
        self.load()

    def load(self) -> None:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise CredentialsError(f"{self.path}: cannot read credentials: {e.strerror}") from e
        if self.path.stat().st_mode & 0o077:
            raise CredentialsError(f"{self.path}: readable by group or others; chmod 600 it")
        users = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            user, sep, stored = line.partition(":")
            if not sep or not user or not stored.startswith("$scrypt$") or stored.count("$") != 6:
                raise CredentialsError(f"{self.path}:{lineno}: expected user:$scrypt$N$r$p$salt$hash "
                                       "(make one with 'postgate passwd USER')")
            users[user] = stored
        self.users = users

    async def check(self, user: str, password: str) -> bool:
        stored = self.users.get(user, "$scrypt$16384$8$1$AAAAAAAAAAAAAAAAAAAAAA==$AAAA")  # same cost either way
        ok = await asyncio.get_running_loop().run_in_executor(None, verify_password, password, stored)
        return ok and user in self.users
