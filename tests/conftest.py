"""Test session setup: every test runs inside a private network namespace, with the test network up.

Run through ``scripts/test`` (which wraps pytest in ``fixtures.netns``); a bare ``pytest`` re-executes
itself inside a fresh namespace, so ports 25 and 53 are always ours and nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures import netns
from fixtures.testnet import TestNet


def pytest_configure(config: pytest.Config) -> None:
    if netns.inside():
        return
    # Re-run this very pytest command inside a fresh namespace; output capture is undone first so the
    # new process writes to the real terminal.
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        capman.stop_global_capturing()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(sys.executable, [sys.executable, "-m", "fixtures.netns", sys.executable, "-m", "pytest",
                               *sys.argv[1:]])


@pytest.fixture(scope="session")
def testnet() -> Iterator[TestNet]:
    state = Path(tempfile.mkdtemp(prefix="postgate-testnet-"))
    net = TestNet(state)
    net.start()
    try:
        yield net
    finally:
        net.stop()
        shutil.rmtree(state, ignore_errors=True)
