"""What happens to a running job when the store no node hosts goes away (launch/store_restart.sh).

    python -m tests.store_restart [--pause S]     (as root, from the repo root: network namespaces)

Two nodes train under ``--nnodes=1:2`` with the store on a host of its own (as tests/test_rendezvous.py
does). Global rank 0 holds after step 6 for ``--pause`` seconds (``pause:0:6``, bounded by the
trainer's --timeout), and meanwhile the store is stopped with SIGTERM, then, per case:

- ``restart``: started again at once, on the same address and port, empty; once both nodes have
  exited, both are started again (what a supervisor would do), and the job resumes from its newest
  checkpoint;
- ``down``: left down until both nodes have exited.

Each case prints the nodes' exit codes, the world size at each step, the max difference from one
uninterrupted process when the job finished, and the line each agent ended on.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

from ddp_demo import train as trainer

from . import elastic_jobs as jobs
from .nodes import hosts_on_a_switch

FIRST = {"RDZV_CONF": jobs.elastic_env(last_call_timeout=60)["RDZV_CONF"]}


def stop(store) -> float:
    store.send_signal(signal.SIGTERM)
    store.wait(30)
    return time.monotonic()


def one_case(case: str, data: Path, pause_s: int, workdir: Path) -> dict:
    flags = [*jobs.train_flags(data), "--timeout", str(pause_s)]
    env = {**jobs.elastic_env(), "RDZV_EXTERNAL": "1"}
    with hosts_on_a_switch(3) as (a, b, s):
        job = jobs.Job((a, b), workdir, flags, env, budget_s=pause_s + 240, store=s)
        stores = [jobs.start_store(s, job.port, workdir / "store.out")]
        try:
            job.wait_for("store", lambda: "listens" in (workdir / "store.out").read_text())
            job.start(0, ("--inject-fault", f"pause:0:{jobs.AT}"), FIRST)
            job.wait_for("node 0 at the store", lambda: jobs.at_the_store(s, job.port, a.addr))
            job.start(1)
            job.checkpoint(jobs.AT)
            stopped = stop(stores[0])
            if case == "restart":
                stores.append(jobs.start_store(s, job.port, workdir / "store-again.out"))
            seconds = {f"store stop to node {n}'s exit": job.exited(n) - stopped for n in (0, 1)}
            if case == "restart":
                back = job.wait_for("store again", lambda: "listens" in (workdir / "store-again.out").read_text())
                seconds["store stop to the store listening again"] = back - stopped
                relaunched = relaunch(job, a, s)
                seconds["relaunch to both exits"] = max(job.exited(0), job.exited(1)) - relaunched
            return {"outcome": job.outcome(**seconds), "stores": stores}
        finally:
            for store in stores:
                store.kill()
            job.close()


def relaunch(job: jobs.Job, a, s) -> float:
    """Both nodes again, node 0 first, as at the start; they resume from the newest checkpoint."""
    started = time.monotonic()
    job.start(0, ("--inject-fault", f"pause:0:{jobs.AT}"), FIRST)
    job.wait_for("node 0 at the store", lambda: jobs.at_the_store(s, job.port, a.addr))
    job.start(1)
    return started


def last_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if re.search(r"Error|error:|FAILED|failed", line)]
    return lines[-1].strip()[:220] if lines else "(no error line)"


def report(case: str, found: dict, reference: Path) -> list[str]:
    o: jobs.Outcome = found["outcome"]
    out = [f"{case}: exit codes {o.codes}, {o.seconds}"]
    if (o.out / "metrics.jsonl").exists():
        sizes = [len(json.loads(line)["sample_ids"]) for line in (o.out / "metrics.jsonl").read_text().splitlines()]
        out.append(f"  world size at each step: {sizes}")
    if (o.out / "final.pt").exists():
        out.append(f"  max |difference| from one process: {jobs.trained_alike(o.out, reference):.2g}")
    else:
        out.append("  no final.pt")
    out += [f"  node {n}'s last error line: {last_error(o.stderr[n])}" for n in (0, 1)]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="tests.store_restart", description=__doc__.splitlines()[0])
    parser.add_argument("--pause", type=int, default=20, help="seconds rank 0 holds after step 6 [default: 20]")
    parser.add_argument("--cases", default="restart,down", help="some of restart,down [default: both]")
    parser.add_argument("--keep", action="store_true", help="keep the nodes' logs (the folder is printed)")
    args = parser.parse_args()
    d = Path(tempfile.mkdtemp(prefix="store-restart-"))
    try:
        data = jobs.write_data(d / "xy.pt")
        assert trainer.main([*jobs.train_flags(data), "--out", str(d / "reference")]) == 0
        for case in args.cases.split(","):
            (d / case).mkdir()
            started = time.monotonic()
            lines = report(case, one_case(case, data, args.pause, d / case), d / "reference")
            print("\n".join(lines) + f"\n  {time.monotonic() - started:.0f} s in all", flush=True)
    finally:
        if args.keep:
            print(f"the nodes' logs: {d}")
        else:
            shutil.rmtree(d)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
