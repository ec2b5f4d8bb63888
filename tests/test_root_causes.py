"""Deterministic regression tests for the two root-cause fixes in ``core/dist.py``.

Both bugs show up only by chance in a whole run (a restart that connects to a dead worker,
an abort at interpreter exit), so these tests check the mechanism each fix relies on, the
same way every time: what a restarted attempt sees in the launcher's store, and whether
the DDP model is gone before the process group is destroyed. The soak scripts
(``launch/soak_restart.sh``, ``launch/soak_exit.sh``) measure the symptoms.
"""

from __future__ import annotations

import gc

import pytest
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp_demo import train as trainer
from ddp_demo.core.dist import attempt_store
from ddp_demo.core.env import launch_env
from ddp_demo.parallel import strategy


@pytest.fixture(scope="module")
def agent_store():
    """A store server like torchrun's agent: it binds port 0 and reports the port it got (no race)."""
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield server.port


def attempt_view(port: int, restart: int, shared: bool = False) -> dist.Store:
    """The store as a worker of restart attempt ``restart`` sees it, from the variables torchrun sets."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "TORCHELASTIC_RESTART_COUNT": str(restart), "TORCHELASTIC_USE_AGENT_STORE": "True"}
    if shared:
        env["DDP_DEMO_SHARED_STORE"] = "1"
    return attempt_store(launch_env(env), timeout_s=10)


def test_a_restarted_attempt_does_not_see_the_dead_attempts_keys(agent_store):
    """Guards the elastic-restart hang: torchrun's agent keeps one store for the whole job, and
    a restarted worker that read the dead workers' gloo addresses would connect to them."""
    attempt_view(agent_store, 0).set("rank-1-address", "the dead worker's port")
    assert attempt_view(agent_store, 0).check(["rank-1-address"])  # the same attempt sees it
    assert not attempt_view(agent_store, 1).check(["rank-1-address"])
    assert not attempt_view(agent_store, 2).check(["rank-1-address"])


def test_negative_control_a_shared_store_shows_the_dead_attempts_keys(agent_store):
    """``DDP_DEMO_SHARED_STORE=1`` (the bug, kept switchable for the soak): attempt 1 reads attempt 0's key."""
    attempt_view(agent_store, 0, shared=True).set("stale", "the dead worker's port")
    assert attempt_view(agent_store, 1, shared=True).check(["stale"])


class CyclicDDP(DDP):
    """DDP held by a reference cycle, as the trainer's is in a fresh process: a lazy import
    during the first ``DDP.__init__`` leaves that frame (and so the model) in a cycle. In this
    test process those modules may be imported already, so the cycle is made on purpose."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cycle = [self]


def live_ddp_models() -> int:
    return sum(type(o) is CyclicDDP for o in gc.get_objects())


def test_the_ddp_model_is_freed_before_the_process_group_is_destroyed(monkeypatch, tmp_path, capsys):
    """Guards the gloo exit abort (``teardown`` in core/dist.py): the DDP model must be freed,
    and only then the process group destroyed, while Python is fully alive. The automatic
    collector is off, so teardown must collect the cycle itself: whether the collector
    happened to run by then would otherwise decide the outcome."""
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "0"}.items():  # one launched process: it hosts its store on port 0
        monkeypatch.setenv(name, value)
    for name in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    alive = {}
    real_teardown, real_destroy = trainer.teardown, dist.destroy_process_group

    def teardown():
        alive["teardown starts"] = live_ddp_models()
        real_teardown()

    def destroy_process_group(*args, **kwargs):
        alive["process group destroyed"] = live_ddp_models()
        real_destroy(*args, **kwargs)

    monkeypatch.setattr(strategy, "DDP", CyclicDDP)  # the trainer wraps through parallel/strategy.py (--strategy ddp)
    monkeypatch.setattr(trainer, "teardown", teardown)
    monkeypatch.setattr(dist, "destroy_process_group", destroy_process_group)
    gc.disable()
    try:
        code = trainer.main(["--steps", "3", "--out", str(tmp_path / "out")])
    finally:
        gc.enable()
    assert code == 0, capsys.readouterr().err
    assert not dist.is_initialized()
    # the control: when teardown starts, the model is still alive (so the check can fail)
    assert alive == {"teardown starts": 1, "process group destroyed": 0}
