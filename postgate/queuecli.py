"""``postgate queue``: Postfix's mailq, postqueue and postsuper in one.

Reading (list, show) is safe at any time. Changes are written as requests into the spool's
``requests/`` directory and applied by the process that owns the spool — the running daemon, between
delivery passes, so a message being delivered is never touched. When no daemon runs, the command takes
the spool lock and applies its request itself.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path
from typing import Any

from postgate import config as configmod
from postgate.outbound.queue.envelope import DEFAULT_PRIORITY
from postgate.outbound.queue.protocol import Spool, SpoolError
from postgate.outbound.queue.scheduler import Scheduler
from postgate.outbound.queue.spool import DirectorySpool
from postgate.policy.vocab import valid_queue_id

EX_OK, EX_USAGE, EX_NOINPUT, EX_IOERR = 0, 64, 66, 74


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("queue", help="list and manage the queue (mailq/postqueue/postsuper)",
                       description="List and manage queued messages. Changes are applied by the running "
                       "daemon between deliveries, or directly when no daemon runs.")
    p.add_argument("--config", type=Path, help="configuration file (TOML)")
    p.add_argument("--spool", type=Path, help="spool directory (overrides [queue] directory)")
    qs = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = qs.add_parser("list", help="list queued messages (like mailq)",
                       description="One line per message (id, state, size, arrival, sender), then one per "
                       "recipient with its status and the reason of the last deferral. A message whose first "
                       "(pre-queue) attempt was deferred is 'deferred', as in Postfix's deferred queue.")
    ls.add_argument("--json", action="store_true", help="machine-readable output (JSON on standard output)")
    sh = qs.add_parser("show", help="show one message's envelope and recipients")
    sh.add_argument("id", help="queue id (20 hexadecimal digits, as logged)")
    sh.add_argument("--json", action="store_true", help="machine-readable output (JSON on standard output)")
    fl = qs.add_parser("flush", help="retry deferred messages now (all, one, or one destination)")
    fl.add_argument("id", nargs="?", help="retry only this message")
    fl.add_argument("--domain", help="retry only messages to this destination domain")
    for name, text in (("hold", "put a message on hold"), ("release", "release a held message"),
                       ("delete", "delete a message")):
        x = qs.add_parser(name, help=text)
        x.add_argument("id", help="queue id (20 hexadecimal digits, as logged)")
    qs.add_parser("requeue", help="retry every message now, held ones included")
    for action in qs.choices.values():  # `postgate queue list --spool DIR` works as well as `queue --spool DIR list`
        action.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="configuration file (TOML)")
        action.add_argument("--spool", type=Path, default=argparse.SUPPRESS,
                            help="spool directory (overrides [queue] directory)")
    p.set_defaults(func=cmd_queue)


class NoSpool(Exception):
    """The spool directory does not exist (or is not a Postgate spool): a queue command never creates it."""


def _spool(args: argparse.Namespace) -> Spool:
    cfg = configmod.load(args.config)
    q = cfg.queue
    if q.backend == "postgresql" and not args.spool:
        # the shared queue: any node's configuration reaches the same queue
        from postgate.outbound.queue.pgspool import PgSettings, PostgresSpool
        return PostgresSpool(PgSettings.from_config(q))
    root = Path(args.spool or q.directory)
    # only the daemon creates a spool: reading one that is not there is an error, not an empty queue
    if not (root / "messages").is_dir():
        why = "no such directory" if not root.exists() else "not a Postgate spool (no messages/ in it)"
        raise NoSpool(f"{root}: {why}; is this the [queue] directory of a Postgate that has run? (--spool or "
                      "--config)")
    return DirectorySpool(root)


def _state(state: str, env: Any) -> str:
    """The state an operator means: a message waiting in incoming/ after a failed pre-queue attempt is
    deferred (Postfix: the deferred queue holds what had an attempt), not newly incoming."""
    if state == "incoming" and env is not None and env.attempts:
        return "deferred"
    return state


def _v(x: object) -> str:
    return "-" if x is None or x == "" else str(x)


async def _close(spool: Spool) -> None:
    close = getattr(spool, "close", None)
    if close is not None:
        res = close()
        if asyncio.iscoroutine(res):
            await res


def _fmt(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def cmd_queue(args: argparse.Namespace) -> int:
    try:
        spool = _spool(args)
    except NoSpool as e:
        print(f"postgate queue: {e}", file=sys.stderr)
        return EX_NOINPUT

    async def run() -> int:
        try:
            return await _queue(args, spool)
        finally:
            await _close(spool)
    try:
        return asyncio.run(run())
    except (OSError, SpoolError) as e:
        print(f"postgate queue: {getattr(spool, 'root', 'the shared queue')}: {e}", file=sys.stderr)
        return EX_IOERR


async def _queue(args: argparse.Namespace, spool: Spool) -> int:
    if args.action == "list":
        rows: list[dict[str, Any]] = []
        for e in await spool.entries():
            env = e.envelope
            if env is None:
                rows.append({"id": e.id, "state": e.state, "error": "unreadable envelope"})
                continue
            row = {"id": e.id, "state": _state(e.state, env), "arrival": env.arrival, "size": env.size,
                   "sender": env.sender, "next_attempt": env.next_attempt, "priority": env.priority,
                   "recipients": [{"address": r.address, "status": r.status, "dsn": r.dsn,
                                   "reason": r.reason} for r in env.recipients]}
            if e.lease is not None:
                row["lease"] = {"owner": e.lease.owner, "until": e.lease.until}
            rows.append(row)
        if args.json:
            json.dump(rows, sys.stdout, indent=2)
            print()
        else:
            for r in rows:
                if "error" in r:
                    print(f"{r['id']} {r['state']:8} ({r['error']})")
                    continue
                prio = f"  priority {r['priority']}" if r["priority"] != DEFAULT_PRIORITY else ""
                print(f"{r['id']} {r['state']:8} {r['size']:>8} {_fmt(r['arrival'])}  <{r['sender']}>{prio}")
                if "lease" in r:
                    print(f"{'':30}leased by {r['lease']['owner']} until {_fmt(r['lease']['until'])}")
                for rc in r["recipients"]:
                    why = f" ({rc['reason']})" if rc["reason"] else ""
                    print(f"{'':30}<{rc['address']}> {rc['status']}{why}")
            print(f"-- {len(rows)} message{'s' if len(rows) != 1 else ''}")
        return EX_OK
    if args.action == "show":
        if not valid_queue_id(args.id):
            print(f"postgate queue: {args.id!r} is not a queue id", file=sys.stderr)
            return EX_USAGE
        got = await spool.get(args.id)
        if got is None:
            print(f"postgate queue: {args.id}: no such message", file=sys.stderr)
            return EX_NOINPUT
        found, env = got
        if args.json:
            d = json.loads(env.to_bytes())
            d["state"] = _state(found, env)
            json.dump(d, sys.stdout, indent=2)
            print()
        else:
            print(f"id: {env.id}\nstate: {_state(found, env)}\nsender: <{env.sender}>\narrival: {_fmt(env.arrival)}\n"
                  f"size: {env.size}\nnext attempt: {_fmt(env.next_attempt)}\nrequiretls: {env.requiretls}")
            for rcpt in env.recipients:
                print(f"recipient: <{rcpt.address}> {rcpt.status} dsn={_v(rcpt.dsn)} {_v(rcpt.reason)}")
            for a in env.attempts:
                kind = "pre-queue" if a.get("prequeue") else "queue"
                counts = ", ".join(f"{k}={a[k]}" for k in ("delivered", "deferred", "bounced") if k in a)
                print(f"attempt: {_fmt(a['time'])} ({kind})" + (f" {counts}" if counts else ""))
        return EX_OK
    if args.action in ("hold", "release", "delete", "flush") and getattr(args, "id", None):
        if not valid_queue_id(args.id):
            print(f"postgate queue: {args.id!r} is not a queue id", file=sys.stderr)
            return EX_USAGE
        if await spool.get(args.id) is None:
            print(f"postgate queue: {args.id}: no such message", file=sys.stderr)
            return EX_NOINPUT
        await spool.request(args.action, args.id)
    elif args.action == "flush":
        await (spool.request("flush-domain", args.domain) if args.domain else spool.request("flush-all"))
    elif args.action == "requeue":
        await spool.request("requeue")
    if await spool.try_lock():  # no daemon: apply it ourselves
        try:
            for line in await Scheduler(spool, _NoDelivery(), clock=time.time).apply_requests():
                print(line)
        finally:
            await spool.unlock()
    else:
        print("request queued for the running daemon")
    return EX_OK


class _NoDelivery:
    async def deliver(self, *a: object, **kw: object) -> list:  # type: ignore[type-arg]
        raise RuntimeError("the queue command never delivers")
