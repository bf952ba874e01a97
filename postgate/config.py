"""Postgate's configuration: one TOML file, checked strictly at load.

Every setting is documented in ``docs/configuration.md``. An unknown key, a wrong type or a bad value is
refused with ``file:line: [section] key: reason``, so a typo never silently becomes a default.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from postgate.outbound.resolver import ResolverConfigError, parse_server

# The self-checks of `postgate check` (postgate/check.py), named here so the configuration can refer to them.
CHECKS = ("tls-certificate", "host-dnssec", "tlsa", "dkim", "caps", "submission-srv", "resolver", "reverse-dns")


class ConfigError(Exception):
    """A configuration problem, already phrased as ``file:line: reason``."""


@dataclass
class ResolverSettings:
    mode: str = "validate"
    servers: list[str] = field(default_factory=list)
    trust_anchor_file: str = ""
    allow_remote_trust_ad: bool = False
    clock_skew: int = 300
    timeout: float = 5.0
    cache_size: int = 20000


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


SECTIONS: dict[str, type] = {"server": ServerSettings, "resolver": ResolverSettings,
                             "delivery": DeliverySettings, "queue": QueueSettings, "relay": RelaySettings,
                             "local": LocalSettings, "prequeue": PrequeueSettings, "limits": LimitSettings,
                             "dkim": DkimSettings, "check": CheckSettings}
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
    if r.trust_anchor_file and cfg.path is not None:
        r.trust_anchor_file = _relative(cfg.path, r.trust_anchor_file)
    _validate_delivery(cfg, source, text)
    _validate_server(cfg, source, text)
    _validate_queue(cfg, source, text)
    _validate_inbound(cfg, source, text)
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
            if not 0 < int(port) < 65536:
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
