"""The proofs: data-parallel training equals one process, checked case by case.

``spawn`` starts N processes joined by a FileStore; ``equivalence`` holds what each
rank runs and what one process computes; ``cases`` decides which cases run and what
counts as equal (with the negative controls that must fail). ``accelerate_checks`` runs
the same cases under ``accelerate launch``; ``exit_probe`` reproduces the gloo exit abort;
``plots`` draws the proof's pictures (matplotlib, imported only by the commands that draw).
"""
