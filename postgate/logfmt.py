"""Log lines in Postfix's format and vocabulary, to syslog (journald) or standard error.

Postfix logs one line per event through syslog, tagged ``postfix/<program>[pid]``: ``smtpd`` for the SMTP
server, ``qmgr`` for the queue manager, ``smtp`` and ``lmtp`` for the delivery agents, ``cleanup``,
``bounce``, ``master``. A line about a message starts with its queue id::

    postfix/smtpd[1234]: 3F2A9C1B7E: client=mail.example.org[192.0.2.1]
    postfix/qmgr[1200]: 3F2A9C1B7E: from=<a@example.org>, size=1234, nrcpt=1 (queue active)
    postfix/smtp[1240]: 3F2A9C1B7E: to=<b@example.net>, relay=mx.example.net[198.51.100.25]:25,
        delay=0.41, delays=0.01/0/0.2/0.2, dsn=2.0.0, status=sent (250 2.0.0 Ok)
    postfix/qmgr[1200]: 3F2A9C1B7E: removed

A warning that is not about one message starts with ``warning:`` (``error:``, ``fatal:`` for worse),
which is what tools such as fail2ban's postfix filter and pflogsumm key on. Postgate logs the same way,
tagged ``postgate/<program>[pid]``: the logger name says which program (:data:`PROGRAMS`), the level
gives the ``warning:`` prefix. Lines about a message (queue id first) never get a prefix, as in Postfix,
where a deferral is an ordinary ``status=deferred`` line.

To standard error each line carries the classic syslog timestamp and host name (``Dec  2 00:05:39
mail.example.org postgate/smtpd[1234]: …``), so ``pflogsumm --syslog-name=postgate`` and
``fail2ban-regex`` read a captured stderr exactly as they read /var/log/mail.log. To syslog (``/dev/log``,
where journald listens too) the daemon sends ``postgate/smtpd[1234]: …`` with facility ``mail``.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import socket
import sys
import time

# Logger name (Postgate's modules) -> Postfix program name
PROGRAMS: dict[str, str] = {
    "postgate.smtpd": "smtpd",
    "postgate.filters": "smtpd",
    "postgate.delivery": "smtp",
    "postgate.local": "lmtp",
    "postgate.queue": "qmgr",
    "postgate.bounce": "bounce",
    "postgate.dkim": "cleanup",
    "postgate.metrics": "master",
    "postgate": "master",
}

# A line about one message: "QUEUEID: …" (Postgate's ids are 20 hex digits) or Postfix's "NOQUEUE: …"
_MESSAGE_LINE = re.compile(r"^(?:[0-9A-F]{10,24}|NOQUEUE): ")
_PREFIX = {logging.WARNING: "warning: ", logging.ERROR: "error: ", logging.CRITICAL: "fatal: "}


def program_of(logger_name: str) -> str:
    """The Postfix program name for a logger: the longest matching prefix in :data:`PROGRAMS`."""
    name = logger_name
    while name:
        if name in PROGRAMS:
            return PROGRAMS[name]
        name = name.rpartition(".")[0]
    return "master"


def message_of(record: logging.LogRecord) -> str:
    """The text after ``program[pid]: `` — with Postfix's ``warning:``/``error:`` prefix where it belongs."""
    msg = record.getMessage()
    if record.exc_info:
        # one event, one line: the exception's last line, not a traceback
        exc = record.exc_info[1]
        msg += f": {type(exc).__name__}: {exc}" if exc is not None else ""
    msg = msg.replace("\n", " ")
    if record.levelno >= logging.WARNING and not _MESSAGE_LINE.match(msg):
        prefix = _PREFIX.get(record.levelno, "error: ")
        if not msg.startswith(prefix):
            msg = prefix + msg
    return msg


class PostfixFormatter(logging.Formatter):
    """``Mon DD HH:MM:SS host name/program[pid]: message`` (``with_header=False``: from ``name/`` on,
    for syslog, which adds the time and host itself)."""

    def __init__(self, syslog_name: str = "postgate", hostname: str | None = None, with_header: bool = True,
                 utc: bool = False) -> None:
        super().__init__()
        self.syslog_name = syslog_name
        self.hostname = (hostname or socket.gethostname()).split(".")[0] if hostname is None else hostname
        self.with_header = with_header
        self.utc = utc
        self._stamp = (-1, "")   # (second, its time stamp), replaced as one object (threads log too)

    def format(self, record: logging.LogRecord) -> str:
        tag = f"{self.syslog_name}/{program_of(record.name)}[{record.process or os.getpid()}]"
        line = f"{tag}: {message_of(record)}"
        if not self.with_header:
            return line
        second = int(record.created)
        cached, stamp = self._stamp
        if second != cached:   # one time stamp per second, not per line
            t = time.gmtime(second) if self.utc else time.localtime(second)
            # RFC 3164 §4.1.2 TIMESTAMP: "Mmm dd hh:mm:ss", the day padded with a space
            stamp = time.strftime("%b ", t) + f"{t.tm_mday:2d}" + time.strftime(" %H:%M:%S", t)
            self._stamp = (second, stamp)
        return f"{stamp} {self.hostname} {line}"


FACILITIES = {"mail": logging.handlers.SysLogHandler.LOG_MAIL,
              **{f"local{i}": getattr(logging.handlers.SysLogHandler, f"LOG_LOCAL{i}") for i in range(8)},
              "daemon": logging.handlers.SysLogHandler.LOG_DAEMON}
TARGETS = ("stderr", "syslog")


def setup(target: str = "stderr", syslog_name: str = "postgate", facility: str = "mail",
          hostname: str | None = None, socket_path: str = "/dev/log", level: int = logging.INFO) -> None:
    """Send every ``postgate.*`` line to ``target`` in Postfix's format (replacing earlier handlers)."""
    root = logging.getLogger("postgate")
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handler: logging.Handler
    if target == "syslog":
        handler = logging.handlers.SysLogHandler(socket_path, facility=FACILITIES[facility])
        handler.setFormatter(PostfixFormatter(syslog_name, with_header=False))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(PostfixFormatter(syslog_name, hostname=hostname))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # a line carries no source position nor thread name (Python's logging HOWTO, "Optimization"): the
    # caller's frame was looked up for every line, 1–2% of a busy relay's CPU time
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
