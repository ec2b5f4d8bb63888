"""docker-compose.yml is valid compose and says what the launch scripts expect.

No Docker engine is needed: the files are validated offline against the compose
specification's JSON schema (``check-jsonschema --builtin-schema vendor.compose-spec``), and
their services are read and compared with ``launch/*.sh``, the Dockerfile and the doctor.
Each agreement rule is shown to fail on a broken copy (the negative controls).
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from ddp_demo.doctor import DEFAULT_RDZV_PORT

from .nodes import ROOT, node_env

COMPOSE, GPU = ROOT / "docker-compose.yml", ROOT / "docker-compose.gpu.yml"
LAUNCH = ROOT / "launch"
DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")  # ${NAME:-default}, in compose files and in bash


def validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec",
                           str(path)], capture_output=True, text=True, timeout=120)


def load(path: Path) -> dict:
    return YAML(typ="safe").load(path.read_text())


def script_vars(name: str) -> tuple[set[str], set[str], dict[str, str]]:
    """A launch script's documented variables (its USAGE line), required ones, and defaults."""
    text = (LAUNCH / name).read_text()
    usage = text.split('USAGE="', 1)[1].split('"', 1)[0]
    required = set(re.findall(r"^require (.+)$", text, re.M)[0].split())
    return set(re.findall(r"\b([A-Z_]+)=", usage)), required, dict(DEFAULT.findall(text))


STORE = "rendezvous"  # the service that runs the store alone (python -m ddp_demo.rendezvous)


def nodes(services: dict) -> dict:
    return {name: svc for name, svc in services.items() if name != STORE}


def problems(compose: dict) -> list[str]:
    """Every way ``compose`` disagrees with launch/compose.sh, launch/multinode.sh and ddp_demo.rendezvous."""
    services = compose["services"]
    stores = {n for n, svc in services.items() if str(svc.get("environment", {}).get("NODE_RANK")) == "0"}
    found = [f"{name}: {p}" for name, svc in nodes(services).items() for p in service_problems(name, svc, stores)]
    return found + [f"{STORE}: {p}" for p in store_problems(services.get(STORE, {}))]


def store_problems(svc: dict) -> list[str]:
    """The store's own service: started only when asked, on the port the nodes dial, by its service name."""
    found = [] if svc.get("profiles") == [STORE] else [f"not only in the profile {STORE}: the default would change"]
    if svc.get("entrypoint", [])[1:] != ["-m", "ddp_demo.rendezvous"]:
        found.append("entrypoint is not python -m ddp_demo.rendezvous")
    if svc.get("hostname") != STORE:
        found.append("hostname is not the service name")
    port = script_vars("multinode.sh")[2]["RDZV_PORT"]
    if svc.get("command") != ["--port", f"${{RDZV_PORT:-{port}}}"]:
        found.append(f"command is not --port ${{RDZV_PORT:-{port}}}, the port launch/multinode.sh dials")
    return found


def service_problems(name: str, svc: dict, stores: set[str]) -> list[str]:
    documented, required, defaults = script_vars("multinode.sh")
    documented |= script_vars("compose.sh")[0]
    env = {k: str(v) for k, v in svc.get("environment", {}).items()}
    found = [f"{v} is not a variable of launch/*.sh" for v in sorted(set(env) - documented)]
    found += [f"required {v} not set" for v in sorted(required - set(env))]
    if svc.get("entrypoint") != ["/app/launch/compose.sh"]:
        found.append("entrypoint is not /app/launch/compose.sh")
    if "GLOO_SOCKET_IFNAME" not in env:
        found.append("GLOO_SOCKET_IFNAME not set")
    if resolved(env).get("RDZV_HOST") not in stores:  # by default; RDZV_HOST=rendezvous RDZV_EXTERNAL=1 when asked
        found.append(f"RDZV_HOST {env.get('RDZV_HOST')} is not the service with NODE_RANK 0")
    if svc.get("hostname") != name:
        found.append("hostname is not the service name")
    if not any(env.get("OUT_DIR", "").startswith(v.split(":")[1]) for v in svc.get("volumes", [])):
        found.append("OUT_DIR is not on a mounted volume")
    for var, value in env.items():  # ${NNODES:-2} in compose == NNODES=${NNODES:-2} in the script
        for ref, default in DEFAULT.findall(value):
            if ref == var and var not in required and defaults.get(var) != default:  # required: none to agree with
                found.append(f"{var} defaults to {default}, in launch/multinode.sh to {defaults.get(var)}")
    return found


@pytest.mark.parametrize("path", [COMPOSE, GPU], ids=lambda p: p.name)
def test_compose_files_are_valid_compose(path):
    proc = validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_negative_control_the_schema_rejects_a_typo(tmp_path):
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("entrypoint:", "entrypiont:"))
    proc = validate(bad)
    assert proc.returncode == 1 and "'entrypiont' was unexpected" in proc.stdout


def test_compose_agrees_with_the_launch_scripts():
    compose = load(COMPOSE)
    assert problems(compose) == []
    nnodes_default = DEFAULT.search(compose["services"]["node0"]["environment"]["NNODES"]).group(2)
    assert int(nnodes_default) == len(nodes(compose["services"])) == 2  # one service per node
    port_default = script_vars("multinode.sh")[2]["RDZV_PORT"]
    assert int(port_default) == DEFAULT_RDZV_PORT  # the doctor checks the port the script uses


BREAKAGES = {  # a broken copy, and what the check must say about it
    "typo in a variable": (lambda s: s["node1"]["environment"].update(RDZV_HOSTS="node0"), "RDZV_HOSTS is not"),
    "required variable missing": (lambda s: s["node1"]["environment"].pop("NODE_RANK"), "required NODE_RANK"),
    "endpoint not node 0": (lambda s: s["node1"]["environment"].update(RDZV_HOST="node1"), "RDZV_HOST node1"),
    "no GLOO_SOCKET_IFNAME": (lambda s: s["node0"]["environment"].pop("GLOO_SOCKET_IFNAME"), "GLOO_SOCKET_IFNAME"),
    "outputs not shared": (lambda s: s["node1"].update(volumes=[]), "OUT_DIR is not on a mounted volume"),
    "other port default": (lambda s: s["node0"]["environment"].update(RDZV_PORT="${RDZV_PORT:-29500}"),
                           "RDZV_PORT defaults to 29500, in launch/multinode.sh to 29400"),
    "other entrypoint": (lambda s: s["node0"].update(entrypoint=["python", "-m", "ddp_demo.train"]), "entrypoint"),
    "store always started": (lambda s: s[STORE].pop("profiles"), "not only in the profile rendezvous"),
    "store on another port": (lambda s: s[STORE].update(command=["--port", "29500"]), "command is not --port"),
    "store not the store": (lambda s: s[STORE].update(entrypoint=["python", "-m", "ddp_demo.train"]),
                            "entrypoint is not python -m ddp_demo.rendezvous"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_negative_control_each_disagreement_is_caught(breakage):
    compose = copy.deepcopy(load(COMPOSE))
    damage, message = BREAKAGES[breakage]
    damage(compose["services"])
    found = problems(compose)
    assert len(found) == 1 and message in found[0], found


def test_the_image_runs_the_same_scripts():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "COPY launch launch" in dockerfile
    assert 'ENTRYPOINT ["/app/launch/compose.sh"]' in dockerfile
    assert "-r requirements-cpu.txt" in dockerfile and "whl/cpu" in dockerfile  # CPU torch by default
    # Buildable without a registry hub: every stage starts from the BASE_IMAGE build argument.
    assert re.findall(r"^FROM (\S+)", dockerfile, re.M) == ["${BASE_IMAGE}"] * 2
    compose_sh = (LAUNCH / "compose.sh").read_text()
    assert '"$(dirname "$0")/multinode.sh"' in compose_sh  # the compose entrypoint is the bare-metal script
    for script in ("torchrun.sh", "multinode.sh", "compose.sh"):
        path = LAUNCH / script
        assert path.stat().st_mode & 0o111 and "source \"$(dirname \"$0\")/common.sh\"" in path.read_text()


def test_gpu_variant_reserves_a_gpu_per_node_and_uses_nccl():
    base, gpu = load(COMPOSE)["services"], load(GPU)["services"]
    assert set(gpu) == set(nodes(base))
    ids = []
    for svc in gpu.values():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
        ids += device["device_ids"]
        assert svc["command"][svc["command"].index("--backend") + 1] == "nccl"
        assert svc["command"][svc["command"].index("--device") + 1] == "cuda"
        assert svc["environment"]["NCCL_SOCKET_IFNAME"] == base["node0"]["environment"]["GLOO_SOCKET_IFNAME"]
    assert len(ids) == len(set(ids)) == len(gpu)  # one host: every node its own GPU


def dry_run(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run a launch script with PYTHON=echo: it prints the command it would run instead of running it."""
    return subprocess.run([str(LAUNCH / script), *args], env=node_env({**env, "PYTHON": "echo", "DOCTOR": "0"}),
                          capture_output=True, text=True, timeout=30)


def resolved(env: dict) -> dict[str, str]:
    """A service's environment as compose passes it when no variable is set: ${X:-d} -> d."""
    return {k: DEFAULT.sub(lambda m: m.group(2), str(v)) for k, v in env.items()}


@pytest.mark.parametrize("service", ["node0", "node1"])
@pytest.mark.parametrize("asked", [{}, {"RDZV_HOST": STORE, "RDZV_EXTERNAL": "1"}], ids=["default", "store-alone"])
def test_each_service_launches_torchrun_as_multinode_sh_says(service, asked, tmp_path):
    """By default node0's agent hosts the store; with the store's own service, no node does."""
    svc = load(COMPOSE)["services"][service]
    (tmp_path / "summary.json").write_text("{}")  # what node0 prints at the end
    env = {**resolved(svc["environment"]), **asked, "OUT_DIR": str(tmp_path), "LOCAL_ADDR": "10.0.0.5"}
    proc = dry_run("compose.sh", env, *svc["command"])
    assert proc.returncode == 0, proc.stderr
    hosts = int(service == "node0" and not asked)
    assert proc.stdout.splitlines()[0].split() == [
        "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={env['RDZV_HOST']}:29400", "--rdzv-id=ddp_demo", f"--rdzv-conf=is_host={hosts}",
        "--local-addr=10.0.0.5", "-m", "ddp_demo.train", "--out", str(tmp_path), "--preflight"]
    assert ("rank 0's summary" in proc.stdout) == (service == "node0")


def test_single_node_script(tmp_path):
    proc = dry_run("torchrun.sh", {}, "--model", "cnn")
    assert proc.stdout.split() == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   "-m", "ddp_demo.train", "--model", "cnn"]


def test_multinode_script_names_what_is_missing():
    proc = dry_run("multinode.sh", {"NODE_RANK": "1"})
    assert proc.returncode == 2 and proc.stdout == ""
    first, usage = proc.stderr.splitlines()
    assert first == "launch: RDZV_HOST is not set"
    assert usage.startswith("usage: RDZV_HOST=<node 0's address, or the store's with RDZV_EXTERNAL=1> NODE_RANK=")
    assert "launch/multinode.sh" in usage


def test_multinode_script_refuses_an_rdzv_external_other_than_0_or_1():
    proc = dry_run("multinode.sh", {"NODE_RANK": "0", "RDZV_HOST": "10.0.0.9", "RDZV_EXTERNAL": "yes"})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("launch: RDZV_EXTERNAL=yes is not 0 or 1; set RDZV_EXTERNAL=1 when python -m "
                           "ddp_demo.rendezvous runs the store on a host of its own, else leave it unset\n")
