"""Sharded checkpoints: every rank writes its own shards through torch.distributed.checkpoint.

A checkpoint is a directory, ``--checkpoint-dir/step-000120/``::

    .metadata        DCP's index: for every key, its global shape and which file holds which chunk
    __0_0.distcp     rank 0's shards (one file per writing rank; DCP writes a replica once)
    meta.pt          the step, epoch, RNG state, config, world size, parameter names and
                     optimizer settings, logged steps (rank 0; plain data, read with weights_only)
    manifest.json    the format version and the sha256 of each file above; written last

The commit point is a rename: all ranks write into ``step-000120.partial/``; once DCP's save
has returned on every rank (it ends with a gather, so every shard is on disk), rank 0 hashes
the files, writes the manifest, fsyncs, and renames the directory to ``step-000120``. A writer
killed before the rename leaves only a ``.partial`` directory, which is never read and is
removed by the next save. The keys are strategy-independent (parallel/state_dict.py), and DCP
reshards on load, so a checkpoint resumes at any world size under any strategy.

Reading trusts nothing: the manifest's version and checksums are verified before use, and
DCP's ``.metadata`` (a pickle, which DCP reads with plain ``pickle.load``) is read by
:func:`safe_reader`, which refuses every class but DCP's own metadata types.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

FORMAT = 1
MANIFEST, META = "manifest.json", "meta.pt"
PARTIAL = ".partial"


class NewerFormat(ValueError):
    """Written by a newer ddp_demo: refused outright, never skipped (a resume would then prune it)."""


def save(directory: str | Path, step: int, module, optimizer, meta: dict, is_main: bool) -> Path:
    """Every rank calls this: DCP writes each rank's shards, then rank 0 commits (renames)."""
    from ddp_demo.parallel import state_dict

    if is_main:  # only rank 0 writes meta.pt
        meta = {**meta, "params": [n for n, _ in module.named_parameters()],
                "param_groups": state_dict.param_groups(module, optimizer)}
    final = Path(directory) / f"step-{step:06d}"
    write(final, state_dict.logical_state(module, optimizer), meta, is_main)
    return final


def write(final: Path, state: dict, meta: dict, is_main: bool) -> None:
    """Write ``state`` (this rank's part) into ``final.partial/``, then rank 0 renames it ``final``."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    tmp = final.with_name(final.name + PARTIAL)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a writer killed mid-save left it
    _barrier()
    with _quiet():
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)), no_dist=not dist.is_initialized())
    if is_main:
        torch.save({**meta, "format": FORMAT}, tmp / META)
        commit(tmp, final)
    _barrier()


def commit(tmp: Path, final: Path) -> None:
    """The manifest, then the rename: before it there is no checkpoint, after it a whole one."""
    files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.name != MANIFEST}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    for p in tmp.iterdir():
        _fsync(p)
    if final.exists():  # a damaged checkpoint of this step, skipped when this run resumed
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)


def verify(path: str | Path) -> dict:
    """Check the manifest and every file against it; return meta.pt (weights_only). Raise
    :class:`NewerFormat` or ValueError naming the problem."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path.name} has no {MANIFEST} (its writer was interrupted, or it is not a checkpoint)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format", 0) > FORMAT:
        raise NewerFormat(f"{path} was written in checkpoint format {manifest['format']}, newer than this ddp_demo's "
                          f"{FORMAT}; resume it with a newer ddp_demo, or pass --resume never")
    for name, digest in manifest["files"].items():
        if not (path / name).is_file():
            raise ValueError(f"{path.name}/{name} is missing (a shard was lost or not copied)")
        if _sha256(path / name) != digest:
            raise ValueError(f"{path.name}/{name} does not match its checksum (truncated or corrupted)")
    return torch.load(path / META, weights_only=True)


def load(path: str | Path, module, optimizer, meta: dict) -> None:
    """Read a verified checkpoint into this rank's module and optimizer, resharding to this world size."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from ddp_demo.parallel import state_dict

    reader = safe_reader(path)
    check_model(path, reader.read_metadata().state_dict_metadata, module)
    targets = state_dict.load_targets(module, optimizer, reader.read_metadata().state_dict_metadata)
    with _quiet():
        dcp.load(targets, storage_reader=reader, no_dist=not dist.is_initialized())
    state_dict.apply_state(module, optimizer, targets, meta["param_groups"], full=False)


def check_model(path, saved: dict, module) -> None:
    """A checkpoint of another model (keys or shapes differ) is refused before anything is read."""
    want = {f"model.{k}": tuple(v.shape) for k, v in module.state_dict().items()}
    have = {k: tuple(m.size) for k, m in saved.items() if k.startswith("model.")}
    for key in sorted(want.keys() | have.keys()):
        if want.get(key) != have.get(key):
            raise ValueError(f"{path} holds another model: {key[6:]} is {_shape(have.get(key))} there, "
                             f"{_shape(want.get(key))} in this one")


def read_full(path: str | Path) -> tuple[dict, dict]:
    """Without a model or a process group: the whole logical state as plain tensors, and meta.pt."""
    import torch.distributed.checkpoint as dcp

    meta = verify(path)
    reader = safe_reader(path)
    state: dict = {}
    for key, m in reader.read_metadata().state_dict_metadata.items():
        state[key] = torch.empty(m.size, dtype=m.properties.dtype)
    with _quiet():
        dcp.load(state, storage_reader=reader, no_dist=True)
    model = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
    optim: dict[str, dict] = {}
    for name in meta["params"]:
        prefix = f"optim.state.{name}."
        entries = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and "." not in k[len(prefix):]}
        if entries:
            optim[name] = entries
    return {"model": model, "optim": {"state": optim}}, meta


def _shape(s) -> str:
    return "absent" if s is None else f"of shape {list(s)}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns that it assumes one process whenever there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


# What DCP's .metadata pickle may name (torch 2.13, read off a checkpoint with pickletools): DCP's own
# dataclasses and enum, torch.Size, dtypes, a layout by name, a path. Nothing else is built.
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        ok = (module, name) in _ALLOWED or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not ok:
            raise ValueError(f".metadata names {module}.{name}, which a checkpoint index never holds (refused unread)")
        return super().find_class(module, name)


def _reader_class():
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReaderImpl(FileSystemReader):
        """DCP's reader, with .metadata read by an unpickler that builds nothing but DCP's metadata."""

        def read_metadata(self, *args, **kwargs):
            if getattr(self, "_safe_metadata", None) is None:
                with open(Path(self.path) / ".metadata", "rb") as f:
                    metadata = _MetadataUnpickler(f).load()
                from torch.distributed.checkpoint.metadata import StorageMeta

                if getattr(metadata, "storage_meta", None) is None:
                    metadata.storage_meta = StorageMeta()
                metadata.storage_meta.load_id = self.load_id
                self._safe_metadata = metadata
            return self._safe_metadata

    return SafeReaderImpl


def safe_reader(path: str | Path):
    """A :class:`SafeReaderImpl` (its class is built on first use: DCP takes about 1 s to import)."""
    return _reader_class()(str(path))
