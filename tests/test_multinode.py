"""Multi-node training, proven: two torchrun agents (``--nnodes=2``, c10d rendezvous), each
started by ``launch/multinode.sh``, train the model one process trains (float64, within 1e-10)
— first both on this machine over 127.0.0.1, then across two real hosts (network namespaces)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from ddp_demo.core.tolerances import WHOLE_RUN

from .helpers import free_port, load, max_diff, train
from .nodes import MULTINODE, Host, node_env, run_nodes, two_hosts

FLAGS = ["--dtype", "float64", "--steps", "6", "--global-batch-size", "16", "--seed", "5", "--model", "mlp"]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one plain process, no launcher."""
    d = tmp_path_factory.mktemp("single")
    proc = train(*FLAGS, "--out", str(d), cwd=d)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load(d / "final.pt")



def two_local_nodes(out, *extra: str) -> tuple[list[list[str]], list[dict[str, str]]]:
    """Node 0 hosts the rendezvous store on 127.0.0.1; node 1 joins it. Same flags on both."""
    env = {"RDZV_HOST": "127.0.0.1", "RDZV_PORT": str(free_port()), "RDZV_ID": out.name}
    cmd = [MULTINODE, *FLAGS, *extra, "--out", str(out)]
    return [cmd, cmd], [{**env, "NODE_RANK": "0"}, {**env, "NODE_RANK": "1"}]


@pytest.fixture(scope="module")
def local_jobs(tmp_path_factory) -> dict:
    """Two jobs of two agents each, at once (4 agents on 2 cores: fine): synced, and the control."""
    d = tmp_path_factory.mktemp("local")
    synced, control = two_local_nodes(d / "synced", "--preflight"), two_local_nodes(d / "control", "--skip-grad-sync")
    nodes = run_nodes(synced[0] + control[0], synced[1] + control[1], cwd=d)
    return {"synced": (d / "synced", nodes[:2]), "control": (d / "control", nodes[2:])}


def test_two_agents_on_one_machine_equal_one_process(local_jobs, single):
    out, nodes = local_jobs["synced"]
    for node in nodes:
        assert node.returncode == 0, node.stderr[-3000:]
    stdout = "".join(n.stdout for n in nodes)
    assert stdout.count("training mlp on 2 process(es)") == 1  # one world of 2, rank 0 speaks once
    assert max_diff(load(out / "final.pt"), single) <= WHOLE_RUN


def test_negative_control_two_agents_without_gradient_sync_differ(local_jobs, single):
    """The same launch with DDP's all-reduce disabled: the check above must be able to fail."""
    out, nodes = local_jobs["control"]
    assert any(n.returncode != 0 for n in nodes)
    assert "ranks hold different parameters" in "".join(n.stderr for n in nodes)
    assert max_diff(load(out / "final.pt"), single) > 1e-3


@pytest.fixture(scope="module")
def hosts():
    with two_hosts() as pair:
        yield pair


def host_env(host: Host, store: Host, port: int, node_rank: int) -> dict[str, str]:
    """What an operator sets on each machine: node 0's address, and this node's own address and NIC."""
    return {"RDZV_HOST": store.addr, "RDZV_PORT": str(port), "NODE_RANK": str(node_rank),
            "LOCAL_ADDR": host.addr, "GLOO_SOCKET_IFNAME": host.ifname}


def test_two_hosts_equal_one_process(hosts, single, tmp_path):
    a, b = hosts
    port = a.free_port()
    cmd = [MULTINODE, *FLAGS, "--preflight", "--out", str(tmp_path / "out")]
    start = time.perf_counter()
    nodes = run_nodes([a.cmd(*cmd), b.cmd(*cmd)], [host_env(a, a, port, 0), host_env(b, a, port, 1)], cwd=tmp_path)
    wall = time.perf_counter() - start
    for host, node in zip(hosts, nodes, strict=True):
        print(f"--- {host.netns} ({host.addr} on {host.ifname}), exit {node.returncode} ---\n{node.stdout}")
        assert node.returncode == 0, node.stderr[-3000:]
        assert "7 of 7 checks passed" in node.stdout  # the doctor, run by launch/multinode.sh
    print(f"two hosts: wall time {wall:.1f} s")
    stdout = "".join(n.stdout for n in nodes)
    assert stdout.count("preflight: 6 launch checks passed") == 1  # the same checks in the workers
    assert stdout.count("training mlp on 2 process(es)") == 1
    diff = max_diff(load(tmp_path / "out" / "final.pt"), single)
    print(f"two hosts vs one process: max |difference| in final.pt = {diff:.3g}")
    assert diff <= WHOLE_RUN


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
