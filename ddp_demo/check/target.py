"""The target a user writes, loaded and checked before any process starts.

A target is a function with no arguments that returns ``(model, batch, loss_fn)``: a fresh
``nn.Module`` with the same weights on every call (seed it inside the function), one global
batch as a tuple of tensors whose first dimension is the batch (inputs first, target last),
and ``loss_fn(output, target)`` returning a scalar; or a :class:`~ddp_demo.check.recipe.Recipe`
holding those and the rest of the training step. It is named ``path/to/file.py:function``
or ``package.module:function``; every worker process loads it again from that name.

Anything wrong with it raises :class:`CheckError`, whose message is the one line the user
sees (exit 2).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ddp_demo.check.recipe import Recipe, refuse

DTYPE_CHOICES = ("float64", "keep")
CHECKED_DTYPES = (torch.float32, torch.float64)  # the dtypes with stated tolerances (docs/check.md)


class CheckError(ValueError):
    """Bad input (a target that cannot be checked, or a bad flag): the message is the one line
    the user sees, naming the problem and the fix; the command exits 2."""


@dataclass
class Target:
    """One call of the user's function, validated (and cast to the checked dtype)."""

    model: nn.Module
    inputs: tuple[torch.Tensor, ...]
    target: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    recipe: Recipe  # how to train it (for a plain target: the check's defaults around loss_fn)

    @property
    def batch_size(self) -> int:
        return self.target.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The least precise floating dtype among the parameters: it sets the tolerance."""
        dtypes = {p.dtype for p in self.model.parameters() if p.is_floating_point()}
        return torch.float32 if torch.float32 in dtypes else torch.float64

    def shard(self, rank: int, world_size: int) -> Target:
        """Rank r's samples r, r+N, ... of every batch entry (DistributedSampler's layout)."""
        return Target(self.model, tuple(t[rank::world_size] for t in self.inputs),
                      self.target[rank::world_size], self.loss_fn, self.recipe)


def _load_module(where: str, spec: str):
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise CheckError(f"TARGET {spec}: no such file {where}; name an existing FILE.py:FUNCTION")
        name = f"_ddp_demo_check_{path.stem}_{zlib.crc32(str(path.resolve()).encode()):08x}"
        if name in sys.modules:
            return sys.modules[name]  # loaded once per process: the reference, the checks and the diagnosis
        module_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # dataclasses and pickling look the module up by name
        if str(path.parent.resolve()) not in sys.path:
            sys.path.insert(0, str(path.parent.resolve()))  # its own imports work as when run as a script
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(where)


def load_function(spec: str) -> Callable[[], tuple]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name.isidentifier():
        raise CheckError(f"TARGET {spec!r} is not FILE.py:FUNCTION or package.module:FUNCTION, "
                          "e.g. examples/check/transformer.py:build")
    try:
        module = _load_module(where, spec)
    except CheckError:
        raise
    except BaseException as e:  # a SyntaxError or SystemExit in the user's file is bad input too
        raise CheckError(f"TARGET {spec}: importing {where} raised {_one_line(e)}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise CheckError(f"TARGET {spec}: {where} has no function {name!r}{_did_you_mean(module, name)}")
    return fn


def _did_you_mean(module, name: str) -> str:
    """``; did you mean 'build'?`` (the closest functions the module defines), as Python's own
    NameError suggests; else the functions it has."""
    functions = [k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
    close = difflib.get_close_matches(name, functions, n=3)
    if close:
        return "; did you mean " + " or ".join(repr(c) for c in close) + "?"
    return f"; it defines {', '.join(repr(f) for f in functions[:8])}" if functions else ""


def spec_of(fn: Callable[[], tuple]) -> str:
    """The name under which worker processes find a module-level function again."""
    if "<" in fn.__qualname__ or "." in fn.__qualname__:
        raise CheckError(f"{fn.__qualname__} is not a module-level function; worker processes import the "
                          "function by name, so define it at the top level of a module")
    module = sys.modules.get(fn.__module__)
    file = getattr(module, "__file__", None)
    if fn.__module__ == "__main__" or fn.__module__.startswith("_ddp_demo_check_"):
        if not file:
            raise CheckError(f"{fn.__qualname__} is defined in an interactive session; put it in a file")
        return f"{file}:{fn.__name__}"
    return f"{fn.__module__}:{fn.__name__}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _describe(x) -> str:
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def call_target(spec: str, dtype: str = "float64") -> Target:
    """Call the user's function once and validate (and cast) what it returned."""
    fn = load_function(spec)
    try:
        built = fn()
    except Exception as e:
        raise CheckError(f"TARGET {spec}: calling {fn.__name__}() raised {_one_line(e)}") from None
    if isinstance(built, Recipe):
        problem = refuse(built)
        if problem:
            raise CheckError(f"TARGET {spec}: {problem}")
        recipe = built
    elif not isinstance(built, (tuple, list)) or len(built) != 3:
        raise CheckError(f"TARGET {spec}: {fn.__name__}() must return (model, batch, loss_fn) or a "
                          f"ddp_demo.check.Recipe; it returned {_describe(built)}")
    else:
        recipe = Recipe(*built)
    model, batch, loss_fn = recipe.model, recipe.batch, recipe.loss_fn
    _check_parts(spec, model, batch, loss_fn, needs_loss=recipe.step is None)
    # autocast leaves float64 alone (it casts float32 only): a bf16 recipe is checked in its own dtype
    if dtype == "float64" and recipe.autocast is None:  # rounding cannot hide a real difference (docs/check.md)
        model = model.to(torch.float64)
        batch = [t.to(torch.float64) if t.is_floating_point() else t for t in batch]
    built = Target(model, tuple(batch[:-1]), batch[-1], loss_fn, recipe)
    _check_dtype(spec, built, dtype)
    return built


def _check_parts(spec: str, model, batch, loss_fn, needs_loss: bool = True) -> None:
    if not isinstance(model, nn.Module):
        raise CheckError(f"TARGET {spec}: the model (1st of the three) is {_describe(model)}, not a torch.nn.Module")
    if not any(p.requires_grad for p in model.parameters()):
        raise CheckError(f"TARGET {spec}: the model has no trainable parameters; there is nothing to compare")
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise CheckError(f"TARGET {spec}: the batch (2nd of the three) must be a tuple of tensors, inputs first "
                          f"and target last; it is {_describe(batch)}")
    for i, t in enumerate(batch):
        if not isinstance(t, torch.Tensor):
            raise CheckError(f"TARGET {spec}: batch entry {i} is {_describe(t)}, not a tensor; "
                              "pass every input and the target as tensors")
        if t.dim() == 0 or t.device.type != "cpu":
            raise CheckError(f"TARGET {spec}: batch entry {i} must be a CPU tensor whose first dimension is "
                              f"the batch; it has shape {tuple(t.shape)} on {t.device}")
    sizes = [t.shape[0] for t in batch]
    if len(set(sizes)) > 1:
        raise CheckError(f"TARGET {spec}: the batch entries' first dimensions differ ({sizes}); "
                          "the first dimension of each is the batch")
    if needs_loss and not callable(loss_fn):
        raise CheckError(f"TARGET {spec}: loss_fn (3rd of the three) is {_describe(loss_fn)}, not callable")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise CheckError(f"TARGET {spec}: the model is not on the CPU; ddp_demo.check runs on CPU processes "
                          "(gloo), so return it on the CPU")


def _check_dtype(spec: str, built: Target, dtype: str) -> None:
    odd = sorted({str(p.dtype) for p in built.model.parameters() if p.dtype not in CHECKED_DTYPES})
    if odd:
        raise CheckError(f"TARGET {spec}: --dtype {dtype}: parameters in {', '.join(odd)}; tolerances are "
                          "stated for float32 and float64 only; use --dtype float64")


def check_batch_divides(spec: str, built: Target, world_sizes: tuple[int, ...]) -> None:
    """Every rank gets B / N samples, in K equal micro-batches: the average of equal-sized means is
    the global mean."""
    k = built.recipe.accumulate
    bad = [n for n in world_sizes if built.batch_size % (n * k)]
    if bad:
        multiple = math.lcm(*world_sizes) * k
        fix = max(multiple, built.batch_size // multiple * multiple)
        per = f" times {k} micro-batches" if k > 1 else ""
        raise CheckError(f"TARGET {spec}: the batch of {built.batch_size} samples does not divide by world size "
                          f"{bad[0]}{per}; return a batch whose size every --world-sizes value{per} divides, "
                          f"e.g. {fix}")


def check_repeatable(spec: str, first: Target, dtype: str) -> None:
    """Each rank calls the function itself: it must build the same weights and batch every time."""
    second = call_target(spec, dtype)
    a, b = first.model.state_dict(), second.model.state_dict()
    differs = [k for k in a if not torch.equal(a[k], b[k])]
    if differs:
        raise CheckError(f"TARGET {spec}: two calls built different weights ({differs[0]} differs); seed inside "
                          "the function, e.g. torch.manual_seed(0) before building the model")
    pairs = zip((*first.inputs, first.target), (*second.inputs, second.target), strict=True)
    if not all(torch.equal(x, y) for x, y in pairs):
        raise CheckError(f"TARGET {spec}: two calls returned different batches; seed the data inside the "
                          "function or build it from fixed values")
