"""Postgate's configuration: one TOML file, checked strictly at load.

Every setting is documented in ``docs/configuration.md``. An unknown key, a wrong type or a bad value is
refused with ``file:line: [section] key: reason``, so a typo never silently becomes a default.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from postgate.outbound.resolver import ResolverConfigError, parse_server

# The self-checks of `postgate check` (postgate/check.py), named here so the configuration can refer to them.
CHECKS = ("tls-certificate", "host-dnssec", "tlsa", "dkim", "caps", "submission-srv", "resolver", "reverse-dns",
          "filters", "queue")


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file:line: reason``."""


class SieveScriptError(ConfigError):
    """A ``[sieve]`` script that does not compile (a reload keeps the previous version running)."""

    def __init__(self, message: str, script: str) -> None:
        super().__init__(message)
        self.script = script


@dataclass
class ResolverSettings:
    mode: str = "validate"
    servers: list[str] = field(default_factory=list)
    trust_anchor_file: str = ""
    allow_remote_trust_ad: bool = False
    clock_skew: int = 300
    timeout: float = 5.0
    cache_size: int = 20000
    # the smtpd's client-name lookups (FCrDNS, one per client address) have a cache of their own, so 100,000
    # clients cannot fill delivery's cache nor the memory (issue 20: ~12 KiB per address in DNS messages)
    client_name_cache_size: int = 2000


@dataclass
class DeliverySettings:
    helo: str = ""
    level: str = "dane"
    policy_map: str = ""
    transport_map: str = ""
    relay: str = ""
    relay_level: str = ""
    relay_match: list[str] = field(default_factory=list)
    relay_auth_file: str = ""
    ca_file: str = ""
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    tls_timeout: float = 60.0
    connection_reuse_time: float = 5.0


@dataclass
class QueueSettings:
    directory: str = "/var/spool/postgate"
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 432000.0
    delay_warning: float = 14400.0
    destination_concurrency: int = 20
    destination_backoff: float = 300.0
    destination_failed_cohort_limit: float = 1.0   # Postfix's default_destination_…_failed_cohort_limit
    # the shared queue (docs/configuration.md [queue]; outbound/queue/pgspool.py)
    backend: str = "directory"           # directory | postgresql
    dsn: str = ""                        # libpq URI/keywords; several hosts + target_session_attrs=read-write
    object_store: str = ""               # s3://bucket[/prefix]?endpoint=…&region=…; empty: bodies in PostgreSQL
    object_store_access_key: str = ""
    object_store_secret_key: str = ""
    lease_time: float = 300.0            # a dead node's messages are taken over after this (renewed every third)
    commit_timeout: float = 10.0         # bound on a write incl. the synchronous standby's confirmation
    node_name: str = ""                  # lease owner; default host name and process id
    # the queue runner (issue 15 item 5; outbound/queue/scheduler.py)
    max_deliveries: int = 100            # delivery attempts at once, all destinations
    run_in_workers: bool = False         # every [server] workers process runs a share of the queue
    # the shared queue across a network partition (libpq parameters; a value named in the dsn wins)
    connect_timeout: float = 5.0         # per server of the dsn
    tcp_user_timeout: float = 10.0       # unacknowledged data for this long ends a connection; 0: kernel default
    keepalives_idle: int = 5             # an idle connection is probed after this many seconds …
    keepalives_interval: int = 2         # … every this many seconds …
    keepalives_count: int = 3            # … and dropped after this many unanswered probes


@dataclass
class ListenerSettings:
    name: str = "mx"
    address: str = "0.0.0.0:25"
    tls: str = "starttls"          # starttls | implicit | none
    auth: bool = False
    auth_required: bool = False


@dataclass
class RelaySettings:
    trusted_networks: list[str] = field(default_factory=lambda: ["127.0.0.0/8", "::1/128"])
    local_domains: list[str] = field(default_factory=list)
    credentials_file: str = ""


@dataclass
class LocalSettings:
    maildir: str = ""
    lmtp: str = ""
    recipients: list[str] = field(default_factory=list)


@dataclass
class PrequeueSettings:
    mode: str = "prequeue"
    budget: float = 30.0
    max_inflight: int = 200
    grace: float = 900.0


@dataclass
class LimitSettings:
    max_recipients: int = 100
    max_sessions: int = 10000
    max_sessions_per_client: int = 50
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    shutdown_timeout: float = 60.0
    # issue 13: time and memory per client (inbound/smtpd.py Limits)
    min_data_rate: int = 500
    tls_handshake_timeout: float = 30.0
    spill_threshold: int = 262144
    auth_delay: float = 1.0
    auth_max_delay: float = 30.0
    client_name_timeout: float = 5.0
    descriptor_reserve: int = 100


@dataclass
class DkimSettings:
    key_directory: str = "/etc/postgate/dkim"
    default_domain: str = ""       # default: the host name without its first label
    required: bool = True


@dataclass
class CheckSettings:
    downgrade: list[str] = field(default_factory=list)


@dataclass
class ServerSettings:
    hostname: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_min_version: str = "1.2"
    max_message_size: int = 52428800
    requiretls: bool = True
    smtputf8: bool = True
    publish_dane: bool = False
    tls_next_key_file: str = ""
    workers: int = 1
    event_loop: str = "auto"  # issue 20: "auto" (uvloop when installed), "uvloop", "asyncio"
    user: str = ""                 # run as this user after binding the ports (privilege drop)


@dataclass
class LogSettings:
    target: str = "stderr"         # stderr | syslog
    syslog_name: str = "postgate"
    syslog_facility: str = "mail"
    syslog_socket: str = "/dev/log"


@dataclass
class MetricsSettings:
    listen: str = ""               # ADDRESS:PORT of the Prometheus /metrics endpoint; empty: off


# --- Milter and policy delegation (issue 16): [[milter]] and [[policy_service]] tables -------------------
@dataclass
class MilterConfig:
    name: str = ""
    address: str = ""                 # inet:HOST:PORT, inet:PORT@HOST, unix:/path
    listeners: list[str] = field(default_factory=list)   # empty: every listener
    connect_timeout: float = 30.0     # Postfix milter_connect_timeout
    command_timeout: float = 30.0     # Postfix milter_command_timeout
    content_timeout: float = 300.0    # Postfix milter_content_timeout
    default_action: str = "tempfail"  # Postfix milter_default_action: accept | tempfail | reject


@dataclass
class PolicyServiceConfig:
    name: str = ""
    address: str = ""
    listeners: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=lambda: ["rcpt"])
    timeout: float = 100.0            # smtpd_policy_service_timeout
    max_idle: float = 300.0           # smtpd_policy_service_max_idle
    max_ttl: float = 1000.0           # smtpd_policy_service_max_ttl
    request_limit: int = 0            # smtpd_policy_service_request_limit
    try_limit: int = 2                # smtpd_policy_service_try_limit
    retry_delay: float = 1.0          # smtpd_policy_service_retry_delay
    default_action: str = "451 4.3.5 Server configuration problem"  # smtpd_policy_service_default_action
    policy_context: str = ""          # smtpd_policy_service_policy_context


FILTER_SECTIONS: dict[str, type] = {"milter": MilterConfig, "policy_service": PolicyServiceConfig}


def _validate_filters(cfg: Config, source: str, text: str) -> None:
    from collections.abc import Sequence

    from postgate.inbound.milter import parse_address
    from postgate.inbound.policyd import PolicyError, parse_action

    def err(section: str, key: str, msg: str, index: int) -> ConfigError:
        line = _line_of(text, section, key, index) if text else 0
        return ConfigError(f"{source}:{line}: [[{section}]] #{index + 1} {key}: {msg}")

    listeners = {ls.name for ls in cfg.listener} or {ListenerSettings().name}
    groups: list[tuple[str, Sequence[MilterConfig | PolicyServiceConfig]]] = [
        ("milter", cfg.milter), ("policy_service", cfg.policy_service)]
    for section, items in groups:
        names: set[str] = set()
        for i, f in enumerate(items):
            if not f.name:
                raise err(section, "name", "is required", i)
            if f.name in names:
                raise err(section, "name", f"duplicate {section} name {f.name!r}", i)
            names.add(f.name)
            if not f.address:
                raise err(section, "address", "is required (inet:HOST:PORT or unix:/PATH)", i)
            try:
                parse_address(f.address)
            except ValueError as e:
                raise err(section, "address", str(e), i) from None
            for ln in f.listeners:
                if ln not in listeners:
                    raise err(section, "listeners",
                              f"no listener named {ln!r} (have {', '.join(sorted(listeners))})", i)
            timeouts = ("connect_timeout", "command_timeout", "content_timeout") if isinstance(f, MilterConfig) \
                else ("timeout", "max_idle", "max_ttl", "retry_delay")
            for key in timeouts:
                if not 0 < getattr(f, key) <= 3600:
                    raise err(section, key, "must be between 0 and 3600 seconds", i)
            if isinstance(f, MilterConfig):
                if f.default_action not in ("accept", "tempfail", "reject"):
                    raise err(section, "default_action", f"{f.default_action!r} is not accept, tempfail or reject", i)
            else:
                for st in f.stages:
                    if st not in ("connect", "helo", "mail", "rcpt", "data"):
                        raise err(section, "stages", f"{st!r} is not one of connect, helo, mail, rcpt, data", i)
                if not f.stages:
                    raise err(section, "stages", "needs at least one stage", i)
                if not 1 <= f.try_limit <= 10:
                    raise err(section, "try_limit", "must be between 1 and 10", i)
                if f.request_limit < 0:
                    raise err(section, "request_limit", "must be 0 (no limit) or positive", i)
                try:
                    parse_action(f.default_action)
                except PolicyError as e:
                    raise err(section, "default_action", f"not an access(5) action: {e}", i) from None
# --- [sieve]: Sieve scripts at the SMTP stages (docs/sieve.md; issue 17) ---------------------------------
@dataclass
class SieveConfig:
    script: str = ""                       # the global script, run first for every listener
    listener_scripts: list[str] = field(default_factory=list)   # "LISTENER=PATH"
    stages: list[str] = field(default_factory=lambda: ["connect", "ehlo", "mail", "rcpt", "data"])
    default_action: str = "tempfail"       # on a run-time error: tempfail | reject | accept
    max_instructions: int = 100000
    max_seconds: float = 0.5
    max_redirects: int = 4
    lists: list[str] = field(default_factory=list)              # "NAME=PATH" (RFC 6134 :list)
    spam_header: str = "X-Spam-Score"
    spam_max: float = 15.0
    virus_header: str = "X-Virus-Status"


SIEVE_STAGES = ("connect", "ehlo", "mail", "rcpt", "data")


def _validate_sieve(cfg: Config, source: str, text: str) -> None:
    sv = cfg.sieve

    def err(key: str, msg: str) -> ConfigError:
        line = _line_of(text, "sieve", key) if text else 0
        return ConfigError(f"{source}:{line}: [sieve] {key}: {msg}")

    from postgate.policy.maps import MapError
    from postgate.policy.sieve import SieveError, compile_file
    from postgate.policy.sieve.lists import ListTable

    def pairs(key: str, items: list[str]) -> list[tuple[str, str]]:
        out = []
        for item in items:
            name, eq, path = item.partition("=")
            if not eq or not name.strip() or not path.strip():
                raise err(key, f"{item!r} is not NAME=PATH")
            path = path.strip()
            if cfg.path is not None:
                path = _relative(cfg.path, path)
            if not Path(path).is_file():
                raise err(key, f"{path}: no such file")
            out.append((name.strip(), path))
        return out

    if sv.default_action not in ("tempfail", "reject", "accept"):
        raise err("default_action", f"{sv.default_action!r} is not one of tempfail, reject, accept")
    for st in sv.stages:
        if st not in SIEVE_STAGES:
            raise err("stages", f"unknown stage {st!r} (one of {', '.join(SIEVE_STAGES)})")
    if not 100 <= sv.max_instructions <= 10_000_000:
        raise err("max_instructions", "must be between 100 and 10000000")
    if not 0 < sv.max_seconds <= 10:
        raise err("max_seconds", "must be between 0 and 10 seconds")
    if not 0 <= sv.max_redirects <= 32:
        raise err("max_redirects", "must be between 0 and 32")
    if sv.spam_max <= 0:
        raise err("spam_max", "must be positive")
    scripts = [("script", sv.script if cfg.path is None or not sv.script else _relative(cfg.path, sv.script))]
    if sv.script and not Path(scripts[0][1]).is_file():
        raise err("script", f"{scripts[0][1]}: no such file")
    sv.script = scripts[0][1]
    listeners = pairs("listener_scripts", sv.listener_scripts)
    names = {ls.name for ls in cfg.listener}
    for name, _ in listeners:
        if names and name not in names:
            raise err("listener_scripts", f"no [[listener]] named {name!r}")
    sv.listener_scripts = [f"{n}={p}" for n, p in listeners]
    lists = pairs("lists", sv.lists)
    sv.lists = [f"{n}={p}" for n, p in lists]
    for key, path in [("script", sv.script)] + [("listener_scripts", p) for _, p in listeners]:
        if path:
            try:
                compile_file(path)
            except SieveError as e:
                raise SieveScriptError(str(err(key, str(e))), path) from e
    for _, path in lists:
        try:
            ListTable(path)
        except MapError as e:
            raise err("lists", str(e)) from e


def sieve_settings(cfg: Config) -> Any:
    """The adapter's settings (``postgate.inbound.sieve_filter.SieveSettings``) for a checked configuration;
    ``sieve_filter.load(sieve_settings(cfg))`` gives the daemon its reloadable holder (None: no script)."""
    from postgate.inbound.filters import Action
    from postgate.inbound.sieve_filter import SieveSettings
    from postgate.policy.sieve import Limits
    sv = cfg.sieve
    return SieveSettings(
        script=sv.script,
        listener_scripts=dict(x.split("=", 1) for x in sv.listener_scripts),
        stages=tuple(sv.stages), default_action=Action(sv.default_action),
        limits=Limits(max_instructions=sv.max_instructions, max_seconds=sv.max_seconds,
                      max_redirects=sv.max_redirects),
        lists=dict(x.split("=", 1) for x in sv.lists), spam_header=sv.spam_header, spam_max=sv.spam_max,
        virus_header=sv.virus_header, hostname=cfg.server.hostname, domain=cfg.dkim.default_domain)
# --- end [sieve] ---------------------------------------------------------------------------------------


@dataclass
class Config:
    path: Path | None = None
    server: ServerSettings = field(default_factory=ServerSettings)
    resolver: ResolverSettings = field(default_factory=ResolverSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    relay: RelaySettings = field(default_factory=RelaySettings)
    local: LocalSettings = field(default_factory=LocalSettings)
    prequeue: PrequeueSettings = field(default_factory=PrequeueSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    listener: list[ListenerSettings] = field(default_factory=list)
    dkim: DkimSettings = field(default_factory=DkimSettings)
    check: CheckSettings = field(default_factory=CheckSettings)
    # issue 18: MTA-STS, TLS-RPT, downgrade memory (docs/mta-sts.md)
    mta_sts: MtaStsSettings = field(default_factory=lambda: MtaStsSettings())
    tlsrpt: TlsRptSettings = field(default_factory=lambda: TlsRptSettings())
    downgrade: DowngradeSettings = field(default_factory=lambda: DowngradeSettings())
    milter: list[MilterConfig] = field(default_factory=list)
    policy_service: list[PolicyServiceConfig] = field(default_factory=list)
    sieve: SieveConfig = field(default_factory=SieveConfig)
    log: LogSettings = field(default_factory=LogSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)


SECTIONS: dict[str, type] = {"server": ServerSettings, "resolver": ResolverSettings,
                             "delivery": DeliverySettings, "queue": QueueSettings, "relay": RelaySettings,
                             "local": LocalSettings, "prequeue": PrequeueSettings, "limits": LimitSettings,
                             "dkim": DkimSettings, "check": CheckSettings}
SECTIONS["sieve"] = SieveConfig  # [sieve] block (issue 17)
SECTIONS.update({"log": LogSettings, "metrics": MetricsSettings})
LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure", "caps-required")


def _line_of(text: str, section: str, key: str | None, index: int | None = None) -> int:
    """Best-effort line number of ``key`` in ``[section]`` (or of the section header); ``index`` picks
    the n-th ``[[section]]`` table."""
    lines = text.splitlines()
    in_section = False
    header = re.compile(r"^\s*\[\[?\s*" + re.escape(section) + r"\s*\]\]?\s*(#.*)?$")
    seen = -1
    for i, line in enumerate(lines, 1):
        if header.match(line):
            seen += 1
            if index is not None and seen != index:
                in_section = False
                continue
            in_section = True
            if key is None:
                return i
            continue
        if in_section and re.match(r"^\s*\[", line):
            in_section = False
        if in_section and key is not None and re.match(r"^\s*" + re.escape(key) + r"\s*=", line):
            return i
    return 1


def _check_type(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, type(default))


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               list: "a list of strings"}


def load(path: Path | str | None) -> Config:
    """Load and check the configuration; ``None`` gives the defaults."""
    cfg = Config()
    if path is None:
        _validate(cfg, "<defaults>", "")
        return cfg
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read configuration: {e.strerror}") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"line (\d+)", str(e))
        raise ConfigError(f"{p}:{m.group(1) if m else 1}: TOML syntax error: {e}") from e
    cfg.path = p
    for section, values in data.items():
        if section == "listener":
            if not isinstance(values, list):
                raise ConfigError(f"{p}:{_line_of(text, section, None)}: listeners are [[listener]] tables")
            for i, item in enumerate(values):
                ls = ListenerSettings()
                _fill(ls, item, p, text, "listener", i)
                cfg.listener.append(ls)
            continue
        if section in FILTER_SECTIONS:
            if not isinstance(values, list):
                raise ConfigError(f"{p}:{_line_of(text, section, None)}: [[{section}]] tables, one per filter")
            for i, item in enumerate(values):
                fc = FILTER_SECTIONS[section]()
                _fill(fc, item, p, text, section, i)
                getattr(cfg, section).append(fc)
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{p}:{_line_of(text, section, None)}: unknown section [{section}]")
        if not isinstance(values, dict):
            raise ConfigError(f"{p}:{_line_of(text, section, None)}: [{section}] must be a table")
        _fill(getattr(cfg, section), values, p, text, section, None)
    _validate(cfg, str(p), text)
    return cfg


def _fill(target: Any, values: dict[str, Any], p: Path, text: str, section: str, index: int | None) -> None:
    known = {f.name for f in fields(target)}
    name = f"[[{section}]] #{index + 1}" if index is not None else f"[{section}]"
    for key, value in values.items():
        line = _line_of(text, section, key, index)
        if key not in known:
            raise ConfigError(f"{p}:{line}: {name} unknown key {key!r}")
        default = getattr(target, key)
        if not _check_type(value, default):
            raise ConfigError(f"{p}:{line}: {name} {key} must be "
                              f"{_TYPE_NAMES.get(type(default), type(default).__name__)}")
        if isinstance(default, float) and not math.isfinite(value):
            raise ConfigError(f"{p}:{line}: {name} {key} must be a finite number, not {value}")
        setattr(target, key, float(value) if isinstance(default, float) else value)


def _validate(cfg: Config, source: str, text: str) -> None:
    r = cfg.resolver

    def err(key: str, msg: str) -> ConfigError:
        line = _line_of(text, "resolver", key) if text else 0
        return ConfigError(f"{source}:{line}: [resolver] {key}: {msg}")

    if r.mode not in ("validate", "trust-ad"):
        raise err("mode", f"{r.mode!r} is not one of validate, trust-ad")
    for s in r.servers:
        try:
            parse_server(s)
        except ResolverConfigError as e:
            raise err("servers", str(e)) from e
    if r.timeout <= 0 or r.timeout > 60:
        raise err("timeout", "must be between 0 and 60 seconds")
    if r.clock_skew < 0 or r.clock_skew > 86400:
        raise err("clock_skew", "must be between 0 and 86400 seconds")
    if r.cache_size < 100:
        raise err("cache_size", "must be at least 100")
    if r.client_name_cache_size < 100:
        raise err("client_name_cache_size", "must be at least 100")
    if r.trust_anchor_file and cfg.path is not None:
        r.trust_anchor_file = _relative(cfg.path, r.trust_anchor_file)
    _validate_delivery(cfg, source, text)
    _validate_server(cfg, source, text)
    _validate_queue(cfg, source, text)
    _validate_inbound(cfg, source, text)
    _validate_filters(cfg, source, text)
    _validate_ops(cfg, source, text)
    if cfg.path is not None:
        cfg.dkim.key_directory = _relative(cfg.path, cfg.dkim.key_directory)
        if cfg.server.tls_next_key_file:
            cfg.server.tls_next_key_file = _relative(cfg.path, cfg.server.tls_next_key_file)
    if not cfg.dkim.default_domain and cfg.server.hostname.count(".") >= 2:
        cfg.dkim.default_domain = cfg.server.hostname.rstrip(".").split(".", 1)[1]
    for name in cfg.check.downgrade:
        if name != "*" and name not in CHECKS:
            line = _line_of(text, "check", "downgrade") if text else 0
            raise ConfigError(f"{source}:{line}: [check] downgrade: unknown check {name!r} "
                              f"(one of {', '.join(CHECKS)}, or *)")
    _validate_tls_reporting(cfg, source, text)
    _validate_sieve(cfg, source, text)


def _validate_inbound(cfg: Config, source: str, text: str) -> None:
    def err(section: str, key: str, msg: str, index: int | None = None) -> ConfigError:
        line = _line_of(text, section, key, index) if text else 0
        name = f"[[{section}]] #{index + 1}" if index is not None else f"[{section}]"
        return ConfigError(f"{source}:{line}: {name} {key}: {msg}")

    names = set()
    for i, ls in enumerate(cfg.listener):
        if ls.name in names:
            raise err("listener", "name", f"duplicate listener name {ls.name!r}", i)
        names.add(ls.name)
        host, _, port = ls.address.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # ASCII digits only
                raise ValueError
        except ValueError:
            raise err("listener", "address", f"{ls.address!r} is not ADDRESS:PORT", i) from None
        if ls.tls not in ("starttls", "implicit", "none"):
            raise err("listener", "tls", f"{ls.tls!r} is not one of starttls, implicit, none", i)
        if ls.tls != "none" and not cfg.server.tls_cert_file:
            raise err("listener", "tls", "needs [server] tls_cert_file and tls_key_file", i)
        if (ls.auth or ls.auth_required) and not cfg.relay.credentials_file:
            raise err("listener", "auth", "needs [relay] credentials_file", i)
        if ls.auth_required and not ls.auth:
            raise err("listener", "auth_required", "needs auth = true", i)
        if ls.auth and ls.tls == "none":
            raise err("listener", "auth", "AUTH is only offered over TLS; this listener has tls = none", i)
    for n in cfg.relay.trusted_networks:
        try:
            ipaddress.ip_network(n, strict=False)
        except ValueError:
            raise err("relay", "trusted_networks", f"{n!r} is not an address or network") from None
    _validate_limits(cfg, err)
    if cfg.prequeue.mode not in ("prequeue", "queue-first"):
        raise err("prequeue", "mode", f"{cfg.prequeue.mode!r} is not prequeue or queue-first")
    if not 0 < cfg.prequeue.budget <= 3600:
        raise err("prequeue", "budget", "must be between 0 and 3600 seconds")
    if cfg.prequeue.grace <= cfg.prequeue.budget:
        raise err("prequeue", "grace", "must be longer than budget")
    if cfg.local.maildir and cfg.local.lmtp:
        raise err("local", "lmtp", "set maildir or lmtp, not both")
    if cfg.relay.local_domains and not (cfg.local.maildir or cfg.local.lmtp):
        raise err("relay", "local_domains", "needs [local] maildir or lmtp")
    if cfg.path is not None:
        for obj, key in ((cfg.relay, "credentials_file"), (cfg.local, "maildir")):
            v = getattr(obj, key)
            if v:
                setattr(obj, key, _relative(cfg.path, v))
    if cfg.relay.credentials_file and not Path(cfg.relay.credentials_file).is_file():
        raise err("relay", "credentials_file", f"{cfg.relay.credentials_file}: no such file")


# [limits]: (key, lowest, highest); zero is meaningless for all of them but the AUTH delay
_LIMIT_RANGES: dict[str, tuple[float, float]] = {
    "max_recipients": (1, 100000), "max_sessions": (1, 1000000), "max_sessions_per_client": (1, 1000000),
    "command_timeout": (1, 3600), "data_timeout": (1, 86400), "shutdown_timeout": (0, 86400),
    "min_data_rate": (1, 1 << 30), "tls_handshake_timeout": (1, 3600), "spill_threshold": (1024, 1 << 30),
    "auth_delay": (0, 3600), "auth_max_delay": (0, 86400), "client_name_timeout": (0.1, 60),
    "descriptor_reserve": (10, 1 << 20),
}


def _validate_limits(cfg: Config, err: Any) -> None:
    lim = cfg.limits
    for key, (lo, hi) in _LIMIT_RANGES.items():
        v = getattr(lim, key)
        if not lo <= v <= hi:   # also false for nan
            raise err("limits", key, f"{v!r} must be between {lo:g} and {hi:g}")
    if lim.auth_max_delay < lim.auth_delay:
        raise err("limits", "auth_max_delay", "must be at least auth_delay")
    if cfg.prequeue.max_inflight < 1:
        raise err("prequeue", "max_inflight", "must be at least 1")


def _validate_queue(cfg: Config, source: str, text: str) -> None:
    q = cfg.queue

    def err(key: str, msg: str) -> ConfigError:
        line = _line_of(text, "queue", key) if text else 0
        return ConfigError(f"{source}:{line}: [queue] {key}: {msg}")

    if not 0 < q.min_backoff <= q.max_backoff:
        raise err("min_backoff", "must be positive and at most max_backoff")
    if q.max_lifetime < q.min_backoff:
        raise err("max_lifetime", "must be at least min_backoff")
    if q.delay_warning < 0:
        raise err("delay_warning", "must be 0 (off) or positive")
    if not 1 <= q.destination_concurrency <= 1000:
        raise err("destination_concurrency", "must be between 1 and 1000")
    v = q.destination_failed_cohort_limit
    if not (isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v <= 100):
        raise err("destination_failed_cohort_limit", "must be between 1 and 100 (windows of failed attempts)")
    if not 1 <= q.max_deliveries <= 10000:
        raise err("max_deliveries", "must be between 1 and 10000")
    if q.backend not in ("directory", "postgresql"):
        raise err("backend", f"{q.backend!r} must be directory or postgresql")
    if q.backend == "postgresql" and not q.dsn:
        raise err("dsn", "backend = postgresql needs a dsn (e.g. postgresql://user@db1,db2/postgate"
                         "?target_session_attrs=read-write)")
    if q.object_store and not q.object_store.startswith("s3://"):
        raise err("object_store", "must be s3://bucket[/prefix]?endpoint=…")
    if q.object_store and q.backend != "postgresql":
        raise err("object_store", "needs backend = postgresql")
    for key, low in (("lease_time", 3), ("commit_timeout", 1)):
        # lease_time: its leases are renewed every third of it, so at least every second
        v = getattr(q, key)
        if not (isinstance(v, (int, float)) and low <= v <= 86400):  # also refuses nan and inf
            raise err(key, f"must be between {low} and 86400 seconds")
    if not (isinstance(q.connect_timeout, (int, float)) and 1 <= q.connect_timeout <= 300):
        raise err("connect_timeout", "must be between 1 and 300 seconds")
    if not (isinstance(q.tcp_user_timeout, (int, float)) and 0 <= q.tcp_user_timeout <= 3600):
        raise err("tcp_user_timeout", "must be between 0 (the kernel's default) and 3600 seconds")
    for key, top in (("keepalives_idle", 7200), ("keepalives_interval", 600), ("keepalives_count", 100)):
        v = getattr(q, key)
        if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top):
            raise err(key, f"must be an integer between 1 and {top}")
    if cfg.path is not None:
        q.directory = _relative(cfg.path, q.directory)


def _validate_server(cfg: Config, source: str, text: str) -> None:
    s = cfg.server

    def err(key: str, msg: str) -> ConfigError:
        line = _line_of(text, "server", key) if text else 0
        return ConfigError(f"{source}:{line}: [server] {key}: {msg}")

    if s.tls_min_version not in ("1.2", "1.3"):
        raise err("tls_min_version", f"{s.tls_min_version!r} must be 1.2 or 1.3")
    if not 1 <= s.workers <= 64:
        raise err("workers", "must be between 1 and 64")
    if s.event_loop not in ("auto", "uvloop", "asyncio"):
        raise err("event_loop", f"{s.event_loop!r} must be auto, uvloop or asyncio")
    if s.event_loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            raise err("event_loop", "uvloop is not installed (pip install uvloop, or event_loop = \"auto\")") from None
    if s.max_message_size < 1024:
        raise err("max_message_size", "must be at least 1024 octets")
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        raise err("tls_cert_file" if not s.tls_cert_file else "tls_key_file",
                  "tls_cert_file and tls_key_file go together")
    if s.publish_dane and not s.tls_cert_file:
        raise err("publish_dane", "needs tls_cert_file: DANE authenticates a certificate")
    if s.hostname and not all(lbl and len(lbl) < 64 for lbl in s.hostname.rstrip(".").split(".")):
        raise err("hostname", f"{s.hostname!r} is not a host name")
    if cfg.path is not None:
        for key in ("tls_cert_file", "tls_key_file"):
            v = getattr(s, key)
            if v:
                setattr(s, key, _relative(cfg.path, v))


def _validate_ops(cfg: Config, source: str, text: str) -> None:
    """[log], [metrics] and [server] user."""
    def err(section: str, key: str, msg: str) -> ConfigError:
        line = _line_of(text, section, key) if text else 0
        return ConfigError(f"{source}:{line}: [{section}] {key}: {msg}")

    lg = cfg.log
    if lg.target not in ("stderr", "syslog"):
        raise err("log", "target", f"{lg.target!r} is not stderr or syslog")
    facilities = ("mail", "daemon", *(f"local{i}" for i in range(8)))
    if lg.syslog_facility not in facilities:
        raise err("log", "syslog_facility", f"{lg.syslog_facility!r} is not one of {', '.join(facilities)}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", lg.syslog_name):
        raise err("log", "syslog_name", f"{lg.syslog_name!r}: letters, digits, '.', '_' and '-' only")
    if cfg.metrics.listen:
        host, _, port = cfg.metrics.listen.rpartition(":")
        try:
            ipaddress.ip_address(host.strip("[]"))
            if not 0 < int(port) < 65536:
                raise ValueError
        except ValueError:
            raise err("metrics", "listen", f"{cfg.metrics.listen!r} is not ADDRESS:PORT") from None
    if cfg.server.user and not re.fullmatch(r"[a-z_][a-z0-9_-]*\$?", cfg.server.user):
        raise err("server", "user", f"{cfg.server.user!r} is not a user name")


def _relative(cfg_path: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else (cfg_path.parent / p).resolve())


def _validate_delivery(cfg: Config, source: str, text: str) -> None:
    d = cfg.delivery

    def err(key: str, msg: str) -> ConfigError:
        line = _line_of(text, "delivery", key) if text else 0
        return ConfigError(f"{source}:{line}: [delivery] {key}: {msg}")

    if d.level not in LEVELS:
        raise err("level", f"{d.level!r} is not one of {', '.join(LEVELS)}")
    if d.relay_level and d.relay_level not in LEVELS:
        raise err("relay_level", f"{d.relay_level!r} is not one of {', '.join(LEVELS)}")
    if d.relay_level and not d.relay:
        raise err("relay_level", "set without relay")
    if d.relay:
        from postgate.policy.maps import MapError, parse_relay
        try:
            parse_relay(d.relay)
        except MapError as e:
            raise err("relay", str(e)) from e
    for key in ("connect_timeout", "command_timeout", "data_timeout", "tls_timeout"):
        v = getattr(d, key)
        if not 0 < v <= 3600:
            raise err(key, "must be between 0 and 3600 seconds")
    if not 0 <= d.connection_reuse_time <= 300:
        raise err("connection_reuse_time", "must be between 0 and 300 seconds")
    if cfg.path is not None:
        for key in ("policy_map", "transport_map", "relay_auth_file", "ca_file"):
            v = getattr(d, key)
            if v:
                setattr(d, key, _relative(cfg.path, v))
    for key in ("policy_map", "transport_map", "relay_auth_file", "ca_file"):
        v = getattr(d, key)
        if v and not Path(v).is_file():
            raise err(key, f"{v}: no such file")


def system_resolvers(resolv_conf: Path = Path("/etc/resolv.conf")) -> list[str]:
    """Name servers of /etc/resolv.conf, the default when none are configured."""
    out = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                out.append(parts[1].split("%")[0])
    except OSError:
        pass
    return out or ["127.0.0.1"]


# --- issue 18: [mta_sts], [tlsrpt], [downgrade] (docs/mta-sts.md, docs/tlsrpt.md) -----------------------------
@dataclass
class MtaStsSettings:
    enabled: bool = True
    ca_file: str = ""                 # Web-PKI trust for policy hosts; default [delivery] ca_file, else the system
    cache_file: str = ""              # default <queue directory>/mta-sts.json
    fetch_timeout: float = 10.0
    max_policy_size: int = 65536
    refresh_interval: float = 86400.0


@dataclass
class TlsRptSettings:
    enabled: bool = True
    store: str = ""                   # default <queue directory>/tlsrpt.sqlite
    send: bool = True
    organization: str = ""            # default [server] hostname
    submitter: str = ""               # default the domain of [server] hostname
    contact: str = ""                 # default postmaster@<submitter>
    sender: str = ""                  # default noreply-smtp-tls-reporting@<submitter>
    reporter: str = "builtin"         # or "tlsrpt-reporter": events to sys4's tlsrpt-collectd
    reporter_socket: str = "/run/tlsrpt/collectd.sock"


@dataclass
class DowngradeSettings:
    action: str = "log"
    defer_domains: list[str] = field(default_factory=list)
    log_domains: list[str] = field(default_factory=list)
    remember: float = 2592000.0
    defer_window: float = 86400.0
    file: str = ""                    # default <queue directory>/downgrade.json
    cleartext_fallback_delay: float = 300.0


SECTIONS.update({"mta_sts": MtaStsSettings, "tlsrpt": TlsRptSettings, "downgrade": DowngradeSettings})


def _validate_tls_reporting(cfg: Config, source: str, text: str) -> None:
    def err(section: str, key: str, msg: str) -> ConfigError:
        line = _line_of(text, section, key) if text else 0
        return ConfigError(f"{source}:{line}: [{section}] {key}: {msg}")

    m, t, g = cfg.mta_sts, cfg.tlsrpt, cfg.downgrade
    if not 0 < m.fetch_timeout <= 300:
        raise err("mta_sts", "fetch_timeout", "must be between 0 and 300 seconds")
    if not 1024 <= m.max_policy_size <= 1048576:
        raise err("mta_sts", "max_policy_size", "must be between 1024 and 1048576 bytes")
    if not 3600 <= m.refresh_interval <= 31557600:
        raise err("mta_sts", "refresh_interval", "must be between 3600 seconds and a year")
    if t.reporter not in ("builtin", "tlsrpt-reporter"):
        raise err("tlsrpt", "reporter", f"{t.reporter!r} is not one of builtin, tlsrpt-reporter")
    if g.action not in ("log", "defer"):
        raise err("downgrade", "action", f"{g.action!r} is not one of log, defer")
    for key in ("remember", "defer_window", "cleartext_fallback_delay"):
        if not 0 <= getattr(g, key) <= 31557600:
            raise err("downgrade", key, "must be between 0 seconds and a year")
    both = set(g.defer_domains) & set(g.log_domains)
    if both:
        raise err("downgrade", "defer_domains", f"{', '.join(sorted(both))} also in log_domains")
    qdir = Path(cfg.queue.directory)
    if cfg.path is not None and m.ca_file:
        m.ca_file = _relative(cfg.path, m.ca_file)
    if m.ca_file and not Path(m.ca_file).is_file():
        raise err("mta_sts", "ca_file", f"{m.ca_file}: no such file")
    m.cache_file = m.cache_file or str(qdir / "mta-sts.json")
    t.store = t.store or str(qdir / "tlsrpt.sqlite")
    g.file = g.file or str(qdir / "downgrade.json")
    host = cfg.server.hostname.rstrip(".")
    t.organization = t.organization or host or "Postgate"
    t.submitter = t.submitter or (host.split(".", 1)[1] if host.count(".") >= 2 else host) or "localhost"
    t.contact = t.contact or f"postmaster@{t.submitter}"
    t.sender = t.sender or f"noreply-smtp-tls-reporting@{t.submitter}"
