"""Issue 12's packaging proof: a wheel installed in a fresh venv serves and delivers on the test network.

``scripts/test`` builds the wheel and installs it with ``scripts/install`` into a staged root, outside the
namespace where PyPI is reachable, and passes the venv in ``$POSTGATE_WHEEL_VENV``. Without it (pytest run
by hand) this test makes the venv itself, offline: the wheel (``pip wheel --no-deps``) installed with
``--no-deps`` into a new venv, whose third-party dependencies come from the development venv through a
``.pth`` line — appended after the venv's own site-packages, so the wheel's ``postgate`` is the one imported.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from fixtures.pgserve import PostgateServer
from fixtures.testnet import TestNet

from .test_inbound import client, data_reply, msg, stored

ROOT = Path(__file__).parent.parent
HERE = "127.0.2.6"


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("POSTGATE_WHEEL_VENV")
    if given:
        return Path(given)
    d = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(d),
                    str(ROOT)], check=True, capture_output=True, timeout=300)
    [whl] = d.glob("postgate-*.whl")
    venv = d / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-index", str(whl)], check=True,
                   timeout=300)
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "zz-dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


def test_the_wheel_is_what_runs(wheel_venv: Path) -> None:
    """The wheel's modules are imported (not the repository's, not the editable install)."""
    r = subprocess.run([wheel_venv / "bin" / "python", "-c", "import postgate.cli, postgate.outbound.queue.spool as s; "
                        "print(postgate.cli.__file__); print(s.__file__)"], capture_output=True, text=True, timeout=60,
                       cwd="/")  # not the repository, whose postgate/ folder -c would find first
    files = r.stdout.split()
    assert r.returncode == 0 and len(files) == 2, r.stderr
    assert all(Path(f).resolve().is_relative_to(wheel_venv.resolve()) for f in files), files
    r = subprocess.run([wheel_venv / "bin" / "postgate", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("postgate 0.")
    # the settings reference travels in the wheel (docs/configuration.md)
    r = subprocess.run([wheel_venv / "bin" / "postgate", "settings", "server.user"], capture_output=True, text=True,
                       timeout=60, cwd="/")
    assert r.returncode == 0 and "type: user name" in r.stdout, r.stderr


def test_the_wheel_serves_and_delivers(wheel_venv: Path, testnet: TestNet, tmp_path: Path) -> None:
    pg = PostgateServer(testnet, tmp_path, address=HERE)
    pg.python = str(wheel_venv / "bin" / "python")
    pg.start()
    try:
        token = secrets.token_hex(8)
        with client(address=HERE) as s:
            s.ehlo("client.test")
            code, text, _ = data_reply(s, "a@client.test", ["bob@dane-ok.test"], msg(token))
        assert code == 250 and "delivered as" in text
        [m] = stored(testnet, "mx.dane-ok.test", token)
        assert m["data"].startswith("DKIM-Signature:")
        # and the queue command of the wheel reads the spool the wheel's daemon made
        r = subprocess.run([wheel_venv / "bin" / "postgate", "queue", "--spool", str(pg.spool), "list"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip().endswith("-- 0 messages"), r.stdout + r.stderr
    finally:
        assert pg.stop() == 0
    # one delivery with the wheel's `postgate deliver`
    token = secrets.token_hex(8)
    r = subprocess.run([wheel_venv / "bin" / "postgate", "deliver", "--config", str(pg.config), "--from",
                        "a@own.test", "--to", "bob@dane-ok.test"], input=f"From: a@own.test\nSubject: {token}\n\nhi\n",
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "bob@dane-ok.test: delivered" in r.stdout, r.stdout + r.stderr
    assert stored(testnet, "mx.dane-ok.test", token)
