"""A tiny non-blocking HTTP/1.1 client on raw sockets and one ``selectors`` loop, for load generation.

Cheap enough to hold thousands of keep-alive connections from one thread, each bound to its own source
address, and to time every response on one clock without being the bottleneck.
Only what the benchmarks need: requests we build ourselves, responses with ``Content-Length``.

Times are ``time.time()`` seconds. A response's arrival time is the kernel's receive timestamp of its last
segment (``SO_TIMESTAMPNS``), so it does not include how long this loop took to get to that socket
among a thousand ready ones.
"""

from __future__ import annotations

import errno
import selectors
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS has the same value
_ANCILLARY = socket.CMSG_SPACE(16)


class LoopTimeout(RuntimeError):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    at: float  # time.time() when the last byte arrived (kernel receive timestamp)


def parse_response(buf: bytearray) -> tuple[int, dict[str, str], bytes] | None:
    """Take one complete response off the front of ``buf``, or None if it is not all there yet."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    total = end + 4 + int(headers.get("content-length", "0"))
    if len(buf) < total:
        return None
    body = bytes(buf[end + 4 : total])
    del buf[:total]
    return status, headers, body


def request_bytes(
    method: str, path: str, host: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if body or method in ("PUT", "POST"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Loop:
    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()

    def run_until(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LoopTimeout(f"{what}: not done after {timeout_s:.0f} s")
            for key, mask in self.sel.select(min(remaining, 0.05)):
                key.data.handle(mask)

    def run_for(self, seconds: float) -> None:
        """Serve whatever happens for ``seconds``."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            for key, mask in self.sel.select(min(remaining, 0.05)):
                key.data.handle(mask)

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            key.data.close()
        self.sel.close()


class Conn:
    """One keep-alive connection; ``on_response(conn, response)`` is called for each full response."""

    def __init__(
        self,
        loop: Loop,
        dest: tuple[str, int],
        on_response: Callable[[Conn, Response], None],
        source: str | None = None,
    ) -> None:
        self.loop = loop
        self.on_response = on_response
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        if source is not None:
            self.sock.bind((source, 0))
        self.connected = False
        self.closed = False
        self.out = bytearray()
        self.buf = bytearray()
        self.state = ""
        self.pending = 0  # requests sent and not yet answered
        err = self.sock.connect_ex(dest)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, f"connect to {dest} from {source}: {errno.errorcode.get(err, err)}")
        loop.sel.register(self.sock, selectors.EVENT_WRITE, self)

    def send(self, data: bytes) -> None:
        """Send one request (queued until the connection is up)."""
        self.pending += 1
        self.out += data
        if self.connected:
            self._flush()

    def _flush(self) -> None:
        if self.out:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                n = 0
            del self.out[:n]
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0)
        self.loop.sel.modify(self.sock, events, self)

    def handle(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            if not self.connected:
                err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, f"connect failed: {errno.errorcode.get(err, err)}")
                self.connected = True
            self._flush()
        if mask & selectors.EVENT_READ:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, _ANCILLARY)
            except BlockingIOError:
                return
            if not data:
                self.close()
                if self.pending:
                    raise ConnectionError(f"server closed the connection (state {self.state!r})")
                return  # an idle keep-alive connection the server let go
            now = time.time()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    sec, nsec = struct.unpack("qq", value[:16])
                    now = sec + nsec * 1e-9
            self.buf += data
            while (parsed := parse_response(self.buf)) is not None:
                self.pending -= 1
                self.on_response(self, Response(*parsed, at=now))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.sel.unregister(self.sock)
            self.sock.close()
