"""ddp_demo: data-parallel training in PyTorch, demonstrated and proven.

Tensors hold data and do the math; ``nn.Module``s own the parameters. Each worker
process runs its tensor ops on its own device, and ``DistributedDataParallel``
reconciles the parameter gradients during backward.
"""

__version__ = "0.1.0"
