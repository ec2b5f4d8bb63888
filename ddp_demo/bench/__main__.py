import sys

if sys.argv[1:2] == ["memory"]:  # python -m ddp_demo.bench memory: ddp, zero and fsdp side by side (bench/memory.py)
    from ddp_demo.bench.memory import main as memory

    sys.exit(memory(sys.argv[2:]))

if sys.argv[1:2] == ["param-peak"]:  # python -m ddp_demo.bench param-peak: parameter bytes alive during a step
    from ddp_demo.bench.param_peak import main as param_peak

    sys.exit(param_peak(sys.argv[2:]))

from ddp_demo.bench.run import main

sys.exit(main())
