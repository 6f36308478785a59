"""Raw HTTP/1.1 probes of the service's limits: bodies sent in chunks (with or without
``Content-Length``), bodies that stop arriving. Standard library only; used by the tests and by
``bench/limits.py``.

    answer = send_body("http://127.0.0.1:3000", "/act", chunks(50 << 20), chunked=True)
    answer.status  # 413, sent after the first ~32 MiB: the rest is never sent
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass
class RawAnswer:
    """What the server answered.

    Attributes:
        status: the HTTP status (``None`` if the connection closed without an answer).
        headers: response headers, lower-case names.
        body: the response body.
        sent: body bytes written before the server answered or closed.
        seconds: from the first byte sent to the end of the answer.
    """

    status: int | None
    headers: dict[str, str]
    body: bytes
    sent: int
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def chunks(total: int, size: int = 64 * 1024, fill: bytes = b" ") -> Iterator[bytes]:
    """``total`` bytes of ``fill`` in pieces of ``size`` (JSON whitespace by default)."""
    block = (fill * (size // len(fill) + 1))[:size]
    while total > 0:
        yield block[: min(size, total)]
        total -= size


def send_body(
    url: str,
    path: str,
    body: Iterable[bytes],
    chunked: bool = True,
    content_length: int | None = None,
    headers: dict[str, str] | None = None,
    stall_s: float = 0.0,
    timeout: float = 60.0,
) -> RawAnswer:
    """POSTs ``body`` piece by piece and stops sending as soon as the server answers.

    Args:
        chunked: ``Transfer-Encoding: chunked``; otherwise ``content_length`` is sent as
            ``Content-Length`` (it may promise more bytes than ``body`` holds: a stalled body).
        stall_s: after the last piece, wait this long for the answer without finishing the body
            (no terminating chunk); ``0``: finish the body normally.
        timeout: longest wait for the answer.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    if chunked:
        head.append("Transfer-Encoding: chunked")
    elif content_length is not None:
        head.append(f"Content-Length: {content_length}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sent, start = 0, time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        answered = False
        try:
            for piece in body:
                if select.select([sock], [], [], 0)[0]:  # the server answered (or closed)
                    answered = True
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                sent += len(piece)
            if not answered and stall_s <= 0 and chunked:
                sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server stopped reading: its answer may already be in the socket
        sock.settimeout(max(timeout, stall_s))
        status, headers_out, data = _read_answer(sock)
    return RawAnswer(status, headers_out, data, sent, time.perf_counter() - start)


def _read_answer(sock: socket.socket) -> tuple[int | None, dict[str, str], bytes]:
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            piece = sock.recv(65536)
            if not piece:
                break
            data += piece
        if b"\r\n\r\n" not in data:
            return None, {}, data
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "-1"))
        while length < 0 or len(rest) < length:
            piece = sock.recv(65536)
            if not piece:
                break
            rest += piece
        return status, headers, rest[:length] if length >= 0 else rest
    except (ConnectionResetError, TimeoutError):
        return None, {}, data
