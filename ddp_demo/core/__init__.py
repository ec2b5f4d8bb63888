"""The training core, in the order data flows through it.

``config`` (typed flags) -> ``dist`` (the one place that reads the launcher's
environment; the process group) -> ``data`` (each rank's share of every batch) ->
``models`` (the article's Modules, ignorant of distribution, and their optimizer) ->
``loop`` (the training step every launcher shares; ``accumulate`` for micro-batches) ->
``outputs`` (summary.json's record; files written whole or not at all). ``log`` keeps
non-zero ranks quiet.
"""
