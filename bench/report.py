"""Shared by the benchmark scripts: the run's identity, and rewriting one section of bench/README.md."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

README = Path(__file__).with_name("README.md")


def identity() -> str:
    """Commit, cores, memory and Python of this run, for the report's first line."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=README.parent).stdout.strip()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"commit {commit}, {os.cpu_count()} cores, {mem:.0f} GiB, Python {platform.python_version()}"


def write_section(name: str, heading: str, lines: list[str]) -> str:
    """Replace (or append) the block between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = "\n".join([begin, *lines, end])
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _m: block, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n{block}\n"
    README.write_text(text)
    print(block)
    return block
