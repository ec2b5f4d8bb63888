"""What the doctor checks: the launch this node is about to make (or its workers were made by)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_RDZV_PORT = 29400  # torchrun's own default for the c10d rendezvous endpoint


class LaunchProblem(RuntimeError):
    """A preflight check failed; the message is the one line the user sees."""


@dataclass(frozen=True)
class LaunchPlan:
    """How this node is about to launch, or (``launched``) how its workers were launched."""

    nnodes: int | None = None  # the most nodes the job may have (NNODES=N, or the MAX of MIN:MAX)
    min_nodes: int | None = None  # the fewest it may go on with (the MIN of NNODES=MIN:MAX); None: nnodes
    nproc_per_node: int | None = None
    node_rank: int | None = None
    rdzv_host: str | None = None
    rdzv_port: int = DEFAULT_RDZV_PORT
    external_store: bool = False  # RDZV_EXTERNAL=1: the store runs on a host of its own (python -m ddp_demo.rendezvous)
    local_addr: str | None = None
    gloo_ifname: str | None = None
    master_addr: str | None = None
    master_port: int | None = None
    max_restarts: int = 0  # MAX_RESTARTS, passed to torchrun as --max-restarts (its default is 0)
    device: str = "auto"
    backend: str = "auto"
    world_size: int | None = None  # the world size the job must have (the trainer passes the real one)
    checkpoint_dir: str | None = None  # the trainer's --checkpoint-dir
    global_batch_size: int | None = None  # the trainer's --global-batch-size, when given
    launched: bool = False  # inside torchrun's workers: rendezvous is over
    agent_store: bool = True  # once launched, the workers' store is the agent's, already listening

    @property
    def multinode(self) -> bool:
        return (self.nnodes or 1) > 1

    @property
    def elastic(self) -> bool:
        """NNODES=MIN:MAX with MIN < MAX: the job may go on with fewer nodes, or take more."""
        return self.min_nodes is not None and self.min_nodes < (self.nnodes or 1)

    @property
    def node_counts(self) -> range:
        """Every number of nodes the job may have."""
        top = self.nnodes or 1
        return range(top if self.min_nodes is None else self.min_nodes, top + 1)

    @property
    def nnodes_text(self) -> str:
        return f"{self.min_nodes}:{self.nnodes}" if self.elastic else str(self.nnodes or 1)

    @property
    def hosts_store(self) -> bool:
        """Node 0 runs the store the other nodes connect to (launch/multinode.sh: is_host=1),
        unless it runs on a host of its own."""
        return self.node_rank == 0 and not self.external_store

    @property
    def single_point_of_failure(self) -> str:
        """Whose loss ends the job, whatever NNODES allows: the host of the rendezvous store."""
        if self.external_store:
            return f"the store's host {self.rdzv_host}, which trains nothing: any training node may be lost"
        return (f"node 0 ({self.rdzv_host}), which hosts the store (RDZV_EXTERNAL=1 and python -m "
                "ddp_demo.rendezvous on a host of its own move it off the training nodes)")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    verdict: str
    fix: str = ""


def _int(environ: dict[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{name}={value!r} is not a whole number; set {name} to one, e.g. {name}=2")
    return int(value)


def _node_range(environ: dict[str, str]) -> tuple[int | None, int | None]:
    """NNODES as torchrun takes it: N, or MIN:MAX (torch.distributed.run, --nnodes)."""
    value = environ.get("NNODES", "").strip()
    if ":" not in value:
        return None, _int(environ, "NNODES")
    low, _, high = value.partition(":")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
        raise ValueError(f"NNODES={value!r} is not a node count or a range MIN:MAX with 0 < MIN <= MAX; "
                         "set e.g. NNODES=2 or NNODES=1:2")
    return int(low), int(high)


def _flag(environ: dict[str, str], name: str) -> bool:
    value = environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{name}={value!r} is not 0 or 1; set {name}=1 or leave it unset")
    return value == "1"


def plan_from_env(environ: dict[str, str], **given) -> LaunchPlan:
    """The launch scripts' variables (empty counts as unset); ``given`` adds what flags know."""
    text = {k: environ.get(k, "").strip() or None for k in ("RDZV_HOST", "LOCAL_ADDR", "GLOO_SOCKET_IFNAME")}
    min_nodes, nnodes = _node_range(environ)
    return LaunchPlan(
        nnodes=nnodes or (2 if text["RDZV_HOST"] else None),  # launch/multinode.sh's default
        min_nodes=min_nodes,
        nproc_per_node=_int(environ, "NPROC_PER_NODE"),
        node_rank=_int(environ, "NODE_RANK"),
        rdzv_host=text["RDZV_HOST"],
        rdzv_port=_int(environ, "RDZV_PORT") or DEFAULT_RDZV_PORT,
        external_store=_flag(environ, "RDZV_EXTERNAL"),
        local_addr=text["LOCAL_ADDR"],
        gloo_ifname=text["GLOO_SOCKET_IFNAME"],
        master_addr=environ.get("MASTER_ADDR") or None,
        master_port=_int(environ, "MASTER_PORT"),
        max_restarts=_int(environ, "MAX_RESTARTS") or 0,
        **given,
    )
