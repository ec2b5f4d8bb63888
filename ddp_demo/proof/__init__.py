"""The proofs: data-parallel training equals one process, checked case by case.

``equivalence`` holds what each rank runs and what one process computes; ``cases``
decides which cases run and judges them, negative controls included (processes from
``core/spawn.py``, tolerances from ``core/tolerances.py``). ``accelerate_checks`` runs
the same cases under ``accelerate launch``; ``exit_probe`` reproduces the gloo exit abort.
The pictures are in ``ddp_demo/plots/``.
"""
