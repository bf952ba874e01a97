"""``postgate settings``: every configuration key with its type, default and meaning, like postconf(5).

The one source is ``docs/configuration.md`` (shipped in the package as ``postgate/configuration.md``, a
link to it): each ``## `[section]` `` heading is followed by a table ``| key | type | default | meaning |``.
The command prints those rows, so the reference an operator reads on the server is the documentation
itself; a test checks that every key the configuration loader knows is documented, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).parent / "configuration.md"
_SECTION = re.compile(r"^## `\[\[?([a-z_]+)\]\]?`")
_CELL = re.compile(r"(?<!\\)\|")


@dataclass(frozen=True)
class Setting:
    section: str
    key: str
    type: str
    default: str
    meaning: str

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    def text(self) -> str:
        """Plain text: Markdown's backquotes and escaped bars removed."""
        def plain(s: str) -> str:
            return s.replace("\\|", "|").replace("`", "")
        return f"{self.name} = {plain(self.default)}\n    type: {plain(self.type)}\n    {plain(self.meaning)}"


def parse(text: str) -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    section = ""
    for line in text.splitlines():
        m = _SECTION.match(line)
        if m:
            section = m.group(1)
            continue
        if line.startswith("## "):
            section = ""
        if not section or not line.startswith("| `"):
            continue
        cells = [c.strip() for c in _CELL.split(line.strip())[1:-1]]
        if len(cells) != 4:
            continue
        key = cells[0].strip("`")
        out[f"{section}.{key}"] = Setting(section, key, *cells[1:])
    return out


def load() -> dict[str, Setting]:
    return parse(SOURCE.read_text())
