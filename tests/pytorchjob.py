"""Offline checks of a Kubeflow PyTorchJob manifest, against the API itself and the operator's rules.

``strict_load`` reads a manifest into the kubeflow-training SDK's generated models (and the
kubernetes client's, for the pod template): it follows their ``openapi_types`` and
``attribute_map`` and constructs every model, so that their own validation runs. The SDK's
deserializer would drop an unknown key silently; here an unknown key or a wrong type is an error
that names its path. ``webhook_problems`` and ``operator_env`` restate what the Training Operator
(v1.9) does with a job: its admission webhook (pkg/webhooks/pytorch/pytorchjob_webhook.go) and the
variables it injects into each pod (pkg/controller.v1/pytorch/envvar.go, master.go, elastic.go).
"""

from __future__ import annotations

import re
from pathlib import Path

import kubernetes.client.models as k8s_models
from kubeflow.training import models as kubeflow_models
from kubeflow.training.constants import constants
from ruamel.yaml import YAML

_LIST, _DICT = re.compile(r"list\[(.+)\]$"), re.compile(r"dict\(str, (.+)\)$")
_PRIMITIVES = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?$")
DEFAULT_PORT_NAME = "pytorchjob-port"  # kubeflowv1.PytorchJobDefaultPortName


class ManifestError(ValueError):
    """The manifest does not deserialise into the API's models; the message names the path."""


def read(path: Path) -> list[dict]:
    """Every YAML document in ``path`` (anchors resolved, as kubectl resolves them)."""
    return [doc for doc in YAML(typ="safe").load_all(path.read_text()) if doc is not None]


def _model(name: str) -> type:
    for module in (kubeflow_models, k8s_models):
        if hasattr(module, name):
            return getattr(module, name)
    raise ManifestError(f"the API has no type {name}")


def strict_load(data, type_name: str, path: str = "$"):
    """``data`` as an instance of the API type ``type_name`` (e.g. ``KubeflowOrgV1PyTorchJob``)."""
    if match := _LIST.match(type_name):
        if not isinstance(data, list):
            raise ManifestError(f"{path}: expected a list, got {data!r}")
        return [strict_load(v, match[1], f"{path}[{i}]") for i, v in enumerate(data)]
    if match := _DICT.match(type_name):
        if not isinstance(data, dict):
            raise ManifestError(f"{path}: expected a mapping, got {data!r}")
        return {k: strict_load(v, match[1], f"{path}.{k}") for k, v in data.items()}
    if type_name in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[type_name]) or (type_name == "int" and isinstance(data, bool)):
            raise ManifestError(f"{path}: expected {type_name}, got {data!r}")
        return data
    cls = _model(type_name)
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a {type_name} mapping, got {data!r}")
    attrs = {key: attr for attr, key in cls.attribute_map.items()}
    for key in data:
        if key not in attrs:
            raise ManifestError(f"{path}: {type_name} has no field {key!r}")
    values = {attrs[k]: strict_load(v, cls.openapi_types[attrs[k]], f"{path}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as e:  # the generated models' own checks, e.g. a required field left out
        raise ManifestError(f"{path}: {e}") from None


def load_job(data: dict):
    """A PyTorchJob document as the SDK's ``KubeflowOrgV1PyTorchJob``."""
    if (data.get("apiVersion"), data.get("kind")) != (constants.API_VERSION, constants.PYTORCHJOB_KIND):
        raise ManifestError(f"$: not a {constants.API_VERSION} {constants.PYTORCHJOB_KIND}")
    return strict_load(data, constants.PYTORCHJOB_MODEL)


def webhook_problems(job) -> list[str]:
    """The operator's admission checks (validatePyTorchJob): what ``kubectl apply`` would be refused for."""
    found = [] if _DNS1035.match(job.metadata.name or "") and len(job.metadata.name) <= 63 else \
        [f"metadata.name {job.metadata.name!r} is not a DNS-1035 label"]
    elastic = job.spec.elastic_policy
    if elastic and elastic.n_proc_per_node is not None and job.spec.nproc_per_node is not None:
        found.append("elasticPolicy.nProcPerNode must not be used with nprocPerNode")
    master, worker = constants.REPLICA_TYPE_MASTER, constants.REPLICA_TYPE_WORKER
    for rtype, spec in job.spec.pytorch_replica_specs.items():
        if rtype not in (master, worker):
            found.append(f"{rtype}: not a PyTorchJob replica type ({master}, {worker})")
        containers = spec.template.spec.containers if spec.template and spec.template.spec else []
        if constants.PYTORCHJOB_CONTAINER not in [c.name for c in containers]:
            found.append(f"{rtype}: no container named {constants.PYTORCHJOB_CONTAINER}")
        found += [f"{rtype}: container {c.name} has no image" for c in containers if not c.image]
        if rtype == master and spec.replicas != 1:
            found.append(f"{rtype}: replicas must be 1")
    return found


def container(job, rtype: str):
    """The replica's ``pytorch`` container: the one the operator configures and starts."""
    spec = job.spec.pytorch_replica_specs[rtype].template.spec
    return next(c for c in spec.containers if c.name == constants.PYTORCHJOB_CONTAINER)


def _named_port(job, rtype: str) -> int:
    """getPortFromPyTorchJob: the ``pytorchjob-port`` of the replica's pytorch container."""
    for port in container(job, rtype).ports or []:
        if port.name == DEFAULT_PORT_NAME:
            return port.container_port
    raise ManifestError(f"{rtype}: the pytorch container has no port named {DEFAULT_PORT_NAME}")


def pods(job) -> list[tuple[str, int]]:
    """Every pod the operator creates: (replica type, index); named ``<job>-<type>-<index>``."""
    return [(rtype, i) for rtype, spec in job.spec.pytorch_replica_specs.items() for i in range(spec.replicas)]


def operator_env(job, rtype: str, index: int) -> dict[str, str]:
    """What the operator adds to the pytorch container of pod ``<job>-<rtype>-<index>`` (setPodEnv)."""
    specs, name = job.spec.pytorch_replica_specs, job.metadata.name
    total = sum(spec.replicas for spec in specs.values())
    nproc = job.spec.nproc_per_node or "auto"
    env = {"PYTHONUNBUFFERED": "0"}
    if constants.REPLICA_TYPE_MASTER in specs:  # Master: rank = index; Worker i: rank i + 1
        port, rank = str(_named_port(job, constants.REPLICA_TYPE_MASTER)), index + (rtype != "Master")
        env |= {"MASTER_PORT": port, "PET_MASTER_PORT": port, "MASTER_ADDR": f"{name}-master-0",
                "PET_MASTER_ADDR": f"{name}-master-0", "WORLD_SIZE": str(total * (int(nproc) if nproc.isdigit()
                                                                                 else 1)),
                "RANK": str(rank), "PET_NPROC_PER_NODE": nproc, "PET_NODE_RANK": str(rank)}
    elastic = job.spec.elastic_policy
    if elastic is None:
        return {**env, "PET_NNODES": str(total)}
    port = elastic.rdzv_port or _named_port(job, constants.REPLICA_TYPE_WORKER)
    env |= {"PET_RDZV_ENDPOINT": f"{elastic.rdzv_host or name + '-worker-0'}:{port}",
            "PET_RDZV_BACKEND": elastic.rdzv_backend or "c10d"}
    # Without min and max the operator counts the Workers alone (generateEnvNNodes).
    env["PET_NNODES"] = str(specs[constants.REPLICA_TYPE_WORKER].replicas) if elastic.min_replicas is None \
        and elastic.max_replicas is None else f"{elastic.min_replicas}:{elastic.max_replicas}"
    optional = {"PET_MAX_RESTARTS": elastic.max_restarts, "PET_NPROC_PER_NODE": elastic.n_proc_per_node,
                "PET_RDZV_ID": elastic.rdzv_id}
    env |= {k: str(v) for k, v in optional.items() if v is not None}
    if elastic.rdzv_conf:
        env["PET_RDZV_CONF"] = ",".join(f"{c.key}={c.value}" for c in elastic.rdzv_conf)
    return env
