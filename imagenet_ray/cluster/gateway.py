"""Port forwarding from 127.0.0.1 into the cluster's network, like `kubectl port-forward`.

Listening sockets arrive bound, as inherited fds; this process then joins the services host's
namespace, so connections it opens land in the cluster (a socket keeps its namespace). Why:
docs/cluster.md ("The local multi-host cluster"). Usage: `--netns NS --forward FD=HOST:PORT ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import socket
import sys
from collections.abc import Awaitable, Callable

CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """setns(2) into /run/netns/<name> (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _handler(target: tuple[str, int]) -> Handler:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, upstream_w), _pipe(upstream_r, client_w))

    return handle


async def serve(forwards: list[tuple[int, tuple[str, int]]]) -> None:
    servers = []
    for fd, target in forwards:
        listener = socket.socket(fileno=fd)
        servers.append(await asyncio.start_server(_handler(target), sock=listener))
    print(
        "gateway ready: "
        + ", ".join(
            f"{s.sockets[0].getsockname()[1]}→{t[0]}:{t[1]}" for s, (_, t) in zip(servers, forwards, strict=True)
        ),
        flush=True,
    )
    await asyncio.gather(*(s.serve_forever() for s in servers))


def _forward(text: str) -> tuple[int, tuple[str, int]]:
    fd, _, target = text.partition("=")
    host, _, port = target.rpartition(":")
    return int(fd), (host, int(port))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--netns", default=None, help="namespace to open connections in (none: this one)")
    parser.add_argument("--forward", action="append", type=_forward, required=True, help="FD=HOST:PORT")
    args = parser.parse_args(argv)
    if args.netns:
        enter_netns(args.netns)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.forward))
    return 0


if __name__ == "__main__":
    sys.exit(main())
