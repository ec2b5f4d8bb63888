"""The benchmark: what data parallelism costs on this machine (``python -m ddp_demo.bench``).

``run`` plans and drives it; ``ranks`` is what each worker process measures; ``timing``
the timed steps and memory probes; ``launchers`` times the real commands end to end;
``report`` turns times into ratios and Markdown; ``plot`` draws them. Imports flow one
way: run -> ranks, launchers -> timing; run -> report and plot; plot -> report (its labels).
"""
