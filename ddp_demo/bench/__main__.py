import sys

from ddp_demo.bench.run import main

sys.exit(main())
