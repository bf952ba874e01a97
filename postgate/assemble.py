"""From a checked configuration to the running parts: resolver, delivery agent, DKIM signer, credentials.

``postgate serve``, ``postgate check`` and a reload (SIGHUP, ``postgate reload``) all build the parts
here, so they refuse exactly the same set-ups: an unknown level in a policy map, a bad or group-readable
credentials file, an unreadable key. :func:`validate` is the whole of serve's validation after the TOML
file itself (``postgate/config.py``); each problem is one ``file:line: reason`` string.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import pwd
import socket
import sqlite3
import ssl
from dataclasses import dataclass
from pathlib import Path

from postgate import config as configmod
from postgate.inbound.credentials import Credentials, CredentialsError
from postgate.outbound import dkim
from postgate.outbound.delivery import DeliveryConfig
from postgate.outbound.resolver import Resolver, load_anchors, parse_server
from postgate.outbound.smtp_client import Timeouts
from postgate.policy import caps as caps_policy
from postgate.policy.maps import MapError, SaslPasswordMap, TlsPolicyMap, TransportMap, parse_relay
from postgate.policy.tls import Level, Policy


@dataclass(frozen=True)
class ResolverOverrides:
    """Command-line options that override ``[resolver]``."""

    servers: tuple[str, ...] = ()
    trust_anchor: Path | None = None
    mode: str | None = None


def build_resolver(cfg: configmod.Config, o: ResolverOverrides = ResolverOverrides()) -> Resolver:
    r = cfg.resolver
    servers = list(o.servers) or r.servers or configmod.system_resolvers()
    anchor_path = o.trust_anchor or (Path(r.trust_anchor_file) if r.trust_anchor_file else None)
    return Resolver(servers=[parse_server(s) for s in servers], anchors=load_anchors(anchor_path),
                    mode=o.mode or r.mode, timeout=r.timeout, skew=r.clock_skew, cache_size=r.cache_size,
                    allow_remote_trust_ad=r.allow_remote_trust_ad)


def name_resolver(cfg: configmod.Config, resolver: Resolver) -> Resolver:
    """The resolver of the smtpd's client-name lookups: the same servers, trust anchors and mode as
    delivery's, with a cache of its own (``[resolver] client_name_cache_size``), so a flood of client
    addresses can neither evict delivery's MX/TLSA answers nor grow the memory by a DNS message each."""
    return dataclasses.replace(resolver, cache_size=cfg.resolver.client_name_cache_size)


def delivery_config(cfg: configmod.Config) -> DeliveryConfig:
    """The delivery agent's configuration; a bad map is a :class:`configmod.ConfigError` (file:line)."""
    d = cfg.delivery
    try:
        policy_map = TlsPolicyMap(d.policy_map) if d.policy_map else None
        transport_map = TransportMap(d.transport_map) if d.transport_map else None
        relay = parse_relay(d.relay, "[delivery] relay") if d.relay else None
        auth = None
        if relay is not None and d.relay_auth_file:
            auth = SaslPasswordMap(d.relay_auth_file).lookup(relay)
    except MapError as e:
        raise configmod.ConfigError(str(e)) from e
    relay_policy = None
    if d.relay_level:
        relay_policy = Policy(Level(d.relay_level), tuple(d.relay_match), source="[delivery] relay_level")
    helo = d.helo or cfg.server.hostname or socket.getfqdn()
    return DeliveryConfig(
        helo=helo, default_policy=Policy(Level(d.level), source="[delivery] level"),
        policy_map=policy_map, transport_map=transport_map, relay=relay, relay_policy=relay_policy,
        relay_auth=auth, ca_file=d.ca_file or None, reuse_idle=d.connection_reuse_time,
        timeouts=Timeouts(connect=d.connect_timeout, greeting=d.command_timeout, command=d.command_timeout,
                          tls=d.tls_timeout, data=d.data_timeout))



def wire_tls_reporting(cfg: configmod.Config, resolver: Resolver, dc: DeliveryConfig) -> None:
    """Issue 18: MTA-STS, the downgrade memory and TLS-RPT collection (docs/mta-sts.md). Their state files
    live beside the queue; a command run where the queue directory is not writable keeps them in memory."""
    import os

    from postgate.outbound import downgrade
    from postgate.outbound.mtasts import StsResolver, StsSettings
    from postgate.outbound.tlsrptdb import TlsRptStore, collector

    qdir = Path(cfg.queue.directory)
    persistent = qdir.is_dir() and os.access(qdir, os.W_OK)
    m, t, g = cfg.mta_sts, cfg.tlsrpt, cfg.downgrade
    if m.enabled:
        dc.sts = StsResolver(resolver, StsSettings(
            ca_file=m.ca_file or cfg.delivery.ca_file or None, cache_file=m.cache_file if persistent else None,
            fetch_timeout=m.fetch_timeout, max_size=m.max_policy_size, refresh_after=m.refresh_interval))
    per_domain = tuple((x.lower().rstrip("."), downgrade.Action.DEFER) for x in g.defer_domains) + tuple(
        (x.lower().rstrip("."), downgrade.Action.LOG) for x in g.log_domains)
    dc.downgrade = downgrade.DowngradeMemory(downgrade.Settings(
        action=downgrade.Action(g.action), remember=g.remember, defer_window=g.defer_window,
        file=g.file if persistent or Path(g.file).is_file() else None, per_domain=per_domain))
    dc.cleartext_fallback_delay = g.cleartext_fallback_delay
    if t.enabled and t.reporter == "tlsrpt-reporter":
        from postgate.outbound.tlsrpt_reporter import ReporterHook
        dc.tls_report = ReporterHook(t.reporter_socket, resolver)
    elif t.enabled and persistent:
        try:
            dc.tls_report = collector(TlsRptStore(t.store))
        except (sqlite3.Error, OSError) as e:
            # a full or read-only disk is no reason not to deliver: TLS-RPT waits for the next start
            logging.getLogger("postgate").warning("TLS-RPT store %s unusable (%s): reports are not collected",
                                                  t.store, e)


def build_signer(cfg: configmod.Config) -> dkim.Signer | None:
    """The DKIM signer, or None when the key directory is unusable (reported by :func:`validate` and the
    ``dkim`` check)."""
    try:
        return dkim.Signer(cfg.dkim.key_directory, cfg.dkim.default_domain or cfg.server.hostname)
    except dkim.DkimError:
        return None


def build_credentials(cfg: configmod.Config) -> Credentials | None:
    if not cfg.relay.credentials_file:
        return None
    try:
        return Credentials(cfg.relay.credentials_file)
    except CredentialsError as e:
        raise configmod.ConfigError(str(e)) from e


def server_tls_context(cfg: configmod.Config) -> ssl.SSLContext | None:
    s = cfg.server
    if not s.tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if s.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise configmod.ConfigError(f"[server] tls_cert_file/tls_key_file: cannot load {s.tls_cert_file}: "
                                    f"{e}") from e
    return ctx


def own_caps(cfg: configmod.Config) -> caps_policy.Caps:
    """The capabilities Postgate's inbound smtpd really offers with this configuration (inbound/)."""
    s = cfg.server
    return caps_policy.record_for(starttls=bool(s.tls_cert_file), dane=s.publish_dane, tls_min=s.tls_min_version,
                                  requiretls=s.requiretls, smtputf8=s.smtputf8, eightbitmime=True,
                                  pipelining=True, chunking=False, size=s.max_message_size)


def unreadable_by(user: str, cfg: configmod.Config) -> list[str]:
    """Files a reload re-reads after the switch to ``user`` (the TOML file, maps, credentials, DKIM keys)
    that this user cannot read, and the spool if it cannot be handed over."""
    pw = pwd.getpwnam(user)
    groups = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}

    def can(path: Path, bits: int) -> bool:  # bits: 4 read, 1 search (owner, group, other, as the kernel does)
        st = path.stat()
        if st.st_uid == pw.pw_uid:
            return bool((st.st_mode >> 6) & bits == bits)
        if st.st_gid in groups:
            return bool((st.st_mode >> 3) & bits == bits)
        return bool(st.st_mode & bits == bits)

    def reachable(path: Path) -> bool:
        return all(can(p, 1) for p in reversed(path.resolve().parents))

    paths = [Path(p) for p in (cfg.path, cfg.delivery.policy_map, cfg.delivery.transport_map,
                               cfg.delivery.relay_auth_file, cfg.relay.credentials_file) if p]
    keydir = Path(cfg.dkim.key_directory)
    if keydir.is_dir():
        paths += [keydir, *keydir.iterdir(), *keydir.glob("*/*.private")]
    out = []
    for p in paths:
        try:
            if not reachable(p) or not can(p, 5 if p.is_dir() else 4):
                out.append(str(p))
        except OSError:
            continue
    return out


def validate(cfg: configmod.Config) -> list[str]:
    """Everything ``serve`` refuses beyond the TOML file and the self-checks: maps, credentials, TLS key, user."""
    problems = []
    for step in (delivery_config, build_credentials, server_tls_context):
        try:
            step(cfg)
        except configmod.ConfigError as e:
            problems.append(str(e))
    if cfg.server.user:
        try:
            pwd.getpwnam(cfg.server.user)
        except KeyError:
            problems.append(f"[server] user: no such user {cfg.server.user!r}")
    return problems
