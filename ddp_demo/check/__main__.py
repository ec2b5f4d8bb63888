"""``python -m ddp_demo.check TARGET``: exit 0 (PASS), 1 (FAIL, with the cause) or 2 (bad input)."""

from __future__ import annotations

import sys
from pathlib import Path

from ddp_demo.check import __doc__ as package_doc
from ddp_demo.check import check
from ddp_demo.check.options import parse
from ddp_demo.check.report import as_json, dumps, text
from ddp_demo.check.target import CheckError
from ddp_demo.core.config import ConfigError
from ddp_demo.core.outputs import atomic_write
from ddp_demo.plots import check_out_file, load_figures


def main(argv: list[str] | None = None) -> int:
    try:
        spec, options = parse(argv, package_doc.splitlines()[0])
        if options.json and not Path(options.json).absolute().parent.is_dir():
            raise CheckError(f"--json {options.json}: its directory does not exist; create it or pick another path")
        if options.plot:  # before any process starts: a wrong path or no matplotlib is bad input
            check_out_file(options.plot, flag="--plot")
            plots = load_figures()
        verdicts = check([spec], options)  # one per strategy (--strategy all: three)
    except (CheckError, ConfigError) as e:
        print(f"ddp_demo.check: error: {e}", file=sys.stderr, flush=True)
        return 2
    verdict = next((v for v in verdicts if not v.ok), verdicts[0])  # --json and --plot: the first failure
    if options.json:
        atomic_write(Path(options.json), lambda p: p.write_text(dumps(verdict)))
    stopped = [w.error.splitlines()[0] for v in verdicts for w in v.worlds if w.error]
    if stopped:  # a rank raised or stopped answering: one line, which rank, which step, what it did last
        print(f"ddp_demo.check: error: {stopped[0]}", file=sys.stderr, flush=True)
        return 2
    print("\n\n".join(text(v) for v in verdicts), flush=True)
    if options.plot:
        plots.save(plots.check_figure(as_json(verdict)), options.plot)
    return 0 if all(v.ok for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
