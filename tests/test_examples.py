"""examples/: the learner's scripts, one process, its DDP version, and that made fully sharded.

Each must (1) train to the same weights as the one-process script, so the DDP one really is
the single-process one made data-parallel and the FSDP one really is the DDP one made sharded,
and (2) differ from the one before only in what data parallelism (or sharding) adds, so that
`diff` is the lesson.
"""

from __future__ import annotations

import ast
import difflib
import re
import subprocess
from pathlib import Path

import pytest
import torch

from ddp_demo.core.tolerances import WHOLE_RUN

from .forked import ForkedRuns

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SINGLE, DDP, FSDP = EXAMPLES / "single_process.py", EXAMPLES / "ddp.py", EXAMPLES / "fsdp.py"
CONTROL_MARGIN = 1e-4  # a run without gradient averaging must miss by at least this much

# Runs examples/ddp.py unchanged except that DistributedDataParallel is replaced by a plain
# wrapper: every rank then trains alone on its own shard (half of each global batch).
WITHOUT_SYNC = """
import runpy, sys
import torch
from torch import nn

class NoSync(nn.Module):
    def __init__(self, module, device_ids=None):
        super().__init__()
        self.module = module

    def forward(self, *args):
        return self.module(*args)

torch.nn.parallel.DistributedDataParallel = NoSync
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _check(proc) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every run at once (none depends on timing): the single process (``A.pt``), the DDP script
    (``B.pt``) and its control, DDP swapped for a plain wrapper (``C.pt``), the FSDP script (``F.pt``)
    and its control, the reduce-scatter reducing nothing (``G.pt``). ``{name: (working directory, process)}``."""
    d = {name: tmp_path_factory.mktemp(name) for name in ("single", "ddp", "control", "fsdp", "fsdp_control")}
    wrapper = d["control"] / "ddp_without_sync.py"
    wrapper.write_text(WITHOUT_SYNC)
    unreduced = d["fsdp_control"] / "fsdp_without_reduce.py"
    unreduced.write_text(WITHOUT_REDUCE)
    # Every script runs on ranks forked from a warm server (tests/forked.py), as torchrun would start
    # them (RANK, WORLD_SIZE, MASTER_ADDR/PORT), the single process as plain `python` (0 ranks);
    # tests/test_readme.py runs `python examples/single_process.py` and `torchrun ... examples/ddp.py`
    # themselves, as written.
    forked = [ForkedRuns({"single": (0, ["--dtype", "float64", "--out", "A.pt"])}, d, module=str(SINGLE)),
              ForkedRuns({"ddp": (2, ["--dtype", "float64", "--out", "B.pt"])}, d, module=str(DDP)),
              ForkedRuns({"control": (2, [str(DDP), "--dtype", "float64", "--out", "C.pt"])}, d, module=str(wrapper)),
              ForkedRuns({"fsdp": (2, ["--dtype", "float64", "--out", "F.pt"])}, d, module=str(FSDP)),
              ForkedRuns({"fsdp_control": (2, [str(FSDP), "--dtype", "float64", "--out", "G.pt"])}, d,
                         module=str(unreduced))]
    done: dict = {}
    for runs in forked:
        done |= runs.wait(240)
    return {name: (d[name], done[name]) for name in d}


@pytest.fixture(scope="module")
def single_run(launched) -> tuple[dict, str]:
    cwd, proc = launched["single"]
    out = _check(proc)
    return torch.load(cwd / "A.pt"), out


def test_ddp_matches_single_process(single_run, launched):
    """N=2 ranks with global batch 64 (32 each) reach the one-process weights within 1e-10 (float64).

    DistributedSampler gives rank r the positions r, r+2, ... of the epoch's seeded permutation, so the
    two per-rank batches at step t together are exactly positions 64t..64t+63: the single process's
    batch. DDP averages the two local mean gradients, which is the gradient of the global mean loss.
    The printed per-epoch loss is all-reduced, so it must match the single-process line too.
    """
    single, single_out = single_run
    cwd, proc = launched["ddp"]
    ddp_out = _check(proc)
    ddp = torch.load(cwd / "B.pt")

    torch.manual_seed(0)  # the examples' initial weights, to prove training moved them
    initial = {k: v.double() for k, v in _load_mlp_class()(10, 32, 2).state_dict().items()}
    assert _max_diff(single, initial) > 0.1, "training did not move the weights: the comparison would be vacuous"

    diff = _max_diff(single, ddp)
    print(f"max |single - ddp| = {diff:.3e}")
    assert diff <= WHOLE_RUN
    assert [ln for ln in ddp_out.splitlines() if ln.startswith("epoch")] == [
        ln for ln in single_out.splitlines() if ln.startswith("epoch")
    ], "only rank 0 prints, and its global-mean loss matches the single-process loss"


def test_control_without_gradient_averaging_fails_the_comparison(single_run, launched):
    """Negative control: the same launch with DDP swapped for a plain wrapper (tests' WITHOUT_SYNC).

    Each rank then steps on its own 32 samples only, which is the bug the comparison above must catch.
    Its rank 0 weights must miss the single-process ones by far more than the tolerance.
    """
    single, _ = single_run
    cwd, proc = launched["control"]
    _check(proc)
    diff = _max_diff(single, torch.load(cwd / "C.pt"))
    print(f"control: max |single - unsynced| = {diff:.3e}")
    assert diff > CONTROL_MARGIN


def _load_mlp_class():
    namespace: dict = {}
    exec(compile(SINGLE.read_text(), str(SINGLE), "exec"), namespace)  # no __main__: defines, does not train
    return namespace["MLP"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_files_are_short_and_torch_only():
    for path in (SINGLE, DDP, FSDP):
        assert len(path.read_text().splitlines()) <= 90, path
        assert not any(m.split(".")[0] == "ddp_demo" for m in _imports(path)), path
    assert not any(m.startswith("torch.distributed") or m == "torch.nn.parallel" for m in _imports(SINGLE))


# Words an added line in ddp.py must use (unless it only re-indents a line of single_process.py).
DP_WORDS = re.compile(
    r"\b(dist|DDP|Distributed\w*|rank|local_rank|world|RANK|LOCAL_RANK|WORLD_SIZE|device|set_epoch|module"
    r"|gc|os|try|finally)\b"
)


def test_diff_shows_only_what_data_parallelism_adds():
    single, ddp = SINGLE.read_text().splitlines(), DDP.read_text().splitlines()
    docstring = ast.parse(DDP.read_text()).body[0]
    doc_lines = range(docstring.lineno - 1, docstring.end_lineno)
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, single, ddp, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += single[i1:i2]
            added += [ddp[j] for j in range(j1, j2) if j not in doc_lines]
    assert len(removed) + len(added) <= 40, "the diff grew: keep the shared lines identical"
    reindented = {line.strip() for line in removed}
    unexplained = [a for a in added if a.strip() and a.strip() not in reindented and not DP_WORDS.search(a)]
    assert not unexplained, f"lines in ddp.py that are not about data parallelism: {unexplained}"
    for piece in (
        "init_process_group",
        "DistributedSampler(",
        "set_epoch",
        "DDP(",
        "destroy_process_group",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "if rank == 0:",
    ):
        assert any(piece in a for a in added), piece


# ---- the third script: examples/fsdp.py --------------------------------------------------------

# Runs examples/fsdp.py unchanged except that every fully_shard'ed block's reduce-scatter reduces
# nothing: each rank's shard receives its own chunk of its own gradient (FSDPModule's
# set_custom_reduce_scatter; float64 is pre-divided by FSDP2, hence the * N).
WITHOUT_REDUCE = """
import runpy, sys
import torch
import torch.distributed as dist
import torch.distributed.fsdp as fsdp

real_fully_shard = fsdp.fully_shard


class OwnChunk:
    def allocate(self, size, *, dtype, device):
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
        mine = input_tensor.view(group.size(), -1)[group.rank()]
        output_tensor.copy_(mine if op == dist.ReduceOp.AVG else mine * group.size())


def fully_shard(module, **kwargs):
    module = real_fully_shard(module, **kwargs)
    module.set_custom_reduce_scatter(OwnChunk())
    return module


fsdp.fully_shard = fully_shard
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_fsdp_matches_single_process(single_run, launched):
    """N=2 fully sharded ranks reach the one-process weights within 1e-10 (float64): the same
    batches as DDP (DistributedSampler), and the reduce-scatter gives each rank the average of its
    chunk of the gradient, which is its chunk of the one-process gradient. The saved file is the
    whole model (a full state dict gathered from the shards), so it compares key for key."""
    single, single_out = single_run
    cwd, proc = launched["fsdp"]
    out = _check(proc)
    diff = _max_diff(single, torch.load(cwd / "F.pt"))
    print(f"max |single - fsdp| = {diff:.3e}")
    assert diff <= WHOLE_RUN
    assert [ln for ln in out.splitlines() if ln.startswith("epoch")] == [
        ln for ln in single_out.splitlines() if ln.startswith("epoch")]


def test_control_fsdp_without_reduce_scatter_fails_the_comparison(single_run, launched):
    single, _ = single_run
    cwd, proc = launched["fsdp_control"]
    _check(proc)
    diff = _max_diff(single, torch.load(cwd / "G.pt"))
    print(f"control: max |single - fsdp unreduced| = {diff:.3e}")
    assert diff > CONTROL_MARGIN


SHARD_WORDS = re.compile(r"\b(fully_shard|FSDP|shard\w*|get_model_state_dict|StateDictOptions|whole|block)\b")


def test_second_diff_shows_only_what_sharding_adds():
    ddp, fsdp = DDP.read_text().splitlines(), FSDP.read_text().splitlines()
    docstring = ast.parse(FSDP.read_text()).body[0]
    doc_lines = range(docstring.lineno - 1, docstring.end_lineno)
    removed, added = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, ddp, fsdp, autojunk=False).get_opcodes():
        if tag != "equal":
            removed += ddp[i1:i2]
            added += [fsdp[j] for j in range(j1, j2) if j not in doc_lines]
    assert len(removed) + len(added) <= 20, "the diff grew: keep the shared lines identical"
    unexplained = [a for a in added if a.strip() and not SHARD_WORDS.search(a)]
    assert not unexplained, f"lines in fsdp.py that are not about sharding: {unexplained}"
    assert not any("DDP(" in a or "DistributedDataParallel" in a for a in fsdp)
    for piece in ("fully_shard(block)", "get_model_state_dict(", "full_state_dict=True"):
        assert any(piece in a for a in added), piece
