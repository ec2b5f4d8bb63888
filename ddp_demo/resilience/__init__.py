"""What keeps a run from losing work: checkpoint files, resume, stop signals, injected faults.

The trainer wires these around the shared loop; none of them touch the model's math.
"""
