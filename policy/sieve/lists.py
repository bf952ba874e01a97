"""External lists for Sieve (RFC 6134) kept as Postfix-syntax tables.

RFC 6134 lets a script test a value against a list stored outside the script: ``header :list "from"
":addrbook:vip"`` is true if an address is on the list. Postgate's lists are the tables operators already
keep (postmap(1) syntax, :mod:`postgate.policy.maps`): each named list is a file of ``key value`` lines, and a
value is on the list if one of its lookup keys is a key of the table, tried as Postfix's access(5) does for
an address: ``user@example.com``, then ``example.com`` and its parent domains written ``.example.com``, then
``user@``. A value that is no address is looked up as it is (case-insensitively). The table's value is not
used (write ``OK``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from postgate.policy.maps import MapError, Table


class ListTable(Table[str]):
    def parse_value(self, key: str, value: str, where: str) -> str:
        return value


def lookup_keys(value: str) -> list[str]:
    """access(5) order for an address; the value itself otherwise."""
    v = value.strip().strip("<>").lower()
    local, at, domain = v.rpartition("@")
    if not at or not local:
        keys = [v]
        labels = v.split(".")
        keys += ["." + ".".join(labels[i:]) for i in range(1, len(labels))] if "." in v else []
        return keys
    labels = domain.split(".")
    return [v, domain] + ["." + ".".join(labels[i:]) for i in range(1, len(labels))] + [local + "@"]


class MapLists:
    """The configured lists, by name (an RFC 6134 list name such as ``:addrbook:vip`` or ``vip``)."""

    def __init__(self, files: Mapping[str, str | Path]) -> None:
        self.tables = {name: ListTable(path) for name, path in files.items()}

    def exists(self, name: str) -> bool:
        return name in self.tables

    def contains(self, name: str, value: str) -> bool:
        t = self.tables.get(name)
        return t is not None and any(k in t.entries for k in lookup_keys(value))

    def reload(self) -> list[str]:
        """Re-read changed tables; a bad file keeps its old version and is reported."""
        errors = []
        for t in self.tables.values():
            try:
                t.reload_if_changed()
            except MapError as e:
                errors.append(str(e))
        return errors
