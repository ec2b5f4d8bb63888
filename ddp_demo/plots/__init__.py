"""The pictures: the proof's loss curves (``python -m ddp_demo.compare``) and the check's
tensors against their tolerances (``python -m ddp_demo.check --plot``).

``figures`` draws them with matplotlib, the ``plot`` extra (``pip install -e ".[plot]"``).
This module imports no matplotlib: the commands check a picture's path and load ``figures``
through it before any work, and the commands that do not draw never load it. Nothing in
``core/`` imports this folder: pictures sit above the ground floor.
"""

from __future__ import annotations

from pathlib import Path

from ddp_demo.core.config import ConfigError
from ddp_demo.core.outputs import check_out_dir

FORMATS = (".png", ".svg", ".pdf")  # the pictures python -m ddp_demo.compare and .check --plot draw


def check_out_file(out: str, flag: str = "--out") -> None:
    """A picture's path (``compare --out``, ``check --plot``), checked before any work."""
    if Path(out).suffix not in FORMATS:
        raise ConfigError(f"{flag} {out}: use a {', '.join(FORMATS)} file name, e.g. {flag} picture.png")
    check_out_dir(str(Path(out).parent), flag=flag)


def load_figures():
    """``plots/figures.py``, or one line naming the extra to install when matplotlib is missing."""
    try:
        from ddp_demo.plots import figures
    except ImportError as e:
        raise ConfigError(f"drawing needs matplotlib ({e}); install it with: pip install -e \".[plot]\"") from None
    return figures
