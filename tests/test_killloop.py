"""Issue 13's standing check: SIGKILL ``postgate serve`` at random moments under load, in queue-first and
pre-queue mode at the same time (two servers); no acknowledged message may be lost; duplicates are
counted and reported. Bounded here (``POSTGATE_SOAK_KILLS`` kills each, default 50: about two and a half
minutes, most of it the servers' start-up checks); ``scripts/soak`` runs it for longer."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fixtures.testnet import TestNet
from tests.killloop import kill_loop

KILLS = int(os.environ.get("POSTGATE_SOAK_KILLS", "50"))


@pytest.mark.slow
@pytest.mark.timeout(900 + 12 * KILLS)
def test_sigkill_loop_loses_no_acknowledged_message(testnet: TestNet, tmp_path: Path) -> None:
    modes = {"queue-first": "127.0.2.1", "prequeue": "127.0.2.2"}
    with ThreadPoolExecutor(len(modes)) as pool:
        futures = {mode: pool.submit(kill_loop, testnet, tmp_path / mode, mode=mode, kills=KILLS, address=address,
                                     max_gap=1.0) for mode, address in modes.items()}
        reports = {mode: f.result() for mode, f in futures.items()}
    for r in reports.values():
        print("killloop:", r.line())  # the counts, for the log of the run (scripts/soak collects them)
    for r in reports.values():
        assert r.kills >= min(50, KILLS)
        assert r.acked > 0, r.line() + "\n" + r.log_tail  # mail did get through between the kills
        assert r.lost == [], r.line()
        assert r.corrupt_files == 0 and r.tracebacks == 0, r.line() + "\n" + r.log_tail
