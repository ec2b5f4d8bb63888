"""What each rank's training step did, recorded as it happened (for ``diagnose_step.py``) and where
it got to (for a rank that raises or stops: ``progress``).

Hooks, not the step's source text: a forward pre-hook on the wrapper (DDP, or the fsdp stand-in)
and one on the user's Module tell whether a forward went through the wrapper and whether that
micro-batch was in ``no_sync``; a step pre-hook on the optimizer reads the learning rate;
``clip_grad_norm_`` and the collectives of ``torch.distributed`` are wrapped (:func:`install`) to
note when the step calls them; under ddp and zero, a hook after each parameter's gradient
accumulation keeps a copy of a gradient that is still local (a ``no_sync`` backward), so that a
change made to it before the next forward or step is seen; and the state of torch's, numpy's and
Python's random-number generators is fingerprinted when each step begins and ends.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import zlib
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

COLLECTIVES = ("all_reduce", "broadcast", "barrier", "all_gather", "all_gather_object", "reduce", "gather",
               "scatter", "broadcast_object_list", "reduce_scatter", "all_to_all", "send", "recv")
_active: list[Recorder] = []  # the recorder of the step now running in this process (one at a time)


def rng_fingerprints() -> dict[str, int]:
    """A checksum of each generator's state: torch's CPU one, numpy's global one (if numpy is loaded), Python's."""
    out = {"torch": zlib.crc32(torch.get_rng_state().numpy().tobytes()),
           "random": zlib.crc32(repr(random.getstate()).encode())}
    if "numpy" in sys.modules:
        kind, keys, pos, *_ = sys.modules["numpy"].random.get_state()
        out["numpy"] = zlib.crc32(keys.tobytes() + str(pos).encode())
    return out


class Progress:
    """Where this rank is, in a file the parent reads if the rank never answers (docs/check.md)."""

    def __init__(self, folder: str | None, rank: int):
        self.path = Path(folder) / f"rank{rank}.json" if folder else None
        self.state = {"rank": rank, "target": "", "step": 0, "last": "started", "raised": None, "time": 0.0,
                      "events": 0}

    def note(self, last: str | None = None, **fields) -> None:
        if self.state["raised"] and "raised" not in fields:
            return  # what it was doing when it raised stays the last thing it did
        self.state.update(fields, **({"last": last} if last else {}), time=time.time(), events=self.state["events"] + 1)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.state))
            os.replace(tmp, self.path)  # the parent never reads half a file


class Recorder:
    """Hooks on one wrapped model and its optimizer for the length of one target's training."""

    def __init__(self, wrapper: nn.Module, module: nn.Module, opt, progress: Progress, local_grads: bool):
        self.wrapper, self.module, self.progress = wrapper, module, progress
        self.steps: list[dict] = []
        self.entered = self.in_optimizer = False
        self.sync = True
        self.local: dict[str, torch.Tensor] = {}  # gradients as a no_sync backward left them
        self.names = {p: n for n, p in module.named_parameters()}
        self.handles = [wrapper.register_forward_pre_hook(self._wrapper_forward),
                        module.register_forward_pre_hook(self._forward),
                        module.register_forward_hook(self._forward_done),
                        opt.register_step_pre_hook(self._optimizer_step),
                        opt.register_step_post_hook(self._optimizer_done)]
        if local_grads:
            self.handles += [p.register_post_accumulate_grad_hook(self._accumulated)
                             for p in module.parameters() if p.requires_grad]

    def __enter__(self) -> Recorder:
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _active.remove(self)
        for h in self.handles:
            h.remove()

    def begin(self, step: int) -> None:
        self.steps.append({"forwards": [], "clips": [], "edited": [], "collectives": [],
                           "rng": rng_fingerprints(), "lr": None})
        self.progress.note(f"step {step + 1} began", step=step + 1)

    def end(self) -> None:
        self.steps[-1]["rng_end"] = rng_fingerprints()

    def _wrapper_forward(self, module, args) -> None:
        self.entered = True

    def _forward(self, module, args) -> None:
        self._check_edits()
        self.sync = bool(getattr(self.wrapper, "require_backward_grad_sync", getattr(self.wrapper, "syncing", True)))
        self.steps[-1]["forwards"].append([self.entered, self.sync])
        self.progress.note(f"forward of micro-batch {len(self.steps[-1]['forwards'])}"
                           + ("" if self.entered else " through model.module") + ("" if self.sync else " in no_sync"))
        self.entered = False

    def _forward_done(self, module, args, out) -> None:
        """Backward reaching this output is where a rank waiting for another's gradients is seen to be."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            i = len(self.steps[-1]["forwards"])
            out.register_hook(lambda g: self.progress.note(f"backward of micro-batch {i}"))

    def _accumulated(self, p: torch.Tensor) -> None:
        if not self.sync:
            self.local[self.names[p]] = p.grad.detach().clone()

    def _check_edits(self) -> None:
        params = dict(self.module.named_parameters())
        edited = [n for n, g in self.local.items() if params[n].grad is None or not torch.equal(params[n].grad, g)]
        self.steps[-1]["edited"] += [n for n in edited if n not in self.steps[-1]["edited"]]
        self.local = {}

    def clipping(self) -> None:
        self._check_edits()
        self.steps[-1]["clips"].append(not self.sync)
        self.progress.note("clip_grad_norm_" + ("" if self.sync else " on local gradients"))

    def collective(self, name: str) -> None:
        if not self.in_optimizer:  # the optimizer's own (ZeRO's broadcasts) are not the step's
            self.steps[-1]["collectives"].append(name)
            self.progress.note(f"dist.{name} called by the step")

    def _optimizer_step(self, opt, args, kwargs) -> None:
        self._check_edits()
        self.in_optimizer = True
        self.steps[-1]["lr"] = self.steps[-1]["lr"] or max(g["lr"] for g in opt.param_groups)
        self.progress.note("optimizer.step()")

    def _optimizer_done(self, opt, args, kwargs) -> None:
        self.in_optimizer = False
        self.progress.note("optimizer.step() returned")


def _clip_recorded(original):
    def clip_grad_norm_(*args, **kwargs):
        if _active:
            _active[-1].clipping()
        return original(*args, **kwargs)

    return clip_grad_norm_


def _collective_recorded(name: str, original):
    def collective(*args, **kwargs):
        if _active:
            _active[-1].collective(name)
        return original(*args, **kwargs)

    return collective


def install() -> None:
    """Wrap ``clip_grad_norm_`` and the collectives, once per worker process, before any target loads
    (a target's ``from torch.nn.utils import clip_grad_norm_`` then gets the wrapped one)."""
    if getattr(torch.nn.utils.clip_grad_norm_, "_ddp_demo_recorded", False):
        return
    clip = _clip_recorded(torch.nn.utils.clip_grad_norm_)
    clip._ddp_demo_recorded = True
    torch.nn.utils.clip_grad_norm_ = torch.nn.utils.clip_grad.clip_grad_norm_ = clip
    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _collective_recorded(name, getattr(dist, name)))
