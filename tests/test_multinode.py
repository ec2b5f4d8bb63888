"""Multi-node training, proven: two torchrun agents (``--nnodes=2``, c10d rendezvous), each
started by ``launch/multinode.sh``, train the model one process trains (float64, within 1e-10)
across two real hosts (network namespaces), and the same launch without gradient sync does not.
(Two agents on one machine over 127.0.0.1 are the same launch with less in the way: the hosts'
own addresses and interfaces are what can go wrong, so that is what runs here.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ddp_demo.core.tolerances import WHOLE_RUN

from .forked import forked_runs
from .helpers import load, max_diff
from .nodes import MULTINODE, Host, node_env, run_nodes, two_hosts

FLAGS = ["--dtype", "float64", "--steps", "6", "--global-batch-size", "16", "--seed", "5", "--model", "mlp"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one plain process, no launcher (forked from the warm server: tests/forked.py)."""
    d = tmp_path_factory.mktemp("single")
    proc = forked_runs({"single": (0, [*FLAGS, "--out", str(d)])}, {"single": d})["single"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load(d / "final.pt")


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


def host_env(host: Host, store: Host, port: int, node_rank: int) -> dict[str, str]:
    """What an operator sets on each machine: node 0's address, and this node's own address and NIC."""
    return {"RDZV_HOST": store.addr, "RDZV_PORT": str(port), "NODE_RANK": str(node_rank),
            "LOCAL_ADDR": host.addr, "GLOO_SOCKET_IFNAME": host.ifname}


@pytest.fixture(scope="module")
def host_jobs(hosts, tmp_path_factory) -> dict:
    """Two jobs on the two hosts at once, each node started by launch/multinode.sh with its own
    rendezvous port (4 agents on 2 cores: fine): synced, with ``--preflight``, and the control,
    the same launch with DDP's all-reduce disabled. ``{name: (out dir, [node 0, node 1], wall s)}``."""
    a, b = hosts
    d = tmp_path_factory.mktemp("hosts")
    jobs = {"synced": ["--preflight"], "control": ["--skip-grad-sync"]}
    commands, envs = [], []
    for name, extra in jobs.items():
        port = a.free_port()
        cmd = [MULTINODE, *FLAGS, *extra, "--out", str(d / name)]
        commands += [a.cmd(*cmd), b.cmd(*cmd)]
        envs += [host_env(a, a, port, 0), host_env(b, a, port, 1)]
    start = time.perf_counter()
    nodes = run_nodes(commands, envs, cwd=d)
    wall = time.perf_counter() - start
    return {name: (d / name, nodes[2 * i : 2 * i + 2], wall) for i, name in enumerate(jobs)}


def test_two_hosts_equal_one_process(hosts, host_jobs, single):
    out, nodes, wall = host_jobs["synced"]
    for host, node in zip(hosts, nodes, strict=True):
        print(f"--- {host.netns} ({host.addr} on {host.ifname}), exit {node.returncode} ---\n{node.stdout}")
        assert node.returncode == 0, node.stderr[-3000:]
        assert "7 of 7 checks passed" in node.stdout  # the doctor, run by launch/multinode.sh
    print(f"two hosts: wall time {wall:.1f} s (the control job ran beside it)")
    stdout = "".join(n.stdout for n in nodes)
    assert stdout.count("preflight: 6 launch checks passed") == 1  # the same checks in the workers
    assert stdout.count("training mlp on 2 process(es)") == 1  # one world of 2, rank 0 speaks once
    diff = max_diff(load(out / "final.pt"), single)
    print(f"two hosts vs one process: max |difference| in final.pt = {diff:.3g}")
    assert diff <= WHOLE_RUN


def test_negative_control_two_hosts_without_gradient_sync_differ(host_jobs, single):
    """The same launch with DDP's all-reduce disabled: the check above must be able to fail."""
    out, nodes, _ = host_jobs["control"]
    assert any(n.returncode != 0 for n in nodes)
    assert "ranks hold different parameters" in "".join(n.stderr for n in nodes)
    assert max_diff(load(out / "final.pt"), single) > 1e-3


def doctor_on(host: Host, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(host.cmd(sys.executable, "-m", "ddp_demo.doctor"), env=node_env(env),
                          capture_output=True, text=True, timeout=60)


def test_doctor_on_a_second_host_catches_the_traps(hosts):
    """Node 1 without LOCAL_ADDR / GLOO_SOCKET_IFNAME: the hostname resolves to an address the
    other host cannot reach. Then a rendezvous address nobody holds, and a name nothing resolves."""
    a, b = hosts
    healthy = host_env(b, a, a.free_port(), 1)
    assert doctor_on(b, healthy).returncode == 0
    bare = {k: v for k, v in healthy.items() if k not in ("LOCAL_ADDR", "GLOO_SOCKET_IFNAME")}
    traps = {
        "hostname": bare,
        "is unreachable": {**healthy, "RDZV_HOST": a.addr.rsplit(".", 1)[0] + ".3"},
        "does not resolve": {**healthy, "RDZV_HOST": "node0.invalid"},  # no route to any DNS server here
        "names no interface": {**healthy, "GLOO_SOCKET_IFNAME": "eth0"},  # copied from another machine
    }
    for verdict, env in traps.items():
        proc = doctor_on(b, env)
        assert proc.returncode == 1 and verdict in proc.stdout, proc.stdout
        assert proc.stdout.count("FAIL") == 1 and "fix: " in proc.stdout
