"""Server and listener specs, parsed in one place.

``inet:host:port``, ``inet:[v6addr]:port`` and ``unix:/path`` name memcached
servers (the ``memcache`` table parameter) and policyd listeners (``listen``,
``metrics_listen``) alike.  A bare ``host:port`` means inet and a bare
``/path`` means unix, as Postfix accepts.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Literal

from memtable.cf import decimal
from memtable.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    """Where to connect or listen."""

    kind: Literal["inet", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"inet:{host}:{self.port}"

    @property
    def family(self) -> socket.AddressFamily:
        if self.kind == "unix":
            return socket.AF_UNIX
        return socket.AF_INET6 if ":" in self.host else socket.AF_INET


def parse_endpoint(spec: str) -> Endpoint:
    """Parse ``inet:host:port``, ``inet:[v6]:port``, ``unix:/path``.

    Raises ConfigError (without file/line: callers add them) on bad specs.
    """
    spec = spec.strip()
    if spec.startswith("unix:") or spec.startswith("/"):
        path = spec[5:] if spec.startswith("unix:") else spec
        if not path:
            raise ConfigError(f'"{spec}": empty UNIX socket path')
        return Endpoint("unix", path=path)
    if spec.startswith("inet:"):
        rest = spec[5:]
    elif spec.count(":") == 1 or spec.startswith("["):
        rest = spec  # bare host:port or [v6]:port
    else:
        kind = spec.split(":", 1)[0]
        raise ConfigError(f'"{spec}": unsupported endpoint type "{kind}:" '
                          "(use inet:host:port, inet:[v6addr]:port or unix:/path)")
    if rest.startswith("["):
        host, sep, port_text = rest[1:].partition("]")
        if not sep or not port_text.startswith(":"):
            raise ConfigError(f'"{spec}": expected inet:[address]:port')
        port_text = port_text[1:]
    else:
        host, sep, port_text = rest.rpartition(":")
        if not sep:
            raise ConfigError(f'"{spec}": expected inet:host:port or unix:/path')
        if ":" in host:
            raise ConfigError(f'"{spec}": put an IPv6 address in brackets: inet:[addr]:port')
    if not host:
        raise ConfigError(f'"{spec}": empty host name')
    problem = _impossible_host(host)
    if problem:
        raise ConfigError(f'impossible host name "{host}": {problem}')
    return Endpoint("inet", host=host, port=_parse_port(port_text, spec))


# DNS limits (RFC 1035): 63 octets a label, 253 a name (without the final dot).
_LABEL_MAX = 63
_NAME_MAX = 253
_BLANK_OR_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def _impossible_host(host: str) -> str:
    """Why no resolver can look host up ("" when it may exist).

    Such a name is a typo; caught here, it is a configuration error with the
    file and line instead of an error at the first connect (Python's IDNA
    encoding raises UnicodeError, not OSError, for an empty or long label).
    """
    try:
        ipaddress.ip_address(host)
        return ""
    except ValueError:
        pass
    if _BLANK_OR_CONTROL.search(host):
        return "white space or control characters"
    labels = host.removesuffix(".").split(".")
    if any(not label for label in labels):
        return "empty label"
    if any(len(label) > _LABEL_MAX for label in labels if label.isascii()):
        return f"a label longer than {_LABEL_MAX} bytes"
    try:
        encoded = host.removesuffix(".").encode("idna")
    except UnicodeError as exc:
        return f"not a valid international name ({exc.__cause__ or exc})"
    if len(encoded) > _NAME_MAX:
        return f"longer than {_NAME_MAX} bytes"
    return ""


def _parse_port(text: str, spec: str) -> int:
    if text.isascii() and text.isdigit():
        port = decimal(text)
        if port is not None and port <= 65535:
            return port
        raise ConfigError(f'"{spec}": port {text} out of range')
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ConfigError(f'"{spec}": unknown port name "{text}"') from None
