"""One logical training state for every strategy: what a sharded checkpoint holds.

Whatever split the training, the state is named the way one process would name it::

    {"model": {fqn: tensor},                                   # parameters and buffers
     "optim": {"state": {fqn: {"exp_avg": ..., "step": ...}}}} # the optimizer's per-parameter state

so DCP (torch.distributed.checkpoint) stores the same keys (``model.linear1.weight``,
``optim.state.linear1.weight.exp_avg``) under ddp, zero, fsdp and one process, and any of them
can load what any other saved, at any world size. Under fsdp the tensors are DTensor shards and
DCP reads or writes only each rank's slice; under ddp they are whole replicas (DCP writes each
once); under zero each rank holds the optimizer state of its own partition only.

torch's ``get_state_dict``/``set_state_dict`` (torch/distributed/checkpoint/state_dict.py) map
DDP and FSDP2 models and their optimizers to these names. ``ZeroRedundancyOptimizer`` is not one
of the optimizers they know: its ``state_dict()`` consolidates everything on one rank
(``consolidate_state_dict``), which is what sharded checkpoints avoid. Its local optimizer
(``.optim``) holds plain per-parameter state for this rank's partition, so :func:`zero_state`
names that state by parameter and each rank saves, or loads, just its own entries (ZeRO-1 keeps
a parameter's state whole on one rank, so nothing needs slicing).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

if TYPE_CHECKING:
    from torch.distributed.optim import ZeroRedundancyOptimizer

# Whole tensors on every rank: what a one-file checkpoint holds (docs: StateDictOptions.full_state_dict)
FULL = StateDictOptions(full_state_dict=True)


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is a ZeroRedundancyOptimizer, without importing its module (0.3 s): only a
    zero run has loaded it (parallel/strategy.py imports it when zero wraps), and only then can one exist."""
    zero = sys.modules.get("torch.distributed.optim.zero_redundancy_optimizer")
    return zero is not None and isinstance(optimizer, zero.ZeroRedundancyOptimizer)


def logical_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's part of the logical state (sharded where the strategy shards). Every rank calls it."""
    if _is_zero(optimizer):
        return {"model": get_model_state_dict(module), "optim": {"state": zero_state(module, optimizer)}}
    optim = get_optimizer_state_dict(module, optimizer)
    return {"model": get_model_state_dict(module), "optim": {"state": optim["state"]}}


def zero_state(module: nn.Module, zero: ZeroRedundancyOptimizer) -> dict:
    """The state of the parameters this rank's ZeRO partition steps, named by parameter."""
    names = {p: n for n, p in module.named_parameters()}
    return {names[p]: dict(s) for p, s in zero.optim.state.items()}


def param_groups(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's settings per group (lr, momentum, betas...), parameters named by fqn.

    ZeroRedundancyOptimizer's ``param_groups`` are the whole model's, as one process's would be."""
    names = {p: n for n, p in module.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[p] for p in g["params"]]}
            for g in optimizer.param_groups]


def load_targets(module: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """Tensors for DCP to fill in place: this rank's layout (DTensor shards under fsdp), so DCP
    reads only the slices each rank needs, whatever world size wrote them. ``saved``: the
    checkpoint's key -> TensorStorageMetadata (its ``.metadata``)."""
    if not _is_zero(optimizer):
        # An optimizer that has not stepped has no state yet; torch's get_optimizer_state_dict
        # creates it (a step with lr 0 on zero gradients) so that there is something to fill.
        return logical_state(module, optimizer)
    state = {}
    names = {p: n for n, p in module.named_parameters()}
    for group in optimizer.optim.param_groups:
        for p in group["params"]:
            prefix = f"optim.state.{names[p]}."
            state[names[p]] = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype,
                                                              device=p.device)
                               for key, meta in saved.items()
                               if key.startswith(prefix) and "." not in key[len(prefix):]}
    return {"model": get_model_state_dict(module), "optim": {"state": state}}


def apply_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict, groups: list[dict],
                full: bool) -> None:
    """Put a logical state into the module and optimizer. ``full``: whole tensors on every rank
    (a one-file checkpoint; torch shards them where fsdp needs shards), else :func:`load_targets`'s
    layout. ``groups``: :func:`param_groups` as saved (the saved lr etc. win, as in a file checkpoint)."""
    options = FULL if full else StateDictOptions()
    set_model_state_dict(module, state["model"], options=options)
    if _is_zero(optimizer):
        names = {p: n for n, p in module.named_parameters()}
        for group in optimizer.optim.param_groups:
            for p in group["params"]:
                optimizer.optim.state[p] = {k: v.to(p.device) for k, v in state["optim"]["state"][names[p]].items()}
        for group, saved in zip(optimizer.param_groups, groups, strict=True):
            group.update({k: v for k, v in saved.items() if k != "params"})
        return
    set_optimizer_state_dict(module, optimizer, {"state": state["optim"]["state"], "param_groups": groups},
                             options=options)


def from_file_state(file_state: dict, names: list[str]) -> tuple[dict, list[dict]]:
    """A one-file checkpoint's model and optimizer (``optimizer.state_dict()``: state by parameter
    index, in ``module.parameters()`` order, whose names are ``names``) as a logical state and
    named parameter groups."""
    optim = file_state["optimizer"]
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in optim["param_groups"]]
    state = {names[i]: s for i, s in optim["state"].items()}
    return {"model": file_state["model"], "optim": {"state": state}}, groups


def to_file_state(state: dict, groups: list[dict], names: list[str]) -> dict:
    """The inverse of :func:`from_file_state`: ``optimizer.state_dict()``'s layout by index."""
    index = {n: i for i, n in enumerate(names)}
    optim_state = {index[n]: s for n, s in state["optim"]["state"].items()}
    optim_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                    for g in groups]
    return {"model": state["model"], "optimizer": {"state": optim_state, "param_groups": optim_groups}}
