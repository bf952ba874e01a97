"""Each listener's filters, built from ``[[milter]]`` and ``[[policy_service]]``, and their reachability.

The daemon calls :func:`build_filters` once per listener and gives the list to a ``FilterChain`` per SMTP
session. The order is Postfix's: the policy services first (Postfix evaluates ``smtpd_*_restrictions``, where
``check_policy_service`` lives, before it calls the milters for the same command), then the milters, each
group in the order of the configuration file. A filter with an empty ``listeners`` list runs on every
listener. The built objects are shared by the listener's sessions (a policy service's connection pool lives
there); build them once per process.
"""

from __future__ import annotations

import asyncio

from postgate import config as configmod
from postgate.inbound.filters import Action, Filter, Stage
from postgate.inbound.milter import MilterError, MilterFilter, MilterSettings
from postgate.inbound.policyd import STAGE_NAMES, PolicyError, PolicyService, PolicySettings

ACTIONS = {"accept": Action.ACCEPT, "tempfail": Action.TEMPFAIL, "reject": Action.REJECT}


def milter_of(m: configmod.MilterConfig) -> MilterFilter:
    return MilterFilter(MilterSettings(m.name, m.address, m.connect_timeout, m.command_timeout,
                                       m.content_timeout, ACTIONS[m.default_action]))


def policy_of(p: configmod.PolicyServiceConfig) -> PolicyService:
    stages: tuple[Stage, ...] = tuple(STAGE_NAMES[s] for s in p.stages)
    return PolicyService(PolicySettings(p.name, p.address, stages, p.timeout, p.max_idle, p.max_ttl,
                                        p.request_limit, p.try_limit, p.retry_delay, p.default_action,
                                        p.policy_context))


def build_filters(cfg: configmod.Config, listener: str) -> list[Filter]:
    """The filters of one listener, in the order they are asked."""
    out: list[Filter] = []
    out += [policy_of(p) for p in cfg.policy_service if not p.listeners or listener in p.listeners]
    out += [milter_of(m) for m in cfg.milter if not m.listeners or listener in m.listeners]
    return out


async def probe(cfg: configmod.Config) -> list[tuple[str, str, str, str | None]]:
    """Try every configured filter once: (kind, name, default action, error or None). A milter is
    connected and negotiated with, then told to quit; a policy service is connected to (a request would
    be counted by it: postgrey would greylist a made-up triplet)."""
    async def one(kind: str, name: str, default: str, f: MilterFilter | PolicyService) -> tuple[str, str, str,
                                                                                              str | None]:
        try:
            await asyncio.wait_for(f.probe(), 35)
        except (MilterError, PolicyError, OSError, TimeoutError) as e:
            return kind, name, default, str(e) or type(e).__name__
        return kind, name, default, None

    jobs = [one("milter", m.name, m.default_action, milter_of(m)) for m in cfg.milter]
    jobs += [one("policy service", p.name, p.default_action, policy_of(p)) for p in cfg.policy_service]
    return list(await asyncio.gather(*jobs))
