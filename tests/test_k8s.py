"""launch/k8s/: Kubeflow PyTorchJob manifests, checked offline against the PyTorchJob API itself.

No cluster is needed. Each manifest must deserialise strictly into the kubeflow-training SDK's
models and pass the operator's admission rules (tests/pytorchjob.py); then, given the variables
the operator injects into each pod, the container's command must resolve, through torchrun's own
argument parser, to the launch the job means: every pod in one rendezvous on the Master, one
process per GPU, outputs and checkpoints on the shared volume. Every check fails on a broken copy.
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
from .pytorchjob import ManifestError, container, load_job, operator_env, pods, read, strict_load, webhook_problems

K8S = ROOT / "launch" / "k8s"
CPU, GPU, VOLUME = K8S / "pytorchjob.yaml", K8S / "pytorchjob-gpu.yaml", K8S / "shared-volume.yaml"
TORCHRUN = ["python3", "-m", "torch.distributed.run"]


def job_doc(path: Path = CPU) -> dict:
    (doc,) = read(path)
    return doc


def resolve(job, rtype: str, index: int):
    """The pod's launch as torchrun itself reads it: its command line, then PET_* for what is missing."""
    spec = container(job, rtype)
    env = {e.name: e.value for e in spec.env or []} | operator_env(job, rtype, index)
    with mock.patch.dict(os.environ, env, clear=True):  # parse_args takes its defaults from PET_*
        config, _, cmd_args = torchrun.config_from_args(torchrun.parse_args(spec.args))
    return config, cmd_args


def shared_mounts(job, rtype: str) -> list[str]:
    """Where the pod mounts a PersistentVolumeClaim: the only paths that outlive it and that all pods see."""
    pod = job.spec.pytorch_replica_specs[rtype].template.spec
    claims = {v.name for v in pod.volumes or [] if v.persistent_volume_claim}
    return [m.mount_path for m in container(job, rtype).volume_mounts or [] if m.name in claims]


def essentials(config) -> tuple:
    return (config.min_nodes, config.max_nodes, config.nproc_per_node, config.rdzv_backend, config.rdzv_endpoint,
            config.run_id, config.max_restarts, config.rdzv_configs)


def contract_problems(job) -> list[str]:
    """Every way the pods' launch differs from what the job means (one line each)."""
    master = container(job, "Master")
    if master.command != TORCHRUN:
        return [f"the command is {master.command}, not {TORCHRUN}"]
    launches = {pod: resolve(job, *pod) for pod in pods(job)}
    config, cmd_args = launches[("Master", 0)]
    found = [f"{rtype}-{i} resolves to another launch than the Master" for (rtype, i), launch in launches.items()
             if (essentials(launch[0]), launch[1]) != (essentials(config), cmd_args)]
    if (config.min_nodes, config.max_nodes) != (len(launches),) * 2:
        nodes = f"{config.min_nodes}:{config.max_nodes}"
        found.append(f"torchrun waits for {nodes} nodes; the job has {len(launches)} pods")
    if config.rdzv_backend != "c10d" or not config.rdzv_endpoint.startswith(f"{job.metadata.name}-master-0:"):
        found.append(f"the rendezvous is {config.rdzv_backend} at {config.rdzv_endpoint}, not c10d on the Master")
    gpus = int((master.resources.limits or {}).get("nvidia.com/gpu", "0"))
    if config.nproc_per_node != max(gpus, 1):
        found.append(f"{config.nproc_per_node} process(es) per pod for {gpus} GPU(s)")
    if cmd_args[:3] != ["-u", "-m", "ddp_demo.train"]:
        return [*found, f"the workers run {cmd_args[:3]}, not ddp_demo.train"]
    try:
        cfg = parse_config(cmd_args[3:])
    except ConfigError as e:
        return [*found, f"ddp_demo.train rejects its flags: {e}"]
    if (cfg.device == "cuda") != (gpus > 0):
        found.append(f"--device {cfg.device} with {gpus} GPU(s) per pod")
    for flag, path in (("--out", cfg.out), ("--checkpoint-dir", cfg.checkpoint_dir)):
        if path is None or not any(Path(path).is_relative_to(m) for m in shared_mounts(job, "Worker")):
            found.append(f"{flag} {path} is not on the shared volume")
    return found


@pytest.mark.parametrize("path", [CPU, GPU], ids=lambda p: p.name)
def test_manifest_is_a_valid_pytorchjob(path):
    job = load_job(job_doc(path))
    assert webhook_problems(job) == []
    assert contract_problems(job) == []


def test_shared_volume_is_a_claim_the_jobs_mount():
    (doc,) = read(VOLUME)
    claim = strict_load(doc, "V1PersistentVolumeClaim")
    assert claim.spec.access_modes == ["ReadWriteMany"]  # pods on different machines mount it at once
    for path in (CPU, GPU):
        pod = load_job(job_doc(path)).spec.pytorch_replica_specs["Worker"].template.spec
        assert claim.metadata.name in [v.persistent_volume_claim.claim_name for v in pod.volumes
                                       if v.persistent_volume_claim]


def test_each_pod_launches_torchrun_as_the_job_says():
    """The operator's variables for each pod, then torchrun's own parser: the launch, spelled out."""
    job = load_job(job_doc())
    for rtype, index in pods(job):
        env = operator_env(job, rtype, index)
        assert env["PET_NNODES"] == "2:2" and env["RANK"] == str(index + (rtype == "Worker"))
        config, cmd_args = resolve(job, rtype, index)
        assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 1)
        assert (config.rdzv_backend, config.rdzv_endpoint, config.run_id) == ("c10d", "ddp-demo-master-0:29400",
                                                                              "ddp-demo")
        assert config.max_restarts == 3
        assert cmd_args == ["-u", "-m", "ddp_demo.train", "--preflight", "--out", "/shared/runs/ddp-demo",
                            "--checkpoint-dir", "/shared/checkpoints/ddp-demo"]


def test_gpu_variant_differs_only_in_gpus():
    cpu, gpu = job_doc(CPU), job_doc(GPU)
    pod = gpu["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert pod["resources"]["limits"]["nvidia.com/gpu"] == gpu["spec"]["nprocPerNode"] == "4"
    assert pod["args"][-4:] == ["--device", "cuda", "--backend", "nccl"]
    for doc in (cpu, gpu):  # take the GPU bits out of both: what is left must be equal
        doc["spec"].pop("nprocPerNode")
        c = _container(doc)  # the Master's and the Worker's, one YAML anchor
        c.pop("image"), c.pop("resources"), c.update(args=c["args"][:7])
    assert cpu == gpu


SCHEMA_BREAKAGES = {  # a broken copy, and what deserialising it must say
    "misspelt field": (lambda d: d["spec"]["elasticPolicy"].update(rdzvBackendd="c10d"), "has no field 'rdzvBackendd'"),
    "wrong type": (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"].update(replicas="1"), "expected int"),
    "misspelt pod field": (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
                           .update(volumeMount=[]), "V1Container has no field 'volumeMount'"),
    "required field missing": (lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"]
                               [0].pop("name"), "`name`, must not be `None`"),
    "other kind": (lambda d: d.update(kind="TFJob"), "not a kubeflow.org/v1 PyTorchJob"),
}


@pytest.mark.parametrize("breakage", SCHEMA_BREAKAGES)
def test_negative_control_the_api_rejects_a_broken_manifest(breakage):
    doc = copy.deepcopy(job_doc())
    damage, message = SCHEMA_BREAKAGES[breakage]
    damage(doc)
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_job(doc)


CONTRACT_BREAKAGES = {  # a broken copy that deserialises, and the problem the checks must find (only that one)
    "Master left out of the count": (CPU, lambda d: [d["spec"]["elasticPolicy"].pop(k) for k in ("minReplicas",
                                                                                                "maxReplicas")],
                                     "torchrun waits for 1:1 nodes; the job has 2 pods"),
    "rendezvous on a Worker": (CPU, lambda d: d["spec"]["elasticPolicy"].pop("rdzvHost"), "not c10d on the Master"),
    "Master as a second Worker": (CPU, lambda d: d["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
                                  "Master: replicas must be 1"),
    "no pytorch container": (CPU, lambda d: _container(d).update(name="trainer"), "no container named pytorch"),
    "not torchrun": (CPU, lambda d: _container(d).update(command=["python3"]), "not ['python3', '-m'"),
    "misspelt train flag": (CPU, lambda d: _container(d)["args"].append("--checkpoint-dri"), "rejects its flags"),
    "outputs in the pod": (CPU, lambda d: _container(d)["args"].extend(["--out", "/tmp/out"]),
                           "--out /tmp/out is not on the shared volume"),
    "one process for 4 GPUs": (GPU, lambda d: d["spec"].update(nprocPerNode="1"), "1 process(es) per pod for 4 GPU(s)"),
    "GPUs left unused": (GPU, lambda d: _container(d).update(args=_container(d)["args"][:-4]),
                         "--device auto with 4 GPU(s) per pod"),
}


def _container(doc: dict) -> dict:
    """The pytorch container, which the YAML anchor shares between the Master and the Worker."""
    return doc["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("breakage", CONTRACT_BREAKAGES)
def test_negative_control_each_broken_contract_is_caught(breakage):
    path, damage, message = CONTRACT_BREAKAGES[breakage]
    doc = job_doc(path)  # read afresh: the Master and the Worker share one template object, as in the file
    damage(doc)
    job = load_job(doc)
    found = webhook_problems(job) or contract_problems(job)
    assert found and all(message in problem for problem in found), found  # this one problem (in each replica)
