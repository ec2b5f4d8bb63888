"""``python -m ddp_demo.rendezvous``: the rendezvous store, run on a host that trains nothing.

    python -m ddp_demo.rendezvous [--host ADDR] [--port 29400]

By default torchrun's c10d rendezvous keeps its key-value store inside node 0's agent, so losing
node 0 ends the job whatever ``--nnodes=MIN:MAX`` allows. This runs the same store, torch's
``TCPStore``, as a process of its own: start it first, then every node with
``RDZV_EXTERNAL=1 RDZV_HOST=<this host> launch/multinode.sh``, which gives every agent
``--rdzv-conf is_host=0`` so that each one is a client. Any training node may then be lost;
this host may not (docs/elastic.md, "A store no node hosts").

It prints one line when it listens and one when it stops (SIGTERM or SIGINT, exit 0). A port
already taken, or an address this host does not have, is one line and exit 2.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import signal
import socket
import sys
from datetime import timedelta

from torch.distributed import TCPStore

from ddp_demo.doctor.plan import DEFAULT_RDZV_PORT as DEFAULT_PORT  # torchrun's, and launch/multinode.sh's

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
PROG = "ddp_demo.rendezvous"


class StoreProblem(RuntimeError):
    """The store cannot listen where it was asked to; the message is the one line the user sees."""


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="The c10d rendezvous store alone, on a host that "
                                     "trains nothing: then no training node is special (docs/elastic.md).")
    parser.add_argument("--host", default="0.0.0.0",
                        help="the address to listen on [default: 0.0.0.0, every address of this host]")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"the port to listen on; 0 lets the system pick a free one [default: {DEFAULT_PORT}]")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number; use one from 0 to 65535")
    return args


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on ``host:port``, bound here rather than by TCPStore: its libuv server
    binds every address whatever ``host`` says, and reports a taken port as a C++ traceback."""
    try:
        addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        raise StoreProblem(f"--host {host} does not resolve; pass one of this host's addresses (`ip -br addr`), "
                           "or 0.0.0.0 for all of them") from None
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does: TIME_WAIT is no conflict
    try:
        sock.bind((addr, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise StoreProblem(f"port {port} is already in use on {host}; pass another --port, or stop what "
                               f"listens there (`ss -ltnp 'sport = :{port}'`)") from None
        raise StoreProblem(f"cannot listen on {host}:{port} ({e.strerror}); pass one of this host's addresses "
                           "(`ip -br addr`), or 0.0.0.0 for all of them") from None
    return sock


def serve(sock: socket.socket) -> TCPStore:
    """The store's server on ``sock``, started without waiting for any client (wait_for_workers).
    The store takes the socket over: it closes it when it stops."""
    addr, port = sock.getsockname()[:2]
    if ipaddress.ip_address(addr).is_unspecified:  # the store's own client must dial a real address
        addr = "::1" if ":" in addr else "127.0.0.1"
    return TCPStore(addr, port, is_master=True, wait_for_workers=False, master_listen_fd=sock.detach(),
                    timeout=timedelta(seconds=30))


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        sock = listen(args.host, args.port)
    except StoreProblem as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sock_addr, port = sock.getsockname()[:2]
    where = f"{args.host}:{port}"
    # Blocked before the store's threads start, so that they inherit the mask and the signals
    # wait for sigwait below instead of killing the process midway.
    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        store = serve(sock)
        host = "<this host's address>" if ipaddress.ip_address(sock_addr).is_unspecified else args.host
        print(f"{PROG}: the store listens on {where}; start every node with RDZV_EXTERNAL=1 RDZV_HOST={host} "
              f"RDZV_PORT={port}", flush=True)
        stopped_by = signal.sigwait(STOP_SIGNALS)
        del store  # stops its server and closes the socket: the agents' next request fails at once
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    print(f"{PROG}: stopped by {signal.Signals(stopped_by).name}; the store at {where} is gone", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
