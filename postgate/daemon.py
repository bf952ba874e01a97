"""``postgate serve``: the listeners, the pre-queue delivery and the queue runner.

Start (as Postfix's master does): load and check the configuration (a bad one is refused with file, key
and reason, exit 78), bind the listening sockets — as root when the ports are privileged — without
SO_REUSEPORT, so a port someone else holds is an error (exit 71), take the spool lock, start the
``[server] workers`` - 1 extra listener processes, which inherit the listening sockets (only Postgate's
own processes share a port), then drop privileges to ``[server] user`` (setgroups, setgid, setuid; the
spool is handed to that user first), recover the spool, start the queue runner and tell systemd
``READY=1`` (``postgate/systemd.py``).

SIGTERM/SIGINT: ``STOPPING=1``, stop accepting, let the sessions under way finish (a session cut short got
no 250, so nothing is lost), stop the queue runner and the workers, exit 0. SIGHUP (``postgate reload``,
systemd's ExecReload): ``RELOADING=1``, re-read the TOML file and with it the policy and transport maps,
the credentials, the DKIM keys and the Sieve scripts, pass the signal on to every worker, ``READY=1``; a bad new
configuration is logged and the old one stays. Listener addresses, workers and user need a restart.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import grp
import ipaddress
import logging
import os
import pwd
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postgate import assemble, logfmt, systemd
from postgate import config as configmod
from postgate.filtering import build_filters
from postgate.inbound import sieve_filter  # [sieve] (issue 17)
from postgate.inbound.clientname import client_names
from postgate.inbound.credentials import Credentials
from postgate.inbound.filters import Filter
from postgate.inbound.local import LMTPClient, Maildir
from postgate.inbound.prequeue import PreQueue, PreQueueConfig
from postgate.inbound.relay import RelayFilter, RelayPolicy
from postgate.inbound.smtpd import Limits, Listener, SMTPServer
from postgate.outbound.delivery import Deliverer
from postgate.outbound.queue.protocol import Spool, SpoolError, SpoolUnavailable
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver
from postgate.policy.sieve import SieveError  # [sieve] (issue 17)
from postgate.policy.vocab import queue_id_share

log = logging.getLogger("postgate")
EX_OSERR, EX_CONFIG = 71, 78
PIDFILE = "master.pid"   # in the spool directory, as Postfix keeps pid/master.pid in its queue directory


def freeze_startup_objects() -> int:
    """Issue 20 (the DATA reply's tail): once started, collect, then move every object that exists to the
    collector's permanent generation (``gc.freeze``), which it no longer scans. Modules, the configuration,
    keys, trust anchors and what the start-up checks cached live as long as the process; a full (generation 2)
    collection under load walked them all every time (14-32 ms measured at 2 KB, C=100, each one a pause of
    every session). It now walks only what was allocated since. The number of frozen objects is logged."""
    gc.collect()
    gc.freeze()
    n = gc.get_freeze_count()
    log.info("gc: %d start-up objects frozen (not scanned by collections)", n)
    return n


class StartupError(Exception):
    def __init__(self, message: str, code: int = EX_CONFIG) -> None:
        super().__init__(message)
        self.code = code


def server_tls_context(cfg: configmod.Config) -> ssl.SSLContext | None:
    try:
        return assemble.server_tls_context(cfg)
    except configmod.ConfigError as e:
        raise StartupError(str(e)) from e


def bind(address: str, name: str) -> socket.socket:
    """A listening socket for ``ADDRESS:PORT`` — no SO_REUSEPORT: a port in use is EADDRINUSE."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT only; never a listening port
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, int(port)))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        why = "in use by another process" if e.errno == errno.EADDRINUSE else e.strerror
        raise StartupError(f"listener {name} on {address}: {why}", EX_OSERR) from e
    sock.setblocking(False)
    return sock


def drop_privileges(user: str, spool: Path | None, also: tuple[Path, ...] = ()) -> None:
    """Become ``user`` for good: its groups, its gid, its uid; the spool (and ``also``) handed over first."""
    pw = pwd.getpwnam(user)
    if os.getuid() != 0:
        if os.getuid() == pw.pw_uid:
            return
        raise StartupError(f"[server] user = {user!r}: only root can switch users (running as uid {os.getuid()})")
    for path in (*([spool] if spool else []), *also):
        if not path.exists():
            continue
        os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
        # relative to each directory's descriptor and never through a symbolic link: the user owns these
        # folders and could swap one for a link while root walks them
        for _root, dirs, files, dirfd in os.fwalk(path, follow_symlinks=False):
            for n in dirs + files:
                os.chown(n, pw.pw_uid, pw.pw_gid, dir_fd=dirfd, follow_symlinks=False)
    groups = [g.gr_gid for g in grp.getgrall() if user in g.gr_mem]
    os.setgroups(sorted({pw.pw_gid, *groups}))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    if os.getuid() != pw.pw_uid or os.geteuid() != pw.pw_uid:
        raise StartupError(f"could not become {user}")
    os.environ["HOME"], os.environ["USER"], os.environ["LOGNAME"] = pw.pw_dir, user, user


@dataclass
class Daemon:
    cfg: configmod.Config
    resolver: Resolver
    deliverer: Deliverer
    servers: list[SMTPServer] = field(default_factory=list)
    spool: Spool | None = None
    scheduler: Scheduler | None = None
    credentials: Credentials | None = None
    prequeue: PreQueue | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    signer: Any = None
    worker: bool = False          # an extra listener process: no spool ownership, no queue runner
    inherited: dict[str, int] = field(default_factory=dict)   # worker: listener name -> inherited socket fd
    children: list[asyncio.subprocess.Process] = field(default_factory=list)
    # filters after relay control, per listener name (Milter, policy delegation, Sieve plug in here)
    extra_filters: dict[str, list[Filter]] = field(default_factory=dict)
    forwarders: list[asyncio.Task[None]] = field(default_factory=list)
    sieve: Any = None             # the reloadable Sieve scripts (inbound/sieve_filter.SieveScripts), if any
    metrics_server: asyncio.Server | None = None
    _recovered: asyncio.Event = field(default_factory=asyncio.Event)   # worker: the main recovered the spool

    def _sign(self, content: bytes, sender: str) -> bytes:
        # through self.signer, so that a reload's new signer is used at once
        return self.signer.sign(content, sender) if self.signer is not None else content

    async def _signature_fields(self, data: bytes, prefix: bytes, sender: str, crlf_only: bool, *,
                                domain: str | None = None, selector: str | None = None) -> bytes:
        # pre-queue: the DKIM-Signature fields for prefix + data, without building that message (issue 20),
        # the RSA operation in a thread while the loop serves other sessions; domain/selector: a filter's
        # choice (Sieve dkim_sign)
        if self.signer is None:
            return b""
        return await self.signer.signature_fields_async(  # type: ignore[no-any-return]
            data, prefix, crlf_only=crlf_only, domain=domain, selector=selector)

    def build(self) -> None:
        cfg = self.cfg
        hostname = cfg.server.hostname or "localhost"
        if self.spool is None:
            raise StartupError("the spool is not open (open_spool() before build())")
        q = cfg.queue
        self.scheduler = Scheduler(self.spool, self.deliverer, SchedulerConfig(
            min_backoff=q.min_backoff, max_backoff=q.max_backoff, max_lifetime=q.max_lifetime,
            delay_warning=q.delay_warning, destination_concurrency=q.destination_concurrency,
            destination_backoff=q.destination_backoff,
            failed_cohort_limit=q.destination_failed_cohort_limit, reporting_mta=hostname,
            max_deliveries=q.max_deliveries))
        # flow control (Postfix in_flow_delay) where this process runs the queue: from the start, so mail
        # accepted while the spool is recovered waits too
        self.scheduler.flow_control = not self.worker or self._runners() > 1
        if self._runners() > 1:
            # issue 15: several runners; mail accepted by another process is found by polling
            self.scheduler.config.poll = 0.1
            self.scheduler.config.requests = not self.worker   # operator requests: the main process applies them
        if q.backend == "postgresql":
            self.scheduler.config.lease_time = q.lease_time
            # the lease owner: unique per running node, so a restarted node never writes under an old lease
            self.scheduler.owner = q.node_name or f"{socket.gethostname()}:{os.getpid()}"
            if q.node_name and self.worker and self._runners() > 1:   # each runner of the node its own owner
                self.scheduler.owner += f"/worker{os.environ.get('POSTGATE_WORKER_INDEX', '')}"
        if self.signer is not None:
            self.scheduler.signer = lambda content: self._sign(content, "")  # bounces are DKIM-signed too
        try:
            self.credentials = assemble.build_credentials(cfg)
        except configmod.ConfigError as e:
            raise StartupError(str(e)) from e
        local: Maildir | LMTPClient | None = None
        if cfg.local.lmtp:
            local = LMTPClient(cfg.local.lmtp, lhlo=hostname)
        elif cfg.local.maildir:
            local = Maildir(cfg.local.maildir)
        relay = RelayPolicy.build(cfg.relay.trusted_networks, cfg.relay.local_domains)
        pq = cfg.prequeue
        self.prequeue = PreQueue(
            PreQueueConfig(hostname=hostname, mode=pq.mode, budget=pq.budget, max_inflight=pq.max_inflight,
                           grace=pq.grace, local_recipients=frozenset(a.lower() for a in cfg.local.recipients)
                           if cfg.local.recipients else None),
            relay, self.deliverer, self.spool, self.scheduler, local=local,
            signer=self._signature_fields if self.signer is not None else None)
        tls = server_tls_context(cfg)
        lim = cfg.limits
        limits = Limits(max_message_size=cfg.server.max_message_size, max_recipients=lim.max_recipients,
                        max_sessions=lim.max_sessions, max_sessions_per_client=lim.max_sessions_per_client,
                        command_timeout=lim.command_timeout, data_timeout=lim.data_timeout,
                        min_data_rate=lim.min_data_rate, tls_handshake_timeout=lim.tls_handshake_timeout,
                        spill_threshold=lim.spill_threshold, auth_delay=lim.auth_delay,
                        auth_max_delay=lim.auth_max_delay, client_name_timeout=lim.client_name_timeout,
                        descriptor_reserve=lim.descriptor_reserve)

        async def auth(user: str, password: str) -> bool:
            return self.credentials is not None and await self.credentials.check(user, password)

        # the client-name lookups through a resolver of their own (same servers and trust anchors, its own
        # small cache: [resolver] client_name_cache_size), so many clients cannot evict delivery's answers
        names_via = assemble.name_resolver(cfg, self.resolver)

        async def names(ip: str) -> tuple[str, str]:
            return await client_names(names_via, ip)

        self._build_sieve()   # [sieve] (issue 17)
        for ls in listeners(cfg, tls is not None):
            host, _, port = ls.address.rpartition(":")
            srv = SMTPServer(
                Listener(ls.name, host.strip("[]"), int(port), tls=tls if ls.tls != "none" else None,
                         implicit_tls=ls.tls == "implicit", auth=ls.auth, auth_required=ls.auth_required,
                         filters=self.listener_filters(ls.name, relay)),
                self.prequeue, hostname=hostname, limits=limits, authenticator=auth if self.credentials else None,
                client_names=names)
            srv.sock = socket.socket(fileno=self.inherited[ls.name]) if self.worker else bind(ls.address, ls.name)
            srv.sock.setblocking(False)
            self.servers.append(srv)

    def listener_filters(self, listener: str, relay: RelayPolicy) -> list[Filter]:
        """The stage hooks of a listener (inbound/filters.py), in order: relay control first, then the ones
        configured for it (``extra_filters[listener name]``, then policy delegation and Milter from
        ``[[policy_service]]`` and ``[[milter]]``: postgate/filtering.py), then Sieve (``[sieve]``). Relay
        control always comes first: a listener without it would be an open relay."""
        filters = build_filters(self.cfg, listener)
        if self.sieve is not None:   # [sieve]: the script sees the milters' headers (spamtest on rspamd's score)
            filters = [sieve_filter.PassEdits(f) for f in filters]
        return [RelayFilter(relay), *self.extra_filters.get(listener, []), *filters, *self.sieve_filters(listener)]

    async def _tls_reporting(self) -> None:
        await _tls_reporting_loop(self)

    async def open_spool(self) -> None:
        """The queue part of the start: a spool mail can be written to (else a clear refusal, exit 78),
        owned by this process (not a worker). Recovery from the previous run comes in :meth:`run`, after
        the privilege drop, so what it writes belongs to ``[server] user``."""
        q = self.cfg.queue
        directory = q.directory
        spool: Spool
        where = "[queue] directory"
        if q.backend == "postgresql":
            from postgate.outbound.queue.pgspool import PgSettings, PostgresSpool
            spool = PostgresSpool(PgSettings.from_config(q))
            directory, where = "the shared queue", "[queue]"
        else:
            runners = self._runners()   # [queue] run_in_workers: process k of n delivers share k
            share = int(os.environ.get("POSTGATE_WORKER_INDEX", "0")) if self.worker and runners > 1 else 0
            spool = DirectorySpool(directory, partition=(share, runners))
            # what this process accepts is in its own share: it delivers it itself, handed over in memory
            queue_id_share(share, runners)
        try:
            await spool.check()
            if not self.worker and not await spool.try_lock():
                raise StartupError(f"{directory}: another Postgate owns this spool", EX_OSERR)
            if not self.worker and isinstance(spool, DirectorySpool):
                spool.expect_recovery()   # mail accepted before recovery is done waits for it (issue 15)
        except SpoolUnavailable as e:
            raise StartupError(f"{where}: {e}") from e
        except (OSError, SpoolError) as e:
            raise StartupError(f"{where}: {directory}: cannot recover the spool: {e}") from e
        self.spool = spool

    async def run(self) -> int:
        assert self.scheduler is not None and self.spool is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for srv in self.servers:
            await srv.start()
            log.info("listening: %s on %s:%d (tls=%s, auth=%s)", srv.listener.name, srv.listener.host,
                     srv.listener.port, "implicit" if srv.listener.implicit_tls else
                     ("starttls" if srv.listener.tls else "none"), srv.listener.auth)
        queue_task: asyncio.Future[Any]
        user = self.cfg.server.user
        if self.worker:
            if self._runners() > 1:   # the main process tells us when the spool is recovered (SIGUSR2)
                loop.add_signal_handler(signal.SIGUSR2, self._recovered.set)
            if user:
                drop_privileges(user, None)  # the main process hands the spool over
            print("ready", flush=True)  # to the main process, on our stdout pipe
            sys.stdout.close()
            log.info("worker ready")
            freeze_startup_objects()
            if self._runners() > 1:   # [queue] run_in_workers: this worker delivers its share too
                queue_task = asyncio.gather(self._orphan_watch(), self._worker_queue())
            else:
                queue_task = asyncio.create_task(self._orphan_watch())  # workers only enqueue; the main runs it
        else:
            if self.cfg.metrics.listen:
                host, _, port = self.cfg.metrics.listen.rpartition(":")
                from postgate import metrics
                spool = self.spool

                def queue_summary() -> tuple[dict[str, int], float | None]:
                    # called in the HTTP server's render thread: the (async) spool is asked on the loop
                    s = asyncio.run_coroutine_threadsafe(spool.summary(), loop).result(30)
                    return {str(k): n for k, n in s.counts.items()}, s.oldest
                try:
                    self.metrics_server = await metrics.serve_http(host, int(port), lambda: metrics.exposition(
                        queue_summary))
                except OSError as e:
                    raise StartupError(f"[metrics] listen {self.cfg.metrics.listen}: {e.strerror}", EX_OSERR) from e
                log.info("metrics: http://%s/metrics", self.cfg.metrics.listen)
            await self._start_workers()
            if user:
                drop_privileges(user, Path(self.cfg.queue.directory),
                                tuple(Path(p) for p in [os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")] if p))
                log.info("running as %s (uid %d)", user, os.getuid())
            try:
                for line in await self.spool.recover():
                    log.info("recovery: %s", line)
            except (OSError, SpoolError) as e:
                raise StartupError(f"[queue]: cannot recover the spool: {e}") from e
            piddir = Path(self.cfg.queue.directory)   # with a shared queue: only the pid file and state live here
            try:
                piddir.mkdir(parents=True, exist_ok=True)
                (piddir / PIDFILE).write_text(f"{os.getpid()}\n")
            except OSError as e:   # a full disk is no reason not to run (the queue can still deliver)
                log.warning("pid file %s not written (%s): postgate reload will not find this process; "
                            "kill -HUP %d does the same", piddir / PIDFILE, e.strerror or e, os.getpid())
            for child in self.children:   # [queue] run_in_workers: the workers may deliver now
                if self._runners() > 1 and child.returncode is None:
                    child.send_signal(signal.SIGUSR2)
            freeze_startup_objects()
            log.info("ready")
            systemd.ready("listening on " + ", ".join(f"{s.listener.host}:{s.listener.port}" for s in self.servers))
            queue_task = asyncio.create_task(self.scheduler.run(self.stopping))
            self.forwarders.append(asyncio.create_task(self._tls_reporting()))  # issue 18
        watchdog = asyncio.create_task(systemd.watchdog(self.stopping))
        await self.stopping.wait()
        if not self.worker:
            systemd.stopping()
        log.info("stopping: no new connections; waiting for sessions under way")
        for child in self.children:
            if child.returncode is None:
                child.terminate()
        for srv in self.servers:
            await srv.stop_accepting()
        if self.metrics_server is not None:
            self.metrics_server.close()
        tasks = {t for srv in self.servers for t in srv.tasks}
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.cfg.limits.shutdown_timeout)
            for t in pending:
                t.cancel()
        if self.prequeue is not None and self.prequeue.late:
            await asyncio.wait(self.prequeue.late, timeout=self.cfg.limits.shutdown_timeout)
        await queue_task
        await watchdog
        for i, child in enumerate(self.children, 1):
            try:
                rc = await asyncio.wait_for(child.wait(), self.cfg.limits.shutdown_timeout + 10)
            except TimeoutError:
                child.kill()
                rc = await child.wait()
            log.info("worker %d exited with %s", i, rc)
            if self.cfg.metrics.listen:
                from postgate import metrics
                metrics.process_gone(child.pid)
        await self.deliverer.close()
        if not self.worker:
            (Path(self.cfg.queue.directory) / PIDFILE).unlink(missing_ok=True)
        if self.spool is not None:
            await self.spool.unlock()
        log.info("stopped")
        return 0

    async def _start_workers(self) -> None:
        """``[server] workers`` > 1: start the extra listener processes (same configuration, ``--worker``);
        they inherit the listening sockets and write to the spool this process runs."""
        if self.cfg.server.workers <= 1 or self.cfg.path is None:
            return
        fds = {srv.listener.name: srv.sock.fileno() for srv in self.servers if srv.sock is not None}
        spec = ",".join(f"{name}={fd}" for name, fd in fds.items())
        for i in range(1, self.cfg.server.workers):
            env = {k: v for k, v in os.environ.items()  # systemd talks to the main process only
                   if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            env["POSTGATE_WORKER_INDEX"] = str(i)   # its share of the queue with [queue] run_in_workers
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postgate.cli", "serve", "--config", str(self.cfg.path), "--worker", spec,
                *sys.argv[sys.argv.index("serve") + 1:] if "serve" in sys.argv and "--worker" not in sys.argv
                else [], stdout=asyncio.subprocess.PIPE, pass_fds=tuple(fds.values()), env=env)
            assert proc.stdout is not None
            try:
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
            except TimeoutError:
                line = b""
            if line.strip() != b"ready":
                proc.kill()
                raise StartupError(f"worker {i} did not start (exit {await proc.wait()})")
            self.children.append(proc)
            log.info("worker %d started (pid %d)", i, proc.pid)
            if self._runners() > 1:
                self.forwarders.append(asyncio.create_task(self._adopt_when_gone(i, proc)))

    def _runners(self) -> int:
        """Processes that run the queue: 1, or every process with ``[queue] run_in_workers``."""
        return self.cfg.server.workers if self.cfg.queue.run_in_workers and self.cfg.server.workers > 1 else 1

    async def _worker_queue(self) -> None:
        """A worker's share of the queue, once the main process recovered the spool (a lease of a dead run
        would otherwise cross the recovery)."""
        while not self._recovered.is_set() and not self.stopping.is_set():
            try:
                await asyncio.wait_for(self._recovered.wait(), 1.0)
            except TimeoutError:
                pass
        if self.stopping.is_set():
            return
        assert self.scheduler is not None
        log.info("queue runner started (share %s of %d)", os.environ.get("POSTGATE_WORKER_INDEX", "?"),
                 self._runners())
        await self.scheduler.run(self.stopping)

    async def _adopt_when_gone(self, i: int, proc: asyncio.subprocess.Process) -> None:
        """A worker that dies leaves its share of the queue to the main process: nothing stays undelivered
        until a restart (its leases are taken back at the next reclaim)."""
        await proc.wait()
        if self.stopping.is_set():
            return
        if isinstance(self.spool, DirectorySpool):
            self.spool.adopt(i)
        log.error("worker %d (pid %d) exited with %s; the main process delivers its share of the queue", i,
                  proc.pid, proc.returncode)

    async def _orphan_watch(self) -> None:
        """A worker whose main process died stops too (it would hold the port without a queue runner)."""
        parent = os.getppid()
        while not self.stopping.is_set():
            if os.getppid() != parent:
                log.warning("the main process %d is gone: stopping", parent)
                self.stopping.set()
                return
            try:
                await asyncio.wait_for(self.stopping.wait(), 1.0)
            except TimeoutError:
                pass

    def reload(self) -> None:
        """SIGHUP: re-read the TOML file, the maps, the credentials and the DKIM keys; tell the workers."""
        if not self.worker:
            systemd.reloading()
        for child in self.children:
            if child.returncode is None:
                child.send_signal(signal.SIGHUP)
        try:
            self._reload()
        finally:
            if not self.worker:
                systemd.ready("reloaded")

    def _reload(self) -> None:
        old = self.cfg
        try:
            cfg = configmod.load(old.path) if old.path is not None else old
            dc = assemble.delivery_config(cfg)
            credentials = assemble.build_credentials(cfg)
        except configmod.SieveScriptError as e:
            log.error("reload refused: the Sieve script %s does not compile, its previous version keeps running "
                      "(and the old configuration stays): %s", e.script, e)
            return
        except configmod.ConfigError as e:
            log.error("reload refused, keeping the old configuration: %s", e)
            return
        signer = assemble.build_signer(cfg)
        if signer is None and self.signer is not None:
            log.error("reload: DKIM keys in %s unusable, keeping the old keys", cfg.dkim.key_directory)
            signer = self.signer
        for what in ("listener", "server", "queue", "local"):
            if getattr(cfg, what) != getattr(old, what):
                log.warning("reload: changes to [%s] take effect at the next restart", what)
        old_dc = self.deliverer.config
        # MTA-STS cache, downgrade memory and TLS-RPT collector are state, not settings: they carry over
        dc.sts, dc.downgrade, dc.tls_report = old_dc.sts, old_dc.downgrade, old_dc.tls_report
        dc.cleartext_fallback_delay = cfg.downgrade.cleartext_fallback_delay
        self.deliverer.config = dc
        self.credentials = credentials
        self.signer = signer
        if self.prequeue is not None:
            self.prequeue.relay = RelayPolicy.build(cfg.relay.trusted_networks, cfg.relay.local_domains)
        cfg.listener, cfg.server, cfg.queue, cfg.local = old.listener, old.server, old.queue, old.local
        self.cfg = cfg
        self._reload_sieve()   # [sieve] (issue 17)
        log.info("reloaded %s (maps, credentials, DKIM keys: %d domain%s)", cfg.path or "the configuration",
                 len(signer.keys) if signer else 0, "" if signer and len(signer.keys) == 1 else "s")

    # --- [sieve]: Sieve scripts as a stage-hook filter of every listener (docs/sieve.md; issue 17) ---------
    def _build_sieve(self) -> None:
        """The global and per-listener scripts, compiled once per process."""
        try:
            self.sieve = sieve_filter.load(configmod.sieve_settings(self.cfg))
        except SieveError as e:
            raise StartupError(f"[sieve] {e}") from e

    def sieve_filters(self, listener: str) -> list[Filter]:
        """Sieve is the last filter of every listener (docs/sieve.md): it decides after relay control,
        policy delegation and the milters have had their say."""
        return [sieve_filter.SieveFilter(self.sieve)] if self.sieve is not None else []

    def _reload_sieve(self) -> None:
        """SIGHUP: recompile the scripts (the configuration check in :meth:`_reload` compiled them already and
        refused the reload if one fails; the holder still keeps an old version if a script changed since); the
        workers got the signal from :meth:`reload` and recompile their own copies."""
        if self.sieve is not None:
            self.sieve.reload()
    # --- end [sieve] ---------------------------------------------------------------------------------------


def listeners(cfg: configmod.Config, tls: bool) -> list[configmod.ListenerSettings]:
    return cfg.listener or [configmod.ListenerSettings(name="mx", address="0.0.0.0:25",
                                                       tls="starttls" if tls else "none")]


def _raise_fd_limit(want: int = 0) -> None:
    """Many slow sessions (pre-queue delivery) need many descriptors: raise the soft limit to the hard one,
    and, where allowed (root, CAP_SYS_RESOURCE), both to what [limits] max_sessions needs (issue 20: 100,000
    idle sessions), at most the kernel's fs.nr_open."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if want > hard:
        try:
            ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            ceiling = want
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, ceiling), min(want, ceiling)))
            return
        except (ValueError, OSError):
            pass  # not allowed (no privilege): the soft limit goes up to the hard one
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _tls_reporting_loop(d: Daemon) -> None:
    """Issue 18, hourly: refresh cached MTA-STS policies (RFC 8461 §5.1) and send the TLS-RPT reports of days
    that are over (RFC 8460 §4.1), by mail through the queue (DKIM-signed) and HTTPS POST."""
    from postgate.outbound import tlsrptsend
    from postgate.outbound.queue.envelope import Envelope, Recipient
    from postgate.outbound.tlsrptdb import Collector

    cfg, dc = d.cfg, d.deliverer.config
    t = cfg.tlsrpt
    settings = tlsrptsend.ReportSettings(organization=t.organization, submitter=t.submitter, contact=t.contact,
                                         sender=t.sender, ca_file=cfg.mta_sts.ca_file or cfg.delivery.ca_file or None)

    async def submit(sender: str, rcpts: list[str], content: bytes) -> None:
        assert d.spool is not None
        body = d.signer.sign(content, sender) if d.signer is not None else content
        await d.spool.enqueue(Envelope.new(sender, [Recipient(r, notify=["NEVER"]) for r in rcpts], body), body)
        if d.scheduler is not None:
            d.scheduler.wake.set()
    while not d.stopping.is_set():
        try:
            if dc.sts is not None:
                await dc.sts.refresh_all()
            if t.send and isinstance(dc.tls_report, Collector):
                await tlsrptsend.send_due(dc.tls_report.store, d.resolver, settings, submit)
        except Exception:  # housekeeping must not take the daemon down
            log.exception("TLS reporting housekeeping failed")
        try:
            await asyncio.wait_for(d.stopping.wait(), 3600)
        except TimeoutError:
            pass


def setup_logging(cfg: configmod.Config) -> None:
    lg = cfg.log
    logfmt.setup(lg.target, lg.syslog_name, lg.syslog_facility, cfg.server.hostname or None, lg.syslog_socket)


def serve(cfg: configmod.Config, resolver: Resolver, deliverer: Deliverer, signer: Any = None,
          caps: Any = None, worker: str | None = None) -> int:
    """Run the daemon; ``worker`` is the inherited socket list (``name=fd,…``) of an extra listener process."""
    _raise_fd_limit(2 * cfg.limits.max_sessions + 1024)  # a session: client socket + next hop's
    setup_logging(cfg)
    inherited = {k: int(v) for k, v in (x.split("=", 1) for x in worker.split(",") if x)} if worker else {}

    async def main() -> int:
        from postgate.check import FAIL, apply_downgrades, run_checks
        if not worker:  # the main process checked before starting the workers
            problems = assemble.validate(cfg)
            if problems:
                raise StartupError("; ".join(problems))
            results = apply_downgrades(await run_checks(cfg, resolver, caps), cfg.check.downgrade)
            for r in results:
                (log.warning if r.status != "PASS" else log.info)("check: %s", r.line().replace("\n", ""))
            failed = [r.check for r in results if r.status == FAIL]
            if failed:
                raise StartupError(f"check(s) failed: {', '.join(dict.fromkeys(failed))} (fix them, or "
                                   "downgrade them by name in [check] downgrade)")
            if cfg.metrics.listen:
                from postgate import metrics
                metrics.prepare_directory()
        if cfg.metrics.listen:
            from postgate import metrics
            metrics.enable()
        d = Daemon(cfg, resolver, deliverer, worker=bool(worker), inherited=inherited)
        d.signer = signer
        await d.open_spool()
        d.build()
        return await d.run()
    try:
        from postgate import eventloop
        return eventloop.run(main(), cfg.server.event_loop)  # issue 20: uvloop or asyncio
    except StartupError as e:
        log.critical("refusing to start: %s", e)
        systemd.notify("STATUS=refusing to start", f"ERRNO={e.code}")
        return e.code


def send_reload(cfg: configmod.Config) -> tuple[int, str]:
    """``postgate reload``: SIGHUP to the daemon whose pid file is in this configuration's spool."""
    pidfile = Path(cfg.queue.directory) / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return 69, f"no Postgate runs on {cfg.queue.directory} ({pidfile} missing or stale)"
    if b"postgate" not in cmdline:
        return 69, f"{pidfile}: process {pid} is not Postgate (stale pid file)"
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        return 69, f"cannot signal process {pid}: {e.strerror}"
    return 0, f"reload signal sent to process {pid}"


__all__ = ["Daemon", "StartupError", "bind", "drop_privileges", "send_reload", "serve"]
