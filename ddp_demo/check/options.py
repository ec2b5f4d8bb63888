"""The command's flags as a typed dataclass: each field's ``help`` is its ``--flag`` help."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from ddp_demo.check.engine import Plan
from ddp_demo.check.target import DTYPE_CHOICES, CheckError
from ddp_demo.core.config import OPTIMIZERS, PROOF_LR


def _opt(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class CheckOptions:
    world_sizes: tuple[int, ...] = _opt((2, 3), "the numbers of processes N to check, comma-separated, e.g. 2,3,4")
    steps: int = _opt(3, "optimizer steps on the batch; parameters are compared after the last")
    dtype: str = _opt("float64", "float64: cast the model and floating inputs, so rounding cannot hide a real "
                      "difference; keep: check in the model's own dtype (float32 or float64)", DTYPE_CHOICES)
    optimizer: str = _opt("sgd", "sgd (momentum 0.9) or adam", OPTIMIZERS)
    lr: float | None = _opt(None, f"learning rate [default: {PROOF_LR['sgd']} for sgd, {PROOF_LR['adam']} for adam]")
    find_unused_parameters: bool = _opt(False, "your DDP uses find_unused_parameters=True: parameters that get no "
                                        "gradient are then not a failure")
    timeout: float = _opt(120.0, "seconds each world size may take before its processes are stopped")
    json: str | None = _opt(None, "also write the verdict as JSON to this file (format: docs/check.md)")
    plot: str | None = _opt(None, "also draw each tensor's largest difference against its tolerance, for every N, "
                            "to this .png, .svg or .pdf (needs matplotlib: the plot extra)")

    def __post_init__(self):
        if not self.world_sizes or min(self.world_sizes) < 1:
            raise CheckError("--world-sizes must list positive integers, e.g. --world-sizes 2,3")
        if self.steps < 1:
            raise CheckError(f"--steps must be a positive integer (got {self.steps})")
        if self.lr is not None and not self.lr > 0:
            raise CheckError(f"--lr must be a positive number (got {self.lr})")
        if not self.timeout > 0:
            raise CheckError(f"--timeout must be a positive number of seconds (got {self.timeout})")
        for name in ("dtype", "optimizer"):
            choices = _field(name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise CheckError(f"--{name} {getattr(self, name)!r} is not known; use one of: {', '.join(choices)}")

    def plan(self, spec: str) -> Plan:
        return Plan(spec, self.dtype, self.optimizer, self.lr, self.steps, self.find_unused_parameters)


def _field(name: str) -> dataclasses.Field:
    return {f.name: f for f in dataclasses.fields(CheckOptions)}[name]


def world_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise CheckError(f"--world-sizes {text!r} is not a comma-separated list of integers, e.g. 2,3") from None
    return tuple(dict.fromkeys(sizes))


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise CheckError(f"{message}; see --help")


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ddp_demo.check", description=description)
    parser.add_argument("target", metavar="TARGET", help="FILE.py:FUNCTION or package.module:FUNCTION; the function "
                        "takes no arguments and returns (model, batch, loss_fn)")
    for f in dataclasses.fields(CheckOptions):
        meta, flag = f.metadata, "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            parser.add_argument(flag, action="store_true", help=meta["help"])
            continue
        kind = {"world_sizes": world_sizes, "lr": float, "json": str, "plot": str}.get(f.name, type(f.default))
        default = ",".join(map(str, f.default)) if f.name == "world_sizes" else f.default
        extra = f" ({'|'.join(meta['choices'])})" if meta["choices"] else ""
        extra += "" if f.default is None else f" [default: {default}]"
        parser.add_argument(flag, type=kind, default=f.default, help=f"{meta['help']}{extra}")
    return parser


def parse(argv: list[str] | None, description: str) -> tuple[str, CheckOptions]:
    args = vars(build_parser(description).parse_args(argv))
    return args.pop("target"), CheckOptions(**args)
