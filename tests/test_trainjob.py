"""launch/k8s/trainjob.yaml: a Kubeflow Trainer v2 TrainJob and its TrainingRuntime, checked offline.

No cluster is needed. Both objects must deserialise strictly into the kubeflow-trainer-api
package's models (tests/trainjob.py) and pass what the Trainer checks on admission; then, given
the PET_* variables its torch plugin sets on each node, the container's command must resolve,
through torchrun's own argument parser, to the launch the job means: every node in one static
rendezvous on node 0, one process per node, outputs and checkpoints on the shared volume. Every
check fails on a broken copy (the negative controls at the end).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from unittest import mock

import pytest
from torch.distributed import run as torchrun

from ddp_demo.core.config import ConfigError, parse_config

from .helpers import ROOT
from .trainjob import (
    RESERVED,
    ManifestError,
    admission_problems,
    gpus,
    node_container,
    num_nodes,
    read,
    strict_load,
    torch_env,
)

MANIFEST, VOLUME = ROOT / "launch" / "k8s" / "trainjob.yaml", ROOT / "launch" / "k8s" / "shared-volume.yaml"
TORCHRUN = ["python3", "-m", "torch.distributed.run"]


def docs() -> tuple[dict, dict]:
    runtime, job = read(MANIFEST)
    return runtime, job


def load(runtime_doc: dict, job_doc: dict) -> tuple:
    return strict_load(runtime_doc), strict_load(job_doc)


def resolve(runtime, job, node_rank: int):
    """Node ``node_rank``'s launch as torchrun reads it: its command line, then PET_* for what is missing."""
    spec = node_container(runtime, job)
    env = {e.name: e.value for e in spec.env or []} | torch_env(runtime, job, node_rank)
    with mock.patch.dict(os.environ, env, clear=True):  # parse_args takes its defaults from PET_*
        config, _, cmd_args = torchrun.config_from_args(torchrun.parse_args([*spec.command[3:], *(spec.args or [])]))
    return config, cmd_args


def shared_mounts(runtime, job) -> list[str]:
    """Where the node mounts a PersistentVolumeClaim: the only paths that outlive it and that all nodes see."""
    pod = next(j for j in runtime.spec.template.spec.replicated_jobs if j.name == "node").template.spec.template.spec
    claims = {v.name for v in pod.volumes or [] if v.persistent_volume_claim}
    return [m.mount_path for m in node_container(runtime, job).volume_mounts or [] if m.name in claims]


def contract_problems(runtime, job) -> list[str]:
    """Every way the nodes' launch differs from what the job means (one line each)."""
    container = node_container(runtime, job)
    if container.command != TORCHRUN:
        return [f"the command is {container.command}, not {TORCHRUN}"]
    nodes, name = num_nodes(runtime, job), job.metadata.name
    found = []
    for rank in range(nodes):
        config, cmd_args = resolve(runtime, job, rank)
        if (config.min_nodes, config.max_nodes, config.rdzv_configs.get("rank")) != (nodes, nodes, rank):
            found.append(f"node {rank}: torchrun waits for {config.min_nodes}:{config.max_nodes} nodes as node "
                         f"{config.rdzv_configs.get('rank')}; the job has {nodes}")
        if (config.rdzv_backend, config.rdzv_endpoint) != ("static", f"{name}-node-0-0.{name}:29400"):
            found.append(f"node {rank}: the rendezvous is {config.rdzv_backend} at {config.rdzv_endpoint}")
    if config.nproc_per_node != max(gpus(container), 1):
        found.append(f"{config.nproc_per_node} process(es) per node for {gpus(container)} GPU(s)")
    if cmd_args[:3] != ["-u", "-m", "ddp_demo.train"]:
        return [*found, f"the nodes run {cmd_args[:3]}, not ddp_demo.train"]
    try:
        cfg = parse_config(cmd_args[3:])
    except ConfigError as e:
        return [*found, f"ddp_demo.train rejects its flags: {e}"]
    for flag, path in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir)):
        if path is None or not any(Path(path).is_relative_to(m) for m in shared_mounts(runtime, job)):
            found.append(f"{flag} {path} is not on the shared volume")
    return found


def test_manifest_is_a_valid_trainjob_and_runtime():
    runtime, job = load(*docs())
    assert (runtime.kind, job.kind) == ("TrainingRuntime", "TrainJob")
    assert admission_problems(runtime, job) == []
    assert contract_problems(runtime, job) == []


def test_each_node_launches_torchrun_as_the_job_says():
    """The torch plugin's variables for each node, then torchrun's own parser: the launch, spelled out."""
    runtime, job = load(*docs())
    for rank in (0, 1):
        assert torch_env(runtime, job, rank) == {
            "PET_NNODES": "2", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank),
            "PET_MASTER_ADDR": "ddp-demo-node-0-0.ddp-demo", "PET_MASTER_PORT": "29400"}
        config, cmd_args = resolve(runtime, job, rank)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 1)
        assert (config.rdzv_backend, config.rdzv_endpoint, config.rdzv_configs["rank"]) == \
            ("static", "ddp-demo-node-0-0.ddp-demo:29400", rank)
        assert runtime.spec.template.spec.failure_policy.max_restarts == 3  # the JobSet restarts every node
        assert cmd_args == ["-u", "-m", "ddp_demo.train", "--preflight", "--out", "/shared/runs/ddp-demo",
                            "--checkpoint-dir", "/shared/checkpoints/ddp-demo"]


def test_torchrun_reads_every_variable_the_torch_plugin_sets():
    """Each PET_* name is one torchrun's parser takes a flag's default from (torch/distributed/argparse_util.py)."""
    parser_reads = {f"PET_{a.dest.upper()}" for a in torchrun.get_args_parser()._actions}
    assert set(RESERVED) <= parser_reads
    assert "PET_NUM_NODES" not in parser_reads  # the control: a name torchrun would ignore


def test_auto_processes_on_a_cpu_pod_is_its_cpu_limit():
    runtime_doc, job_doc = docs()
    job_doc["spec"]["trainer"].pop("numProcPerNode")
    assert torch_env(*load(runtime_doc, job_doc), 0)["PET_NPROC_PER_NODE"] == "1"
    job_doc["spec"]["trainer"]["resourcesPerNode"]["limits"]["cpu"] = "2500m"
    assert torch_env(*load(runtime_doc, job_doc), 0)["PET_NPROC_PER_NODE"] == "3"


def _pod(runtime_doc: dict) -> dict:
    return runtime_doc["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def test_shared_volume_is_the_claim_the_runtime_mounts():
    (claim,) = read(VOLUME)
    pod = _pod(docs()[0])
    assert claim["metadata"]["name"] in [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                                         if "persistentVolumeClaim" in v]


def _trainer(d: tuple) -> dict:
    return d[1]["spec"]["trainer"]


def _node(d: tuple) -> dict:
    return _pod(d[0])["containers"][0]


SCHEMA_BREAKAGES = {  # a broken copy, and what deserialising it must say
    "misspelt field": (lambda d: _trainer(d).update(numNode=2), r"\$\.spec\.trainer\.numNode: the API has no such"),
    "wrong type": (lambda d: _trainer(d).update(numNodes="2"), "numNodes: Input should be a valid integer"),
    "misspelt runtime field": (lambda d: d[0]["spec"]["mlPolicy"].update(numNode=2), r"mlPolicy\.numNode: the API"),
    "misspelt pod field": (lambda d: _node(d).update(volumeMount=[]), r"containers\[0\]\.volumeMount: the API"),
    "required field missing": (lambda d: d[1]["spec"]["runtimeRef"].pop("name"),
                               "TrainerV1alpha1RuntimeRef.name: Input should be a valid string"),
    "other kind": (lambda d: d[1].update(kind="PyTorchJob"), "not a trainer.kubeflow.org/v1alpha1"),
}


@pytest.mark.parametrize("breakage", SCHEMA_BREAKAGES)
def test_negative_control_the_api_rejects_a_broken_manifest(breakage):
    d = docs()
    damage, message = SCHEMA_BREAKAGES[breakage]
    damage(d)
    with pytest.raises(ManifestError, match=message):
        load(*d)


CONTRACT_BREAKAGES = {  # a broken copy that deserialises, and the problem the checks must find (only that one)
    "another runtime": (lambda d: d[1]["spec"]["runtimeRef"].update(name="torch-distributed"),
                        "runtimeRef names TrainingRuntime torch-distributed"),
    "no torch policy": (lambda d: d[0]["spec"]["mlPolicy"].pop("torch"), "no mlPolicy.torch"),
    "container renamed": (lambda d: _node(d).update(name="trainer"), "with a container named node"),
    "PET variable set by hand": (lambda d: _trainer(d).update(env=[{"name": "PET_NNODES", "value": "1"}]),
                                 "trainer.env sets ['PET_NNODES']"),
    "not torchrun": (lambda d: _node(d).update(command=["python3"]), "not ['python3', '-m'"),
    "misspelt train flag": (lambda d: _trainer(d)["args"].append("--checkpoint-dri"), "rejects its flags"),
    "outputs in the pod": (lambda d: _trainer(d)["args"].extend(["--out", "/tmp/out"]),
                           "--out /tmp/out is not on the shared volume"),
    "two processes for no GPU": (lambda d: _trainer(d).update(numProcPerNode=2), "2 process(es) per node for 0 GPU"),
    "a world size in the command": (lambda d: _trainer(d).update(args=["--nnodes=1", *_trainer(d)["args"]]),
                                    "torchrun waits for 1:1 nodes"),
}


@pytest.mark.parametrize("breakage", CONTRACT_BREAKAGES)
def test_negative_control_each_broken_contract_is_caught(breakage):
    d = docs()
    damage, message = CONTRACT_BREAKAGES[breakage]
    damage(d)
    runtime, job = load(*d)
    found = admission_problems(runtime, job) or contract_problems(runtime, job)
    assert found and all(message in problem for problem in found), found  # this one problem (on each node)


def test_the_manifests_round_trip_is_exact():
    """The strict reader's premise: a document with only known fields comes back unchanged."""
    for doc in docs():
        assert strict_load(copy.deepcopy(doc)).to_dict() == doc
