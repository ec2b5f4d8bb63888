"""The training core, in the order data flows through it, and the tools every proof shares.

``config`` (typed flags) -> ``env`` (the one place that reads the launcher's environment)
-> ``dist`` (the process group) -> ``data`` (each rank's share of every batch) ->
``models`` (the article's Modules, ignorant of distribution, and their optimizer) ->
``loop`` (the training step every launcher shares; ``accumulate`` for micro-batches) ->
``outputs`` (summary.json's record; files written whole or not at all). ``log`` keeps
non-zero ranks quiet.

Shared by the proofs, the check and the tests: ``spawn`` starts N processes joined by a
FileStore (no ports, a timeout); ``tolerances`` is the one table of how close counts as equal.
This folder is the ground floor: it imports nothing from the folders above it.
"""
