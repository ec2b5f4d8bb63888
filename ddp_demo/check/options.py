"""The command's flags as a typed dataclass: each field's ``help`` is its ``--flag`` help
(the parser is built from it by core/flags.py, as the trainer's is)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from ddp_demo.check.engine import Plan
from ddp_demo.check.target import DTYPE_CHOICES, CheckError
from ddp_demo.core.config import OPTIMIZERS, PROOF_LR
from ddp_demo.core.flags import OneLineParser, add_options, field_named, numbers_option, option


@dataclass(frozen=True)
class CheckOptions:
    world_sizes: tuple[int, ...] = numbers_option((2, 3), "the numbers of processes N to check, e.g. 2 3 or 2,3")
    steps: int = option(3, "optimizer steps on the batch; parameters are compared after the last")
    dtype: str = option("float64", "float64: cast the model and floating inputs, so rounding cannot hide a real "
                        "difference; keep: check in the model's own dtype (float32 or float64)", DTYPE_CHOICES)
    optimizer: str = option("sgd", "sgd (momentum 0.9) or adam", OPTIMIZERS)
    lr: float | None = option(None, f"learning rate [default: {PROOF_LR['sgd']} for sgd, {PROOF_LR['adam']} for adam]",
                              type_=float)
    find_unused_parameters: bool = option(False, "your DDP uses find_unused_parameters=True: parameters that get no "
                                          "gradient are then not a failure")
    strategy: str = option("ddp", "ddp, zero (optimizer state sharded), fsdp (fully_shard) or all three: the "
                           "strategy the model is trained under on N processes", ("ddp", "zero", "fsdp", "all"))
    reduce_dtype: str | None = option(None, "fsdp only: reduce-scatter the gradients in this dtype, below the "
                                      "parameters', and measure what that alone changes (docs/check.md)",
                                      ("float32", "bfloat16"), type_=str)
    timeout: float = option(120.0, "seconds the check's processes may take, every N together; a rank that stops "
                            "is then named in one line (exit 2)")
    json: str | None = option(None, "also write the verdict as JSON to this file (format: docs/check.md)", type_=str)
    plot: str | None = option(None, "also draw each tensor's largest difference against its tolerance, for every N, "
                              "to this .png, .svg or .pdf (needs matplotlib: the plot extra)", type_=str)

    def __post_init__(self):
        if not self.world_sizes or min(self.world_sizes) < 1:
            raise CheckError("--world-sizes must list positive integers, e.g. --world-sizes 2 3")
        if self.steps < 1:
            raise CheckError(f"--steps must be a positive integer (got {self.steps})")
        if self.lr is not None and not self.lr > 0:
            raise CheckError(f"--lr must be a positive number (got {self.lr})")
        if not self.timeout > 0:
            raise CheckError(f"--timeout must be a positive number of seconds (got {self.timeout})")
        for name in ("dtype", "optimizer", "strategy", *(("reduce_dtype",) if self.reduce_dtype else ())):
            choices = field_named(CheckOptions, name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise CheckError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not known; use one of: "
                                 f"{', '.join(choices)}")
        if self.reduce_dtype is not None and self.strategy not in ("fsdp", "all"):
            raise CheckError(f"--reduce-dtype is fully_shard's (fsdp's) reduce dtype, not {self.strategy}'s; "
                             "add --strategy fsdp (or all), or drop --reduce-dtype")

    def plans(self, spec: str) -> list[Plan]:
        names = ("ddp", "zero", "fsdp") if self.strategy == "all" else (self.strategy,)
        return [Plan(spec, self.dtype, self.optimizer, self.lr, self.steps, self.find_unused_parameters, name,
                     self.reduce_dtype if name == "fsdp" else None) for name in names]


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m ddp_demo.check", description=description, error_type=CheckError)
    parser.add_argument("target", metavar="TARGET", help="FILE.py:FUNCTION or package.module:FUNCTION; the function "
                        "takes no arguments and returns (model, batch, loss_fn) or a ddp_demo.check.Recipe")
    return add_options(parser, CheckOptions)


def parse(argv: list[str] | None, description: str) -> tuple[str, CheckOptions]:
    args = vars(build_parser(description).parse_args(argv))
    return args.pop("target"), CheckOptions(**args)
