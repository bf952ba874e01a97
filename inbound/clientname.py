"""The client's name, from its address: forward-confirmed reverse DNS (FCrDNS).

Postfix's ``client_name`` (milter macro ``_``, policy attribute ``client_name``) is the PTR name of the
client's address only when that name resolves back (A/AAAA) to the same address; otherwise it is
``unknown``. ``reverse_client_name`` is the PTR name without that check. A lookup that fails or is slow
leaves both ``unknown``: the name is information for filters and logs, never a reason to refuse here.

Lookups go through Postgate's own resolver (``outbound/resolver.py``); the caller bounds them in time.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Protocol

import dns.reversename


class ResolvesNames(Protocol):
    async def resolve(self, qname: Any, rdtype: int | str) -> Any: ...


def _names(answer: Any) -> list[str]:
    return [r.target.to_text(omit_final_dot=True).lower() for r in answer.records()
            if hasattr(r, "target")] if getattr(answer, "ok", False) else []


async def client_names(resolver: ResolvesNames, address: str, max_names: int = 5) -> tuple[str, str]:
    """(client_name, reverse_client_name) of ``address``; "unknown" where there is none."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown", "unknown"
    ptr = await resolver.resolve(dns.reversename.from_address(str(ip)), "PTR")
    names = _names(ptr)
    if not names:
        return "unknown", "unknown"
    for name in names[:max_names]:
        ans = await resolver.resolve(name, "A" if ip.version == 4 else "AAAA")
        if getattr(ans, "ok", False) and any(ipaddress.ip_address(r.address) == ip for r in ans.records()):
            return name, names[0]
    return "unknown", names[0]
