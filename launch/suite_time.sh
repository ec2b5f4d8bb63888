#!/usr/bin/env bash
# The test suite's wall time and CPU time, as docs/performance.md quotes them: the README's test
# command (python -m pytest -n 2, or the pytest arguments given), then one line. The CPU is that of
# every process the run started: a cgroup v1 cpuacct group where one can be made (root), else the
# children the run waited for (getrusage: it misses the fork server's ranks, so it reads low).
# Run it on an otherwise idle machine for the wall time to mean much.
USAGE="launch/suite_time.sh [pytest arguments; default -n 2]"
set -euo pipefail
source "$(dirname "$0")/common.sh"
cd "$root"
[ "$#" -gt 0 ] || set -- -n 2
exec "$PYTHON" - "$@" <<'PY'
import os, resource, subprocess, sys, time

group = f"/sys/fs/cgroup/cpuacct/ddp-demo-suite-{os.getpid()}"
try:
    os.mkdir(group)
    with open(f"{group}/tasks", "w") as tasks:
        tasks.write(str(os.getpid()))  # the children follow this process into the group
except OSError:
    group = None
start = time.monotonic()
code = subprocess.call([sys.executable, "-m", "pytest", "-q", *sys.argv[1:]])
wall = time.monotonic() - start
if group:
    with open(f"{group}/cpuacct.usage") as usage:
        cpu, how = int(usage.read()) / 1e9, "every process it started (cgroup cpuacct)"
    with open("/sys/fs/cgroup/cpuacct/tasks", "w") as tasks:
        tasks.write(str(os.getpid()))
    time.sleep(1)  # the last children leave the group
    try:
        os.rmdir(group)
    except OSError:
        pass
else:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, how = used.ru_utime + used.ru_stime, "the processes it waited for (getrusage: reads low)"
print(f"suite: exit {code}, wall {wall:.0f} s, CPU {cpu:.0f} s, {how}")
sys.exit(code)
PY
