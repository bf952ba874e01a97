"""Run ``postgate serve`` as a real process on the test network, with a generated configuration."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fixtures.testnet import TestNet
from inbound.credentials import hash_password

ADDRESS = "127.0.2.1"
TRUSTED = "127.0.5.1"      # a client address inside [relay] trusted_networks
UNTRUSTED = "127.0.6.1"    # a client address outside


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


class PostgateServer:
    def __init__(self, net: TestNet, directory: Path, address: str = ADDRESS, **sections: dict[str, Any]) -> None:
        self.net, self.dir, self.address = net, directory, address
        directory.mkdir(parents=True, exist_ok=True)
        assert net.pki is not None
        if "postgate.test" not in net.pki.leaves:
            net.pki.issue("postgate.test", "chain")
        chain, key = net.pki.paths("postgate.test")
        creds = directory / "credentials"
        if not creds.exists():
            creds.write_text(f"alice:{hash_password('wonderland')}\n")
            creds.chmod(0o600)
        cfg: dict[str, dict[str, Any]] = {
            "server": {"hostname": "postgate.test", "tls_cert_file": str(chain), "tls_key_file": str(key)},
            "resolver": {"servers": [net.resolver], "trust_anchor_file": str(net.anchor_file)},
            "queue": {"directory": str(directory / "spool")},
            "delivery": {"connect_timeout": 3.0, "command_timeout": 5.0, "tls_timeout": 3.0, "data_timeout": 10.0},
            "relay": {"trusted_networks": ["127.0.5.0/24"], "credentials_file": str(creds)},
            "prequeue": {"budget": 10.0, "grace": 60.0},
        }
        for name, values in sections.items():
            cfg.setdefault(name, {}).update(values)
        lines = []
        for name, values in cfg.items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml(v)}" for k, v in values.items()]
        for ls in (("mx", f"{address}:25", "starttls", False, False),
                   ("submission", f"{address}:587", "starttls", True, True),
                   ("submissions", f"{address}:465", "implicit", True, True)):
            lines += ["[[listener]]", f'name = "{ls[0]}"', f'address = "{ls[1]}"', f'tls = "{ls[2]}"',
                      f"auth = {_toml(ls[3])}", f"auth_required = {_toml(ls[4])}"]
        self.config = directory / "postgate.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.logfile = directory / "postgate.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def spool(self) -> Path:
        return self.dir / "spool"

    def start(self, timeout: float = 20) -> PostgateServer:
        offset = len(self.log())
        log = self.logfile.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "postgate.cli", "serve", "--config", str(self.config)],
                                     stdout=log, stderr=log, env=dict(os.environ))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "postgate: ready" in self.log()[offset:]:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgate serve exited {self.proc.returncode}: {self.log()[-2000:]}")
            time.sleep(0.05)
        raise RuntimeError("postgate serve did not become ready: " + self.log()[-2000:])

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def __enter__(self) -> PostgateServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


__all__ = ["ADDRESS", "TRUSTED", "UNTRUSTED", "PostgateServer", "select"]
