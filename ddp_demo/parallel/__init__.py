"""Data-parallel machinery written out by hand, each piece tested against torch's own.

What ``DistributedDataParallel`` and ``SyncBatchNorm`` do inside, in Python a reader can follow.
"""
