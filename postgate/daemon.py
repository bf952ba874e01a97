"""``postgate serve``: the listeners, the pre-queue delivery and the queue runner in one process.

Start: load and check the configuration (a bad one is refused with file, key and reason), take the spool
lock, recover the spool, start the queue runner, then listen. SIGTERM/SIGINT: stop accepting, let the
sessions under way finish (a session cut short got no 250, so nothing is lost), stop the queue runner,
exit 0. SIGHUP: reload the policy and transport maps, the credentials and the DKIM keys.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postgate import config as configmod
from postgate.inbound.credentials import Credentials, CredentialsError
from postgate.inbound.local import LMTPClient, Maildir
from postgate.inbound.prequeue import PreQueue, PreQueueConfig
from postgate.inbound.relay import RelayPolicy
from postgate.inbound.smtpd import Limits, Listener, SMTPServer
from postgate.outbound.delivery import Deliverer
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver

log = logging.getLogger("postgate")


class StartupError(Exception):
    pass


def server_tls_context(cfg: configmod.Config) -> ssl.SSLContext | None:
    s = cfg.server
    if not s.tls_cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if s.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(s.tls_cert_file, s.tls_key_file)
    except (OSError, ssl.SSLError) as e:
        raise StartupError(f"[server] tls_cert_file/tls_key_file: cannot load {s.tls_cert_file}: {e}") from e
    return ctx


@dataclass
class Daemon:
    cfg: configmod.Config
    resolver: Resolver
    deliverer: Deliverer
    servers: list[SMTPServer] = field(default_factory=list)
    spool: DirectorySpool | None = None
    scheduler: Scheduler | None = None
    credentials: Credentials | None = None
    prequeue: PreQueue | None = None
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    signer: Any = None
    worker: bool = False          # an extra listener process: no spool ownership, no queue runner
    children: list[asyncio.subprocess.Process] = field(default_factory=list)
    forwarders: list[asyncio.Task[None]] = field(default_factory=list)

    def build(self, signer: Any = None) -> None:
        cfg = self.cfg
        hostname = cfg.server.hostname or "localhost"
        self.spool = DirectorySpool(cfg.queue.directory)
        if not self.worker:
            if not self.spool.try_lock():
                raise StartupError(f"{cfg.queue.directory}: another Postgate owns this spool")
            for line in self.spool.recover():
                log.info("recovery: %s", line)
        q = cfg.queue
        self.scheduler = Scheduler(self.spool, self.deliverer, SchedulerConfig(
            min_backoff=q.min_backoff, max_backoff=q.max_backoff, max_lifetime=q.max_lifetime,
            delay_warning=q.delay_warning, destination_concurrency=q.destination_concurrency,
            destination_backoff=q.destination_backoff, reporting_mta=hostname))
        if signer is not None:
            self.scheduler.signer = lambda content: signer(content, "")  # bounces are DKIM-signed too
        if cfg.relay.credentials_file:
            try:
                self.credentials = Credentials(cfg.relay.credentials_file)
            except CredentialsError as e:
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
            relay, self.deliverer, self.spool, self.scheduler, local=local, signer=signer)
        tls = server_tls_context(cfg)
        lim = cfg.limits
        limits = Limits(max_message_size=cfg.server.max_message_size, max_recipients=lim.max_recipients,
                        max_sessions=lim.max_sessions, max_sessions_per_client=lim.max_sessions_per_client,
                        command_timeout=lim.command_timeout, data_timeout=lim.data_timeout)
        listeners = cfg.listener or [configmod.ListenerSettings(
            name="mx", address="0.0.0.0:25", tls="starttls" if tls else "none")]
        auth = self.credentials.check if self.credentials else None
        for ls in listeners:
            host, _, port = ls.address.rpartition(":")
            self.servers.append(SMTPServer(
                Listener(ls.name, host.strip("[]"), int(port), tls=tls if ls.tls != "none" else None,
                         implicit_tls=ls.tls == "implicit", auth=ls.auth, auth_required=ls.auth_required),
                self.prequeue, hostname=hostname, limits=limits, authenticator=auth))

    async def _tls_reporting(self) -> None:
        await _tls_reporting_loop(self)

    async def run(self) -> int:
        assert self.scheduler is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for srv in self.servers:
            try:
                await srv.start()
            except OSError as e:
                raise StartupError(f"listener {srv.listener.name} on {srv.listener.host}:{srv.listener.port}: "
                                   f"{e.strerror}") from e
            log.info("listening: %s on %s:%d (tls=%s, auth=%s)", srv.listener.name, srv.listener.host,
                     srv.listener.port, "implicit" if srv.listener.implicit_tls else
                     ("starttls" if srv.listener.tls else "none"), srv.listener.auth)
        queue_task: asyncio.Task[Any]
        if self.worker:
            print("postgate: worker ready", file=sys.stderr, flush=True)
            queue_task = asyncio.create_task(self.stopping.wait())  # workers only enqueue; the main process runs it
        else:
            await self._start_workers()
            print("postgate: ready", file=sys.stderr, flush=True)
            queue_task = asyncio.create_task(self.scheduler.run(self.stopping))
            self.forwarders.append(asyncio.create_task(self._tls_reporting()))  # issue 18
        await self.stopping.wait()
        log.info("stopping: no new connections; waiting for sessions under way")
        for child in self.children:
            if child.returncode is None:
                child.terminate()
        for srv in self.servers:
            await srv.stop_accepting()
        tasks = {t for srv in self.servers for t in srv.tasks}
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.cfg.limits.shutdown_timeout)
            for t in pending:
                t.cancel()
        if self.prequeue is not None and self.prequeue.late:
            await asyncio.wait(self.prequeue.late, timeout=self.cfg.limits.shutdown_timeout)
        await queue_task
        for child in self.children:
            try:
                await asyncio.wait_for(child.wait(), self.cfg.limits.shutdown_timeout + 10)
            except TimeoutError:
                child.kill()
        await self.deliverer.close()
        if self.spool is not None:
            self.spool.unlock()
        log.info("stopped")
        return 0

    async def _start_workers(self) -> None:
        """``[server] workers`` > 1: start the extra listener processes (same configuration, ``--worker``);
        they share the ports through SO_REUSEPORT and write to the spool this process runs."""
        if self.cfg.server.workers <= 1 or self.cfg.path is None:
            return
        for i in range(1, self.cfg.server.workers):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "postgate.cli", "serve", "--config", str(self.cfg.path), "--worker",
                *sys.argv[sys.argv.index("serve") + 1:] if "serve" in sys.argv else [],
                stderr=asyncio.subprocess.PIPE)
            assert proc.stderr is not None
            while True:  # forward its log lines; wait until it listens
                line = (await proc.stderr.readline()).decode(errors="replace")
                if not line:
                    raise StartupError(f"worker {i} exited with {await proc.wait()}")
                if "worker ready" in line:
                    break
                sys.stderr.write(line)
            self.forwarders.append(asyncio.create_task(_forward(proc, i)))
            self.children.append(proc)
            log.info("worker %d started (pid %d)", i, proc.pid)

    def reload(self) -> None:
        d = self.deliverer.config
        for table in (d.policy_map, d.transport_map):
            if table is not None:
                try:
                    if table.reload_if_changed():
                        log.info("reloaded %s", table.path)
                except ValueError as e:
                    log.error("reload refused, keeping the old table: %s", e)
        if self.signer is not None:
            try:
                self.signer.reload()
                log.info("reloaded DKIM keys from %s", self.signer.keydir)
            except ValueError as e:
                log.error("DKIM key reload refused, keeping the old keys: %s", e)
        if self.credentials is not None:
            try:
                self.credentials.load()
                log.info("reloaded %s", self.credentials.path)
            except CredentialsError as e:
                log.error("reload refused, keeping the old credentials: %s", e)


async def _forward(proc: asyncio.subprocess.Process, i: int) -> None:
    assert proc.stderr is not None
    async for line in proc.stderr:
        sys.stderr.write(line.decode(errors="replace").replace("postgate: ", f"postgate[w{i}]: ", 1))
    log.info("worker %d exited with %s", i, await proc.wait())


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
        await asyncio.to_thread(d.spool.enqueue, Envelope.new(sender, [Recipient(r, notify=["NEVER"]) for r in rcpts],
                                                              body), body)
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


def serve(cfg: configmod.Config, resolver: Resolver, deliverer: Deliverer, signer: Any = None,
          caps: Any = None, worker: bool = False) -> int:
    _raise_fd_limit(2 * cfg.limits.max_sessions + 1024)  # a session: client socket + next hop's

    async def main() -> int:
        from postgate.check import FAIL, apply_downgrades, run_checks
        if not worker:  # the main process checked before starting the workers
            results = apply_downgrades(await run_checks(cfg, resolver, caps), cfg.check.downgrade)
            for r in results:
                print("postgate: check: " + r.line(), file=sys.stderr)
            failed = [r.check for r in results if r.status == FAIL]
            if failed:
                raise StartupError(f"check(s) failed: {', '.join(dict.fromkeys(failed))} (fix them, or "
                                   "downgrade them by name in [check] downgrade)")
        d = Daemon(cfg, resolver, deliverer, worker=worker)
        d.signer = signer
        d.build(signer.sign if signer is not None else None)
        return await d.run()
    try:
        from postgate import eventloop
        return eventloop.run(main(), cfg.server.event_loop)  # issue 20: uvloop or asyncio
    except StartupError as e:
        print(f"postgate: refusing to start: {e}", file=sys.stderr)
        return 78


__all__ = ["Daemon", "Path", "StartupError", "serve"]
