"""Free TCP ports on 127.0.0.1, picked all at once, from a range nobody else picks from.

Ports are drawn between 20000 and the kernel's ephemeral range (above weed's and Ray's fixed defaults,
below what the kernel hands out to port-0 binds), checked by binding, all held until all are known.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOCALHOST = "127.0.0.1"
QUIET_FIRST = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def quiet_range() -> tuple[int, int] | None:
    """[first, last] ports that neither fixed service defaults nor the kernel's ephemeral ports use."""
    try:
        ephemeral_first = int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_first = 32768  # Linux default; macOS/BSD start at 49152, so this is safe there too
    last = min(ephemeral_first, 32768) - 1
    return (QUIET_FIRST, last) if last - QUIET_FIRST >= 1000 else None


def _try_bind(host: str, port: int) -> socket.socket | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # No SO_REUSEADDR: a port that is bound, listening or in TIME_WAIT is never handed out.
        s.bind((host, port))
        return s
    except OSError:
        s.close()
        return None


def free_ports(count: int, host: str = LOCALHOST) -> list[int]:
    """`count` distinct ports that are free on `host` right now (see module docstring)."""
    if count < 0:
        raise ValueError("count must be >= 0")
    socks: list[socket.socket] = []
    try:
        span = quiet_range()
        if span is not None:
            first, last = span
            for port in random.SystemRandom().sample(range(first, last + 1), min(last - first + 1, 20 * count + 50)):
                if len(socks) == count:
                    break
                s = _try_bind(host, port)
                if s is not None:
                    socks.append(s)
        while len(socks) < count:
            s = _try_bind(host, 0)
            if s is None:
                raise OSError(f"cannot bind any port on {host}")
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
