"""A TCP relay in front of the real S3 server that interrupts one checkpoint upload mid-transfer: at the
k-th request of the N-th checkpoint directory's upload it resets every connection and refuses new ones for
a while, then relays again. The S3 server stays up; only the network between client and server fails."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import time


class UploadCut:
    """Relays 127.0.0.1:`port` to `upstream`. Once armed, cuts at the `cut_at_request`-th PUT/POST below
    `prefix` (a path such as b"/checkpoints/runs/NAME/") into the `cut_at`-th distinct `checkpoint_*`
    directory (a multipart upload's first request only starts it: the second carries data)."""

    def __init__(self, upstream: tuple[str, int], refuse_s: float, cut_at_request: int = 2) -> None:
        self.upstream, self.refuse_s, self.cut_at_request = upstream, refuse_s, cut_at_request
        self.pattern: re.Pattern[bytes] | None = None
        self.cut_at = 0
        self.directories: dict[bytes, int] = {}  # write requests per checkpoint directory, in first-seen order
        self.cut_at_time: float | None = None
        self.refused = 0
        self._refuse_until = 0.0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def arm(self, prefix: bytes, cut_at: int) -> None:
        with self._lock:
            # A directory, not Ray's checkpoint_manager_snapshot.json beside them.
            self.pattern = re.compile(rb"(?:PUT|POST) " + re.escape(prefix) + rb"(checkpoint_[^/ ?]+)/")
            self.cut_at = cut_at

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self._reset_all()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if time.monotonic() < self._refuse_until:
                self.refused += 1
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:  # the S3 server itself is down (the outage of the same test)
                _reset(client)
                continue
            with self._lock:
                self._open |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, requests: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if requests and self._inspect(data):
                    return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                _reset(s)

    def _inspect(self, data: bytes) -> bool:
        """True when this request starts the cut (it is not passed on)."""
        cut = False
        with self._lock:
            for match in self.pattern.finditer(data) if self.pattern else ():
                name = match.group(1)
                self.directories[name] = self.directories.get(name, 0) + 1
                index = list(self.directories).index(name) + 1
                if index == self.cut_at and self.directories[name] == self.cut_at_request and not self.cut_at_time:
                    self.cut_at_time = time.time()
                    self._refuse_until = time.monotonic() + self.refuse_s
                    cut = True
        if cut:
            self._reset_all()
        return cut

    def _reset_all(self) -> None:
        with self._lock:
            sockets, self._open = list(self._open), set()
        for s in sockets:
            _reset(s)


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset (linger 0), waking a thread blocked in recv on it."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
