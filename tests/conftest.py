"""pytest configuration and shared fixtures. Shared helpers live in ``tests/helpers.py``."""

from __future__ import annotations

import subprocess

import pytest

from .helpers import main_in_process


@pytest.fixture
def in_process(monkeypatch, capsys):
    """``run(*argv)``: ``ddp_demo.train.main(argv)`` in this process (see ``main_in_process``);
    returns its exit code and output as a CompletedProcess."""
    capsys.readouterr()

    def run(*argv) -> subprocess.CompletedProcess:
        code = main_in_process(argv, monkeypatch)
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, captured.out, captured.err)

    return run


# The longest files first (their wall time in a serial run, `pytest --durations`): under the README's
# `-n 2` each file goes whole to one of two processes, in the order collected, so a long file taken
# last leaves the other process idle while it runs. The rest keep their order.
LONGEST_FIRST = ("test_readme.py", "test_resilience.py", "test_elastic.py", "test_ray.py", "test_check_recipe.py",
                 "test_slurm.py", "test_train.py", "test_accelerate.py", "test_rendezvous.py", "test_scratch_ddp.py",
                 "test_multinode.py", "test_sharding.py", "test_bad_input.py", "test_examples.py")


def pytest_collection_modifyitems(items):
    place = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: place.get(item.path.name, len(place)))  # stable: a file's tests stay in order
