"""ddp_demo: data-parallel training in PyTorch, demonstrated and proven.

Tensors hold data and do the math; ``nn.Module``s own the parameters. Each worker
process runs its tensor ops on its own device, and ``DistributedDataParallel``
reconciles the parameter gradients during backward.

The package, by concern (entry points on top, each run as ``python -m ddp_demo.<name>``):

- ``train``, ``train_accelerate``: the trainer under torchrun or ``accelerate launch``;
  ``verify``: the equivalence table; ``explain``: one gradient, reconciled;
  ``doctor``: the launch doctor; ``bench``: the benchmark; ``compare``: runs of one job on one picture.
- ``core``: the training core (config -> dist -> data -> models -> loop -> outputs).
- ``resilience``: checkpoints, resume, stop signals, injected faults.
- ``parallel``: data-parallel machinery by hand: ``ScratchDDP``, DDP from hooks (``--ddp scratch``);
  ``SyncBatchNorm`` for the CPU (``ddp_demo.convert_sync_batchnorm``).
- ``proof``: N processes against one, case by case, with negative controls;
  ``plots``: the pictures (matplotlib, loaded only by the commands that draw).
- ``check``: the same proof pointed at your own model (``python -m ddp_demo.check``);
  ``testing``: its pytest helper.

``ddp_demo.convert_sync_batchnorm(model)`` is imported on first use, so that every command
that imports this package stays quick to start.
"""

__version__ = "0.1.0"
__all__ = ["convert_sync_batchnorm"]


def __getattr__(name: str):
    if name == "convert_sync_batchnorm":
        from ddp_demo.parallel.sync_batchnorm import convert_sync_batchnorm

        return convert_sync_batchnorm
    raise AttributeError(f"module 'ddp_demo' has no attribute {name!r}")
