"""Listening sockets for policyd, made in one place.

Either from ``listen`` in policyd.cf (inet v4/v6 and unix endpoints; inet
ones with SO_REUSEPORT when ``listen_reuse_port = yes``, so that several
policyd processes can share a port) or,
under systemd socket activation (LISTEN_PID is our pid and LISTEN_FDS > 0),
from the inherited descriptors 3, 4, ...; ``listen`` is then ignored.  The
activation variables are removed from the environment in both cases, as
sd_listen_fds(unset_environment=1) does, so children never inherit them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import MutableMapping
from dataclasses import dataclass

from memtable.cf import decimal
from memtable.endpoint import Endpoint
from policyd import limits
from policyd.config import PolicydConfig
from policyd.errors import ListenerError

SD_LISTEN_FDS_START = 3
_ACTIVATION_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


@dataclass
class Listener:
    """A listening stream socket and how to name it in logs."""

    sock: socket.socket
    name: str
    unlink_path: str | None = None  # a UNIX socket file we created
    file_id: tuple[int, int] = (0, 0)  # its (st_dev, st_ino)

    def close(self) -> None:
        """Close the socket and remove the socket file we created, unless
        another process has replaced it meanwhile."""
        self.sock.close()
        if self.unlink_path is not None:
            with contextlib.suppress(OSError):
                st = os.lstat(self.unlink_path)
                if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == self.file_id:
                    os.unlink(self.unlink_path)
            self.unlink_path = None


def open_listeners(config: PolicydConfig,
                   environ: MutableMapping[str, str] | None = None) -> list[Listener]:
    """Return policyd's listening sockets (inherited from systemd or bound).

    Raises ListenerError naming the endpoint on any failure; sockets opened
    before the failure are closed.
    """
    env = os.environ if environ is None else environ
    inherited = _inherited_fds(env)
    if inherited:
        return _adopt(inherited)
    listeners: list[Listener] = []
    try:
        for endpoint in config.listen:
            listeners.append(_bind(endpoint, config.unix_socket_mode,
                                   config.listen_reuse_port))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _inherited_fds(env: MutableMapping[str, str]) -> list[int]:
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    for name in _ACTIVATION_VARS:
        env.pop(name, None)
    if not pid or not count:
        return []
    if decimal(pid) != os.getpid():
        return []  # meant for another process (e.g. our parent)
    fds = decimal(count)
    if fds is None or not 0 < fds <= limits.MAX_INHERITED_FDS:
        raise ListenerError(f"socket activation: bad LISTEN_FDS={count!r}")
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + fds))


def _adopt(fds: list[int]) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for fd in fds:
            try:
                sock = socket.socket(fileno=fd)
            except OSError as exc:
                raise ListenerError(f"socket activation: fd {fd}: {exc.strerror}") from None
            listeners.append(Listener(sock, f"fd {fd} {_describe(sock)}"))
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                    socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                raise ListenerError(f"socket activation: fd {fd} is not a listening "
                                    "stream socket")
            sock.set_inheritable(False)
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _describe(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "(unnamed)"
    if sock.family == socket.AF_UNIX:
        return f"unix:{addr or '(unnamed)'}"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        return str(Endpoint("inet", host=addr[0], port=addr[1]))
    return str(addr)


def _bind(endpoint: Endpoint, unix_mode: int, reuse_port: bool = False) -> Listener:
    try:
        if endpoint.kind == "unix":
            return _bind_unix(endpoint.path, unix_mode)
        return bind_inet(endpoint, reuse_port)
    except OSError as exc:
        raise ListenerError(f"cannot listen on {endpoint}: {exc.strerror or exc}") from None


def bind_inet(endpoint: Endpoint, reuse_port: bool = False) -> Listener:
    """A listening TCP socket on an inet endpoint (also the metrics
    endpoint's); OSError (socket.gaierror for a name) when it cannot be had."""
    infos = socket.getaddrinfo(endpoint.host, endpoint.port, endpoint.family,
                               socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            # Several policyd processes on one port (listen_reuse_port):
            # the kernel spreads new connections over them.  Without it a
            # second process on the port fails with "address in use".
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::] must not also take the IPv4 port another listener may want.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(limits.LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return Listener(sock, _describe(sock))


def _unix_in_use(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(limits.UNIX_PROBE_TIMEOUT_SECONDS)
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def _bind_unix(path: str, mode: int) -> Listener:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"cannot listen on unix:{path}: exists and is not a socket")
        if _unix_in_use(path):
            raise ListenerError(f"cannot listen on unix:{path}: another server listens there")
        os.unlink(path)  # stale socket of an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        try:
            # Before listen(): nobody can connect while the mode is still wrong.
            os.chmod(path, mode)
            st = os.lstat(path)
            sock.listen(limits.LISTEN_BACKLOG)
        except BaseException:
            os.unlink(path)
            raise
    except BaseException:
        sock.close()
        raise
    return Listener(sock, f"unix:{path}", unlink_path=path, file_id=(st.st_dev, st.st_ino))
