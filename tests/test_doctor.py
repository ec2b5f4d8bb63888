"""The launch doctor catches each multi-node trap (simulated with environment variables and
a bound port) with a verdict and a fix, and passes a healthy setup. Its run on a real second
host is in test_multinode.py."""

from __future__ import annotations

import socket

import pytest
import torch

from ddp_demo import doctor
from ddp_demo.doctor.cli import main as doctor_main

from .helpers import LAUNCH_VARS, PYTHON, TORCHRUN, free_port, run_cmd


@pytest.fixture
def launch_env(monkeypatch):
    """A clean launch environment: each test sets only the variables it is about."""
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)

    def set_env(**values) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, str(v))

    return set_env



def diagnose(capsys, *argv: str) -> tuple[int, str]:
    code = doctor_main(list(argv))
    return code, capsys.readouterr().out


def only_failure(out: str) -> str:
    """The one check that failed, with its fix: every trap below trips exactly one check."""
    fails = [line for line in out.splitlines() if line.lstrip().startswith("FAIL")]
    assert len(fails) == 1, out
    assert "fix: " in out.split(fails[0], 1)[1].splitlines()[1], out
    return fails[0]


def test_healthy_single_node(launch_env, capsys):
    code, out = diagnose(capsys)
    assert code == 0 and "5 of 5 checks passed" in out and "FAIL" not in out
    assert out.startswith("ddp_demo doctor: one node, ") and "?" not in out.splitlines()[0]  # issue 26: `node ? of 1`


def test_help_names_the_variables_it_reads(capsys):
    """Issue 26: the doctor reads launch/multinode.sh's variables, and its --help now says which."""
    with pytest.raises(SystemExit):
        doctor_main(["--help"])
    out = capsys.readouterr().out
    read = ("NNODES", "NPROC_PER_NODE", "NODE_RANK", "RDZV_HOST", "RDZV_PORT", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME",
            "MASTER_ADDR", "MASTER_PORT", "MAX_RESTARTS")  # doctor/plan.py's plan_from_env
    assert all(var in out for var in read), out
    assert "example:" in out and "exit status" in out


def test_healthy_two_nodes_on_this_machine(launch_env, capsys):
    launch_env(NNODES=2, NODE_RANK=0, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port(), GLOO_SOCKET_IFNAME="lo")
    code, out = diagnose(capsys, "--world-size", "2")
    assert code == 0 and "7 of 7 checks passed" in out, out
    assert "this node hosts the store" in out and "the port is free" in out


def test_hostname_resolving_to_loopback(launch_env, capsys, monkeypatch):
    """Debian's 127.0.1.1 trap, made here by a hostname that always resolves to loopback."""
    monkeypatch.setattr(socket, "gethostname", lambda: "localhost")
    launch_env(NNODES=2)
    code, out = diagnose(capsys)
    assert code == 1 and "hostname" in only_failure(out)
    assert "LOCAL_ADDR=<this node's address> and GLOO_SOCKET_IFNAME=<its interface>" in out
    launch_env(LOCAL_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo")  # what the fix says: both, and it passes
    assert diagnose(capsys)[0] == 0


def test_gloo_socket_ifname_naming_no_interface(launch_env, capsys):
    launch_env(GLOO_SOCKET_IFNAME="lo,nosuchnic0")
    code, out = diagnose(capsys)
    assert code == 1 and "names no interface of this machine: nosuchnic0" in only_failure(out)
    assert "use one of: " in out and "lo" in out


def test_port_in_use_on_the_store_host(launch_env, capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        launch_env(NNODES=2, NODE_RANK=0, RDZV_HOST="127.0.0.1", RDZV_PORT=held.getsockname()[1])
        code, out = diagnose(capsys)
    assert code == 1 and "is in use" in only_failure(out)


def test_master_addr_unreachable_once_launched():
    """Inside the workers the store must listen already; nothing does at a fresh free port."""
    variables = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}  # core/dist.py's launch_variables
    with pytest.raises(doctor.LaunchProblem, match=r"^preflight: MASTER_ADDR: .*connection refused.*; fix: "):
        doctor.preflight(variables, launched=True, world_size=1, device="cpu", backend="gloo")


def test_world_size_not_nnodes_times_nproc(launch_env, capsys):
    launch_env(NNODES=2, NPROC_PER_NODE=2, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port(), NODE_RANK=0)
    code, out = diagnose(capsys, "--world-size", "3")
    assert code == 1 and "world size 3 != NNODES 2 x NPROC_PER_NODE 2 = 4" in only_failure(out)


def test_cuda_requested_but_absent(launch_env, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out = diagnose(capsys, "--device", "cuda", "--model", "cnn")  # trainer flags are ignored
    assert code == 1 and "CUDA requested" in only_failure(out)
    assert "--device cpu --backend gloo" in out


@pytest.mark.parametrize("nnodes, error", [
    ("two", "NNODES='two' is not a whole number; set NNODES to one, e.g. NNODES=2"),
    ("2:1", "NNODES='2:1' is not a node count or a range MIN:MAX with 0 < MIN <= MAX; set e.g. NNODES=2 or NNODES=1:2"),
])
def test_bad_variable_is_one_line_and_exit_2(tmp_path, nnodes, error):
    proc = run_cmd([PYTHON, "-m", "ddp_demo.doctor"], tmp_path, timeout=60, env={"NNODES": nnodes})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"ddp_demo.doctor: error: {error}"


def test_trainer_preflight_stops_a_mismatched_launch(tmp_path):
    """torchrun starts 2 processes where the node was told 2 x 2: one line, exit 2, nothing written."""
    out = tmp_path / "out"
    proc = run_cmd([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "ddp_demo.train", "--preflight",
                    "--steps", "2", "--out", str(out)], tmp_path, timeout=180,
                   env={"NNODES": "1", "NPROC_PER_NODE": "4"})
    assert proc.returncode != 0 and not out.exists()
    ours = [line for line in proc.stderr.splitlines() if line.startswith("ddp_demo: error: ")]
    assert ours == ["ddp_demo: error: preflight: world size: world size 2 != NNODES 1 x NPROC_PER_NODE 4 = 4; "
                    "fix: start exactly NNODES nodes, every one with the same NPROC_PER_NODE"], proc.stderr


def test_an_elastic_launch_that_would_survive_a_node_loss(launch_env, capsys, tmp_path):
    launch_env(NNODES="1:2", MAX_RESTARTS=3, NODE_RANK=0, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port())
    code, out = diagnose(capsys, "--checkpoint-dir", str(tmp_path / "ckpt"), "--global-batch-size", "16")
    assert code == 0 and "node 0 of 1:2" in out and "7 of 7 checks passed" in out, out
    assert "goes on with 1 to 2 nodes, MAX_RESTARTS=3" in out


def test_a_fixed_launch_says_a_lost_node_ends_it(launch_env, capsys):
    launch_env(NNODES=2, NODE_RANK=0, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port())
    code, out = diagnose(capsys)
    assert code == 0 and "a lost node ends the job" in out, out


@pytest.mark.parametrize("env, flags, verdict", [
    ({"MAX_RESTARTS": 0}, ["--checkpoint-dir", "{d}/ckpt"], "NNODES=1:2 but MAX_RESTARTS=0"),
    ({"MAX_RESTARTS": 3}, [], "no --checkpoint-dir"),
    ({"MAX_RESTARTS": 3}, ["--checkpoint-dir", "{d}/file"], "is a file, not a directory"),
    ({"MAX_RESTARTS": 3, "NNODES": "2:3"}, ["--checkpoint-dir", "{d}/ckpt", "--global-batch-size", "16"],
     "does not divide by world size 3"),
], ids=["no restarts", "no checkpoints", "checkpoint dir a file", "batch vs a smaller world"])
def test_an_elastic_launch_missing_what_a_node_loss_needs(launch_env, capsys, tmp_path, env, flags, verdict):
    (tmp_path / "file").write_text("")
    launch_env(**{"NNODES": "1:2", "NODE_RANK": 0, "RDZV_HOST": "127.0.0.1", "RDZV_PORT": free_port(), **env})
    code, out = diagnose(capsys, *[f.format(d=tmp_path) for f in flags])
    assert code == 1 and "node loss" in only_failure(out) and verdict in out, out


def test_world_size_inside_an_elastic_range(launch_env, capsys):
    launch_env(NNODES="1:2", NPROC_PER_NODE=2, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port(), NODE_RANK=1,
               MAX_RESTARTS=3)
    for world_size, ok in ((2, True), (4, True), (3, False)):
        out = diagnose(capsys, "--world-size", str(world_size), "--checkpoint-dir", "ckpt")[1]
        assert ("FAIL  world size" not in out) == ok, out
    assert "world size 3 != NNODES 1:2 x NPROC_PER_NODE 2 = 2 or 4" in out



def test_the_default_layout_names_node_0_as_the_single_point_of_failure(launch_env, capsys):
    launch_env(NNODES="1:2", NODE_RANK=1, RDZV_HOST="127.0.0.1", RDZV_PORT=free_port(), MAX_RESTARTS=3)
    out = diagnose(capsys, "--checkpoint-dir", "ckpt")[1]
    assert "single point of failure: node 0 (127.0.0.1), which hosts the store" in out, out


def test_a_store_no_node_hosts_must_answer_before_the_launch(launch_env, capsys):
    """RDZV_EXTERNAL=1: nobody starts the store later (python -m ddp_demo.rendezvous runs first)."""
    port = free_port()
    launch_env(NNODES=2, NODE_RANK=0, RDZV_HOST="127.0.0.1", RDZV_PORT=port, RDZV_EXTERNAL=1)
    code, out = diagnose(capsys)
    assert code == 1 and "127.0.0.1:" in only_failure(out) and "no store answers there" in out, out
    assert f"fix: start `python -m ddp_demo.rendezvous --port {port}` on that host before the nodes" in out


def test_a_store_no_node_hosts_must_not_run_on_this_training_node(launch_env, capsys):
    """Listening here (loopback is this machine too): this node would be the single point of failure.
    Its healthy run, on a host of its own, is in test_rendezvous.py (every node's doctor passes there)."""
    with socket.socket() as store:
        store.bind(("127.0.0.1", 0))
        store.listen()
        launch_env(NNODES=2, NODE_RANK=1, RDZV_HOST="127.0.0.1", RDZV_PORT=store.getsockname()[1], RDZV_EXTERNAL=1)
        code, out = diagnose(capsys)
    assert code == 1 and "the store runs on this training node" in only_failure(out), out
    assert "unset RDZV_EXTERNAL (node 0 then hosts the store)" in out


def test_rdzv_external_other_than_0_or_1_is_one_line_and_exit_2(tmp_path):
    proc = run_cmd([PYTHON, "-m", "ddp_demo.doctor"], tmp_path, timeout=60, env={"RDZV_EXTERNAL": "yes"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "ddp_demo.doctor: error: RDZV_EXTERNAL='yes' is not 0 or 1; set RDZV_EXTERNAL=1 " \
        "or leave it unset"
