"""gRPC targets and bind addresses: their host, and whether they stay on this machine (stdlib only)."""

from __future__ import annotations

import ipaddress


def host_of(target: str) -> str:
    """The host of a gRPC target or bind address: "dns:///h:1" / "ipv4:h:1" / "h:1" -> "h"; "[::1]:1" -> "::1";
    a host without a port (and a bare IPv6 address) is returned as it is."""
    if "///" in target:
        target = target.split("///", 1)[1]
    for scheme in ("ipv4:", "ipv6:", "dns:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
    if target.startswith("["):
        end = target.find("]")
        return target[1:end] if end >= 0 else target[1:]
    if target.count(":") == 1:
        return target.rsplit(":", 1)[0]
    return target


def is_loopback(target: str) -> bool:
    """Whether a gRPC target or bind address names this machine only: unix sockets, localhost (and
    *.localhost), 127.0.0.0/8, ::1. "0.0.0.0" and "::" (every interface) are not."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = host_of(target).lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
