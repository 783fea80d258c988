"""A byte source on the box's side and a drain on the laptop's, for forwarding benchmarks."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time

CHUNK = os.urandom(1 << 20)


def start_source(size_mb: int) -> socketserver.ThreadingTCPServer:
    """A TCP server on 127.0.0.1 that sends ``size_mb`` MiB to each connection."""

    class Source(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            for _ in range(size_mb):
                self.request.sendall(CHUNK)

    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Source)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def drain(port: int, size_mb: int) -> float:
    """Read one connection's bytes through a local port; MB/s."""
    t0 = time.perf_counter()
    got = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        while chunk := s.recv(1 << 20):
            got += len(chunk)
    assert got == size_mb << 20, got
    return got / (time.perf_counter() - t0) / 1e6
