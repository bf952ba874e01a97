"""Running Postgate like Postfix (issue 19): reload in every worker, ports, check = serve's validation,
Postfix-format logs read by fail2ban and pflogsumm, the queue command, systemd notification, privilege
drop, metrics, the command line."""

from __future__ import annotations

import argparse
import os
import pwd
import re
import secrets
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgate.inbound.credentials import hash_password

from fixtures.pgserve import PostgateServer
from fixtures.testnet import TestNet
from postgate import cli

from .test_inbound import client, data_reply, msg, stored, tls

HERE = "127.0.2.4"         # the servers of this module listen here
LOGGED = "127.0.2.5"       # … and the one whose log the log tests read (it runs for the whole module)
VERIFIED = "127.0.5.1"     # PTR client.own.test, whose A record leads back (fixtures/scenarios.toml)
LIAR = "127.0.5.2"         # PTR liar.own.test, whose A record does not
OUTSIDE = "127.0.6.1"      # not in [relay] trusted_networks, no PTR
# The smtpd delays the reply to each failed AUTH, doubling per client and per account up to 30 s by default
# (issue 13); smtplib's login() tries PLAIN then LOGIN, so a few failed logins would reach a reply later than
# the test client's 30 s timeout. The tests that fail logins on purpose use short delays.
FAST_AUTH = {"auth_delay": 0.05, "auth_max_delay": 0.5}


def serve(testnet: TestNet, d: Path, **sections: dict) -> PostgateServer:  # type: ignore[type-arg]
    return PostgateServer(testnet, d, address=HERE, **sections).start()


def pg_cmd(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postgate.cli", *args], capture_output=True, text=True,
                          timeout=120, **kw)  # type: ignore[call-overload]


def wait_for(pred: object, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def send(token: str, rcpt: str, source: str = VERIFIED, address: str = HERE) -> tuple[int, str]:
    with client(address=address, source=source) as s:
        s.ehlo("helo.example")
        code, text, _ = data_reply(s, "a@client.test", [rcpt], msg(token))
    return code, text


# --- 1. SIGHUP / postgate reload reaches every worker and re-reads the TOML file, credentials, DKIM keys ----

def test_reload_reaches_every_worker_toml_credentials_dkim(testnet: TestNet, tmp_path: Path) -> None:
    pg = serve(testnet, tmp_path, server={"workers": 2}, limits=FAST_AUTH)
    try:
        before = [secrets.token_hex(8) for _ in range(8)]
        for t in before:  # nodane.test has no TLSA: level dane falls back to unauthenticated TLS
            assert "delivered as" in send(t, "b@nodane.test")[1]
        assert all(stored(testnet, "mx.nodane.test", t) for t in before)
        # the new configuration: a policy map (dane-only for nodane.test), a new password, only the RSA key
        pm = tmp_path / "tls_policy"
        pm.write_text("nodane.test  dane-only\n")
        keys = tmp_path / "dkim-rsa-only"
        (keys / "own.test").mkdir(parents=True)
        shutil.copy(tmp_path / "dkim" / "own.test" / "s1.private", keys / "own.test")  # s1: RSA, s2: Ed25519
        (keys / "own.test" / "s1.private").chmod(0o600)
        creds = tmp_path / "credentials"
        creds.write_text(f"alice:{hash_password('looking-glass')}\n")
        PostgateServer(testnet, tmp_path, address=HERE, server={"workers": 2}, delivery={"policy_map": str(pm)},
                       dkim={"key_directory": str(keys)}, limits=FAST_AUTH)  # rewrites postgate.toml only
        r = pg_cmd("reload", "--config", str(pg.config))
        assert r.returncode == 0, r.stderr
        # every process (the main one and the worker) logs its reload, each with its own PID
        pids = lambda: set(re.findall(r"\[(\d+)\]: reloaded " + re.escape(str(pg.config)), pg.log()))  # noqa: E731
        assert wait_for(lambda: len(pids()) == 2), pg.log()[-3000:]
        after = [secrets.token_hex(8) for _ in range(8)]
        for t in after:
            code, text = send(t, "b@nodane.test")
            assert code == 250 and "queued as" in text   # dane-only without TLSA: deferred, in every process
        assert not any(stored(testnet, "mx.nodane.test", t) for t in after)
        for _ in range(8):  # the new password works, the old one not, whichever process answers
            with tls(client(587, address=HERE)) as s:
                assert s.login("alice", "looking-glass")[0] == 235
            with tls(client(587, address=HERE)) as s, pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "wonderland")
        signed = [secrets.token_hex(8) for _ in range(8)]
        for t in signed:
            assert "delivered as" in send(t, "bob@dane-ok.test")[1]
        for t in signed:
            [m] = stored(testnet, "mx.dane-ok.test", t)
            assert "a=rsa-sha256" in m["data"] and "a=ed25519-sha256" not in m["data"]
    finally:
        assert pg.stop() == 0


def test_bad_new_configuration_keeps_the_old_one(testnet: TestNet, tmp_path: Path) -> None:
    pg = serve(testnet, tmp_path)
    try:
        pm = tmp_path / "tls_policy"
        pm.write_text("nodane.test  dane-ony\n")
        PostgateServer(testnet, tmp_path, address=HERE, delivery={"policy_map": str(pm)})
        assert pg_cmd("reload", "--config", str(pg.config)).returncode == 0
        assert wait_for(lambda: "reload refused, keeping the old configuration" in pg.log())
        assert f"{pm}:1: unknown security level 'dane-ony'" in pg.log()
        t = secrets.token_hex(8)
        assert "delivered as" in send(t, "b@nodane.test")[1]
    finally:
        assert pg.stop() == 0
    # no daemon any more: reload says so
    r = pg_cmd("reload", "--config", str(pg.config))
    assert r.returncode == 69 and "no Postgate runs" in r.stderr


# --- 2. only Postgate's own workers share a port ---------------------------------------------------------

def test_a_second_serve_on_a_port_in_use_fails(testnet: TestNet, tmp_path: Path) -> None:
    pg = serve(testnet, tmp_path / "a", server={"workers": 2})
    try:
        second = PostgateServer(testnet, tmp_path / "b", address=HERE)
        with pytest.raises(RuntimeError, match="exited 71"):
            second.start()
        assert f"listener mx on {HERE}:25: in use by another process" in second.log()
        assert "fatal: refusing to start" in second.log()
    finally:
        assert pg.stop() == 0
    # a port held by something else entirely (no SO_REUSEPORT on it or on ours)
    with socket.socket() as other:
        other.bind((HERE, 587))
        other.listen()
        third = PostgateServer(testnet, tmp_path / "c", address=HERE)
        with pytest.raises(RuntimeError, match="exited 71"):
            third.start()
        assert f"listener submission on {HERE}:587: in use by another process" in third.log()


def test_workers_do_not_outlive_the_main_process(testnet: TestNet, tmp_path: Path) -> None:
    """SIGKILL of the main process: its worker stops too, so the port is free for the next start."""
    pg = serve(testnet, tmp_path, server={"workers": 2})
    assert pg.proc is not None
    [worker] = [int(p) for p in Path(f"/proc/{pg.proc.pid}/task/{pg.proc.pid}/children").read_text().split()]
    pg.proc.kill()
    pg.proc.wait()
    assert wait_for(lambda: not Path(f"/proc/{worker}").exists() or
                    _status(worker).get("State", "").strip().startswith("Z"), 30)
    assert f"[{worker}]: warning: the main process {pg.proc.pid} is gone: stopping" in pg.log()
    serve(testnet, tmp_path).stop()   # the ports are free again


# --- 4. postgate check runs exactly serve's validation first --------------------------------------------

@pytest.mark.parametrize("case", ["map-level", "credentials-line", "credentials-mode"])
def test_check_refuses_what_serve_refuses(testnet: TestNet, tmp_path: Path, case: str) -> None:
    sections: dict[str, dict[str, object]] = {}
    pm = tmp_path / "tls_policy"
    creds = tmp_path / "credentials"
    if case == "map-level":
        pm.write_text("# partners\nexample.com  dane-ony\n")
        sections["delivery"] = {"policy_map": str(pm)}
        want = f"{pm}:2: unknown security level 'dane-ony'"
    elif case == "credentials-line":
        creds.write_text("alice:plaintext\n")
        creds.chmod(0o600)
        want = f"{creds}:1: expected user:$scrypt$"
    else:
        creds.write_text(f"alice:{hash_password('x')}\n")
        creds.chmod(0o644)
        want = f"{creds}: readable by group or others"
    srv = PostgateServer(testnet, tmp_path, address=HERE, **sections)
    r = pg_cmd("check", "--config", str(srv.config))
    assert r.returncode == 1 and f"FAIL config: {want}" in r.stdout, r.stdout + r.stderr
    with pytest.raises(RuntimeError, match="exited 78"):
        srv.start()
    assert want in srv.log()


def test_check_warns_about_root_without_user(testnet: TestNet, tmp_path: Path) -> None:
    assert os.getuid() == 0
    srv = PostgateServer(testnet, tmp_path, address=HERE)
    r = pg_cmd("check", "--config", str(srv.config))
    assert "WARN user: running as root with no [server] user" in r.stdout
    assert r.returncode == 0, r.stdout
    srv = PostgateServer(testnet, tmp_path, address=HERE, server={"user": "nobody"})
    r = pg_cmd("check", "--config", str(srv.config))
    assert "WARN user: running as root" not in r.stdout and "PASS config" in r.stdout
    # pytest's temporary directory is root's (mode 0700): nobody could not re-read anything on a reload
    assert f"WARN user: nobody cannot read {srv.config}, " in r.stdout


# --- 6. logs in Postfix's format, read by fail2ban and pflogsumm ------------------------------------------

LINE = re.compile(r"^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d mail\.own\.test postgate/(\w+)\[(\d+)\]: (.*)$")


@pytest.fixture(scope="module")
def logged(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PostgateServer, dict]]:  # type: ignore[type-arg]
    """One server, a known mix of traffic, its log: what the log tests read."""
    d = tmp_path_factory.mktemp("logged")
    pg = PostgateServer(testnet, d, address=LOGGED, limits=FAST_AUTH).start()
    ids: dict[str, str] = {}
    try:
        for name, rcpt, src in (("sent1", "bob@dane-ok.test", VERIFIED), ("sent2", "carol@dane-ok.test", LIAR),
                                ("deferred", "b@nostarttls.test", VERIFIED)):
            code, text = send(secrets.token_hex(8), rcpt, src, LOGGED)
            assert code == 250
            ids[name] = text.split()[-1]
        code, _ = send(secrets.token_hex(8), "d@nullmx.test", VERIFIED, LOGGED)  # null MX: bounced pre-queue
        assert code // 100 == 5
        for _ in range(3):  # failed AUTH, three times
            with tls(client(587, address=LOGGED, source=OUTSIDE)) as s, \
                    pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("mallory", "guess")
        with tls(client(address=LOGGED, source=OUTSIDE)) as s:  # relay denied, twice
            s.mail("spam@client.test")
            assert s.rcpt("x@dane-ok.test")[0] == 554
            assert s.rcpt("y@dane-ok.test")[0] == 554
        yield pg, ids
    finally:
        pg.stop()


def test_log_lines_are_postfix_lines(logged: tuple[PostgateServer, dict]) -> None:  # type: ignore[type-arg]
    pg, ids = logged
    text = pg.log()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert all(LINE.match(ln) for ln in lines), [ln for ln in lines if not LINE.match(ln)][:3]
    assert {LINE.match(ln).group(2) for ln in lines} == {str(pg.proc.pid)}  # type: ignore[union-attr]
    # client= is the verified reverse DNS name, not the HELO name; unverified: unknown
    assert f"postgate/smtpd[{pg.proc.pid}]: {ids['sent1']}: client=client.own.test[{VERIFIED}]" in text  # type: ignore[union-attr]
    assert f"{ids['sent2']}: client=unknown[{LIAR}]" in text
    assert "helo.example[" not in text
    assert re.search(rf"postgate/qmgr\[\d+\]: {ids['sent1']}: from=<a@client.test>, size=\d+, nrcpt=1", text)
    # relay=host[addr]:port, delay= and delays=a/b/c/d, dsn=, status=
    assert re.search(rf"postgate/smtp\[\d+\]: {ids['sent1']}: to=<bob@dane-ok.test>, relay=mx.dane-ok.test\[127\.0\.1\.\d+\]:25, "
                     r"delay=[\d.]+, delays=[\d.]+/[\d.]+/[\d.]+/[\d.]+, dsn=2\.0\.0, status=sent \(250 ", text)
    # a deferral after a contacted MX names it (not relay=none)
    assert re.search(rf"{ids['deferred']}: to=<b@nostarttls.test>, relay=mx.nostarttls.test\[127\.0\.1\.\d+\]:25, "
                     r"delay=.*status=deferred \(", text)
    assert re.search(rf"postgate/smtpd\[\d+\]: warning: unknown\[{OUTSIDE}\]: SASL (PLAIN|LOGIN) authentication failed: ", text)
    assert (f"NOQUEUE: reject: RCPT from unknown[{OUTSIDE}]: 554 5.7.1 <x@dane-ok.test>: Relay access denied; "
            "from=<spam@client.test> to=<x@dane-ok.test> proto=ESMTP helo=<client.test>") in text


def test_fail2ban_postfix_filter_matches(logged: tuple[PostgateServer, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    pg, _ = logged
    log = tmp_path / "mail.log"
    log.write_text(pg.log())
    # the stock filter; only the daemon name differs (a jail sets it the same way)
    r = subprocess.run(["fail2ban-regex", "-v", str(log), r"postfix[mode=aggressive, _daemon=postgate/\w+]"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"Lines: \d+ lines, \d+ ignored, (\d+) matched", r.stdout)
    # every failed AUTH (smtplib tries PLAIN, then LOGIN: 2 per login) and both relay refusals, nothing else
    failed_auth = pg.log().count("authentication failed:")
    denied = pg.log().count("Relay access denied;")
    assert failed_auth >= 3 and denied == 2
    assert m and int(m.group(1)) == failed_auth + denied, r.stdout


def test_pflogsumm_counts_a_postgate_log(logged: tuple[PostgateServer, dict], tmp_path: Path) -> None:  # type: ignore[type-arg]
    pg, _ = logged
    log = tmp_path / "mail.log"
    log.write_text(pg.log())
    r = subprocess.run(["pflogsumm", "--syslog-name=postgate", "--smtpd-stats", str(log)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    counts = {k: int(v) for v, k in re.findall(r"^\s+(\d+)\s+(received|delivered|deferred|bounced|rejected)\b",
                                              r.stdout, re.M)}
    assert counts == {"received": 4, "delivered": 2, "deferred": 1, "bounced": 1, "rejected": 2}, r.stdout
    assert "client.own.test" in r.stdout  # senders by host/domain


def test_syslog_target(testnet: TestNet, tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        pg = PostgateServer(testnet, tmp_path, address=HERE, log={"target": "syslog", "syslog_socket": path})
        proc = subprocess.Popen([sys.executable, "-m", "postgate.cli", "serve", "--config", str(pg.config)])
        try:
            got = []
            while not any(g.endswith(": ready") for g in got):
                got.append(sock.recv(65536).decode().rstrip("\0"))  # Python's SysLogHandler ends with NUL
            # RFC 3164 PRI: facility mail (2) * 8 + info (6) = 22; the tag is postgate/program[pid]
            assert any(g.startswith(f"<22>postgate/master[{proc.pid}]: listening: mx") for g in got), got
            assert any(g.startswith(f"<20>postgate/master[{proc.pid}]: warning: check: WARN") for g in got), got
            proc.terminate()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# --- 7. the queue command ----------------------------------------------------------------------------------

def test_queue_list_never_creates_the_spool(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "x"
    r = pg_cmd("queue", "list", "--spool", str(missing))
    assert r.returncode == 66 and f"{missing}: no such directory" in r.stderr
    assert not (tmp_path / "nonexistent").exists()
    r = pg_cmd("queue", "--spool", str(tmp_path), "list")
    assert r.returncode == 66 and "not a Postgate spool" in r.stderr


def test_deferred_after_prequeue_is_listed_deferred_and_show_prints_no_none(testnet: TestNet, tmp_path: Path) -> None:
    pg = serve(testnet, tmp_path)
    try:
        _code, text = send(secrets.token_hex(8), "b@nostarttls.test")
        qid = text.split()[-1]
        assert "queued as" in text
        r = pg_cmd("queue", "--spool", str(pg.spool), "list")
        assert re.search(rf"^{qid} deferred ", r.stdout, re.M), r.stdout
        r = pg_cmd("queue", "--spool", str(pg.spool), "show", qid)
        assert r.returncode == 0 and "None" not in r.stdout and "state: deferred" in r.stdout
        assert "(pre-queue)" in r.stdout
    finally:
        assert pg.stop() == 0


# --- 8. the command line -------------------------------------------------------------------------------------

def test_version_json_and_help_texts() -> None:
    r = pg_cmd("--version")
    assert r.returncode == 0 and re.fullmatch(r"postgate \d+\.\d+\.\d+\S*\n", r.stdout)
    r = pg_cmd("serve", "--json")
    assert r.returncode == 2 and "unrecognized arguments: --json" in r.stderr

    def walk(p: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from walk(sp, f"{path} {name}")
            elif a.help != argparse.SUPPRESS and not a.help:
                yield f"{path} {'/'.join(a.option_strings) or a.dest}"
    assert list(walk(cli.make_parser(), "postgate")) == []


def test_deliver_without_a_dkim_key_refuses(testnet: TestNet, tmp_path: Path) -> None:
    srv = PostgateServer(testnet, tmp_path, address=HERE, dkim={"key_directory": str(tmp_path / "nokeys")})
    (tmp_path / "nokeys").mkdir()
    r = pg_cmd("deliver", "--config", str(srv.config), "--from", "a@own.test", "--to", "bob@dane-ok.test",
               input="Subject: x\n\nhi\n")
    assert r.returncode == 78 and "refusing to send it unsigned" in r.stderr
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "Every outgoing\nmessage is DKIM-signed" in readme or "Every outgoing message is DKIM-signed" in readme
    assert (Path(__file__).parent.parent / "docs" / "maps.md").exists()


def test_example_config_loads(tmp_path: Path) -> None:
    """docs/postgate.toml.example loads (its files placed under a temporary /etc/postgate)."""
    from postgate import config as configmod
    text = (Path(__file__).parent.parent / "docs" / "postgate.toml.example").read_text()
    etc = tmp_path / "etc-postgate"
    (etc / "dkim").mkdir(parents=True)
    (etc / "users").write_text("")
    (etc / "users").chmod(0o600)
    example = etc / "postgate.toml"
    example.write_text(text.replace("/etc/postgate/", f"{etc}/"))
    cfg = configmod.load(example)
    assert cfg.server.user == "postgate" and cfg.metrics.listen == "127.0.0.1:9108" and cfg.server.workers == 2
    assert [ls.name for ls in cfg.listener] == ["mx", "submission", "submissions"]
    assert cfg.relay.credentials_file == str(etc / "users")


# --- systemd: sd_notify READY/RELOADING/STOPPING/WATCHDOG, and the privilege drop --------------------------

def test_sd_notify_and_watchdog(testnet: TestNet, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        env = dict(os.environ, NOTIFY_SOCKET=path, WATCHDOG_USEC="200000")
        pg = PostgateServer(testnet, tmp_path, address=HERE)
        old = os.environ.copy()
        os.environ.update(env)
        try:
            pg.start()
        finally:
            os.environ.clear()
            os.environ.update(old)
        try:
            def until(state: str) -> list[str]:
                seen = []
                while True:
                    d = sock.recv(4096).decode()
                    seen.append(d)
                    if state in d.split("\n"):
                        return seen
            assert any(d.startswith("READY=1") for d in until("READY=1"))
            until("WATCHDOG=1")
            until("WATCHDOG=1")   # again: pinged while the daemon runs
            assert pg.proc is not None
            pg.proc.send_signal(signal.SIGHUP)
            seen = until("RELOADING=1")
            assert re.search(r"MONOTONIC_USEC=\d+", seen[-1])
            until("READY=1")
            pg.proc.send_signal(signal.SIGTERM)
            until("STOPPING=1")
            assert pg.proc.wait(30) == 0
        finally:
            if pg.proc is not None and pg.proc.poll() is None:
                pg.proc.kill()


def _status(pid: int) -> dict[str, str]:
    return dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in ln)


# The test machine's Python lives under /root (mode 0700), where an unprivileged user cannot import from
# (an installed Postgate lives under /usr or /opt). The daemon runs in a private mount namespace whose /root
# is a world-traversable tmpfs with only the Python installation bind-mounted back in.
_OPEN_ROOT = ('set -e; keep=$(mktemp -d); mount --bind /root/.pyenv "$keep"; '
              'mount -t tmpfs -o mode=0755 tmpfs /root; mkdir /root/.pyenv; mount --bind "$keep" /root/.pyenv; '
              'exec "$@"')


def test_privilege_drop_to_user(testnet: TestNet) -> None:
    nobody = pwd.getpwnam("nobody")
    d = Path(tempfile.mkdtemp(prefix="postgate-drop-"))   # under /tmp (0755 path): reachable by nobody
    d.chmod(0o755)
    try:
        pg = PostgateServer(testnet, d / "pg", address=HERE, server={"user": "nobody", "workers": 2},
                            prequeue={"mode": "queue-first"})
        if Path(sys.prefix).resolve().is_relative_to("/root") or Path(sys.base_prefix).is_relative_to("/root"):
            pg.wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c", _OPEN_ROOT, "sh"]
        pg.start()
        try:
            assert pg.proc is not None
            children = [int(p) for p in Path(f"/proc/{pg.proc.pid}/task/{pg.proc.pid}/children").read_text().split()]
            assert children
            for pid in [pg.proc.pid, *children]:
                st = _status(pid)
                assert st["Uid"].split() == [str(nobody.pw_uid)] * 4, (pid, st["Uid"])
                assert st["Gid"].split() == [str(nobody.pw_gid)] * 4
                assert st["Groups"].split() in ([], [str(nobody.pw_gid)])
                assert st["CapEff"].strip("0\t ") == ""   # no capability left
            # it still listens on port 25 and writes its spool (queue-first: every message goes through it)
            tokens = [secrets.token_hex(8) for _ in range(6)]
            for t in tokens:
                assert "queued as" in send(t, "bob@dane-ok.test")[1]
            assert wait_for(lambda: all(stored(testnet, "mx.dane-ok.test", t) for t in tokens), 60)
            assert (pg.spool / "messages").stat().st_uid == nobody.pw_uid
            assert "running as nobody" in pg.log()
            # a reload re-reads everything as nobody: check names what nobody cannot read, then it works
            r = pg_cmd("check", "--config", str(pg.config))
            assert "WARN user: nobody cannot read" in r.stdout and "credentials" in r.stdout
            for f in [pg.config, d / "pg" / "credentials", *(d / "pg" / "dkim").rglob("*"), d / "pg" / "dkim"]:
                os.chown(f, nobody.pw_uid, nobody.pw_gid)
            r = pg_cmd("check", "--config", str(pg.config))
            assert "WARN user" not in r.stdout, r.stdout
            assert pg_cmd("reload", "--config", str(pg.config)).returncode == 0
            assert wait_for(lambda: len(set(re.findall(r"\[(\d+)\]: reloaded ", pg.log()))) == 2), pg.log()[-2000:]
            assert "reload refused" not in pg.log() and "unusable" not in pg.log()
        finally:
            assert pg.stop() == 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


# --- metrics ---------------------------------------------------------------------------------------------

def test_metrics_with_workers_under_load(testnet: TestNet, tmp_path: Path) -> None:
    listen = f"{HERE}:9108"
    pg = serve(testnet, tmp_path, server={"workers": 2}, metrics={"listen": listen})
    url = f"http://{listen}/metrics"
    scrapes: list[str] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            scrapes.append(urllib.request.urlopen(url, timeout=10).read().decode())
    try:
        scraper = threading.Thread(target=scrape)
        scraper.start()
        results: list[int] = []

        def sender(n: int) -> None:
            for _ in range(n):
                results.append(send(secrets.token_hex(8), "bob@dane-ok.test")[0])
        senders = [threading.Thread(target=sender, args=(5,)) for _ in range(4)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        send(secrets.token_hex(8), "b@nostarttls.test")   # one deferral
        done.set()
        scraper.join()
        assert results == [250] * 20 and len(scrapes) > 1
        text = urllib.request.urlopen(url, timeout=10).read().decode()

        def value(name: str, **labels: str) -> float:
            total = 0.0
            for m in re.finditer(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", text, re.M):
                if all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
                    total += float(m.group(2))
            return total
        assert value("postgate_messages_received_total", listener="mx", outcome="accepted") == 21
        assert value("postgate_deliveries_total", outcome="delivered") == 20
        assert value("postgate_deliveries_total", outcome="deferred") == 1
        assert value("postgate_delivery_latency_seconds_count", outcome="delivered") == 20
        assert value("postgate_dnssec_verdicts_total", verdict="secure") >= 21
        assert value("postgate_smtpd_connections_total", listener="mx") >= 21
        assert value("postgate_smtpd_sessions", listener="mx") == 0
        assert value("postgate_queue_messages", state="incoming") == 1
        assert value("postgate_queue_oldest_age_seconds") > 0
        # both processes counted: the smtpd lines carry two PIDs
        assert len(set(re.findall(r"postgate/smtpd\[(\d+)\]: \w+: client=", pg.log()))) == 2
        r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        done.set()
        assert pg.stop() == 0


# --- pure parts: the log vocabulary, the unit file, the dashboard ------------------------------------------

@pytest.mark.parametrize(("arrival", "start", "end", "connected", "want"), [
    # (arrival, attempt start, attempt end, connection set up) -> Postfix's delay=, delays=a/b/c/d
    (1000.0, 1000.0, 1000.41, 1000.2, "delay=0.41, delays=0/0/0.20/0.21"),       # pre-queue: no wait before
    (1000.0, 1300.0, 1301.5, None, "delay=302, delays=300/0/1.50/0"),           # a retry: delay since arrival
    (1000.0, 1000.001, 1000.003, None, "delay=0, delays=0/0/0/0"),              # nothing measurable
    (1000.0, 1012.0, 1013.0, 1012.5, "delay=13.0, delays=12.0/0/0.50/0.50"),
])
def test_delay_and_delays(arrival: float, start: float, end: float, connected: float | None, want: str) -> None:
    from postgate.policy.logline import arrival_of, delays
    from postgate.policy.vocab import new_queue_id
    qid = new_queue_id(arrival)
    assert arrival_of(qid) == pytest.approx(arrival, abs=1e-6)
    assert delays(qid, start, end, connected) == want
    # an id without a time in it: the attempt's start stands for the arrival
    assert delays("not-a-queue-id", start, end, connected).split(", delays=")[1].startswith("0/0/")


@pytest.mark.parametrize(("logger", "level", "message", "want"), [
    ("postgate.smtpd", "WARNING", "unknown[192.0.2.1]: SASL PLAIN authentication failed: x",
     "postgate/smtpd[42]: warning: unknown[192.0.2.1]: SASL PLAIN authentication failed: x"),
    ("postgate.delivery", "WARNING", "0005F2A9C1B7E3A1B2C3: to=<b@example.net>, relay=none, status=deferred (x)",
     "postgate/smtp[42]: 0005F2A9C1B7E3A1B2C3: to=<b@example.net>, relay=none, status=deferred (x)"),
    ("postgate.queue", "INFO", "0005F2A9C1B7E3A1B2C3: removed", "postgate/qmgr[42]: 0005F2A9C1B7E3A1B2C3: removed"),
    ("postgate.smtpd", "INFO", "NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 554 5.7.1 x",
     "postgate/smtpd[42]: NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 554 5.7.1 x"),
    ("postgate", "ERROR", "reload refused", "postgate/master[42]: error: reload refused"),
    ("postgate", "CRITICAL", "refusing to start: x", "postgate/master[42]: fatal: refusing to start: x"),
    ("postgate.local", "INFO", "x", "postgate/lmtp[42]: x"),
    ("postgate.something.new", "INFO", "x", "postgate/master[42]: x"),
])
def test_postfix_formatter(logger: str, level: str, message: str, want: str) -> None:
    import logging

    from postgate.logfmt import PostfixFormatter
    rec = logging.LogRecord(logger, getattr(logging, level), __file__, 1, message, None, None)
    rec.process = 42
    rec.created = time.mktime((2026, 12, 2, 3, 4, 5, 0, 0, -1))
    assert PostfixFormatter(with_header=False).format(rec) == want
    assert PostfixFormatter(hostname="mail").format(rec) == f"Dec  2 03:04:05 mail {want}"


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    unit = (Path(__file__).parent.parent / "packaging" / "systemd" / "postgate.service").read_text()
    settings = {}
    for ln in unit.splitlines():
        if "=" in ln and not ln.startswith("#"):
            k, _, v = ln.partition("=")
            settings.setdefault(k, v)
    assert settings["Type"] == "notify" and settings["ExecReload"].endswith("postgate reload --config "
                                                                             "/etc/postgate/postgate.toml")
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "CAP_NET_BIND_SERVICE" in settings["CapabilityBoundingSet"] and int(settings["WatchdogSec"]) > 0
    assert settings["RestartPreventExitStatus"] == "78"   # a configuration error is not retried
    # systemd's own checker, with the binary where this test's Postgate is
    staged = tmp_path / "postgate.service"
    staged.write_text(unit.replace("/opt/postgate/bin/postgate", str(Path(sys.executable).parent / "postgate")))
    r = subprocess.run(["systemd-analyze", "verify", str(staged)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_grafana_dashboard_uses_declared_metrics() -> None:
    import json

    from postgate.policy.metrics import METRICS
    dash = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"postgate_[a-z_]+", e)}
    known = {"postgate_queue_messages", "postgate_queue_oldest_age_seconds"}
    for name, m in METRICS.items():
        known |= {f"postgate_{name}_total"} if m.kind == "counter" else {f"postgate_{name}"}
        if m.kind == "histogram":
            known |= {f"postgate_{name}_{s}" for s in ("bucket", "sum", "count")}
    assert used and used <= known, used - known
    assert {m.removesuffix("_bucket") for m in used} >= {"postgate_delivery_latency_seconds",
                                                          "postgate_messages_received_total"}


# --- the test network from a second shell ----------------------------------------------------------------

def test_testnet_shell_enters_a_running_network(tmp_path: Path) -> None:
    """`python -m fixtures.testnet shell -- CMD` runs CMD in the namespaces of a running `up` (here one
    started in a namespace of its own, inside this test's)."""
    repo = Path(__file__).parent.parent
    up = subprocess.Popen([sys.executable, "-m", "fixtures.netns", sys.executable, "-m", "fixtures.testnet", "up",
                           "--state", str(tmp_path / "state")], cwd=repo, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if line.startswith("up;"):
                break
        else:
            pytest.fail("the test network did not come up")
        assert "fixtures.testnet shell" in line
        r = subprocess.run([sys.executable, "-m", "fixtures.testnet", "shell", "--", "dig", "@127.0.53.53", "+short",
                            "mx", "dane-ok.test"], cwd=repo, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "10 mx.dane-ok.test.", r.stdout + r.stderr
        assert "nsenter --target" in r.stderr
    finally:
        up.terminate()
        up.wait(60)   # the namespace ends with it (unshare --kill-child): nothing survives


@pytest.mark.parametrize(("text", "want"), [
    ('[log]\ntarget = "journal"\n', ':2: [log] target: \'journal\' is not stderr or syslog'),
    ('[log]\nsyslog_facility = "kern"\n', ":2: [log] syslog_facility: 'kern' is not one of mail"),
    ('[metrics]\nlisten = "localhost:9108"\n', ":2: [metrics] listen: 'localhost:9108' is not ADDRESS:PORT"),
    ('[server]\nuser = "Bad User"\n', ":2: [server] user: 'Bad User' is not a user name"),
])
def test_ops_settings_are_checked(tmp_path: Path, text: str, want: str) -> None:
    from postgate import config as configmod
    p = tmp_path / "postgate.toml"
    p.write_text(text)
    with pytest.raises(configmod.ConfigError, match=re.escape(f"{p}{want}")):
        configmod.load(p)


def test_sd_notify_abstract_socket() -> None:
    from postgate import systemd
    name = f"postgate-test-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        old = os.environ.get("NOTIFY_SOCKET")
        os.environ["NOTIFY_SOCKET"] = "@" + name
        try:
            assert systemd.ready("up")
            assert s.recv(100) == b"READY=1\nSTATUS=up"
        finally:
            os.environ.pop("NOTIFY_SOCKET")
            if old is not None:
                os.environ["NOTIFY_SOCKET"] = old
    assert not systemd.notify("READY=1")   # not run by systemd: nothing, no error


def test_every_setting_is_documented_once_and_settings_prints_it() -> None:
    """docs/configuration.md is the one reference: every key the loader knows has its row, and no row
    names a key the loader does not know; `postgate settings` prints them."""
    from dataclasses import fields

    from postgate import config as configmod
    from postgate import settings
    table = settings.load()
    known = {f"{name}.{f.name}" for name, cls in configmod.SECTIONS.items() for f in fields(cls)}
    known |= {f"listener.{f.name}" for f in fields(configmod.ListenerSettings)}
    # the repeatable [[milter]]/[[policy_service]] tables are loaded from FILTER_SECTIONS, not SECTIONS
    known |= {f"{name}.{f.name}" for name, cls in configmod.FILTER_SECTIONS.items() for f in fields(cls)}
    names, section = [], ""   # each documented once: no second row for a key (parse() would keep the last)
    for ln in settings.SOURCE.read_text().splitlines():
        if ln.startswith("## "):
            section = m.group(1) if (m := settings._SECTION.match(ln)) else ""
        elif section and ln.startswith("| `") and f"{section}.{ln.split('`')[1]}" in table:
            names.append(f"{section}.{ln.split('`')[1]}")
    assert len(names) == len(set(names)) == len(table)
    assert set(table) == known, (sorted(known - set(table)), sorted(set(table) - known))
    r = pg_cmd("settings", "server.user", "dkim.required")
    assert r.returncode == 0 and r.stdout.startswith('server.user = ""\n    type: user name\n')
    assert "dkim.required = true" in r.stdout
    assert pg_cmd("settings", "server.nosuch").returncode == 64
