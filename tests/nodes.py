"""Helpers for multi-node tests: start several "nodes" at once, and make two real hosts.

Two hosts are two Linux network namespaces joined by a veth pair: each has its own
loopback, its own interface and its own address, and reaches the other only over that
link, as two machines on a LAN do. They share the filesystem, which plays the part of
the shared volume the outputs go to.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from .helpers import PYTHON, ROOT, clean_env

MULTINODE = str(ROOT / "launch" / "multinode.sh")


def node_env(extra: dict[str, str]) -> dict[str, str]:
    """A node's environment: no inherited launch settings, the test's python, then ``extra``."""
    return clean_env({"PYTHON": PYTHON, **extra})


def run_nodes(commands: list[list[str]], envs: list[dict[str, str]], cwd: Path,
              timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start every node at once and wait for all; at ``timeout`` kill them and fail with their output."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=node_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for cmd, env in zip(commands, envs, strict=True)]
    deadline = time.monotonic() + timeout
    outputs: list[tuple[str, str]] = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            kill_tree(p.pid)
        outputs += [p.communicate() for p in procs[len(outputs):]]
        tails = [f"--- node {i} ---\n{out[-1500:]}\n{err[-1500:]}" for i, (out, err) in enumerate(outputs)]
        raise AssertionError(f"the nodes were still running after {timeout:g} s:\n" + "\n".join(tails)) from None
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err)
            for p, (out, err) in zip(procs, outputs, strict=True)]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it. Not its process group alone: torchrun starts
    each worker in a session of its own (torch/distributed/elastic/multiprocessing/subprocess_handler)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after its last ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    todo, found = [pid], []
    while todo:
        found.append(todo.pop())
        todo += children.get(found[-1], [])
    sigkill(found)


def sigkill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:  # it exited meanwhile
            pass


@dataclass(frozen=True)
class Host:
    netns: str
    ifname: str
    addr: str

    def cmd(self, *args: str) -> list[str]:
        """``args`` run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.netns, *args]

    def pids(self) -> list[int]:
        """Every process in this host's namespace: an agent, its workers (each in a session of its own), ..."""
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(pid) for pid in out.stdout.split()]

    def power_off(self) -> None:
        """SIGKILL everything running on this host, as when a machine loses power."""
        sigkill(self.pids())

    def link(self, up: bool) -> None:
        """Plug or unplug this host's cable: its end of the veth pair goes up or down."""
        _ip("-n", self.netns, "link", "set", self.ifname, "up" if up else "down")

    def free_port(self) -> int:
        """Bind port 0 on this host's address: the kernel names a free port."""
        probe = f"import socket; s = socket.socket(); s.bind(({self.addr!r}, 0)); print(s.getsockname()[1])"
        out = subprocess.run(self.cmd(sys.executable, "-c", probe), capture_output=True, text=True, timeout=30)
        return int(out.stdout)


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode:
        raise OSError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@contextmanager
def _namespaces(hosts: tuple[Host, ...], others: tuple[str, ...] = ()) -> Iterator[None]:
    """Make a network namespace per host (and per name in ``others``); on the way out kill every
    process left in them (deleting a namespace does not end its processes) and delete them,
    which deletes their veth pairs with them."""
    made: list[str] = []
    try:
        for netns in (*others, *(host.netns for host in hosts)):
            try:
                _ip("netns", "add", netns)
            except OSError as e:  # the one reason to skip: this kernel (or sandbox) refuses namespaces
                pytest.skip(f"network namespaces are refused here, so there is no second host: {e}")
            made.append(netns)
        yield
    finally:
        for host in hosts:
            if host.netns in made:
                host.power_off()
        for netns in made:
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True, timeout=30)


def _plug_in(host: Host) -> None:
    """Give ``host`` its address on its end of the cable and bring both of its interfaces up."""
    _ip("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", host.ifname)
    _ip("-n", host.netns, "link", "set", host.ifname, "up")
    _ip("-n", host.netns, "link", "set", "lo", "up")  # a new namespace's loopback starts down


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Hosts ``a`` (x.x.x.1) and ``b`` (x.x.x.2) on a private /24 that exists only between them.

    Names are unique per run (interface names stay under Linux's 15 characters), so several
    pairs can exist at once. On the way out every process left on either host is killed and
    both namespaces are deleted (``_namespaces``).
    """
    tag = secrets.token_hex(4)
    net = f"10.213.{secrets.randbelow(254) + 1}"
    a = Host(f"ddp-a-{tag}", f"vda{tag}", f"{net}.1")
    b = Host(f"ddp-b-{tag}", f"vdb{tag}", f"{net}.2")
    with _namespaces((a, b)):
        _ip("link", "add", a.ifname, "netns", a.netns, "type", "veth", "peer", "name", b.ifname, "netns", b.netns)
        for host in (a, b):
            _plug_in(host)
        yield a, b


@contextmanager
def hosts_on_a_switch(count: int) -> Iterator[tuple[Host, ...]]:
    """``count`` hosts (x.x.x.1, x.x.x.2, ...) on one LAN: each host's cable (a veth pair) goes
    to a switch, a bridge in a namespace of its own. ``Host.link`` unplugs one host only."""
    tag = secrets.token_hex(4)
    net = f"10.214.{secrets.randbelow(254) + 1}"
    switch = f"ddp-sw-{tag}"
    hosts = tuple(Host(f"ddp-{i}-{tag}", f"vh{i}{tag}", f"{net}.{i + 1}") for i in range(count))
    with _namespaces(hosts, (switch,)):
        _ip("-n", switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", switch, "link", "set", "br0", "up")
        for i, host in enumerate(hosts):
            port = f"vs{i}{tag}"
            _ip("link", "add", host.ifname, "netns", host.netns, "type", "veth", "peer", "name", port, "netns", switch)
            _ip("-n", switch, "link", "set", port, "master", "br0", "up")
            _plug_in(host)
        yield hosts
