"""The launch doctor's checks: each returns a verdict and, when it fails, the fix."""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import replace

from ddp_demo.doctor.membership import check_node_loss
from ddp_demo.doctor.plan import Check, LaunchPlan, LaunchProblem, plan_from_env

CONNECT_TIMEOUT_S = 5.0


def _resolve(host: str) -> str | None:
    try:
        return socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        return None


def _is_loopback(addr: str | None) -> bool:
    return addr is not None and ipaddress.ip_address(addr.split("%")[0]).is_loopback


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _own_address(addr: str) -> str | None:
    """None when this machine has ``addr`` (a socket can bind to it), else why not."""
    try:
        with socket.socket(_family(addr), socket.SOCK_STREAM) as s:
            s.bind((addr, 0))
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_cuda(plan: LaunchPlan) -> Check:
    if plan.device != "cuda" and plan.backend != "nccl":
        return Check("cuda", True, f"not requested (device {plan.device}, backend {plan.backend})")
    import torch  # only here: every other check works without torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        return Check("cuda", False, f"CUDA requested (device {plan.device}, backend {plan.backend}) but torch "
                     f"{torch.__version__} sees no GPU", "use --device cpu --backend gloo, or install a CUDA build "
                     "of torch and expose the GPUs (docker: docker-compose.gpu.yml)")
    if (plan.nproc_per_node or 1) > gpus:
        return Check("cuda", False, f"NPROC_PER_NODE={plan.nproc_per_node} but this node has {gpus} GPU(s); "
                     "nccl needs a GPU per process", f"set NPROC_PER_NODE={gpus}")
    return Check("cuda", True, f"{gpus} GPU(s) visible")


def check_world_size(plan: LaunchPlan) -> Check:
    if plan.world_size is None or (plan.nnodes is None and plan.nproc_per_node is None):
        return Check("world size", True, "no expected world size to compare with")
    nproc = plan.nproc_per_node or 1
    sizes = [n * nproc for n in plan.node_counts]
    if plan.world_size in sizes:
        return Check("world size", True, f"{plan.world_size} = {plan.world_size // nproc} node(s) of "
                     f"NNODES {plan.nnodes_text} x NPROC_PER_NODE {nproc}")
    # torchrun sums the processes of the nodes that joined, so a node started with another
    # NPROC_PER_NODE silently changes the world size.
    allowed = " or ".join(map(str, sizes))
    return Check("world size", False, f"world size {plan.world_size} != NNODES {plan.nnodes_text} x NPROC_PER_NODE "
                 f"{nproc} = {allowed}", "start exactly NNODES nodes, every one with the same NPROC_PER_NODE")


def check_hostname(plan: LaunchPlan) -> Check:
    """The 127.0.1.1 trap (Debian's /etc/hosts): torchrun advertises the address the hostname
    resolves to, and gloo binds to it, unless --local-addr and GLOO_SOCKET_IFNAME say otherwise."""
    name = socket.gethostname()
    addr = _resolve(name)
    if not plan.multinode:
        return Check("hostname", True, f"{name!r} -> {addr}; one node, so loopback would be fine")
    if plan.rdzv_host and _is_loopback(_resolve(plan.rdzv_host)):
        return Check("hostname", True, f"{name!r} -> {addr}; rendezvous on loopback: all nodes on this machine")
    if addr is not None and not _is_loopback(addr) and _own_address(addr) is None:
        return Check("hostname", True, f"{name!r} -> {addr}, an address of this machine")
    wanted = {"LOCAL_ADDR": (plan.local_addr, "<this node's address>"),
              "GLOO_SOCKET_IFNAME": (plan.gloo_ifname, "<its interface>")}
    missing = [f"{var}={hint}" for var, (value, hint) in wanted.items() if not value]
    if not missing:
        return Check("hostname", True, f"{name!r} -> {addr}, overridden by LOCAL_ADDR and GLOO_SOCKET_IFNAME")
    # Loopback, or (a stale /etc/hosts, a container's copy) an address this machine does not have.
    return Check("hostname", False, f"{name!r} resolves to {addr or 'nothing'}, not an address other nodes can reach: "
                 "torchrun would advertise it and gloo would bind to it", f"set {' and '.join(missing)} "
                 f"(see `ip -br addr`), or map {name!r} to this node's address in /etc/hosts")


def check_local_addr(plan: LaunchPlan) -> Check:
    if not plan.local_addr:
        return Check("LOCAL_ADDR", True, "unset: torchrun advertises the address the hostname resolves to")
    error = _own_address(plan.local_addr)
    if error:
        return Check("LOCAL_ADDR", False, f"LOCAL_ADDR {plan.local_addr} is not an address of this machine "
                     f"({error})", "set LOCAL_ADDR to this node's own address (see `ip -br addr`)")
    return Check("LOCAL_ADDR", True, f"{plan.local_addr} is an address of this machine")


def check_ifname(plan: LaunchPlan) -> Check:
    if not plan.gloo_ifname:
        return Check("GLOO_SOCKET_IFNAME", True, "unset: gloo uses the address the hostname resolves to")
    # gloo accepts a comma-separated list of interfaces (torch.distributed docs, "Common environment variables")
    known = [name for _, name in socket.if_nameindex()]
    unknown = [n for n in plan.gloo_ifname.split(",") if n not in known]
    if unknown:
        return Check("GLOO_SOCKET_IFNAME", False, f"GLOO_SOCKET_IFNAME names no interface of this machine: "
                     f"{', '.join(unknown)}", f"use one of: {', '.join(known)}")
    return Check("GLOO_SOCKET_IFNAME", True, f"{plan.gloo_ifname}: interface present")




def _bindable(name: str, target: str, addr: str, port: int) -> Check:
    """The store host must be able to listen there: the port free, the address its own."""
    try:
        with socket.socket(_family(addr), socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store does: TIME_WAIT is no conflict
            s.bind((addr, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return Check(name, False, f"port {port} is in use on this machine ({target})",
                         f"pick a free port, or stop what listens there (`ss -ltnp 'sport = :{port}'`)")
        return Check(name, False, f"{target}: this node hosts the store but {addr} is not one of its addresses "
                     f"({e.strerror})", "on node 0 use its own address; on the other nodes NODE_RANK must not be 0")
    return Check(name, True, f"this node hosts the store at {target}; the port is free")


def _reachable(name: str, target: str, addr: str, port: int, store_up: bool) -> Check:
    try:
        socket.create_connection((addr, port), timeout=CONNECT_TIMEOUT_S).close()
    except ConnectionRefusedError:
        if not store_up:
            return Check(name, True, f"{target}: the host answers; nothing listens yet (fine until node 0 starts)")
        return Check(name, False, f"{target}: connection refused, nothing listens there",
                     "check that the address is node 0's as seen from this node (LOCAL_ADDR on node 0)")
    except OSError as e:
        return Check(name, False, f"{target} is unreachable ({e.strerror or 'timed out'})",
                     f"check that node 0 is up, that this is its address as seen from here, "
                     f"and that no firewall blocks port {port}")
    return Check(name, True, f"{target} accepts connections")


def check_endpoint(name: str, host: str, port: int, hosting: bool, store_up: bool) -> Check:
    """Rendezvous endpoint or MASTER_ADDR: resolvable, then free (its host) or reachable (the others)."""
    target = f"{host}:{port}"
    addr = _resolve(host)
    if addr is None:
        return Check(name, False, f"{target}: {host!r} does not resolve",
                     "use node 0's IP address, or a name every node resolves (DNS or /etc/hosts)")
    if hosting and not store_up:
        return _bindable(name, target, addr, port)
    return _reachable(name, target, addr, port, store_up)


def check_store_elsewhere(plan: LaunchPlan) -> Check:
    """RDZV_EXTERNAL=1: the store (python -m ddp_demo.rendezvous) must listen already, on a host
    that is not this training node; else this node would be the one whose loss ends the job."""
    target, port = f"{plan.rdzv_host}:{plan.rdzv_port}", plan.rdzv_port
    addr = _resolve(plan.rdzv_host)
    if addr is None:
        return check_endpoint("rendezvous", plan.rdzv_host, port, False, True)  # says: does not resolve
    try:
        socket.create_connection((addr, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return Check("rendezvous", False, f"{target}: no store answers there ({e.strerror or 'timed out'})",
                     f"start `python -m ddp_demo.rendezvous --port {port}` on that host before the nodes, "
                     f"and check that no firewall blocks port {port}")
    if _is_loopback(addr) or _own_address(addr) is None:
        return Check("rendezvous", False, f"{target}: the store runs on this training node, but RDZV_EXTERNAL=1 "
                     "wants it on a host that trains nothing", "run python -m ddp_demo.rendezvous on a host of its "
                     "own and set RDZV_HOST to its address, or unset RDZV_EXTERNAL (node 0 then hosts the store)")
    return Check("rendezvous", True, f"{target}: the store accepts connections, on a host that is not this node")


def check_rendezvous(plan: LaunchPlan) -> Check:
    """The rendezvous endpoint, by layout; once it passes, whose loss ends the job in that layout."""
    if plan.external_store:
        found = check_store_elsewhere(plan)
    else:
        found = check_endpoint("rendezvous", plan.rdzv_host, plan.rdzv_port, plan.hosts_store, False)
    if not found.ok or not plan.multinode:
        return found
    return replace(found, verdict=f"{found.verdict}; single point of failure: {plan.single_point_of_failure}")


def run_checks(plan: LaunchPlan) -> list[Check]:
    found = [check_cuda(plan), check_world_size(plan), check_hostname(plan), check_local_addr(plan),
             check_ifname(plan)]
    if plan.rdzv_host and not plan.launched:  # once launched, rendezvous is over and its port is taken
        found.append(check_rendezvous(plan))
    if plan.multinode and not plan.launched:  # membership: what a node's loss would need
        found.append(check_node_loss(plan))
    if plan.master_addr and plan.master_port:
        # Inside the workers the agent's store already listens; a store of the workers' own
        # (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) opens when global rank 0 starts it, maybe later.
        up = plan.launched and plan.agent_store
        found.append(check_endpoint("MASTER_ADDR", plan.master_addr, plan.master_port,
                                    plan.hosts_store and not plan.launched, up))
    return found


def preflight(variables: dict[str, str], launched: bool, world_size: int, device: str, backend: str,
              agent_store: bool = True) -> int:
    """The trainer's ``--preflight``: raise LaunchProblem (one line) on the first failure.
    ``variables``: the process's environment, read by core/env.py (``launch_variables``)."""
    try:
        plan = plan_from_env(variables, device=device, backend=backend, launched=launched,
                             world_size=world_size if launched else None, agent_store=agent_store)
    except ValueError as e:
        raise LaunchProblem(f"preflight: {e}") from None
    found = run_checks(plan)
    for check in found:
        if not check.ok:
            raise LaunchProblem(f"preflight: {check.name}: {check.verdict}; fix: {check.fix}")
    return len(found)
