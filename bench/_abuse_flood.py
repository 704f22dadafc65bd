"""Holds idle TCP connections to one port for bench/abuse.py's connection flood.

A process holds only as many sockets as its open-file limit allows (often 20,000 in all,
and the bench needs some for itself), so the bench starts as many of these as it takes.
Each raises its own soft limit to the hard one, opens COUNT connections (non-blocking
connects, a few hundred in flight) from source addresses FIRST_ADDRESS upwards, PER_ADDRESS
on each (so that no single client address is what the server's per-client cap catches),
sends nothing, and prints `opened N failed M SECONDS`. Then, on each line read from stdin,
it prints `closed K`: how many of its connections the server has closed so far (EOF or a
reset). When stdin closes it closes everything and exits.

    python bench/_abuse_flood.py PORT COUNT FIRST_ADDRESS PER_ADDRESS
"""

from __future__ import annotations

import errno
import ipaddress
import os
import resource
import selectors
import socket
import sys
import time

IN_FLIGHT = 256
# Linux: pick the source port at connect(), not bind(), so ports are shared across addresses.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONNECT_PATIENCE = 30.0


def raise_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def open_all(
    port: int, count: int, first: ipaddress.IPv4Address, per_address: int
) -> tuple[list[socket.socket], int]:
    """Open `count` connections; the connected sockets and how many failed."""
    sel = selectors.DefaultSelector()
    connected: list[socket.socket] = []
    failed = 0
    started = 0
    deadline = time.monotonic() + CONNECT_PATIENCE
    while (started < count or sel.get_map()) and time.monotonic() < deadline:
        while started < count and len(sel.get_map()) < IN_FLIGHT:
            source = str(first + started // per_address)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            started += 1
            try:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((source, 0))
                sock.setblocking(False)
                code = sock.connect_ex(("127.0.0.1", port))
            except OSError:
                sock.close()
                failed += 1
                continue
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
                continue
            sel.register(sock, selectors.EVENT_WRITE)
        for key, _ in sel.select(timeout=0.5):
            sock = key.fileobj  # type: ignore[assignment]
            sel.unregister(sock)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                sock.close()
                failed += 1
            else:
                connected.append(sock)
    for key in list(sel.get_map().values()):  # still connecting at the deadline
        key.fileobj.close()  # type: ignore[union-attr]
        failed += 1
    sel.close()
    return connected, failed


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    first, per_address = ipaddress.IPv4Address(sys.argv[3]), int(sys.argv[4])
    raise_limit()
    t0 = time.monotonic()
    sockets, failed = open_all(port, count, first, per_address)
    print(f"opened {len(sockets)} failed {failed} {time.monotonic() - t0:.3f}", flush=True)
    sel = selectors.DefaultSelector()
    for sock in sockets:
        sel.register(sock, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    closed = 0
    pending = b""
    while True:
        for key, _ in sel.select(timeout=1.0):
            if key.fileobj is sys.stdin:
                data = os.read(sys.stdin.fileno(), 4096)
                if not data:
                    for sock in sockets:
                        sock.close()
                    return
                pending += data
                while b"\n" in pending:
                    _, pending = pending.split(b"\n", 1)
                    print(f"closed {closed}", flush=True)
                continue
            sock = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(1)
            except OSError:
                data = b""
            if not data:  # the server closed it (anything it sent instead is ignored)
                sel.unregister(sock)
                closed += 1


if __name__ == "__main__":
    main()
