"""A rendezvous no training node hosts (``python -m ddp_demo.rendezvous``, RDZV_EXTERNAL=1).

On three real hosts (network namespaces on one switch, tests/nodes.py) the store runs on a host
that trains nothing; two nodes train under ``--nnodes=1:2``. The node that joined first, and
holds global rank 0, loses power mid-run; the other trains on alone; then the lost node comes
back and the job grows again. The weights end equal to one uninterrupted process (float64,
within 1e-10), every sample used once per epoch. The control: the same loss with the store in
node 0's agent (the default layout) ends the job. docs/elastic.md, "A store no node hosts".
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from ddp_demo import rendezvous
from ddp_demo import train as trainer
from ddp_demo.core.config import TrainConfig
from ddp_demo.resilience.faults import FaultInjector

from . import elastic_jobs as jobs
from .helpers import PYTHON
from .nodes import Host, hosts_on_a_switch, node_env, two_hosts

AT, AGAIN = jobs.AT, 9  # node 0 is lost after step 6; the survivor, alone, waits after step 9 for it to return
# Node 0's first round waits for node 1 (its last call is long); rounds node 1 closes do not wait.
FIRST = {"RDZV_CONF": jobs.elastic_env(last_call_timeout=60)["RDZV_CONF"]}
EXTERNAL = {**jobs.elastic_env(), "RDZV_EXTERNAL": "1"}


def world_sizes(out: Path) -> list[int]:
    """Each step's world size: ``--record-samples`` logs one share of sample ids per rank."""
    return [len(json.loads(line)["sample_ids"]) for line in (out / "metrics.jsonl").read_text().splitlines()]


def lose_node_0_and_rejoin(lan: tuple[Host, Host, Host], workdir: Path, flags: list[str]) -> jobs.Outcome:
    """Node 0 joins first, node 1 after it; node 0 loses power after step 6; node 1 resumes alone
    and waits after step 9 (``pause:0:9:1``: its rank 0, its agent's second attempt); node 0's
    agent starts again and the job grows back to two nodes."""
    a, b, s = lan
    workdir.mkdir(parents=True)
    job = jobs.Job((a, b), workdir, flags, EXTERNAL, budget_s=240, store=s)
    store = jobs.start_store(s, job.port, workdir / "store.out")
    try:
        job.wait_for("store", lambda: "listens" in (workdir / "store.out").read_text())
        job.start(0, ("--inject-fault", f"pause:0:{AT}"), FIRST)
        job.wait_for("node 0 at the store", lambda: jobs.at_the_store(s, job.port, a.addr))
        job.start(1, ("--inject-fault", f"pause:0:{AGAIN}:1"))
        killed = job.checkpoint(AT)
        a.power_off()
        seconds = {"kill to the survivor's resumed attempt": job.resumed(1) - killed}
        back = job.checkpoint(AGAIN)
        job.start(0, ("--inject-fault", f"pause:0:{AT}"))
        seconds["node 0's return to the grown attempt"] = job.wait_for(
            "grown attempt", lambda: "resuming from" in job.output(0)) - back
        seconds["kill to the exits"] = max(job.exited(0), job.exited(1)) - killed
        store.send_signal(signal.SIGINT)
        store.wait(30)
        return job.outcome(**seconds)
    finally:
        store.kill()
        job.close()


def lose_the_store_host(pair: tuple[Host, Host], workdir: Path, flags: list[str]) -> jobs.Outcome:
    """The control: node 0's agent hosts the store (the default layout); the same loss."""
    a, _ = pair
    workdir.mkdir(parents=True)
    job = jobs.Job(pair, workdir, flags, jobs.elastic_env(), budget_s=180)
    try:
        job.start(0, ("--inject-fault", f"pause:0:{AT}"), FIRST)
        job.start(1)
        killed = job.checkpoint(AT)
        a.power_off()
        return job.outcome(**{"kill to node 1's exit": job.exited(1) - killed})
    finally:
        job.close()


def _run(scenario, hosts, workdir: Path, flags: list[str]):
    try:
        return scenario(hosts, workdir, flags)
    except Exception as e:  # kept: its test fails with it, the other still reports
        return e


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted run in this process, and both jobs at once, each on hosts of its own."""
    d = tmp_path_factory.mktemp("rendezvous")
    data = jobs.write_data(d / "xy.pt")
    flags = [*jobs.train_flags(data), "--timeout", "120"]  # the pauses end at a stop signal, or after 120 s
    with ExitStack() as stack, ThreadPoolExecutor(2) as pool:
        lan, pair = stack.enter_context(hosts_on_a_switch(3)), stack.enter_context(two_hosts())
        found = {"no node hosts": pool.submit(_run, lose_node_0_and_rejoin, lan, d / "external", flags),
                 "node 0 hosts": pool.submit(_run, lose_the_store_host, pair, d / "node0", flags)}
        assert trainer.main([*jobs.train_flags(data), "--out", str(d / "reference")]) == 0
        return {"reference": d / "reference", **{name: f.result() for name, f in found.items()}}


def outcome(runs: dict, name: str) -> jobs.Outcome:
    found = runs[name]
    if isinstance(found, Exception):
        raise found
    print(f"{name}: exit codes {found.codes}, measured {found.seconds}")
    return found


def test_losing_the_node_that_joined_first_and_getting_it_back(runs):
    o = outcome(runs, "no node hosts")
    assert o.codes == [0, 0], o.stderr[0][-3000:] + o.stderr[1][-3000:]
    sizes = world_sizes(o.out)
    print(f"  world size at each step: {sizes}")
    assert sizes == [2] * AT + [1] * (AGAIN + 1 - AT) + [2] * (jobs.STEPS - AGAIN - 1)
    assert f"world size 2 -> 1 at step {AT}: " in o.stdout[1]  # the survivor, now global rank 0, says so
    assert f"world size 1 -> 2 at step {AGAIN + 1}: " in o.stdout[0]  # node 0, back, global rank 0 again
    for node in (0, 1):  # the doctor, before each launch, named the host whose loss would end the job
        assert "single point of failure: the store's host " in o.stdout[node], o.stdout[node][:3000]
    diff = jobs.trained_alike(o.out, runs["reference"])  # each step's samples, each sample once an epoch
    print(f"  max |difference| from the uninterrupted run: {diff:.3g}")
    assert diff <= 1e-10
    store = (o.out.parent / "store.out").read_text()
    assert store.splitlines()[-1].startswith("ddp_demo.rendezvous: stopped by SIGINT"), store


def test_negative_control_the_same_loss_ends_a_job_whose_store_node_0_hosts(runs):
    o = outcome(runs, "node 0 hosts")
    assert o.codes[1] not in (0, None)
    assert not (o.out / "final.pt").exists()
    assert "single point of failure: node 0 (" in o.stdout[1]


def test_the_store_serves_until_sigterm_then_says_it_stopped(tmp_path):
    proc = subprocess.Popen([PYTHON, "-m", "ddp_demo.rendezvous", "--host", "127.0.0.1", "--port", "0"], cwd=tmp_path,
                            env=node_env({}), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        port = int(first.rsplit("RDZV_PORT=", 1)[1])
        assert first == (f"ddp_demo.rendezvous: the store listens on 127.0.0.1:{port}; start every node with "
                         f"RDZV_EXTERNAL=1 RDZV_HOST=127.0.0.1 RDZV_PORT={port}\n")
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        client.set("key", "value")
        assert client.get("key") == b"value"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out == f"ddp_demo.rendezvous: stopped by SIGTERM; the store at 127.0.0.1:{port} is gone\n"
    with pytest.raises(dist.DistError):  # gone indeed
        client.get("key")


def test_a_taken_port_is_one_line_and_exit_2(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert rendezvous.main(["--host", "127.0.0.1", "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == (f"ddp_demo.rendezvous: error: port {port} is already in use on 127.0.0.1; pass "
                                 f"another --port, or stop what listens there (`ss -ltnp 'sport = :{port}'`)\n")


def test_an_address_this_host_lacks_is_one_line_and_exit_2(capsys):
    assert rendezvous.main(["--host", "192.0.2.1", "--port", "0"]) == 2  # TEST-NET-1: nobody's address
    assert capsys.readouterr().err.startswith("ddp_demo.rendezvous: error: cannot listen on 192.0.2.1:0 (")


@pytest.mark.parametrize("restart_count, strikes", [(0, False), (1, True), (2, False)])
def test_a_fault_strikes_in_the_attempt_it_names(restart_count, strikes):
    """``pause:0:9:1`` holds the survivor above in its agent's second attempt only."""
    cfg = TrainConfig(inject_fault=f"pause:0:{AGAIN}:1")
    assert (FaultInjector(cfg, 0, restart_count).fault is not None) == strikes
    assert FaultInjector(TrainConfig(inject_fault="kill:1:7"), 1, restart_count).fault == (
        ("kill", 1, 7, 0) if restart_count == 0 else None)
