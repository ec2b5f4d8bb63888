"""SLURM's compressed lists, read the way SLURM itself reads them (pure string functions).

SLURM hands each task its job's nodes as a *hostlist* (``node[01-03,07],gpu5``) and the
tasks per node as a run-length list (``2(x3),1``). ``core/dist.py`` reads the variables;
these functions only expand the strings. ``expand_hostlist`` is tested against
``scontrol show hostnames``, the command SLURM's docs tell batch scripts to use.
"""

from __future__ import annotations

import re

_RANGE = re.compile(r"(\d+)(?:-(\d+))?")
_COUNT = re.compile(r"(\d+)(?:\(x(\d+)\))?")


def _split_top_level(text: str) -> list[str]:
    """Split on the commas that are not inside brackets: ``a[1,2],b`` -> ``a[1,2]``, ``b``."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"unbalanced brackets in hostlist {text!r}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in hostlist {text!r}")
    return [*parts, text[start:]]


def _numbers(ranges: str, hostlist: str) -> list[str]:
    """``01-03,07`` -> ``01 02 03 07``: a range keeps the zero padding of its first number."""
    found = []
    for item in ranges.split(","):
        match = _RANGE.fullmatch(item)
        if not match or (match[2] and int(match[2]) < int(match[1])):
            raise ValueError(f"bad range {item!r} in hostlist {hostlist!r}")
        first, last = match[1], match[2] or match[1]
        found += [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    return found


def _expand_name(name: str, hostlist: str) -> list[str]:
    """One name with any number of bracket groups: ``rack[1-2]n[1-2]`` is their product."""
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    ranges, tail = rest.split("]", 1)
    return [head + n + t for n in _numbers(ranges, hostlist) for t in _expand_name(tail, hostlist)]


def expand_hostlist(hostlist: str) -> list[str]:
    """``node[01-03,07],gpu5`` -> ``node01 node02 node03 node07 gpu5``, in SLURM's order."""
    if not hostlist.strip():
        raise ValueError("empty hostlist")
    return [host for name in _split_top_level(hostlist.strip()) for host in _expand_name(name, hostlist)]


def expand_counts(counts: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` ``2(x3),1`` -> ``2 2 2 1``: one count per node, in node order."""
    found = []
    for item in counts.split(","):
        match = _COUNT.fullmatch(item.strip())
        if not match:
            raise ValueError(f"bad count {item!r} in {counts!r}")
        found += [int(match[1])] * int(match[2] or 1)
    return found
