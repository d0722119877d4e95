"""Private server processes for the benchmarks, all on loopback.

memcached (own port, own memory), postgrey (the Debian package's
/usr/sbin/postgrey, run in the foreground with its own database directory,
never the system instance or its files), policyd (the example config from
deploy/policyd/ with ports and paths moved into the run's directory) and
the do-nothing server; and two policyd variants that show where policyd's
time goes: without the backups, and with stores that cost nothing
(bench.nostore).  Each is started, waited for until it answers a
real request, and stopped by its own process id.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.requests import POOL_CLIENTS, pool_address
from policyd.devrun import memcached_answers

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "policyd"
POSTGREY = "/usr/sbin/postgrey"
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
# Same greylisting delay for both servers: the default of both.
GREYLIST_DELAY = 300

PROBE = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
         b"client_address=192.0.2.1\nclient_name=probe.example\n"
         b"reverse_client_name=probe.example\nhelo_name=probe.example\n"
         b"sender=probe@example.org\nrecipient=probe@example.com\nrecipient_count=0\n"
         b"instance=0.0.0.0\nsize=0\n\n")


class ServerError(Exception):
    """A server would not start or answer."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status_kib(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS), 0 if it is gone."""
    return _status_kib(pid, "VmRSS")


def anon_kib(pid: int) -> int:
    """The anonymous part of the RSS (heap, stacks): what a leak grows.
    VmRSS also counts mapped file pages, such as an lmdb backup's map,
    which grow with the data and are the kernel's to drop."""
    return _status_kib(pid, "RssAnon")


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of pid from /proc/PID/stat: every
    thread of the process (ended ones included) and its waited-for
    children; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0
    # Field 2 (comm) may hold spaces and parentheses: count after the last ")".
    fields = text[text.rindex(")") + 2:].split()
    return sum(int(x) for x in fields[11:15])  # fields 14-17 of proc(5)


def _live_children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
        except OSError:
            pass  # the thread ended, or a kernel without CONFIG_PROC_CHILDREN
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) that pid has used so far: all its threads,
    its children that ended, and its running descendants.  The resolution
    is the kernel's clock tick (usually 10 ms): a difference over a load
    point of several seconds is exact to a few microseconds per request."""
    ticks, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        ticks += _stat_cpu_ticks(p)
        todo += _live_children(p)
    return ticks / _CLOCK_TICKS


def ask_policy(sock: socket.socket, request: bytes) -> bool:
    """Send one policy request; True when a whole ``action=`` reply came."""
    sock.sendall(request)
    buf = b""
    while not buf.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        if not chunk:
            return False
        buf += chunk
    return buf.startswith(b"action=")


def policy_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            return ask_policy(s, PROBE)
    except OSError:
        return False


@dataclass
class Server:
    """A started server: one process, or several sharing one port."""

    name: str
    procs: list[subprocess.Popen[bytes]]
    host: str
    port: int
    log: Path
    # Run after the processes stopped (a private memcached, a DNS server).
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.procs[0].pid

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rss_kib(self) -> int:
        return sum(rss_kib(p.pid) for p in self.procs)

    def anon_kib(self) -> int:
        return sum(anon_kib(p.pid) for p in self.procs)

    def cpu_seconds(self) -> float:
        """CPU time the server's processes have used so far (cpu_seconds)."""
        return sum(cpu_seconds(p.pid) for p in self.procs)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, wait: float = STOP_SECONDS) -> None:
        """Terminate, then kill what is left after ``wait`` seconds; never
        raises, so that every process gets its turn (safe to call twice)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(wait)
        while self.cleanup:
            with contextlib.suppress(Exception):
                self.cleanup.pop()()


def _spawn(name: str, argv: list[str], log: Path, host: str, port: int,
           ready: str = "policy", copies: int = 1) -> Server:
    """Start ``copies`` processes of argv (copies > 1: they share the port)
    and wait until the port answers."""
    server = Server(name, [], host, port, log)
    try:  # whatever goes wrong (a failed copy, Ctrl-C), no copy is left behind
        with open(log, "ab") as out:
            for _ in range(copies):
                server.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                                     stderr=subprocess.STDOUT, cwd=ROOT))
        check = memcached_answers if ready == "memcached" else policy_answers
        deadline = time.monotonic() + STARTUP_SECONDS
        while not check(host, port) or (copies > 1 and not _all_listening(server)):
            if not server.alive() or time.monotonic() > deadline:
                raise ServerError(
                    f"{name} did not start ({' '.join(argv)}):\n{server.log_tail()}")
            time.sleep(0.05)
    except BaseException:
        server.stop()
        raise
    return server


def _all_listening(server: Server) -> bool:
    """Every process of server holds a listening socket on its port (with
    SO_REUSEPORT each has its own), so the first to start does not take
    all the connections of the first load point."""
    port_hex = f":{server.port:04X}"
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                for line in f.readlines()[1:]:
                    fields = line.split()
                    if fields[1].endswith(port_hex) and fields[3] == "0A":  # LISTEN
                        listening.add(fields[9])  # inode
        except OSError:
            pass
    return len(listening) >= len(server.procs)


def start_memcached(workdir: Path, memory_mb: int = 256) -> Server:
    binary = shutil.which("memcached") or "/usr/bin/memcached"
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    return _spawn("memcached", [binary, *user, "-l", "127.0.0.1", "-p", str(port), "-U", "0",
                                "-m", str(memory_mb), "-c", "4096"],
                  workdir / "memcached.log", "127.0.0.1", port, ready="memcached")


def start_null(workdir: Path) -> Server:
    port = free_port()
    return _spawn("null", [sys.executable, "-m", "bench.nullserver", "--port", str(port)],
                  workdir / "null.log", "127.0.0.1", port)


def start_postgrey(workdir: Path, extra: tuple[str, ...] = ()) -> Server:
    """postgrey with its own database and empty whitelists (as policyd's
    default config has none), logging to a file instead of syslog; ``extra``
    postgrey options go last (a later --delay wins)."""
    if not os.access(POSTGREY, os.X_OK):
        raise ServerError(f"{POSTGREY} not found (Debian package postgrey)")
    port = free_port()
    home = workdir / "postgrey"
    dbdir = home / "db"
    dbdir.mkdir(parents=True, exist_ok=True)
    empty = home / "empty-whitelist"
    empty.write_text("")
    argv = [POSTGREY, f"--inet=127.0.0.1:{port}", f"--dbdir={dbdir}",
            f"--delay={GREYLIST_DELAY}", f"--whitelist-clients={empty}",
            f"--whitelist-recipients={empty}", "--listen-queue-size=999", *extra]
    if os.geteuid() == 0:
        # postgrey drops root to its own user; that user must reach dbdir.
        user = "postgrey"
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            user, pw = "nobody", pwd.getpwnam("nobody")
        # Every directory from the temp dir down (mkdtemp makes them 0700).
        tmp = Path(tempfile.gettempdir()).resolve()
        for d in (home.resolve(), *home.resolve().parents):
            if d == tmp or tmp not in d.parents:
                break
            d.chmod(0o755)
        os.chown(dbdir, pw.pw_uid, pw.pw_gid)
        argv += [f"--user={user}", f"--group={pw.pw_gid}"]
    return _spawn("postgrey", argv, workdir / "postgrey.log", "127.0.0.1", port)


def write_policyd_config(workdir: Path, memcached: Server, port: int, *,
                         backups: bool = True) -> Path:
    """deploy/policyd/*.cf, with /etc/policyd and /var/lib/policyd moved to
    workdir, memcached's port and policyd's listen port replaced; without
    ``backups``, the memcache tables lose their ``backup`` lines."""
    conf = workdir / "policyd"
    conf.mkdir(parents=True, exist_ok=True)
    for name in ("policyd.cf", "triplets.cf", "clients.cf"):
        text = (DEPLOY / name).read_text()
        text = text.replace("/etc/policyd", str(conf)).replace("/var/lib/policyd", str(conf))
        text = text.replace("inet:127.0.0.1:11211", f"inet:127.0.0.1:{memcached.port}")
        text = text.replace("inet:127.0.0.1:10023", f"inet:127.0.0.1:{port}")
        if not backups:
            text = "".join(line for line in text.splitlines(keepends=True)
                           if not line.startswith("backup"))
        (conf / name).write_text(text)
    return conf / "policyd.cf"


def policyd_command() -> list[str]:
    script = Path(sys.executable).parent / "policyd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "policyd"]


def policyd_config_ok(cf: Path) -> tuple[bool, str]:
    """Whether ``policyd --check-config`` accepts cf (and exists at all)."""
    try:
        done = subprocess.run([*policyd_command(), "--check-config", "-c", str(cf)],
                              capture_output=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    text = (done.stdout + done.stderr).decode(errors="replace").strip()
    return done.returncode == 0, text


def start_policyd(workdir: Path, memcached: Server, instances: int = 1) -> Server:
    """policyd with the example configuration; ``instances`` > 1 starts
    that many processes on one port (listen_reuse_port = yes), sharing the
    memcached and the lmdb backup files, as docs/operations.md describes."""
    return _start_policyd("policyd", workdir, memcached, instances)


def start_policyd_nobackup(workdir: Path, instances: int = 1) -> Server:
    """policyd as start_policyd starts it, its memcache tables without
    backups, on a memcached of its own (its triplets are new to it too)."""
    return _start_beside("policyd-nobackup", workdir, instances, backups=False)


def start_policyd_nostore(workdir: Path, instances: int = 1) -> Server:
    """policyd as start_policyd starts it, its stores answered from dicts in
    the process (bench.nostore): the server and the policy alone."""
    return _start_beside("policyd-nostore", workdir, instances, backups=False,
                         command=[sys.executable, "-m", "bench.nostore"])


def _start_beside(name: str, workdir: Path, instances: int, *, backups: bool = True,
                  command: list[str] | None = None) -> Server:
    """A policyd variant in workdir/name, with a memcached of its own."""
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    memcached = start_memcached(home)
    try:
        server = _start_policyd(name, home, memcached, instances, backups=backups,
                                command=command)
    except BaseException:
        memcached.stop()
        raise
    server.cleanup.append(memcached.stop)
    return server


def _start_policyd(name: str, home: Path, memcached: Server, instances: int,
                   extra: str = "", *, backups: bool = True,
                   command: list[str] | None = None) -> Server:
    """policyd named ``name`` with the example configuration written in
    ``home``, plus ``extra`` settings, checked before it starts; run as
    ``command`` (default: the policyd command)."""
    port = free_port()
    cf = write_policyd_config(home, memcached, port, backups=backups)
    if extra:
        with open(cf, "a") as f:
            f.write(extra)
    ok, text = policyd_config_ok(cf)
    if not ok:
        raise ServerError(f"policyd --check-config failed:\n{text[-2000:]}")
    argv = [*(command or policyd_command()), "-c", str(cf)]
    if instances > 1:
        argv += ["-o", "listen_reuse_port=yes"]
    return _spawn(name, argv, home / "policyd.log", "127.0.0.1", port, copies=instances)


# policyd-dns: the same policyd with two DNS lists on a private nsd; the
# score is computed and logged but decides nothing (no thresholds), so the
# requests take the same greylisting path as plain policyd's: the
# difference is the cost of DNS.  One pool client in ten is on each list.
DNS_SITES = "bl.bench.test*2, wl.bench.test=127.0.[0..255].[1..3]*-2"
DNS_TTL = 3600  # the listed answers stay cached; NXDOMAIN for the SOA minimum (60 s)


def dns_zones() -> dict[str, str]:
    listed = [pool_address(i) for i in range(0, POOL_CLIENTS, 10)]
    allowed = [pool_address(i) for i in range(5, POOL_CLIENTS, 10)]

    def records(addresses: list[str], answer: str) -> str:
        return "".join(f"{'.'.join(reversed(a.split('.')))} {DNS_TTL} IN A {answer}\n"
                       for a in addresses)

    return {"bl.bench.test": records(listed, "127.0.0.2"),
            "wl.bench.test": records(allowed, "127.0.10.2")}


def start_policyd_dns(workdir: Path, instances: int = 1) -> Server:
    """policyd as start_policyd starts it, with dnsbl_sites asking a private
    nsd (tests/dnslab.py: Debian's nsd on a loopback port), and its own
    memcached, so that its triplets are new to it as they are to plain policyd."""
    from tests.dnslab import start_nsd  # the tests' nsd set-up, reused

    home = workdir / "policyd-dns"
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        memcached = start_memcached(home)
        stack.callback(memcached.stop)
        try:
            nsd = stack.enter_context(start_nsd(home / "nsd", dns_zones()))
        except (RuntimeError, OSError) as exc:
            raise ServerError(f"nsd did not start: {exc}") from None
        server = _start_policyd(
            "policyd-dns", home, memcached, instances,
            f"\n# bench: DNS on\ndns_servers = {nsd.spec}\ndnsbl_sites = {DNS_SITES}\n")
        server.cleanup.append(stack.pop_all().close)
        return server
    raise AssertionError("unreachable")  # (mypy: the with block returns or raises)
