"""Convert checkpoints offline: a sharded directory to one file, and back. No process group.

    python -m ddp_demo.checkpoint to-file   ckpt/step-000120 step-000120.pt    # resumable, one file
    python -m ddp_demo.checkpoint to-file   ckpt/step-000120 model.pt --model-only  # final.pt's format
    python -m ddp_demo.checkpoint to-sharded step-000120.pt ckpt2/step-000120  # resumable at any N

A sharded checkpoint (resilience/sharded.py) is many files, one set per writing rank; to take the
model elsewhere, ``to-file`` reads every shard into whole tensors and writes the format the
trainer's one-file checkpoints have (``step-000120.pt`` and its ``.sha256``; the model under
``"model"``, keys without prefixes as in ``final.pt``), or with ``--model-only`` just the model,
as ``final.pt``. ``to-sharded`` does the reverse for a one-file checkpoint. Both verify their
input first (checksums, format version) and refuse to write over anything: a bad input is one
line and exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ddp_demo.core import log
from ddp_demo.core.config import ConfigError
from ddp_demo.core.flags import OneLineParser


def to_file(source: Path, target: Path, model_only: bool = False) -> None:
    """A sharded checkpoint as one file (see the module docstring)."""
    from ddp_demo.parallel import state_dict
    from ddp_demo.resilience import checkpoint, sharded

    state, meta = _read(source, sharded.read_full)
    if model_only:
        torch.save(state["model"], target)
        return
    whole = {**state_dict.to_file_state(state, meta["param_groups"], meta["params"]),
             **{k: v for k, v in meta.items() if k not in ("param_groups", "format")}}
    checkpoint.write_file(target, whole)


def to_sharded(source: Path, target: Path) -> None:
    """A one-file checkpoint as a sharded one (see the module docstring)."""
    from ddp_demo.parallel import state_dict
    from ddp_demo.resilience import checkpoint, sharded

    whole = _read(source, checkpoint.load)
    if "params" not in whole:
        raise ConfigError(f"{source} predates parameter names in checkpoints; resume it once with this ddp_demo "
                          "and convert the checkpoint that run writes")
    state, groups = state_dict.from_file_state(whole, whole["params"])
    meta = {k: v for k, v in whole.items() if k not in ("model", "optimizer")}
    sharded.write(target, state, {**meta, "param_groups": groups}, is_main=True)


def _read(source: Path, reader):
    try:
        return reader(source)
    except FileNotFoundError as e:
        raise ConfigError(f"{source}: no such checkpoint ({Path(e.filename or source).name} is missing); "
                          "pass a checkpoint directory or file") from None
    except Exception as e:  # ValueError from verify/load, an unreadable file, a refused pickle
        raise ConfigError(f"{source}: not a valid checkpoint ({e}); nothing was written") from None


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m ddp_demo.checkpoint", description=__doc__.split("\n\n")[0],
                      error_type=ConfigError)
    sub = p.add_subparsers(dest="command", required=True,
                           parser_class=lambda **kw: OneLineParser(error_type=ConfigError, **kw))
    f = sub.add_parser("to-file", help="a sharded checkpoint directory -> one .pt file")
    f.add_argument("source", type=Path, help="a sharded checkpoint: --checkpoint-dir/step-NNNNNN")
    f.add_argument("target", type=Path, help="the file to write (must not exist)")
    f.add_argument("--model-only", action="store_true", help="write only the model, as final.pt holds it")
    s = sub.add_parser("to-sharded", help="a one-file checkpoint (step-NNNNNN.pt) -> a sharded directory")
    s.add_argument("source", type=Path, help="a one-file checkpoint (with its .sha256)")
    s.add_argument("target", type=Path, help="the directory to write (must not exist)")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.target.exists():
            raise ConfigError(f"{args.target} exists; pick a new target, nothing is overwritten")
        if not args.target.parent.is_dir():
            raise ConfigError(f"{args.target.parent} is not a directory; create it or pick another target")
        if args.command == "to-file":
            to_file(args.source, args.target, args.model_only)
        else:
            to_sharded(args.source, args.target)
    except ConfigError as e:
        log.error(0, str(e))
        return 2
    log.info(0, f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
