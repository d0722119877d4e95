"""deploy/: the files an operator installs are valid and agree with each other.

systemd's own tools check the units (systemd-analyze verify), the sysusers
and tmpfiles snippets (applied under a temporary --root); memcached runs
with the drop-in's command line; Postfix reads the shared memcached through
the deployed .cf files next to policyd's tables.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memtable import open_table
from memtable.config import MemcacheConfig
from memtable.endpoint import parse_endpoint
from memtable.limits import MEMCACHED_RELATIVE_TTL_MAX
from policyd import limits
from policyd.config import PolicydConfig
from tests.conftest import Memcached, free_port
from tests.postfixcf import backdate, postfix_config_dir
from tests.postfixlab import requires_postmap, run_postmap
from tests.wait import WAIT

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
SERVICE = SYSTEMD / "policyd.service"
TEMPLATE = SYSTEMD / "policyd@.service"
SOCKET = SYSTEMD / "policyd.socket"
POLICYD_CF = DEPLOY / "policyd" / "policyd.cf"
MAIN_CF = DEPLOY / "postfix" / "main.cf.snippet"
MEMCACHED_DROPIN = DEPLOY / "memcached" / "loopback.conf"
STATE_DIR = "/var/lib/policyd"
# Every memcache table of the deployment: policyd's and Postfix's.
SHARED_TABLES = [DEPLOY / "policyd" / "triplets.cf", DEPLOY / "policyd" / "clients.cf",
                 DEPLOY / "postfix" / "postscreen_cache.cf",
                 DEPLOY / "postfix" / "verify_cache.cf"]

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
requires_systemd = pytest.mark.skipif(
    not SYSTEMD_ANALYZE, reason="systemd-analyze not installed (Debian package systemd)")


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}} (keys repeat; an
    empty assignment, which resets a list in systemd, is kept as "")."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        assert not line.endswith("\\"), f"{path}: continuation lines not expected"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep, f"{path}: bad line {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def only(section: dict[str, list[str]], key: str) -> str:
    values = [v for v in section[key] if v]
    assert len(values) == 1, (key, values)
    return values[0]


# --------------------------------------------------------------------------
# systemd units
# --------------------------------------------------------------------------

@requires_systemd
def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    # verify also checks that ExecStart's program exists: stand one in at
    # the documented install path, keeping the unit's arguments as shipped.
    service = SERVICE.read_text()
    program = only(unit(SERVICE)["Service"], "ExecStart").split()[0]
    stand_in = tmp_path / "bin" / Path(program).name
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    (tmp_path / SERVICE.name).write_text(service.replace(program, str(stand_in)))
    shutil.copy(SOCKET, tmp_path / SOCKET.name)
    result = subprocess.run(
        [str(SYSTEMD_ANALYZE), "verify", "--man=no",
         str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
        capture_output=True, text=True, timeout=WAIT, check=False, cwd=tmp_path)
    # Unknown or misspelt settings are only warnings: any output fails too.
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


@requires_systemd
def test_systemd_analyze_verify_accepts_the_instance_template(tmp_path: Path) -> None:
    program = only(unit(TEMPLATE)["Service"], "ExecStart").split()[0]
    stand_in = tmp_path / "bin" / Path(program).name
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\nexit 0\n")
    stand_in.chmod(0o755)
    instance = tmp_path / "policyd@1.service"  # as `systemctl start policyd@1` sees it
    instance.write_text(TEMPLATE.read_text().replace(program, str(stand_in)))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", "--man=no", str(instance)],
                            capture_output=True, text=True, timeout=WAIT, check=False,
                            cwd=tmp_path)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def test_instance_template_is_the_service_plus_reuse_port() -> None:
    """policyd@.service keeps every setting of policyd.service (hardening,
    limits, files); it differs only where it says "instance"."""
    service, template = unit(SERVICE), unit(TEMPLATE)
    assert template.keys() == service.keys()
    differ = {"Description", "ExecStart", "EnvironmentFile", "SyslogIdentifier"}
    for name, section in service.items():
        kept = {k: v for k, v in template[name].items() if k not in differ}
        assert kept == {k: v for k, v in section.items() if k not in differ}, name
    argv = shlex.split(only(template["Service"], "ExecStart"))
    assert argv[:3] == shlex.split(only(service["Service"], "ExecStart"))
    assert argv[3:] == ["-o", "listen_reuse_port=yes", "$POLICYD_OPTS"]
    assert only(template["Service"], "EnvironmentFile") == "-/etc/policyd/instance-%i.env"
    for line in TEMPLATE.read_text().splitlines():
        if line.startswith(("EnvironmentFile=", "SyslogIdentifier=")):
            assert "%i" in line


DEBIAN_UNITS = Path("/lib/systemd/system")


def _starts_postfix(path: Path) -> bool:
    """A Postfix unit that really starts Postfix (not Debian's /bin/true
    postfix.service, which only groups the instances)."""
    starts = unit(path).get("Service", {}).get("ExecStart", [])
    return any(re.search(r"\bpost(?:fix|multi)\b.*\bstart\b", line) for line in starts)


@pytest.mark.parametrize("path", [SERVICE, TEMPLATE], ids=lambda p: p.name)
def test_units_start_before_the_postfix_that_runs_smtpd(path: Path) -> None:
    """Postfix must find policyd listening.  On Debian 12 postfix.service is a
    oneshot running /bin/true; smtpd comes from postfix@-.service, the
    default instance of postfix@.service: the units order before both."""
    before = set(" ".join(unit(path)["Unit"]["Before"]).split())
    assert {"postfix.service", "postfix@-.service"} <= before
    # The installed postfix package agrees: each unit of it that starts
    # Postfix is one we order before (a template by its default instance).
    shipped = sorted(DEBIAN_UNITS.glob("postfix*.service"))
    for postfix_unit in filter(_starts_postfix, shipped):
        name = postfix_unit.name.replace("@.service", "@-.service")
        assert name in before, postfix_unit


@requires_systemd
def test_systemd_analyze_reports_a_broken_unit(tmp_path: Path) -> None:
    # The check above can fail: a misspelt hardening option is reported.
    broken = tmp_path / "policyd.service"
    broken.write_text(SERVICE.read_text().replace("ProtectSystem=strict",
                                                  "ProtectSystm=strict"))
    result = subprocess.run([str(SYSTEMD_ANALYZE), "verify", "--man=no", str(broken)],
                            capture_output=True, text=True, timeout=WAIT, check=False)
    assert "ProtectSystm" in result.stderr


def test_service_runs_unprivileged_with_one_writable_directory() -> None:
    service = unit(SERVICE)["Service"]
    assert only(service, "User") == "policyd" and only(service, "Group") == "policyd"
    assert only(service, "ProtectSystem") == "strict"
    assert only(service, "StateDirectory") == "policyd"
    assert [v for v in service["ReadWritePaths"] if v] == [STATE_DIR]
    assert service["CapabilityBoundingSet"] == [""]  # no capabilities at all
    assert service["AmbientCapabilities"] == [""]
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectControlGroups",
                "MemoryDenyWriteExecute", "LockPersonality", "RestrictRealtime",
                "RestrictNamespaces"):
        assert only(service, key) == "yes", key
    assert set(only(service, "RestrictAddressFamilies").split()) == {
        "AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"]
    assert only(service, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_service_runs_the_deployed_configuration() -> None:
    service = unit(SERVICE)["Service"]
    argv = shlex.split(only(service, "ExecStart"))
    assert argv[1:] == ["-c", f"/etc/{only(service, 'ConfigurationDirectory')}/policyd.cf"]
    config = PolicydConfig.from_file(str(POLICYD_CF))  # the shipped file is valid
    # systemd must not SIGKILL policyd while it finishes open requests and
    # closes its stores, each step bounded.
    stop = only(service, "TimeoutStopSec")
    assert stop.endswith("s")
    assert int(stop[:-1]) > limits.longest_stop_seconds(config.shutdown_grace)


def test_shipped_policyd_cf_names_each_setting_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every commented-out setting, uncommented, makes a valid file without
    "set again" warnings: each parameter has one place in the file."""
    text = POLICYD_CF.read_text()
    names = re.findall(r"^#?([a-z_0-9]+)\s*=", text, re.MULTILINE)
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
    uncommented = tmp_path / "policyd.cf"
    uncommented.write_text(re.sub(r"^#([a-z_0-9]+\s*=)", r"\1", text, flags=re.MULTILINE))
    with caplog.at_level("WARNING"):
        PolicydConfig.from_file(str(uncommented))
    assert [r.getMessage() for r in caplog.records] == []


def test_every_backup_is_in_the_state_directory() -> None:
    # ProtectSystem=strict: an lmdb backup anywhere else could not be written.
    for cf in (DEPLOY / "policyd").glob("*.cf"):
        if cf.name == "policyd.cf":
            continue
        backup = MemcacheConfig.from_file(str(cf)).backup
        assert backup is not None, cf
        kind, _, path = backup.partition(":")
        assert kind == "lmdb" and path.startswith(STATE_DIR + "/"), (cf, backup)


def test_socket_listens_where_policyd_and_postfix_expect() -> None:
    sock = unit(SOCKET)["Socket"]
    listen = parse_endpoint(only(sock, "ListenStream"))
    assert only(sock, "Accept") == "no"  # one policyd gets the listening socket
    config = PolicydConfig.from_file(str(POLICYD_CF))
    assert config.listen == (listen,)
    match = re.search(r"check_policy_service\s+(\S+)", MAIN_CF.read_text())
    assert match and parse_endpoint(match.group(1)) == listen
    assert "sockets.target" in unit(SOCKET)["Install"]["WantedBy"]


def test_sysusers_and_tmpfiles_create_user_and_state_dir(tmp_path: Path) -> None:
    sysusers, tmpfiles = shutil.which("systemd-sysusers"), shutil.which("systemd-tmpfiles")
    if not (sysusers and tmpfiles):
        pytest.skip("systemd-sysusers / systemd-tmpfiles not installed")
    (tmp_path / "etc").mkdir()
    (tmp_path / "var" / "lib").mkdir(parents=True)
    subprocess.run([sysusers, f"--root={tmp_path}", str(SYSTEMD / "policyd.sysusers.conf")],
                   check=True, capture_output=True, timeout=WAIT)
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("policyd:"))
    assert int(entry[2]) != 0 and entry[5] == STATE_DIR and entry[6].endswith("nologin")
    subprocess.run([tmpfiles, f"--root={tmp_path}", "--create",
                    str(SYSTEMD / "policyd.tmpfiles.conf")],
                   check=True, capture_output=True, timeout=WAIT)
    state = os.stat(tmp_path / STATE_DIR.lstrip("/"))
    assert state.st_uid == int(entry[2]) and state.st_mode & 0o777 == 0o750


# --------------------------------------------------------------------------
# memcached drop-in
# --------------------------------------------------------------------------

def test_memcached_dropin_binds_loopback_only(tmp_path: Path) -> None:
    service = unit(MEMCACHED_DROPIN)["Service"]
    assert service["ExecStart"][0] == ""  # resets the packaged ExecStart
    argv = shlex.split(service["ExecStart"][-1])
    assert argv[argv.index("-l") + 1] == "127.0.0.1"
    assert argv[argv.index("-U") + 1] == "0"  # no UDP
    # Run that exact command line on a free port: memcached accepts it.
    port = free_port()
    argv[argv.index("-p") + 1] = str(port)
    if os.geteuid() != 0:  # -u needs root; without it memcached runs as us
        i = argv.index("-u")
        del argv[i:i + 2]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mc = Memcached(proc, f"inet:127.0.0.1:{port}", host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            try:
                assert mc.raw(b"version\r\n").startswith(b"VERSION")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
                time.sleep(0.02)
        with pytest.raises(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(0.2)
            # memcached's UDP frame header, then "version": no answer when -U 0.
            udp.sendto(b"\x00\x01\x00\x00\x00\x01\x00\x00version\r\n", ("127.0.0.1", port))
            udp.recvfrom(100)
    finally:
        mc.stop()


# --------------------------------------------------------------------------
# one memcached shared by postscreen, verify and policyd
# --------------------------------------------------------------------------

def local_copy(cf: Path, tmp: Path, memcached: Memcached) -> Path:
    """cf with memcache = the test server and the backup moved into tmp."""
    text = re.sub(r"(?m)^memcache\s*=.*$", f"memcache = {memcached.spec}", cf.read_text())
    text = re.sub(r"(?m)^backup\s*=\s*lmdb:.*/([^/\s]+)$", rf"backup = lmdb:{tmp}/\1", text)
    out = tmp / cf.name
    out.write_text(text)
    return out


def test_tables_share_one_memcached_with_distinct_prefixes() -> None:
    configs = [MemcacheConfig.from_file(str(cf)) for cf in SHARED_TABLES]
    assert len({c.memcache for c in configs}) == 1
    prefixes = [c.key_format.split("%s")[0] for c in configs]
    assert all(p.endswith(":") for p in prefixes), prefixes
    for i, p in enumerate(prefixes):
        assert not any(q.startswith(p) for j, q in enumerate(prefixes) if i != j), prefixes
    # Entries must not be sent as absolute times in 1970 (> 30 days is
    # absolute for memcached; memtable converts, Postfix does not).
    for c in configs:
        if "postfix" in c.path:
            assert c.ttl <= MEMCACHED_RELATIVE_TTL_MAX, c.path


@requires_postmap
@pytest.mark.postfix
def test_postfix_and_policyd_keys_do_not_collide(tmp_path: Path, memcached: Memcached) -> None:
    postmap_config = postfix_config_dir(tmp_path)
    name = "192.0.2.25"
    copies = {cf.stem: local_copy(cf, tmp_path, memcached) for cf in SHARED_TABLES}
    for stem, path in copies.items():
        with open_table(f"memcache:{path}", read_write=True) as table:
            table.update(name, f"value-of-{stem}")
    # One item per table under the same name, each alive (ttl > 0).
    for stem, path in copies.items():
        prefix = MemcacheConfig.from_file(str(path)).key_format.replace("%s", name)
        info = memcached.meta(prefix)
        assert info is not None and info["value"] == f"value-of-{stem}", stem
        assert int(str(info["ttl"])) > 0, stem
    # Postfix itself reads its entries through the deployed .cf files.
    for stem in ("postscreen_cache", "verify_cache"):
        r = run_postmap(postmap_config, "-q", name, f"memcache:{copies[stem]}")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().strip() == f"value-of-{stem}"


def shipped_postfix_config(tmp_path: Path) -> Path:
    """A private Postfix configuration directory as docs/operations.md sets
    Postfix up: main.cf.snippet, with the verify settings verify_cache.cf
    asks for, and the shipped table files where main.cf names them."""
    conf = postfix_config_dir(tmp_path)
    verify_cf = DEPLOY / "postfix" / "verify_cache.cf"
    advice = [line.lstrip("#").strip() for line in verify_cf.read_text().splitlines()
              if re.match(r"#\s+address_verify_\w+ = ", line)]
    assert advice, "verify_cache.cf no longer says which verify times to set"
    text = MAIN_CF.read_text().replace("/etc/postfix/", f"{DEPLOY}/postfix/")
    with open(conf / "main.cf", "a") as main_cf:
        main_cf.write(text + "\n"
                      f"address_verify_map = memcache:{verify_cf}\n"
                      "address_verify_cache_cleanup_interval = 0\n"
                      + "\n".join(advice) + "\n")
    backdate(conf)
    return conf


@requires_postmap
@pytest.mark.postfix
@pytest.mark.parametrize("cf", SHARED_TABLES, ids=lambda cf: cf.name)
def test_memtable_ttl_finds_nothing_to_warn_about_in_shipped_tables(
        tmp_path: Path, cf: Path) -> None:
    """`memtable ttl` on every table file we ship, with Postfix configured
    as the docs say: no warning, so an operator who runs it learns that the
    files are right rather than wondering about a warning on them."""
    conf = shipped_postfix_config(tmp_path)
    done = subprocess.run([sys.executable, "-m", "memtable.cli", "ttl", "-c", str(conf),
                           f"memcache:{cf}"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stdout + done.stderr, done.stdout + done.stderr
    if cf.parent.name == "postfix":
        assert "uses this table" in done.stdout, done.stdout  # the check did run
