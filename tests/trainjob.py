"""Offline checks of a Kubeflow Trainer v2 TrainJob and its TrainingRuntime, against the API itself.

``strict_load`` reads a document into the kubeflow-trainer-api package's models (pydantic, with
strict types: a wrong type is an error) and writes it back: the package's reader drops a key it
does not know, silently, so any difference between the document and what comes back is a field
the API does not have, reported with its path. ``node_container`` and ``torch_env`` restate what
the Trainer's controller makes of the pair (v2, pkg/runtime/framework/plugins/torch/torch.go,
``EnforceMLPolicy``): the TrainJob's trainer fields laid over the runtime's ``node`` container,
and the PET_* variables its torch plugin adds for torchrun.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from kubeflow_trainer_api import models
from pydantic import ValidationError
from ruamel.yaml import YAML

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KINDS = {"TrainJob": models.TrainerV1alpha1TrainJob, "TrainingRuntime": models.TrainerV1alpha1TrainingRuntime,
         "ClusterTrainingRuntime": models.TrainerV1alpha1ClusterTrainingRuntime}
NODE = "node"  # constants.Node: the trainer's replicated Job and its container
ANCESTOR_LABEL, TRAINER = "trainer.kubeflow.org/trainjob-ancestor-step", "trainer"
MASTER_PORT = 29400  # constants.ContainerTrainerPort
# The variables the torch plugin sets (constants.TorchRunReservedEnvNames): a TrainJob may not set them.
RESERVED = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(ValueError):
    """The document does not deserialise into the API's models; the message names the path."""


def read(path: Path) -> list[dict]:
    return [doc for doc in YAML(typ="safe").load_all(path.read_text()) if doc is not None]


def strict_load(doc: dict):
    """``doc`` as an instance of the model its ``kind`` names; every key must survive the round trip."""
    kind = doc.get("kind")
    if doc.get("apiVersion") != API_VERSION or kind not in KINDS:
        raise ManifestError(f"$: not a {API_VERSION} {' or '.join(KINDS)}")
    try:
        obj = KINDS[kind].from_dict(doc)
    except ValidationError as e:
        first = e.errors()[0]
        raise ManifestError(f"{e.title}.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if problem := first_difference(doc, obj.to_dict()):
        raise ManifestError(problem)
    return obj


def first_difference(sent, back, path: str = "$") -> str | None:
    """Where the document and its round trip through the models first differ (None: nowhere)."""
    if isinstance(sent, dict) and isinstance(back, dict):
        for key in sent:
            if key not in back:
                return f"{path}.{key}: the API has no such field (its reader dropped it)"
            if found := first_difference(sent[key], back[key], f"{path}.{key}"):
                return found
        extra = set(back) - set(sent)
        return f"{path}: the API added {sorted(extra)}" if extra else None
    if isinstance(sent, list) and isinstance(back, list) and len(sent) == len(back):
        return next(filter(None, (first_difference(a, b, f"{path}[{i}]")
                                  for i, (a, b) in enumerate(zip(sent, back, strict=True)))), None)
    return None if sent == back else f"{path}: {sent!r} came back as {back!r}"


def trainer_job(runtime):
    """The runtime's replicated Job that the Trainer treats as the trainer (its ancestor label)."""
    for job in runtime.spec.template.spec.replicated_jobs or []:
        labels = job.template.metadata.labels if job.template.metadata else None
        if job.name == NODE and (labels or {}).get(ANCESTOR_LABEL) == TRAINER:
            return job
    return None


def node_container(runtime, job):
    """The runtime's ``node`` container with the TrainJob's trainer fields laid over it."""
    replicated = trainer_job(runtime)
    pod = replicated.template.spec.template.spec if replicated else None
    base = next((c for c in (pod.containers if pod else []) if c.name == NODE), None)
    if base is None:
        return None
    trainer = job.spec.trainer
    patch = {"image": trainer.image, "command": trainer.command, "args": trainer.args,
             "resources": trainer.resources_per_node}
    merged = base.model_copy(update={k: v for k, v in patch.items() if v is not None})
    env = {e.name: e for e in [*(base.env or []), *(trainer.env or [])]}  # the TrainJob's win (apply.UpsertEnvVars)
    return merged.model_copy(update={"env": list(env.values()) or None})


def num_nodes(runtime, job) -> int:
    return job.spec.trainer.num_nodes or runtime.spec.ml_policy.num_nodes or 1


def gpus(container) -> int:
    limits = container.resources.limits if container.resources else None
    return sum(int(q.actual_instance) for name, q in (limits or {}).items() if "gpu" in name.lower())


def num_proc_per_node(runtime, job) -> str:
    """numProcPerNode, else "auto"; "auto" on a pod that asks for no GPU means its CPU count (limits first)."""
    trainer = job.spec.trainer
    if trainer.num_proc_per_node is not None:
        return str(trainer.num_proc_per_node)
    resources = trainer.resources_per_node
    for amounts in (resources.limits, resources.requests) if resources else ():
        if amounts and not any("gpu" in name.lower() for name in amounts):
            return str(max(1, cpu_count(amounts.get("cpu"))))
    return "auto"


def cpu_count(quantity) -> int:
    """A CPU quantity ("2", "500m", 1.5) as Kubernetes' Value(): rounded up to a whole CPU."""
    if quantity is None:
        return 0
    text = str(quantity.actual_instance)
    return math.ceil(int(text[:-1]) / 1000) if text.endswith("m") else math.ceil(float(text))


def torch_env(runtime, job, node_rank: int) -> dict[str, str]:
    """What the torch plugin adds to node ``node_rank``'s container (nothing without ``mlPolicy.torch``).
    PET_NODE_RANK comes from the pod's Job completion index, which is the node's rank."""
    if runtime.spec.ml_policy is None or runtime.spec.ml_policy.torch is None:
        return {}
    name = job.metadata.name
    return {"PET_NNODES": str(num_nodes(runtime, job)), "PET_NPROC_PER_NODE": num_proc_per_node(runtime, job),
            "PET_NODE_RANK": str(node_rank), "PET_MASTER_ADDR": f"{name}-{NODE}-0-0.{name}",
            "PET_MASTER_PORT": str(MASTER_PORT)}


def admission_problems(runtime, job) -> list[str]:
    """What the Trainer's webhooks or controller would refuse, or silently do otherwise."""
    ref, found = job.spec.runtime_ref, []
    if not (_DNS1035.match(job.metadata.name or "") and len(job.metadata.name) <= 63):
        found.append(f"metadata.name {job.metadata.name!r} is not a DNS-1035 label")
    if (ref.api_group or "trainer.kubeflow.org", ref.kind or "ClusterTrainingRuntime", ref.name) != \
            (API_VERSION.split("/")[0], runtime.kind, runtime.metadata.name):
        found.append(f"runtimeRef names {ref.kind or 'ClusterTrainingRuntime'} {ref.name}, not the "
                     f"{runtime.kind} {runtime.metadata.name} beside it")
    if runtime.spec.ml_policy is None or runtime.spec.ml_policy.torch is None:
        found.append("the runtime has no mlPolicy.torch: no PET_* variables for torchrun")
    if node_container(runtime, job) is None:
        found.append(f"the runtime has no replicated Job {NODE} labelled {ANCESTOR_LABEL}: {TRAINER} "
                     f"with a container named {NODE}")
    reserved = sorted({e.name for e in job.spec.trainer.env or []} & set(RESERVED))
    if reserved:
        found.append(f"trainer.env sets {reserved}, which the torch plugin reserves")
    return found
