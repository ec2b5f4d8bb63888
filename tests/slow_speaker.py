"""Run under torchrun by tests/test_bad_input.py: every rank has the same bad input, and rank 0,
the one that reports it, is the last to get there (``sleep``). ``wait`` makes the others wait
for it as ``ddp_demo.train`` does (core/dist.py, ``after_one_spoke``); ``exit`` does not."""

import sys
import time

from ddp_demo.core import dist as dist_env
from ddp_demo.core import log

if __name__ == "__main__":
    env = dist_env.launch_env()
    if env.rank == 0:
        time.sleep(3)  # the agent would stop this worker here if another had exited already
        log.error(env.rank, "bad input, reported once")
    if sys.argv[1] == "wait":
        dist_env.after_one_spoke(env, speaker=0)
    sys.exit(2)
